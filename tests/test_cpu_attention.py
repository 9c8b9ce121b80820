"""The CPU training attention kernel (hpllm/kernels/cpu_attention.py): output and gradients
against jax.grad of the reference attention in float64 on fresh random inputs with odd sizes
(grouped heads, windows, packed segments with padding, rows that see no key), its routing
from the model's attention, and refused operands."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.kernels import cpu_attention as ca
from hpllm.kernels.masking import reference_attention
from hpllm.model.attention import attention

BF16_EPS = 2.0 ** -8  # bf16 rounding: half an ulp of its 8-bit significand


def _kernel_built():
    """Skips where the kernel cannot be built here; fails where it should build but did not."""
    if shutil.which("g++") is None or not ca.native.enabled():
        pytest.skip("no g++ or HPLLM_CPU_KERNELS=0: the CPU kernels are off here")
    assert ca.available(), "g++ is present but the kernel did not build (see the warning)"


needs_native = pytest.mark.usefixtures("native")


@pytest.fixture(scope="module")
def native():
    _kernel_built()


def _inputs(rng, b, s, t, h, kv, d, segments: bool):
    q, k, v, do = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
                   for shape in [(b, s, h, d), (b, t, kv, d), (b, t, kv, d), (b, s, h, d)])
    q_pos = jnp.broadcast_to(jnp.arange(t - s, t, dtype=jnp.int32), (b, s))
    kv_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segments:  # packed documents, padding (0) between and at the end
        kv_seg = jnp.asarray(np.sort(rng.integers(1, 4, (b, t)), axis=1), jnp.int32)
        kv_seg = kv_seg.at[:, -3:].set(0).at[:, t // 3].set(0)
        q_seg = kv_seg[:, t - s:]
    else:
        kv_seg, q_seg = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32)
    return (q, k, v), do, (q_pos, kv_pos, q_seg, kv_seg)


def _value_and_grads(fn, qkv, do, masks, window, dtype):
    def loss(q, k, v):
        out = fn(q, k, v, *masks, window=window)
        return jnp.sum(out.astype(dtype) * do.astype(dtype)), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(*qkv)
    return out, grads


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _check_against_float64(qkv, do, masks, window, variant="native"):
    kernel = jax.jit(lambda qkv, do, masks: _value_and_grads(
        lambda *a, **kw: ca.attention(*a, variant=variant, **kw), qkv, do, masks, window,
        jnp.float32))
    out, grads = kernel(qkv, do, masks)
    with jax.enable_x64(True):
        want_out, want_grads = jax.jit(lambda qkv, do, masks: _value_and_grads(
            reference_attention, qkv, do, masks, window, jnp.float64))(
            [jnp.asarray(_f64(x)) for x in qkv], jnp.asarray(_f64(do)), masks)
        want_out, want_grads = np.asarray(want_out), [np.asarray(g) for g in want_grads]
    assert out.dtype == jnp.bfloat16 and out.shape == qkv[0].shape
    # Each result is float32 math rounded to bf16 once; the backward reads the bf16 output
    # (delta = dO . O), so its results carry a few roundings of the largest terms.
    for name, got, want, rounds in [("out", out, want_out, 2),
                                    *zip(("dq", "dk", "dv"), grads, want_grads, (4, 4, 4))]:
        assert got.dtype == jnp.bfloat16 and got.shape == want.shape, name
        err = np.max(np.abs(_f64(got) - want))
        assert err <= rounds * BF16_EPS * np.max(np.abs(want)) + 1e-6, (name, err)
    return out, grads


# (B, S, T, H, KV, D), window, packed segments: none a multiple of the 16-key chunks or the
# 4-row blocks; S < T (queries at the end, as a prefix-cached chunk); one KV head for all; MHA.
CASES = [((2, 37, 37, 6, 3, 20), None, False), ((3, 19, 45, 4, 1, 33), 7, True),
         ((1, 50, 50, 2, 2, 16), None, True)]


@needs_native
def test_kernel_matches_float64():
    rng = np.random.default_rng()  # fresh inputs each run
    for size, window, segments in CASES:
        qkv, do, masks = _inputs(rng, *size, segments)
        out, grads = _check_against_float64(qkv, do, masks, window)
        if segments:  # padding queries (segment 0) see nothing: zero output, zero dq
            pad = np.asarray(masks[2] == 0)
            assert pad.any() and np.all(_f64(out)[pad] == 0) and np.all(_f64(grads[0])[pad] == 0)


@pytest.mark.slow  # a second g++ build of the kernel
def test_portable_build_matches_float64():
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    rng = np.random.default_rng()
    size, window, segments = CASES[1]
    qkv, do, masks = _inputs(rng, *size, segments)
    _check_against_float64(qkv, do, masks, window, variant="portable")


@needs_native
def test_model_attention_routes_to_the_kernel_only_when_asked():
    rng = np.random.default_rng()
    qkv, _, masks = _inputs(rng, 2, 21, 21, 4, 2, 8, False)

    def hlo(*qkv):
        return jax.jit(lambda *a: attention(*a, *masks, impl="auto")).lower(*qkv).as_text()

    assert "hpllm_attention_fwd" not in hlo(*qkv)  # routing off
    with ca.routing():
        assert "hpllm_attention_fwd" in hlo(*qkv)
        assert "hpllm_attention_fwd" not in hlo(*(x.astype(jnp.float32) for x in qkv))
        grad = jax.jit(jax.grad(lambda q: attention(q, *qkv[1:], *masks).astype(
            jnp.float32).sum())).lower(qkv[0]).as_text()
        assert "hpllm_attention_bwd" in grad
        got = jax.jit(lambda *a: attention(*a, *masks))(*qkv)
    want = reference_attention(*qkv, *masks)
    err = np.max(np.abs(_f64(got) - _f64(want)))
    assert err <= 4 * BF16_EPS * np.max(np.abs(_f64(want))), err


def test_bad_operands_are_refused():
    q = jnp.zeros((2, 5, 4, 8), jnp.bfloat16)
    k = jnp.zeros((2, 5, 3, 8), jnp.bfloat16)
    pos = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ca.KernelError, match="bfloat16"):
        ca.attention(q.astype(jnp.float32), q, q, pos, pos, pos, pos)
    with pytest.raises(ca.KernelError, match="multiple"):
        ca.attention(q, k, k, pos, pos, pos, pos)
    with pytest.raises(ca.KernelError, match="k = v"):
        ca.attention(q, q, k, pos, pos, pos, pos)

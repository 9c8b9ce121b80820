"""The CPU training step's elementwise kernels (hpllm/kernels/cpu_elementwise.py): SwiGLU,
RMSNorm, RoPE and the softmax cross-entropy, values and gradients against float64 on fresh
random inputs with odd sizes, their routing from the model, and refused operands."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.kernels import cpu_elementwise as ce
from hpllm.model import layers

BF16_EPS = 2.0 ** -8  # bf16 rounding: half an ulp of its 8-bit significand


@pytest.fixture(scope="module")
def native():
    if shutil.which("g++") is None or not ce.native.enabled():
        pytest.skip("no g++ or HPLLM_CPU_KERNELS=0: the CPU kernels are off here")
    assert ce.available(), "g++ is present but the kernels did not build (see the warning)"


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _bf16(rng, shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.bfloat16)


def _cases(rng):
    """(name, kernel fn, float64 fn, differentiated inputs, other inputs, cotangent)."""
    x = _bf16(rng, (3, 37, 45), 2.0)
    w = _bf16(rng, (45,))
    q = _bf16(rng, (3, 7, 5, 34))
    angles = np.concatenate([rng.standard_normal((3, 7, 17))] * 2, axis=-1)
    cos, sin = (jnp.asarray(f(angles), jnp.float32) for f in (np.cos, np.sin))
    logits = jnp.asarray(rng.standard_normal((5, 9, 203)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 203, (5, 9)), jnp.int32)

    def norm64(x, w):
        return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5) * w

    def rope64(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos[..., None, :] + rotated * sin[..., None, :]

    def nll64(logits):
        return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, targets[..., None], -1)[..., 0]

    return [
        ("swiglu", ce.swiglu, lambda g, u: g * jax.nn.sigmoid(g) * u,
         (_bf16(rng, x.shape, 3.0), x), (), _bf16(rng, x.shape)),
        ("rms_norm", lambda x, w, **kw: ce.rms_norm(x, w, 1e-5, **kw), norm64, (x, w), (),
         _bf16(rng, x.shape)),
        ("rope", ce.rope, rope64, (q,), (cos, sin), _bf16(rng, q.shape)),
        ("softmax_nll", lambda l, **kw: ce.softmax_nll(l, targets, **kw), nll64, (logits,), (),
         jnp.asarray(rng.standard_normal(targets.shape), jnp.float32)),
    ]


def _check(variant: str, seed: int):
    for name, kernel, ref, diff, other, cot in _cases(np.random.default_rng(seed)):
        n = len(diff)
        fn = jax.jit(lambda *a: jax.vjp(lambda *d: kernel(*d, *a[n:], variant=variant),
                                        *a[:n]))
        out, vjp = fn(*diff, *other)
        grads = vjp(cot)
        with jax.enable_x64(True):
            want, want_grads = jax.jit(lambda *a: (lambda o, vjp: (o, vjp(a[-1])))(
                *jax.vjp(lambda *d: ref(*d, *a[n:-1]), *a[:n])))(
                *(jnp.asarray(_f64(a)) for a in (*diff, *other, cot)))
            want, want_grads = np.asarray(want), [np.asarray(g) for g in want_grads]
        # bf16 results: float32 math rounded once (a few roundings for the gradients, whose
        # inputs are bf16 themselves); the loss stays float32
        tol = 1e-5 if name == "softmax_nll" else BF16_EPS
        for label, got, expect, rounds in [("out", out, want, 1.01),
                                           *((f"d{i}", g, e, 2) for i, (g, e) in
                                             enumerate(zip(grads, want_grads)))]:
            assert got.shape == expect.shape and got.dtype == diff[0].dtype, (name, label)
            err = np.max(np.abs(_f64(got) - expect)) / np.max(np.abs(expect))
            assert err <= rounds * tol, (name, label, err)


def test_kernels_match_float64(native):
    _check("native", seed=0)


@pytest.mark.slow  # a second build of the kernels (~10 s of g++)
def test_portable_build_matches_float64(native):
    _check("portable", seed=1)


def test_model_routes_to_the_kernels_only_when_asked(native):
    rng = np.random.default_rng(2)
    x, w = _bf16(rng, (2, 9, 24)), _bf16(rng, (24,))
    gate, up, down = _bf16(rng, (24, 40)), _bf16(rng, (24, 40)), _bf16(rng, (40, 24))
    q = _bf16(rng, (2, 9, 3, 8))
    cos, sin = layers.rope_angles(jnp.broadcast_to(jnp.arange(9), (2, 9)), 8, 1e4)

    def block(x, w, q):
        h = layers.rms_norm(x, w, 1e-5)
        return layers.swiglu(h, gate, up, down).sum() + layers.apply_rope(q, cos, sin).sum()

    def text(routed: bool):
        with ce.routing(routed):
            return jax.jit(jax.value_and_grad(block, argnums=(0, 1, 2))).lower(x, w, q).as_text()

    on, off = text(True), text(False)
    for target in ("rms_norm", "swiglu", "rope"):
        assert f"hpllm_{target}_fwd" in on and f"hpllm_{target}_bwd" in on, target
        assert f"hpllm_{target}" not in off, target
    with ce.routing():  # float32 activations (a float32 step) keep XLA's ops
        x32 = x.astype(jnp.float32)
        assert "hpllm_" not in jax.jit(lambda x: layers.rms_norm(x, x[0, 0], 1e-5)).lower(
            x32).as_text()


def test_bad_operands_are_refused():
    x = jnp.ones((4, 6), jnp.bfloat16)
    with pytest.raises(ce.KernelError, match="swiglu needs bf16 g and u of one shape"):
        ce.swiglu(x, x[:, :5])
    with pytest.raises(ce.KernelError, match="rms_norm needs bf16"):
        ce.rms_norm(x, jnp.ones(5, jnp.bfloat16), 1e-5)
    with pytest.raises(ce.KernelError, match="rope needs bf16 x"):
        ce.rope(jnp.ones((2, 3, 5), jnp.bfloat16), jnp.ones((2, 5)), jnp.ones((2, 5)))
    with pytest.raises(ce.KernelError, match="softmax_nll needs float32 logits"):
        ce.softmax_nll(x, jnp.zeros(4, jnp.int32))

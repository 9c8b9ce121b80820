"""The CPU bf16 matmul kernel (hpllm/kernels/cpu_matmul.py) against float64 NumPy on odd
sizes, its gradients against XLA's, the einsum routing of the model's projections, and a
training loss through it against the float64 reference model."""

import importlib.util
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.config import make_config
from hpllm.kernels import cpu_attention, cpu_elementwise
from hpllm.kernels import cpu_matmul as cm
from hpllm.model.transformer import init_params
from hpllm.train.data import random_batch
from hpllm.train.step import loss_fn

EPS32 = float(np.finfo(np.float32).eps)
BF16_EPS = 2.0 ** -8  # bf16 rounding: half an ulp of its 8-bit significand


@pytest.fixture(scope="module")
def native():
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: the CPU kernels cannot be built here")
    if not cm.native.enabled():
        pytest.skip("HPLLM_CPU_KERNELS=0 disables the native CPU kernels")
    assert cm.available(), "g++ is present but the kernel did not build (see the warning)"


needs_native = pytest.mark.usefixtures("native")


def _bf16(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _check(got, a, b, trans_a, trans_b, out_dtype):
    """Within float32 accumulation (K terms) of sum |a||b| per element, plus the output's
    rounding when it is bf16."""
    a64, b64 = _f64(a), _f64(b)
    a64, b64 = (a64.T if trans_a else a64), (b64.T if trans_b else b64)
    want, scale = a64 @ b64, np.abs(a64) @ np.abs(b64)
    k = a64.shape[1]
    tol = k * EPS32 * scale + (BF16_EPS * np.abs(want) if out_dtype == jnp.bfloat16 else 0)
    got = _f64(got)
    assert got.shape == want.shape and got.dtype == np.float64
    assert np.all(np.abs(got - want) <= tol + 1e-30), float(np.max(np.abs(got - want) - tol))


# M, K, N: none a multiple of the 6 x 64 tile; K odd (a zero-padded pair), K > 2 blocks of
# 256 pairs, N past one panel; M below one tile.
SIZES = [(37, 53, 70), (97, 1031, 130), (5, 8, 3)]


@needs_native
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True),
                                             (True, True)])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_float64(trans_a, trans_b, out_dtype):
    rng = np.random.default_rng()  # fresh inputs each run
    for m, k, n in SIZES:
        a = _bf16(rng, (k, m) if trans_a else (m, k))
        b = _bf16(rng, (n, k) if trans_b else (k, n))
        got = cm.matmul(a, b, trans_a=trans_a, trans_b=trans_b, out_dtype=out_dtype)
        assert got.dtype == out_dtype
        _check(got, a, b, trans_a, trans_b, out_dtype)


@pytest.mark.slow  # a second g++ build of the kernel (~5 s idle, half a minute loaded)
def test_portable_build_matches_float64():
    """The scalar fallback (built without AVX-512), on the hardest shape in both layouts."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    rng = np.random.default_rng()
    m, k, n = SIZES[1]
    for trans_a, trans_b in [(False, True), (True, False)]:
        a = _bf16(rng, (k, m) if trans_a else (m, k))
        b = _bf16(rng, (n, k) if trans_b else (k, n))
        got = cm.matmul(a, b, trans_a=trans_a, trans_b=trans_b, out_dtype=jnp.float32,
                        variant="portable")
        _check(got, a, b, trans_a, trans_b, jnp.float32)


@needs_native
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_gradients_match_xla(layout):
    rng = np.random.default_rng()
    (m, k, n) = (3, 97, 43)
    x = _bf16(rng, (m, 5, k))  # leading axes fold into rows
    w = _bf16(rng, (k, n) if layout == "kn" else (n, k))
    r = jnp.asarray(rng.standard_normal((m, 5, n)), jnp.float32)
    eq = "bsk,kn->bsn" if layout == "kn" else "bsk,nk->bsn"

    def kernel_loss(x, w):
        return (cm.project_bf16(x, w, layout, jnp.float32) * r).sum()

    def xla_loss(x, w):
        return (jnp.einsum(eq, x, w, preferred_element_type=jnp.float32) * r).sum()

    (lk, gk), (lx, gx) = [jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)
                          for f in (kernel_loss, xla_loss)]
    assert float(lk) == pytest.approx(float(lx), rel=1e-5)
    for got, want in zip(gk, gx):
        assert got.dtype == jnp.bfloat16 and got.shape == want.shape
        err = np.max(np.abs(_f64(got) - _f64(want))) / np.max(np.abs(_f64(want)))
        assert err < 2 * BF16_EPS, err  # both round the same f32 sums to bf16


@needs_native
def test_model_equations_route_to_the_kernel_only_when_asked():
    rng = np.random.default_rng()
    x = _bf16(rng, (4, 70, 32))  # 280 rows >= MIN_ROWS
    cases = [("bsd,dhk->bshk", (32, 3, 5)), ("bsd,df->bsf", (32, 45)),
             ("...d,vd->...v", (37, 32)), ("...d,dv->...v", (32, 37))]
    for eq, shape in cases:
        w = _bf16(rng, shape)
        assert cm.bf16_project(x, w, eq) is None  # routing is off outside `routing()`
        with cm.routing():
            fn = jax.jit(lambda x, w, eq=eq: cm.bf16_project(x, w, eq))
            got = fn(x, w)
            hlo = fn.lower(x, w).as_text()
        assert "hpllm_bf16_matmul" in hlo, eq
        want = jnp.einsum(eq, x, w, preferred_element_type=jnp.float32)
        assert got.shape == want.shape and got.dtype == jnp.bfloat16
        err = np.max(np.abs(_f64(got) - _f64(want))) / np.max(np.abs(_f64(want)))
        assert err < 2 * BF16_EPS, (eq, err)
    with cm.routing():  # not a projection, too few rows, float32: the caller's einsum
        w = _bf16(rng, (32, 45))
        assert cm.bf16_project(x, w, "bsd,df->bfs") is None
        assert cm.bf16_project(x[:, :10], w, "bsd,df->bsf") is None
        assert cm.bf16_project(x.astype(jnp.float32), w.astype(jnp.float32),
                               "bsd,df->bsf") is None


def test_bad_operands_are_refused():
    a = jnp.zeros((4, 6), jnp.bfloat16)
    with pytest.raises(cm.KernelError, match="bfloat16"):
        cm.matmul(a.astype(jnp.float32), a.T)
    with pytest.raises(cm.KernelError, match="contraction"):
        cm.matmul(a, a)
    with pytest.raises(cm.KernelError, match="out_dtype"):
        cm.matmul(a, a.T, out_dtype=jnp.float16)


_spec = importlib.util.spec_from_file_location(
    "hpllm_tests_reference_model", pathlib.Path(__file__).with_name("reference_model.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


@needs_native
def test_training_loss_through_the_kernels_matches_float64_reference():
    """The bf16 training loss with every projection on the kernel (tied head included),
    attention on hpllm/kernels/cpu_attention.py and SwiGLU, RMSNorm, RoPE and the loss on
    hpllm/kernels/cpu_elementwise.py equals the float64 reference model's on the
    same weights within bf16 tolerance, with finite gradients for every parameter (their
    values: test_gradients_match_xla, tests/test_cpu_attention.py)."""
    config = make_config("tiny", ["--compute_dtype=bfloat16", "--seq_len=40", "--batch_size=7"])
    params = init_params(config.model, jax.random.key(1))
    params = jax.tree.map(lambda p: p * 25.0 if p.ndim == 3 else p, params)  # not near-uniform
    batch = random_batch(config, 3)

    def loss(p):
        with cm.routing(), cpu_attention.routing(), cpu_elementwise.routing():
            return loss_fn(p, batch, config)[0]

    routed = jax.jit(jax.value_and_grad(loss)).lower(params)
    assert "hpllm_bf16_matmul" in routed.as_text()
    assert cpu_attention.available() and "hpllm_attention_bwd" in routed.as_text()
    assert cpu_elementwise.available()
    for kind in ("swiglu", "rms_norm", "rope", "nll"):
        assert f"hpllm_{kind}_bwd" in routed.as_text(), kind
    lk, grads = routed.compile()(params)
    logits = ref.forward(ref.to_numpy64(params), np.asarray(batch["tokens"]),
                         np.asarray(batch["positions"]), config.model,
                         np.asarray(batch["segment_ids"]))
    want = ref.masked_mean_xent(logits, batch["targets"], batch["loss_mask"])
    assert float(lk) == pytest.approx(want, rel=2e-2)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0, \
            jax.tree_util.keystr(path)

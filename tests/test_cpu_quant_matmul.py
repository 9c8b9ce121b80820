"""The CPU quantized-matmul kernels (hpllm/kernels/cpu_quant_matmul.py) against float64 NumPy
on the dequantized weights, and the model's dispatch to them (hpllm.quantized)."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm import quantized as qt
from hpllm.compress import quantize as qz
from hpllm.config import make_config
from hpllm.kernels import cpu_quant_matmul as cq
from hpllm.model.transformer import forward, init_params, unstack_layers

EPS32 = float(np.finfo(np.float32).eps)


def _skip_without_gpp():
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: the CPU kernels cannot be built here")


@pytest.fixture(scope="module")
def native():
    """The native kernels, built and registered; only the tests that call them ask for it
    (the checks of bad input, of the XLA fallback and of the portable build run anyway)."""
    _skip_without_gpp()
    if not cq.enabled():
        pytest.skip(f"{cq.ENV_SWITCH}=0 disables the native CPU kernels")
    assert cq.available(), "g++ is present but the kernels did not build (see the warning)"


needs_native = pytest.mark.usefixtures("native")


def _int8_weight(rng, n, k):
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    return q, rng.uniform(0.01, 2.0, n).astype(np.float32)


def _int4_weight(rng, n, k, group_size):
    """(packed, scale, dense float64 (n, k)), packed in NumPy as the layout says: K padded to
    whole groups, code + 8 in a nibble, even k in the low one; padding codes are random (the
    kernel must not read them)."""
    kp = -(-k // group_size) * group_size
    codes = rng.integers(-8, 8, (n, kp))
    scale = rng.uniform(0.01, 2.0, (n, kp // group_size)).astype(np.float32)
    u = (codes + 8).astype(np.uint8)
    packed = u[:, 0::2] | (u[:, 1::2] << 4)
    dense = codes * np.repeat(scale.astype(np.float64), group_size, axis=1)
    return jnp.asarray(packed), jnp.asarray(scale), dense[:, :k]


def _assert_close_to_float64(got, x, w, terms):
    """|got - x @ w.T| within float32 accumulation of `terms` roundings of sum |x| |w|."""
    x = np.asarray(x, np.float64).reshape(-1, w.shape[1])
    want = x @ w.T
    bound = (terms + 2) * EPS32 * (np.abs(x) @ np.abs(w).T) + 1e-30
    err = np.abs(np.asarray(got, np.float64).reshape(want.shape) - want)
    assert np.all(err <= bound), f"max error / bound {float(np.max(err / bound)):.3g}"


# ------------------------------------------- gemm.h's matmul_block through its C entry

def _gemm_weight(fmt, rng, n, k, group_size):
    """(weight array as gemm.h reads it, scale or None, dense float64 (n, k))."""
    if fmt == "f32":
        w = rng.standard_normal((n, k)).astype(np.float32)
        return w, None, w.astype(np.float64)
    if fmt == "int8":
        q, s = _int8_weight(rng, n, k)
        return q, s, q * s[:, None].astype(np.float64)
    packed, scale, dense = _int4_weight(rng, n, k, group_size)
    return np.asarray(packed), np.asarray(scale), dense


def _quantized_x(x, block=64):
    """prepare_x's arithmetic in NumPy (block=8: the int4 x int8 path's): per row, blocks of
    `block` k, d = max|x| / 127 and codes rint(x * (127 / max|x|)) in float32, clipped to
    +-127; returns (codes * d, d per k)."""
    m, k = x.shape
    nb = -(-k // block)
    xp = np.zeros((m, nb * block), np.float32)
    xp[:, :k] = x
    blocks = xp.reshape(m, nb, block)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    codes = np.clip(np.rint(blocks * inv), -127, 127)
    d = (amax / np.float32(127)).astype(np.float32).astype(np.float64)
    deq = (codes * d).reshape(m, -1)[:, :k]
    return deq, np.broadcast_to(d, blocks.shape).reshape(m, -1)[:, :k]


def _x16(x):
    """The int8 x int16 path's x in NumPy: per row d = max|x| / 32767 and codes
    rint(clip(x * (32767 / max|x|))) in float32; returns codes * d (float64)."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(32767) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    codes = np.rint(np.clip(x * inv, -32767, 32767))
    return codes * (amax / np.float32(32767)).astype(np.float32).astype(np.float64)


def _kernel_x(kind, x, group_size=0, variant="native"):
    """The x (float64 (M, K)) gemm.h multiplies in one call of M = the rows of x: x itself, or
    its quantized twin where gemm.h takes an integer path (int8 from a few rows of x, int4 up to
    some rows; cq.int8_x16_min_rows, cq.int4_x8_max_rows say where)."""
    x = np.asarray(x, np.float32)
    x = x.reshape(-1, x.shape[-1])
    m = x.shape[0]
    if kind == "int8" and 0 < cq.int8_x16_min_rows(variant) <= m:
        return _x16(x)
    if kind == "int4" and m <= cq.int4_x8_max_rows(group_size, variant):
        return _quantized_x(x, 8)[0]
    return x.astype(np.float64)


# (n, k, group size): k below one vector, odd k, k not a multiple of 16 / 64, groups that do
# not divide 16 (6), a last group cut short by k (577 = 9 * 64 + 1), several 1536-long rows.
GEMM_SHAPES = [(5, 1, 2), (37, 7, 2), (9, 33, 6), (21, 96, 32), (130, 577, 64), (23, 1536, 64)]


@pytest.mark.parametrize("variant", ["native", "portable"])
@pytest.mark.parametrize("fmt", ["f32", "int8", "int4", "int8-prepared"])
def test_matmul_block_matches_float64(fmt, variant):
    """Every M tile remainder (1, 3, 17, 64, 65, 200 rows), strided x and y, a sub-range
    [n0, n1) of the rows (the others untouched) and accumulate=True, against float64.
    Tolerance: float32 summation, eps (2 sqrt(k) + 8) sum |x| |w| (+ |y| when accumulating)."""
    if variant == "portable" and os.uname().machine not in ("x86_64", "AMD64"):
        pytest.skip("the portable variant targets x86-64")
    _skip_without_gpp()
    prepared = fmt.endswith("-prepared")
    kind = fmt.removesuffix("-prepared")
    rng = np.random.default_rng(sum(map(ord, fmt + variant)))
    for m in (1, 3, 17, 64, 65, 200):
        for n, k, g in GEMM_SHAPES:
            w, scale, dense = _gemm_weight(kind, rng, n, k, g)
            x = rng.standard_normal((m, k + 3)).astype(np.float32)[:, :k]  # ldx = k + 3
            y = rng.standard_normal((m, n + 2)).astype(np.float32)
            y0 = y.copy()
            n0, n1 = (n // 3, n - 1) if n > 3 else (0, n)
            accumulate = (m + n) % 2 == 1
            cq.matmul_block(kind, x, w, scale, k, g, n0, n1, y, accumulate, variant=variant,
                            prepared=prepared)
            # the integer paths multiply the quantized x exactly
            x64 = _quantized_x(x)[0] if prepared else _kernel_x(kind, x, g, variant)
            want = y0.astype(np.float64)
            want[:, n0:n1] = want[:, n0:n1] * accumulate + x64 @ dense[n0:n1].T
            bound = EPS32 * (2 * np.sqrt(k) + 8) * (
                np.abs(x64) @ np.abs(dense[n0:n1]).T + accumulate * np.abs(y0[:, n0:n1]))
            np.testing.assert_array_equal(y[:, :n0], y0[:, :n0])
            np.testing.assert_array_equal(y[:, n1:], y0[:, n1:])
            err = np.abs(y[:, n0:n1] - want[:, n0:n1])
            assert np.all(err <= bound), (m, n, k, g, float(np.max(err / bound)))


@needs_native
def test_prepared_path_error_is_the_per_block_rounding_of_x():
    """The int8 x int8 result against the exact product: within half a quantization step of
    each 64-block of x times that block's |w| (and that bound is not vacuous)."""
    rng = np.random.default_rng(21)
    m, n, k = 5, 33, 577
    x = rng.standard_normal((m, k)).astype(np.float32) * np.exp(rng.standard_normal(k))
    x = x.astype(np.float32)
    q, s = _int8_weight(rng, n, k)
    dense = q * s[:, None].astype(np.float64)
    y = np.zeros((m, n), np.float32)
    cq.matmul_block("int8", x, q, s, k, 0, 0, n, y, False, prepared=True)
    exact = x.astype(np.float64) @ dense.T
    _, d = _quantized_x(x)
    bound = (0.5 * d * 1.0001) @ np.abs(dense).T + 1e-5 * np.abs(x) @ np.abs(dense).T
    err = np.abs(y - exact)
    assert np.all(err <= bound)
    assert np.max(err) > 1e-3 * np.max(np.abs(exact))  # x really was quantized


@pytest.mark.parametrize("variant", ["native", "portable"])
def test_integer_paths_error_is_the_rounding_of_x(variant):
    """int8 weights from a few rows of x (x at 15 bits per row, int32 sums flushed every 4096 k)
    and int4 weights up to some rows (x at 8 bits per 8 k), against the exact product of the
    unquantized x: within half a quantization step of x times |w| (+ float32 rounding), and
    that bound is not vacuous. Shapes: K tails, one short block, K past the int32 flush, group
    sizes below, equal to and above the 128-k block, a worst case for the int32 sums."""
    if variant == "portable" and os.uname().machine not in ("x86_64", "AMD64"):
        pytest.skip("the portable variant targets x86-64")
    _skip_without_gpp()
    rng = np.random.default_rng(23)
    i16_rows = cq.int8_x16_min_rows(variant)
    cases = [("int8", m, n, k, 0) for m, n, k in ((i16_rows, 7, 4099), (i16_rows + 5, 33, 577),
                                                 (40, 12, 31))] if i16_rows else []
    for g, k in ((8, 33), (16, 200), (32, 129), (64, 577), (128, 300), (256, 300)):
        for m in sorted({1, 2, cq.int4_x8_max_rows(g, variant)} - {0}):
            cases.append(("int4", m, 11, k, g))
    assert any(c[0] == "int4" for c in cases)
    for kind, m, n, k, g in cases:
        x = (rng.standard_normal((m, k)) * np.exp(rng.standard_normal(k))).astype(np.float32)
        w, scale, dense = _gemm_weight(kind, rng, n, k, g)
        y = np.zeros((m, n), np.float32)
        cq.matmul_block(kind, x, w, scale, k, g, 0, n, y, False, variant=variant)
        x_seen = _kernel_x(kind, x, g, variant)
        step = np.abs(x_seen - x).max()  # <= half a step of each row / block
        assert step > 0, (kind, m, k, g)  # x really was quantized
        exact = x.astype(np.float64) @ dense.T
        bound = np.abs(x_seen - x) @ np.abs(dense).T + EPS32 * (2 * np.sqrt(k) + 8) * (
            np.abs(x_seen) @ np.abs(dense).T)
        err = np.abs(y - exact)
        assert np.all(err <= bound), (kind, m, k, g, float(np.max(err / bound)))
        assert np.max(err) > 1e-7 * np.max(np.abs(exact)), (kind, m, k, g)
    if i16_rows:  # int32 sums at their largest: x at +-32767, every code -128, K = 2 flushes
        k = 2 * 4096 + 3
        x = np.ones((i16_rows, k), np.float32)
        x[1] = -1
        q = np.full((3, k), -128, np.int8)
        y = np.zeros((i16_rows, 3), np.float32)
        cq.matmul_block("int8", x, q, np.ones(3, np.float32), k, 0, 0, 3, y, False,
                        variant=variant)
        want = np.where(np.arange(i16_rows)[:, None] == 1, 128.0 * k, -128.0 * k)
        np.testing.assert_allclose(y, np.broadcast_to(want, y.shape), rtol=1e-6)


@needs_native
@pytest.mark.parametrize("m", [1, 65, 200])
def test_ffi_kernels_at_any_rows(m):
    """int8 (both paths), int4 and f32 through XLA's FFI at decode and prefill widths, the
    rows split over the pool (the 49-row tied-head-like matrix: thousands of rows)."""
    rng = np.random.default_rng(30 + m)
    n, k = 2051, 131
    x = rng.standard_normal((m, k)).astype(np.float32)
    q, s = _int8_weight(rng, n, k)
    packed, scale, dense4 = _int4_weight(rng, n, k, 64)
    w = rng.standard_normal((n, k)).astype(np.float32)
    xj = jnp.asarray(x)
    _assert_close_to_float64(cq.int8_matmul(xj, jnp.asarray(q), jnp.asarray(s), prepared=False),
                             _kernel_x("int8", x), q * s[:, None].astype(np.float64), k)
    _assert_close_to_float64(cq.int4_matmul(xj, packed, scale, k, 64), _kernel_x("int4", x, 64),
                             dense4, k + 8)
    _assert_close_to_float64(cq.f32_matmul(xj, jnp.asarray(w)), x, w.astype(np.float64), k)
    if cq.prepared_supported():
        got = np.asarray(cq.int8_matmul(xj, jnp.asarray(q), jnp.asarray(s), prepared=True))
        want = np.zeros_like(got)
        cq.matmul_block("int8", x, q, s, k, 0, 0, n, want, False, prepared=True)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@needs_native
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n", [1, 5, 130])
@pytest.mark.parametrize("k", [1, 7, 33, 577])
def test_int8_kernel_matches_float64(m, n, k):
    rng = np.random.default_rng(1000 * m + 10 * n + k)
    q, s = _int8_weight(rng, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    got = cq.int8_matmul(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s))
    assert got.shape == (m, n) and got.dtype == jnp.float32
    _assert_close_to_float64(got, _kernel_x("int8", x), q.astype(np.float64) * s[:, None], k)


@needs_native
@pytest.mark.parametrize("group_size", [2, 6, 32, 64, 128])
@pytest.mark.parametrize("k", [1, 7, 33, 577])
def test_int4_kernel_matches_float64(k, group_size):
    rng = np.random.default_rng(7 * k + group_size)
    for m in (1, 3, 17):
        for n in (1, 5, 130):
            packed, scale, dense = _int4_weight(rng, n, k, group_size)
            x = rng.standard_normal((m, k)).astype(np.float32)
            got = cq.int4_matmul(jnp.asarray(x), packed, scale, k, group_size)
            assert got.shape == (m, n)
            _assert_close_to_float64(got, _kernel_x("int4", x, group_size), dense,
                                     k + k // group_size + 2)


@needs_native
def test_leading_batch_dims_and_bfloat16_x():
    rng = np.random.default_rng(3)
    q, s = _int8_weight(rng, 37, 65)
    packed, scale, dense4 = _int4_weight(rng, 37, 65, 32)
    x = rng.standard_normal((2, 3, 65)).astype(np.float32)
    y8 = cq.int8_matmul(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s))
    y4 = cq.int4_matmul(jnp.asarray(x), packed, scale, 65, 32)
    assert y8.shape == y4.shape == (2, 3, 37)
    # the shared weight folds the batch into M = 6 rows of x
    _assert_close_to_float64(y8, _kernel_x("int8", x), q * s[:, None].astype(np.float64), 65)
    _assert_close_to_float64(y4, _kernel_x("int4", x, 32), dense4, 70)
    # bfloat16 activations: computed in float32 from the bf16 values, returned as bf16
    xb = jnp.asarray(x, jnp.bfloat16)
    for kind, got, w in (("int8", cq.int8_matmul(xb, jnp.asarray(q), jnp.asarray(s)),
                          q * s[:, None]),
                         ("int4", cq.int4_matmul(xb, packed, scale, 65, 32), dense4)):
        assert got.dtype == jnp.bfloat16
        want = _kernel_x(kind, np.asarray(xb, np.float32), 32) @ np.asarray(w, np.float64).T
        want_bf16 = np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16), np.float64)
        # the float32 result rounds to bf16 once: at most one bf16 ulp from rounding want
        ulp = 2.0 ** (np.floor(np.log2(np.abs(want_bf16) + 1e-30)) - 7)
        assert np.all(np.abs(np.asarray(got, np.float64).reshape(want.shape) - want_bf16)
                      <= ulp + 1e-6)


@needs_native
def test_inside_jit_and_scan_over_stacked_weights():
    rng = np.random.default_rng(4)
    layers, d = 4, 48
    w = rng.standard_normal((layers, d, d)).astype(np.float32) / np.sqrt(d)
    w8 = qt.quantize(jnp.asarray(w), "int8", (1,), trailing=2)  # (L, N, K) codes
    w4 = qt.quantize(jnp.asarray(w), "int4", (1,), group_size=32, trailing=2)
    x = rng.standard_normal((3, d)).astype(np.float32)

    def run(kind, qw):
        def layer(h, lw):
            if kind == "int8":
                y = cq.int8_matmul(h, lw.q, lw.scale)
            else:
                y = cq.int4_matmul(h, lw.q, lw.scale, d, 32)
            return jnp.tanh(y), None
        return jax.jit(lambda x, qw: jax.lax.scan(layer, x, qw)[0])(jnp.asarray(x), qw)

    for kind, qw in (("int8", w8), ("int4", w4)):
        dense = np.asarray(qt.dequantize(qw), np.float64)  # (L, N, K)
        want = x.astype(np.float64)
        for i in range(layers):  # each layer multiplies the x its kernel call sees
            want = np.tanh(_kernel_x(kind, want, 32) @ dense[i].T)
        np.testing.assert_allclose(np.asarray(run(kind, qw)), want, rtol=2e-5, atol=2e-6)


@needs_native
def test_vmap_over_x_weights_and_both():
    rng = np.random.default_rng(5)
    b, m, n, k = 3, 2, 9, 40
    qs = rng.integers(-127, 128, (b, n, k)).astype(np.int8)
    ss = rng.uniform(0.5, 1.5, (b, n)).astype(np.float32)
    xs = rng.standard_normal((b, m, k)).astype(np.float32)
    wq = qs.astype(np.float64) * ss[..., None]
    f = cq.int8_matmul
    cases = {  # in_axes of (x, q, scale) -> the float64 answer (a shared weight: M = b m)
        (0, None, None): np.einsum("bmk,nk->bmn", _kernel_x("int8", xs).reshape(xs.shape),
                                   wq[0]),
        (None, 0, 0): np.einsum("mk,bnk->bmn", xs[0], wq),
        (0, 0, 0): np.einsum("bmk,bnk->bmn", xs, wq),
    }
    for axes, want in cases.items():
        args = [a if ax == 0 else a[0] for a, ax in zip((xs, qs, ss), axes)]
        vf = jax.jit(jax.vmap(f, in_axes=axes))
        np.testing.assert_allclose(np.asarray(vf(*map(jnp.asarray, args))), want, rtol=1e-5,
                                   atol=1e-4)
        hlo = vf.lower(*map(jnp.asarray, args)).as_text()
        assert hlo.count("hpllm_int8_matmul") == 1, "vmap should batch the call, not loop it"
    # nested vmap: x over one axis, weights over another (broadcast inside the kernel)
    g = jax.vmap(jax.vmap(f, in_axes=(None, 0, 0)), in_axes=(0, None, None))
    want = np.einsum("amk,bnk->abmn", xs, wq)
    np.testing.assert_allclose(np.asarray(jax.jit(g)(*map(jnp.asarray, (xs, qs, ss)))), want,
                               rtol=1e-5, atol=1e-4)
    # int4 under vmap over x (groups of 8), and over x and stacked weights (groups of 32,
    # where the kernel reorders x in blocks of 32)
    packed, scale, dense = _int4_weight(rng, n, k, 8)
    got = jax.vmap(lambda x: cq.int4_matmul(x, packed, scale, k, 8))(jnp.asarray(xs))
    np.testing.assert_allclose(np.asarray(got), np.einsum(
        "bmk,nk->bmn", _kernel_x("int4", xs, 8).reshape(xs.shape), dense), rtol=1e-5, atol=1e-4)
    stacked = [_int4_weight(rng, n, k, 32) for _ in range(b)]
    got = jax.vmap(lambda x, p, s: cq.int4_matmul(x, p, s, k, 32))(
        jnp.asarray(xs), jnp.stack([w[0] for w in stacked]), jnp.stack([w[1] for w in stacked]))
    x_seen = np.stack([_kernel_x("int4", x, 32) for x in xs])  # per weight: M = m rows
    want = np.einsum("bmk,bnk->bmn", x_seen, np.stack([w[2] for w in stacked]))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


@needs_native
def test_concurrent_calls_from_several_threads():
    """Calls big enough to split over the pool, issued at once from 4 Python threads: each
    result is right (the pool is busy with the others' chunks and tasks start late)."""
    import threading

    rng = np.random.default_rng(9)
    q, s = _int8_weight(rng, 4096, 96)
    f = jax.jit(lambda x: cq.int8_matmul(x, jnp.asarray(q), jnp.asarray(s)))
    xs = [rng.standard_normal((m, 96)).astype(np.float32) for m in (1, 5, 9)]
    wants = [x.astype(np.float64) @ (q * s[:, None].astype(np.float64)).T for x in xs]
    errors = []

    def work(t):
        for i in range(12):
            j = (t + i) % len(xs)
            err = np.abs(np.asarray(f(jnp.asarray(xs[j]))) - wants[j]).max()
            if not err <= 1e-4 * np.abs(wants[j]).max():
                errors.append((t, i, err))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@needs_native
def test_gradients_match_the_float_reference():
    rng = np.random.default_rng(6)
    m, n, k = 3, 11, 70
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    cot = rng.standard_normal((m, n))
    q, s = _int8_weight(rng, n, k)
    packed, scale, dense4 = _int4_weight(rng, n, k, 32)
    for fn, dense in ((lambda x: cq.int8_matmul(x, jnp.asarray(q), jnp.asarray(s)),
                       q.astype(np.float64) * s[:, None]),
                      (lambda x: cq.int4_matmul(x, packed, scale, k, 32), dense4)):
        dx = jax.grad(lambda x: jnp.sum(fn(x) * cot))(x)
        np.testing.assert_allclose(np.asarray(dx), cot @ dense, rtol=1e-5, atol=1e-5)
    # the scales get the reference's gradient; the codes none
    ds = jax.grad(lambda s: jnp.sum(cq.int8_matmul(x, jnp.asarray(q), s) * cot))(jnp.asarray(s))
    want = np.einsum("mn,mk,nk->n", cot, np.asarray(x, np.float64), q.astype(np.float64))
    np.testing.assert_allclose(np.asarray(ds), want, rtol=1e-5, atol=1e-4)
    ds4 = jax.grad(lambda s: jnp.sum(cq.int4_matmul(x, packed, s, k, 32) * cot))(scale)
    ref = jax.grad(lambda s: jnp.sum(cq.int4_matmul_reference(x, packed, s, 32) * cot))(scale)
    np.testing.assert_allclose(np.asarray(ds4), np.asarray(ref), rtol=1e-5, atol=1e-4)


def test_bad_inputs_are_refused_with_a_reason():
    q = jnp.zeros((4, 6), jnp.int8)
    s = jnp.ones((4,), jnp.float32)
    with pytest.raises(cq.KernelError, match="end in the weight's K = 6"):
        cq.int8_matmul(jnp.ones((2, 5)), q, s)
    with pytest.raises(cq.KernelError, match="int8 \\(N, K\\)"):
        cq.int8_matmul(jnp.ones((2, 6)), q.astype(jnp.int32), s)
    with pytest.raises(cq.KernelError, match="one value per row"):
        cq.int8_matmul(jnp.ones((2, 6)), q, jnp.ones((3,)))
    with pytest.raises(cq.KernelError, match="floating point"):
        cq.int8_matmul(jnp.ones((2, 6), jnp.int32), q, s)
    packed = jnp.zeros((4, 8), jnp.uint8)  # Kp = 16
    with pytest.raises(cq.KernelError, match="group size must be even"):
        cq.int4_matmul(jnp.ones((1, 16)), packed, jnp.ones((4, 2)), 16, 7)
    with pytest.raises(cq.KernelError, match="does not fit packed"):
        cq.int4_matmul(jnp.ones((1, 16)), packed, jnp.ones((4, 3)), 16, 8)
    with pytest.raises(cq.KernelError, match="k = 7 does not fit"):
        cq.int4_matmul(jnp.ones((1, 7)), packed, jnp.ones((4, 2)), 7, 8)


def test_disabled_or_unbuildable_kernels_fall_back_to_xla(monkeypatch, tmp_path):
    monkeypatch.setenv(cq.ENV_SWITCH, "0")
    assert not cq.available()
    w = qt.quantize(jax.random.normal(jax.random.key(0), (16, 8)), "int8", (0,))
    x = jnp.ones((1, 16))
    hlo = jax.jit(lambda x, w: qt.project(x, w, "bd,df->bf")).lower(x, w).as_text()
    assert "hpllm_int8_matmul" not in hlo
    with pytest.raises(cq.KernelError, match="disabled"):
        cq.int8_matmul(x, w.q, w.scale)
    monkeypatch.delenv(cq.ENV_SWITCH)
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler: building says so
    with pytest.raises(RuntimeError, match="g\\+\\+ not found"):
        cq.library_path()
    with pytest.raises(cq.KernelError, match="unknown kernel variant"):
        cq.int8_matmul(x, w.q, w.scale, variant="fast")


def test_portable_build_runs_the_scalar_fallbacks_through_the_ffi():
    """The portable build (x86-64 without AVX2: gemm.h's scalar paths) registered under its
    own FFI names, against float64."""
    if os.uname().machine not in ("x86_64", "AMD64"):
        pytest.skip("the portable variant targets x86-64")
    _skip_without_gpp()
    assert not cq.prepared_supported("portable")  # no VNNI there: the scalar int8 x int8 path
    rng = np.random.default_rng(8)
    for m, n, k in ((1, 5, 7), (3, 130, 33), (17, 5, 577)):
        x = rng.standard_normal((m, k)).astype(np.float32)
        q, s = _int8_weight(rng, n, k)
        got = cq.int8_matmul(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s), variant="portable",
                             prepared=False)
        _assert_close_to_float64(got, _kernel_x("int8", x, 0, "portable"),
                                 q.astype(np.float64) * s[:, None], k)
        packed, scale, dense = _int4_weight(rng, n, k, 32)
        got = cq.int4_matmul(jnp.asarray(x), packed, scale, k, 32, variant="portable")
        _assert_close_to_float64(got, _kernel_x("int4", x, 32, "portable"), dense, k + 20)


# --------------------------------------------------------------- the model's dispatch

@needs_native
def test_dispatch_is_cpu_only_at_any_rows():
    w = qt.quantize(jax.random.normal(jax.random.key(1), (32, 24)), "int4", (0,), group_size=8)
    f = jax.jit(lambda x, w: qt.project(x, w, "bsd,df->bsf"))
    small = jnp.ones((1, 3, 32))
    assert "hpllm_int4_matmul" in f.trace(small, w).lower(lowering_platforms=("cpu",)).as_text()
    for other in ("cuda", "tpu"):  # the same jitted code lowers to the XLA path there
        text = f.trace(small, w).lower(lowering_platforms=(other,)).as_text()
        assert "hpllm_" not in text
    big = jnp.ones((2, 300, 32))  # prefill-sized: the kernel too (gemm.h tiles many rows)
    assert "hpllm_int4_matmul" in f.lower(big, w).as_text()
    np.testing.assert_allclose(np.asarray(f(small, w)), np.asarray(qt._xla_matmul_nk(small, w)),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=["tiny", "smollm2-shaped"])
def model(request):
    if request.param == "tiny":
        config = make_config("tiny").model
    else:  # SmolLM2-135M's layer shapes (and tied head), 1 layer, a small vocabulary
        config = make_config("smollm2-135m", ["--n_layers=1", "--vocab_size=1000",
                                              "--max_seq_len=64", "--seq_len=64"]).model
    # random weights in init_params' tree (its shapes only: running init compiles for ~5 s)
    rng = np.random.default_rng(11)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(11)))
    params = jax.tree.map(lambda a: jnp.asarray(
        rng.standard_normal(a.shape) * 0.2 if len(a.shape) > 1 else 1 + 0.1 * rng.standard_normal(
            a.shape), a.dtype), shapes)
    return config, params


@needs_native
@pytest.mark.parametrize("scheme", ["int8", "int8-zp", "int4"])
def test_quantized_model_logits_equal_the_xla_path(model, scheme, monkeypatch):
    config, params = model
    qp = qz.quantize_params(params, scheme, group_size=64)
    tokens = jax.random.randint(jax.random.key(12), (2, 5), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))

    def logits(p):  # a fresh jit: the kernel switch is read while tracing
        run = jax.jit(lambda p: forward(p, tokens, positions, config)[0])
        return run, np.asarray(run(p))

    # tiny: layers under lax.scan (sliced per step); SmolLM2-shaped: unrolled, as decode runs
    for p in ((qp,) if config.dim < 576 else (unstack_layers(qp),)):
        run, got = logits(p)
        assert "hpllm_" in run.lower(p).as_text()  # the kernel really ran
        monkeypatch.setenv(cq.ENV_SWITCH, "0")
        _, want = logits(p)
        monkeypatch.delenv(cq.ENV_SWITCH)
        # The kernel multiplies the 10 rows of x quantized (gemm.h's integer paths; the XLA
        # path in float): int8 at 15 bits per row, each input off by <= 2^-16 of its row's
        # largest (measured 6e-5 - 1.2e-4 of the largest logit; +1e-4 for int8-zp, whose
        # (x @ q) s - (sum x) z s subtracts two terms ~100x their difference); int4 at 8 bits
        # per 8 inputs, <= 2^-8 of the 8's largest, 0.9-1.2 % of the largest logit through
        # these random layers. Exact arithmetic: test_matmul_block_matches_float64.
        tol = {"int8": 5e-4, "int8-zp": 1e-3, "int4": 3e-2}[scheme]
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())

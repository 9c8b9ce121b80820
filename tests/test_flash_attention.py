"""Blockwise flash attention (pure JAX and Pallas) and flash decoding vs the dense reference:
values and gradients, odd sizes. The Pallas kernels run in interpret mode on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.kernels.flash_attention import flash_attention
from hpllm.kernels.masking import reference_attention
from hpllm.kernels.pallas_attention import pallas_attention
from hpllm.model.attention import attention
from numerics import family_rel_errs, rel_err


def packed_inputs(rng, batch, length, segments):
    """Positions restarting at each of `segments` documents per row, segment ids from 1."""
    pos = np.zeros((batch, length), np.int32)
    seg = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = sorted(rng.choice(np.arange(1, length), segments - 1, replace=False)) \
            if segments > 1 and length > segments else []
        start = 0
        for i, end in enumerate(list(cuts) + [length]):
            seg[b, start:end] = i + 1
            pos[b, start:end] = np.arange(end - start)
            start = end
    return jnp.asarray(pos), jnp.asarray(seg)


CASES = [  # batch, seq, heads, kv_heads, head_dim, segments, window, block
    (2, 37, 6, 2, 16, 1, None, 16),     # odd length, GQA 3
    (1, 100, 8, 1, 32, 3, None, 16),    # MQA (GQA 8), packed documents
    (2, 50, 3, 3, 8, 2, 7, 16),         # GQA 1, sliding window
    (1, 1, 2, 1, 8, 1, None, 16),       # a single token
    (3, 129, 6, 2, 16, 4, 33, 32),      # one past a block multiple, window and segments
    (1, 64, 8, 1, 64, 1, None, 64),     # exactly one block
]


BLOCKWISE = {"flash": flash_attention, "pallas": pallas_attention}


def _blockwise_params():
    """Every (implementation, dtype, case); the default set runs each case once, with the
    four (implementation, dtype) pairs taken in turn so each pair and each case is covered,
    and the other 18 combinations run under -m slow (they cost minutes in interpret mode)."""
    pairs = [(impl, dtype, tol) for impl in BLOCKWISE
             for dtype, tol in [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)]]
    params = []
    for i, case in enumerate(CASES):
        for j, (impl, dtype, tol) in enumerate(pairs):
            marks = () if j == i % len(pairs) else pytest.mark.slow
            params.append(pytest.param(impl, case, dtype, tol, marks=marks,
                                       id=f"{impl}-{jnp.dtype(dtype).name}-{case}"))
    return params


@pytest.mark.parametrize("impl, case, dtype, tol", _blockwise_params())
def test_blockwise_matches_reference_values_and_gradients(impl, case, dtype, tol):
    batch, length, heads, kv_heads, dim, segments, window, block = case
    rng = np.random.default_rng(CASES.index(case))
    q = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, length, kv_heads, dim)), dtype)
    pos, seg = packed_inputs(rng, batch, length, segments)
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def run(fn):
        def loss(q, k, v):
            return jnp.sum(fn(q, k, v, pos, pos, seg, seg, window=window).astype(jnp.float32)
                           * cotangent)
        out = jax.jit(lambda q, k, v: fn(q, k, v, pos, pos, seg, seg, window=window))(q, k, v)
        return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    blockwise = lambda *a, **kw: BLOCKWISE[impl](*a, block_q=block, block_k=block, **kw)  # noqa
    out, grads = run(blockwise)
    ref_out, ref_grads = run(reference_attention)
    assert out.dtype == dtype
    assert rel_err(out, ref_out) < tol
    assert [g.dtype for g in grads] == [dtype] * 3
    # Against the family's scale where a gradient vanishes: the single token's softmax is
    # constant, so its reference dq and dk are exactly 0, while the kernels form dS from
    # dP - delta with delta = rowsum(dO * O) (as FlashAttention-2 does, to stay one pass),
    # which cancels only to rounding (~1e-8 of the gradients' scale, summation-order
    # dependent).
    errs = family_rel_errs(grads, ref_grads)
    assert max(errs) < tol, errs


@pytest.mark.parametrize("n_new", [1, 3])
def test_flash_against_a_kv_cache(n_new):
    """Decode shape: a few queries at the end of a long key/value sequence."""
    rng = np.random.default_rng(n_new)
    t, heads, kv_heads, dim = 67, 6, 2, 16
    q = jnp.asarray(rng.standard_normal((2, n_new, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, t, kv_heads, dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, t, kv_heads, dim)), jnp.float32)
    kv_pos = jnp.broadcast_to(jnp.arange(t), (2, t))
    q_pos = jnp.asarray([[50 + i for i in range(n_new)], [t - n_new + i for i in range(n_new)]])
    ones_q, ones_k = jnp.ones(q_pos.shape, jnp.int32), jnp.ones(kv_pos.shape, jnp.int32)
    out = flash_attention(q, k, v, q_pos, kv_pos, ones_q, ones_k, block_q=16, block_k=16)
    ref = reference_attention(q, k, v, q_pos, kv_pos, ones_q, ones_k)
    assert rel_err(out, ref) < 1e-5


def test_rows_that_see_nothing_are_zero_and_have_zero_gradient():
    q = jnp.ones((1, 4, 2, 8))
    k = v = jnp.ones((1, 4, 1, 8))
    pos = jnp.arange(4)[None]
    seg = jnp.asarray([[1, 1, 0, 0]])  # the last two are padding
    out = flash_attention(q, k, v, pos, pos, seg, seg, block_q=2, block_k=2)
    np.testing.assert_array_equal(np.asarray(out[0, 2:]), 0.0)
    grad = jax.grad(lambda q: flash_attention(q, k, v, pos, pos, seg, seg, block_q=2,
                                              block_k=2).sum())(q)
    np.testing.assert_array_equal(np.asarray(grad[0, 2:]), 0.0)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_flash_memory_grows_linearly_and_the_reference_quadratically():
    """Compiled temporary memory of forward+backward at S and 4S."""
    def temp_bytes(fn, length):
        q = jax.ShapeDtypeStruct((1, length, 4, 32), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)
        pos = jax.ShapeDtypeStruct((1, length), jnp.int32)
        grad = jax.grad(lambda q, k, v, p: fn(q, k, v, p, p, jnp.ones_like(p),
                                                 jnp.ones_like(p)).sum(), argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, kv, kv, pos).compile().memory_analysis().temp_size_in_bytes

    flash = lambda *a: flash_attention(*a, block_q=128, block_k=128)  # noqa: E731
    f1, f4 = temp_bytes(flash, 1024), temp_bytes(flash, 4096)
    r1, r4 = temp_bytes(reference_attention, 1024), temp_bytes(reference_attention, 4096)
    assert f4 < 6 * f1  # linear (x4) plus slack, not x16
    assert r4 > 12 * r1  # the dense scores: quadratic
    assert f4 < r4 / 10


def test_dispatcher_routes_by_name_and_rejects_unknown():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 20, 4, 8)), jnp.float32)
    k = v = jnp.asarray(rng.standard_normal((1, 20, 2, 8)), jnp.float32)
    pos = jnp.arange(20)[None]
    b = attention(q, k, v, pos, pos, impl="reference", window=5)
    for impl in ("flash", "pallas"):
        assert rel_err(attention(q, k, v, pos, pos, impl=impl, window=5), b) < 1e-5
    with pytest.raises(ValueError, match="unknown attention implementation 'fast'"):
        attention(q, k, v, pos, pos, impl="fast")


@pytest.mark.parametrize("n_new, t, splits, window, dtype, tol", [
    # the default set keeps two cases (window, more splits than keys); the rest under -m slow
    pytest.param(1, 67, 8, None, jnp.float32, 1e-5, marks=pytest.mark.slow),  # T % splits
    pytest.param(3, 200, 7, None, jnp.float32, 1e-5, marks=pytest.mark.slow),  # few queries
    (1, 64, 64, 9, jnp.float32, 1e-5),      # one key per split, sliding window
    pytest.param(2, 130, 4, None, jnp.bfloat16, 2e-2, marks=pytest.mark.slow),
    (1, 5, 16, None, jnp.float32, 1e-5),    # more splits than keys
])
def test_flash_decoding_matches_reference(n_new, t, splits, window, dtype, tol):
    from hpllm.kernels.decode_attention import flash_decode

    rng = np.random.default_rng(t + splits)
    heads, kv_heads, dim = 8, 2, 16
    q = jnp.asarray(rng.standard_normal((2, n_new, heads, dim)), dtype)
    k = jnp.asarray(rng.standard_normal((2, t, kv_heads, dim)), dtype)
    v = jnp.asarray(rng.standard_normal((2, t, kv_heads, dim)), dtype)
    kv_pos = jnp.broadcast_to(jnp.arange(t), (2, t))
    # Row 0 decodes at the end of the cache, row 1 in its middle (later slots invisible).
    q_pos = jnp.asarray([[t - n_new + i for i in range(n_new)],
                         [t // 2 + i for i in range(n_new)]])
    q_seg, kv_seg = jnp.ones(q_pos.shape, jnp.int32), jnp.ones(kv_pos.shape, jnp.int32)
    def decode(q, k, v):
        return flash_decode(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window,
                            num_splits=splits)

    def ref(q, k, v):
        return reference_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window)

    out = jax.jit(decode)(q, k, v)
    assert out.dtype == dtype and rel_err(out, ref(q, k, v)) < tol
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    grads = [jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent),
                      argnums=(0, 1, 2))(q, k, v) for fn in (decode, ref)]
    errs = family_rel_errs(*grads)
    assert max(errs) < tol, errs


def test_auto_picks_by_lengths_and_matches_the_reference():
    from hpllm.model.attention import choose_implementation

    assert choose_implementation(128, 128) == "reference"  # training at short lengths
    assert choose_implementation(4096, 4096) == "flash"
    assert choose_implementation(1, 8192) == "flash_decode"
    assert choose_implementation(1, 512) == "reference"
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((1, 2, 4, 8)), jnp.float32)
    k = v = jnp.asarray(rng.standard_normal((1, 2048, 2, 8)), jnp.float32)
    q_pos, kv_pos = jnp.asarray([[1000, 1001]]), jnp.arange(2048)[None]
    a = attention(q, k, v, q_pos, kv_pos, impl="auto")
    assert rel_err(a, attention(q, k, v, q_pos, kv_pos, impl="reference")) < 1e-5
    assert rel_err(a, attention(q, k, v, q_pos, kv_pos, impl="flash_decode")) < 1e-6

"""The device-side KV caches (hpllm/model/kv_cache.py): dense and paged, float and int8, fed a
sequence chunk by chunk, attend exactly as attention over the whole sequence with no cache
(a float64 NumPy reference here, and the model's no-cache forward)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.config import ConfigError, ModelConfig
from hpllm.model.kv_cache import (DenseKVCache, PagedKVCache, copy_blocks, kv_bytes_per_token)
from hpllm.model.transformer import forward, init_params, unstack_layers
from hpllm.quantized import dequantize_kv, quantize_kv
from numerics import rel_err

# odd sizes: 3 KV heads of 10 dims shared by 6 query heads, 13 positions in chunks 5, 1, 4, 3,
# paged blocks of 3 slots
CFG = ModelConfig(vocab_size=53, dim=60, n_layers=2, n_heads=6, n_kv_heads=3, ffn_dim=37,
                  max_seq_len=16, init_std=0.3)
B, T, BLOCK = 3, 13, 3
CHUNKS = [(0, 5), (5, 6), (6, 10), (10, 13)]


def reference(q, k, v, window=None):
    """float64 causal grouped-query attention over positions 0..T-1 of each row."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, s, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for r in range(b):
        for i in range(s):
            for head in range(h):
                seen = [t for t in range(i + 1) if window is None or i - t < window]
                kk, vv = k[r, seen, head // group], v[r, seen, head // group]
                scores = kk @ q[r, i, head] / np.sqrt(d)
                p = np.exp(scores - scores.max())
                out[r, i, head] = (p / p.sum()) @ vv
    return out


def random_qkv(seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    d = CFG.head_dim
    return (jax.random.normal(keys[0], (B, T, CFG.n_heads, d)),
            jax.random.normal(keys[1], (B, T, CFG.n_kv_heads, d)) * 2,
            jax.random.normal(keys[2], (B, T, CFG.n_kv_heads, d)))


def paged(kv_dtype, unrolled):
    """A pool with each row's blocks scattered (block 0 stays the null block)."""
    per_row = -(-T // BLOCK)
    blocks = np.random.default_rng(0).permutation(np.arange(1, 1 + B * per_row))
    tables = jnp.asarray(blocks.reshape(B, per_row), jnp.int32)
    return PagedKVCache.create(CFG, 1 + B * per_row, BLOCK, kv_dtype, unrolled).with_tables(tables)


def make_cache(kind, kv_dtype):
    if kind == "dense":
        return DenseKVCache.create(CFG, B, T + 3, kv_dtype)  # slots past the text stay empty
    return paged(kv_dtype, unrolled=kind == "paged-list")


@functools.partial(jax.jit, static_argnames=("layer", "window"))
def chunked(cache, q, k, v, layer, window=None):
    out = []
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    for a, b in CHUNKS:
        cache = cache.update(layer, k[:, a:b], v[:, a:b], positions[:, a:b])
        out.append(cache.attend(layer, q[:, a:b], positions[:, a:b], "reference", window))
    return jnp.concatenate(out, axis=1), cache


KINDS = ["dense", "paged-list", "paged-stacked"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", [None, 4])
def test_float_cache_attends_like_attention_over_the_whole_sequence(kind, window):
    q, k, v = random_qkv(1)
    got, cache = chunked(make_cache(kind, "float32"), q, k, v, layer=1, window=window)
    want = reference(q, k, v, window)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert float(jnp.abs(cache.k[0]).max()) == 0.0  # layer 0 was never written


@pytest.mark.parametrize("kind", KINDS)
def test_int8_cache_attends_like_attention_over_its_dequantized_keys(kind):
    """Exactly attention over dequantize(quantize(k, v)) (float32 tolerance), and within the
    quantization error of the float attention (a scale is absmax / 127 per token per head)."""
    q, k, v = random_qkv(2)
    got, cache = chunked(make_cache(kind, "int8"), q, k, v, layer=0)
    assert cache.k[0].dtype == jnp.int8
    k8, v8 = (dequantize_kv(*quantize_kv(x)) for x in (k, v))
    want8 = reference(q, k8, v8)
    np.testing.assert_allclose(got, want8, rtol=0, atol=1e-5 * np.abs(want8).max())
    want = reference(q, k, v)
    err = rel_err(got, want)
    assert 0 < err < 0.02, err


def test_paged_padding_queries_write_the_null_block_and_return_zeros():
    q, k, v = random_qkv(3)
    cache = paged("float32", unrolled=True)
    positions = jnp.asarray([[0, 1, -1], [0, -1, -1], [-1, -1, -1]], jnp.int32)
    cache = cache.update(0, k[:, :3], v[:, :3], positions)
    out = np.asarray(cache.attend(0, q[:, :3], positions))
    assert np.all(out[positions == -1] == 0) and np.abs(out[0, :2]).max() > 0
    tables = np.asarray(cache.block_tables)
    pool = np.asarray(cache.k[0])
    np.testing.assert_array_equal(pool[tables[0, 0], :2], np.asarray(k[0, :2]))
    used = {tables[0, 0], tables[1, 0], 0}
    assert all(np.abs(pool[i]).max() == 0 for i in range(pool.shape[0]) if i not in used)


@pytest.mark.parametrize("unrolled", [True, False])
def test_copy_blocks_and_layer_slices(unrolled):
    q, k, v = random_qkv(4)
    cache = paged("int8", unrolled)
    positions = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (B, 3))
    cache = cache.update(0, k[:, :3], v[:, :3], positions).update(1, v[:, :3], k[:, :3],
                                                                    positions)
    src, dst = int(cache.block_tables[0, 0]), int(cache.block_tables[2, 2])
    copied = copy_blocks(jax.tree.map(jnp.copy, cache), jnp.asarray([src]), jnp.asarray([dst]))
    for name in ("k", "v", "k_scale", "v_scale"):
        for layer in range(CFG.n_layers):
            a = np.asarray(getattr(copied, name)[layer])
            np.testing.assert_array_equal(a[dst], a[src])
    first = cache.slice_layers(0, 1)
    assert first.n_layers == 1
    merged = cache.merge_layers(0, jax.tree.map(jnp.zeros_like, first))
    assert float(jnp.abs(merged.k[0]).max()) == 0 and float(jnp.abs(merged.k[1]).max()) > 0


_forward = jax.jit(forward, static_argnames="config")


def _model_logits(params, cache, tokens, positions):
    out = []
    for a, b in CHUNKS:
        logits, cache = _forward(params, tokens[:, a:b], positions[:, a:b], CFG, cache=cache)
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_forward_through_each_cache_equals_the_no_cache_forward(kind, kv_dtype):
    params = init_params(CFG, jax.random.key(5))
    if kind == "paged-list":
        params = unstack_layers(params)  # a per-layer pool needs unrolled layers
    tokens = jax.random.randint(jax.random.key(6), (B, T), 0, CFG.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    want = np.asarray(_forward(params, tokens, positions, CFG)[0])
    got = _model_logits(params, make_cache(kind, kv_dtype), tokens, positions)
    err = rel_err(got, want)
    # int8: observed 2.3e-2 (init_std 0.3 makes attention peaked); a wrong scale or slot
    # gives errors of order 1
    assert err < (1e-5 if kv_dtype == "float32" else 5e-2), err
    if kv_dtype == "int8":
        assert err > 0


def test_bytes_per_token_and_bad_kv_dtype():
    for kv_dtype in ("float32", "bfloat16", "int8"):
        cache = DenseKVCache.create(CFG, 2, 5, kv_dtype)
        assert cache.nbytes == 2 * 5 * kv_bytes_per_token(CFG, kv_dtype)
        pool = PagedKVCache.create(CFG, 4, BLOCK, kv_dtype)
        assert pool.nbytes == 4 * BLOCK * kv_bytes_per_token(CFG, kv_dtype)
    with pytest.raises(ConfigError, match="kv_dtype must be one of"):
        DenseKVCache.create(CFG, 1, 4, "float")
    with pytest.raises(ConfigError, match="kv_dtype must be one of"):
        kv_bytes_per_token(dataclasses.replace(CFG), "int4")

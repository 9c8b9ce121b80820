"""One step's work as a flat (ragged) batch of tokens, and the XLA pass over it.

A step's decode tokens, prefill chunks and speculative drafts (extra tokens of their row) are
laid end to end (vLLM V1's flattened batch): token t of sequence slot s = seq_index[t] at
position p = positions[t] (-1: padding, writes and sees nothing). tables (S, W) holds each
slot's block ids, fixed in shape for the engine's life; logits_index (R,) picks the tokens
whose logits come back. Shapes are bucketed by token count and sampled rows only, so a
handful of executables serve every mix of decodes and prefills.

Semantics (the same as the fused CPU kernel, hpllm.kernels.cpu_decoder): in every layer
token t writes its K/V at block tables[s, p // bs], offset p % bs, then attends over the
positions 0..p of its own sequence (a window w: > p - w). Here the attention is split in
two parts merged by their softmax statistics (flash attention's merge):
  in-step   this step's own tokens, read straight from the projections (rounded as the
            pool stores them): a dense (T, T) score matrix masked to the same sequence and
            causal, so a fresh prefill chunk never gathers anything from the pool;
  history   positions before the sequence's first token of this step (the cached prefix,
            earlier chunks, the decode context), read from the pool a few blocks at a time
            through each token's own table (an online softmax, as paged_attention_online).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hpllm.config import ModelConfig
from hpllm.kernels.masking import NEG_INF
from hpllm.model.kv_cache import PagedKVCache
from hpllm.model.transformer import decoder_stack, embed, head
from hpllm.quantized import dequantize_kv, quantize_kv

HISTORY_STEP_TOKENS = 256  # pool keys per history step (paged_attention's ONLINE_STEP_TOKENS)
SMALLEST_TOKEN_BUCKET = 8


def pow_buckets(smallest: int, largest: int, base: int = 2) -> list[int]:
    """smallest, smallest * base, ... up to the first >= largest."""
    out = [smallest]
    while out[-1] < largest:
        out.append(out[-1] * base)
    return out


def bucket(n: int, buckets: list[int]) -> int:
    """The smallest bucket holding n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass
class FlatBatch:
    """numpy arrays of one ragged pass (see the module docstring)."""
    tokens: np.ndarray  # (T,) int32
    positions: np.ndarray  # (T,) int32, -1 = padding
    seq_index: np.ndarray  # (T,) int32 table row of each token
    tables: np.ndarray  # (S, W) int32
    logits_index: np.ndarray  # (R,) int32

    @property
    def num_tokens(self) -> int:
        return int((self.positions >= 0).sum())


class FlatBatchBuilder:
    """Lays rows (token ids at consecutive positions of one sequence) end to end."""

    def __init__(self, num_slots: int, width: int):
        self.num_slots, self.width = num_slots, width
        self.tokens: list[int] = []
        self.positions: list[int] = []
        self.seq_index: list[int] = []
        self.blocks: list[list[int]] = []

    def add(self, blocks: list[int], tokens, start: int) -> list[int]:
        """One sequence's tokens at positions start..; returns their flat indices."""
        slot = len(self.blocks)
        if slot >= self.num_slots:
            raise ValueError(f"more than {self.num_slots} sequences in one step")
        self.blocks.append(blocks)
        first = len(self.tokens)
        self.tokens += [int(t) for t in tokens]
        self.positions += range(start, start + len(tokens))
        self.seq_index += [slot] * len(tokens)
        return list(range(first, len(self.tokens)))

    def build(self, logits_index: list[int], token_buckets: list[int],
              row_buckets: list[int]) -> FlatBatch:
        n, r = len(self.tokens), len(logits_index)
        t_pad, r_pad = bucket(max(n, 1), token_buckets), bucket(max(r, 1), row_buckets)
        tokens = np.zeros(t_pad, np.int32)
        positions = np.full(t_pad, -1, np.int32)
        seq_index = np.zeros(t_pad, np.int32)
        tokens[:n], positions[:n], seq_index[:n] = self.tokens, self.positions, self.seq_index
        tables = np.zeros((self.num_slots, self.width), np.int32)
        for s, blocks in enumerate(self.blocks):
            tables[s, :len(blocks)] = blocks
        index = np.zeros(r_pad, np.int32)
        index[:r] = logits_index
        return FlatBatch(tokens, positions, seq_index, tables, index)


def dummy_batch(num_tokens: int, num_rows: int, num_slots: int, width: int) -> FlatBatch:
    """All padding: a pass over it writes only the null block (warm-up compiles)."""
    return FlatBatch(np.zeros(num_tokens, np.int32), np.full(num_tokens, -1, np.int32),
                     np.zeros(num_tokens, np.int32), np.zeros((num_slots, width), np.int32),
                     np.zeros(num_rows, np.int32))


# ---------------------------------------------------------------- the XLA pass

def _gather(array, layer, ids):
    """array[layer][ids] without copying a stacked pool's whole layer first."""
    if isinstance(array, list):
        return array[layer][ids]
    return array[layer, ids]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedKV:
    """The cache `decoder_stack` threads through its layers for a ragged pass (B = 1 row of
    T tokens): the pool, each token's table row, where its sequence's history ends, and the
    layer's new keys/values as the pool stores them (for the in-step part)."""
    pool: PagedKVCache
    token_tables: jax.Array  # (T, W)
    seq_index: jax.Array  # (T,)
    history_end: jax.Array  # (T,) positions < this are read from the pool
    k_new: jax.Array  # (T, KV, D) in the compute dtype
    v_new: jax.Array

    def update(self, layer, k, v, positions) -> RaggedKV:
        k, v, pos = k[0], v[0], positions[0]
        pool = self.pool.with_tables(self.token_tables).update(layer, k[:, None], v[:, None],
                                                              pos[:, None])
        return dataclasses.replace(self, pool=pool.with_tables(None),
                                   k_new=_as_stored(k, self.pool), v_new=_as_stored(v, self.pool))

    def attend(self, layer, q, positions, impl: str = "auto", window=None):
        del impl
        out = ragged_attention(q[0], positions[0], self.seq_index, self.k_new, self.v_new,
                               self.pool, layer, self.token_tables, self.history_end, window)
        return out[None]


def _as_stored(x, pool: PagedKVCache):
    """x rounded as the pool stores it, back in x's dtype (so the in-step part sees exactly
    what a later step reads from the pool)."""
    if pool.quantized:
        return dequantize_kv(*quantize_kv(x), x.dtype)
    return x.astype(pool.k[0].dtype).astype(x.dtype)


def ragged_attention(q, pos, seq_index, k_new, v_new, pool: PagedKVCache, layer, token_tables,
                     history_end, window=None):
    """q (T, H, D) at positions pos (T,); k_new, v_new (T, KV, D) this step's keys/values.
    Returns (T, H, D) in q's dtype; padding tokens get zeros."""
    t, h, d = q.shape
    n_kv = k_new.shape[1]
    g = h // n_kv
    scale = d ** -0.5
    qg = q.reshape(t, n_kv, g, d)
    valid = pos >= 0
    qp = pos[:, None]

    # in-step: the step's tokens of the same sequence at positions <= p
    kp = pos[None, :]
    mask = (seq_index[:, None] == seq_index[None, :]) & (kp <= qp) & (kp >= 0) & valid[:, None]
    if window is not None:
        mask &= qp - kp < window
    init = (jnp.full((t, n_kv, g), NEG_INF, jnp.float32), jnp.zeros((t, n_kv, g), jnp.float32),
            jnp.zeros((t, n_kv, g, d), jnp.float32))
    carry = _softmax_step(init, jnp.einsum("tkgd,jkd->tkgj", qg, k_new,
                                           preferred_element_type=jnp.float32) * scale,
                          mask, v_new, "tkgj,jkd->tkgd")

    # history: pool positions [first, history_end) of each token's sequence
    bs = pool.block_size
    per = max(1, HISTORY_STEP_TOKENS // bs)
    tables = jnp.pad(token_tables, ((0, 0), (0, -token_tables.shape[1] % per)))
    end = jnp.where(valid, history_end, 0)
    hi = (jnp.max(end) + per * bs - 1) // (per * bs)
    lo = jnp.int32(0)
    if window is not None:
        lowest = jnp.min(jnp.where(valid & (end > 0), pos - window + 1, jnp.iinfo(jnp.int32).max))
        lo = jnp.minimum(jnp.maximum(lowest, 0) // (per * bs), hi)
    hq = end[:, None]

    def step(c, carry):
        ids = lax.dynamic_slice_in_dim(tables, c * per, per, axis=1)  # (T, per)
        k = _read(pool, "k", layer, ids, q.dtype).reshape(t, per * bs, n_kv, d)
        v = _read(pool, "v", layer, ids, q.dtype).reshape(t, per * bs, n_kv, d)
        kpos = c * per * bs + jnp.arange(per * bs, dtype=jnp.int32)[None]
        mask = kpos < hq
        if window is not None:
            mask &= qp - kpos < window
        scores = jnp.einsum("tkgd,tnkd->tkgn", qg, k, preferred_element_type=jnp.float32)
        return _softmax_step(carry, scores * scale, mask, v, "tkgn,tnkd->tkgd")

    _, l, acc = lax.fori_loop(lo, hi, step, carry)
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    return out.reshape(t, h, d).astype(q.dtype)


def _softmax_step(carry, scores, mask, v, pv_spec: str):
    """Online softmax: fold scores (T, KV, G, n) (visible where mask (T, n)) over values v
    into the running (max, normaliser, output) of each query."""
    m, l, acc = carry
    mask = mask[:, None, None, :]
    scores = jnp.where(mask, scores, NEG_INF)
    m_new = jnp.maximum(m, scores.max(-1))
    p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    pv = jnp.einsum(pv_spec, p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv


def _read(pool: PagedKVCache, name: str, layer, ids, dtype):
    values = _gather(getattr(pool, name), layer, ids)
    if not pool.quantized:
        return values.astype(dtype)
    return dequantize_kv(values, _gather(getattr(pool, name + "_scale"), layer, ids), dtype)


def ragged_hidden(params, pool: PagedKVCache, tokens, positions, seq_index, tables,
                  config: ModelConfig, dtype):
    """The decoder stack over a flat batch: hidden states (T, D) and the updated pool."""
    valid = positions >= 0
    big = jnp.iinfo(jnp.int32).max
    start = jax.ops.segment_min(jnp.where(valid, positions, big), seq_index,
                                num_segments=tables.shape[0])
    history_end = jnp.where(valid, start[seq_index], 0)
    shape = (tokens.shape[0], config.n_kv_heads, config.head_dim)
    cache = RaggedKV(pool, tables[seq_index], seq_index, history_end,
                     jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    x = embed(params, tokens[None], positions[None], config, dtype)
    x, cache, _ = decoder_stack(params["layers"], x, positions[None], config, cache=cache)
    return x[0], cache.pool


def ragged_forward(params, cache: PagedKVCache, tokens, positions, seq_index, tables,
                   logits_index, config: ModelConfig, dtype=jnp.float32):
    """The whole pass: (logits (R, V) float32 at the tokens logits_index, the updated cache)."""
    x, cache = ragged_hidden(params, cache, tokens, positions, seq_index, tables, config, dtype)
    return head(params, x[logits_index], config), cache


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("pool",))
def ragged_stack(params, pool, tokens, positions, seq_index, tables, config, dtype):
    """Jitted ragged_hidden (one executable per token bucket)."""
    return ragged_hidden(params, pool, tokens, positions, seq_index, tables, config, dtype)


@functools.partial(jax.jit, static_argnames=("config",))
def ragged_head(params, hidden, logits_index, config):
    """Logits of the sampled tokens only (cheap to compile: one per (tokens, rows) bucket)."""
    return head(params, hidden[logits_index], config)

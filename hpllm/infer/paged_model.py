"""The device half of the engine: parameters, the paged KV block pool, and the jitted passes
over it, with the host-side padding that keeps the compiled shapes few.

A pass takes (B, S) tokens and positions (-1 = padding) and (B, M) block tables: position p of
row b lives in block tables[b, p // block_size]. Rows are bucketed to powers of two, prefill
chunk lengths to powers of four from 16, and the table width is fixed for the engine's life,
so a handful of compiled variants serve every batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.config import EngineConfig, ModelConfig
from hpllm.infer.sampling import pow2_bucket
from hpllm.infer.scheduler import Chunk
from hpllm.model.kv_cache import PagedKVCache, copy_blocks, kv_bytes_per_token
from hpllm.model.transformer import forward, unstack_layers

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # EngineConfig.dtype (compute)


def num_blocks_for(config: ModelConfig, engine: EngineConfig) -> int:
    """Blocks in the pool (including the reserved null block)."""
    if engine.num_blocks:
        return engine.num_blocks
    per_block = kv_bytes_per_token(config, engine.kv_dtype) * engine.block_size
    return max(2, int(engine.kv_memory_mb * 2**20 // per_block))


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("pool",))
def _run_model(params, pool, tokens, positions, tables, last, config, dtype):
    logits, pool = forward(params, tokens, positions, config, cache=pool.with_tables(tables),
                           dtype=dtype, logits_at=last)
    return logits, pool.with_tables(None)


class PagedModel:
    """Parameters, the block pool (a PagedKVCache), and the jitted passes over it."""

    def __init__(self, params, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype=jnp.float32, kv_dtype: str = "float32", unroll_layers: bool = True):
        # Unrolled, each layer's weights are their own arrays: XLA:CPU reads them at memory
        # speed, where a scan's dynamic slices are copied first (see unstack_layers).
        self.params = unstack_layers(params) if unroll_layers else params
        self.config, self.dtype = config, dtype
        # Unrolled: one array per layer, so a step writes and reads a layer's blocks in place
        # (slicing a layer out of one stacked array copied the layer's whole pool per step:
        # SmolLM2 decode 91 -> see docs/perf/engine.md).
        self.pool = PagedKVCache.create(config, num_blocks, block_size, kv_dtype,
                                        unrolled=unroll_layers)

    def run(self, tokens, positions, tables, last):
        """numpy (B, S) tokens and positions (-1 = padding), (B, M) tables, (B,) index of the
        token whose logits to return (None: every position's). Returns (B, V) logits on
        device, or (B, S, V)."""
        last = None if last is None else jnp.asarray(last)
        logits, self.pool = _run_model(self.params, self.pool, jnp.asarray(tokens),
                                       jnp.asarray(positions), jnp.asarray(tables), last,
                                       self.config, self.dtype)
        return logits

    def copy_blocks(self, pairs) -> None:
        if pairs:
            src, dst = (jnp.asarray(x, jnp.int32) for x in zip(*pairs))
            self.pool = copy_blocks(self.pool, src, dst)


def block_tables(chunks: list[Chunk], rows: int, width: int) -> np.ndarray:
    """(rows, width) block ids of the chunks' sequences, zero (the null block) padded. One
    width for the engine's whole life (paged attention only visits the blocks a row can see),
    so the table never adds compiled variants."""
    tables = np.zeros((rows, width), np.int32)
    for r, c in enumerate(chunks):
        tables[r, :len(c.seq.table.blocks)] = c.seq.table.blocks
    return tables


def pad_chunks(chunks: list[Chunk], rows: int, max_chunk: int, drafts=None, n_proposed=None):
    """numpy (rows, width) tokens and positions (-1 = padding) of the chunks, and (rows,) the
    index of each row's last token. With drafts (R, G) and n_proposed (R,), each decode row
    is [its token, first n_proposed drafts] (width 1 + G). Else the width is 1 for decodes
    and a power of four from 16 (capped by max_chunk's bucket) for prefill chunks."""
    longest = max(c.length for c in chunks)
    width = 1 if longest == 1 else 16
    while width < longest:
        width *= 4
    if longest > 1:
        width = min(width, pow2_bucket(max_chunk, 16))
    if drafts is not None:
        width = 1 + drafts.shape[1]
    tokens = np.zeros((rows, width), np.int32)
    positions = np.full((rows, width), -1, np.int32)
    last = np.zeros(rows, np.int32)
    for r, c in enumerate(chunks):
        n = c.length if drafts is None else 1 + n_proposed[r]
        tokens[r, :c.length] = c.seq.tokens[c.start:c.start + c.length]
        if drafts is not None:
            tokens[r, 1:n] = drafts[r, :n - 1]
        positions[r, :n] = np.arange(c.start, c.start + n)
        last[r] = c.length - 1
    return tokens, positions, last

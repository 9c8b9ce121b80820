"""The device half of the engine: parameters, the paged KV block pool, and the jitted passes
over it, with the host-side padding that keeps the compiled shapes few.

The engine's step is one ragged pass (hpllm.infer.ragged: a flat batch of tokens, bucketed by
token count and sampled rows) run by one of two backends:
  kernel  the fused CPU decoder step (hpllm.kernels.cpu_decoder) where it runs the model
          (CPU, float32 compute and KV, supported weights), with its own pool layout;
  xla     ragged_stack + ragged_head (GPU/TPU, and every case the kernel does not run).
`run` is the older padded pass over (B, S) rows (the speculative draft model's catch-up,
hpllm.perf.measure): position p of row b lives in block tables[b, p // block_size].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.config import ConfigError, EngineConfig, ModelConfig
from hpllm.infer.generate import kernel_unsupported
from hpllm.infer.ragged import FlatBatch, ragged_head, ragged_stack
from hpllm.infer.sampling import pow2_bucket
from hpllm.infer.scheduler import Chunk
from hpllm.kernels import cpu_decoder
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


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("pool",))
def _kernel_step(weights, pool, tokens, positions, seq_index, tables, logits_index, config):
    return cpu_decoder.step(weights, pool, tokens, positions, seq_index, tables, logits_index,
                            config=config)


@functools.partial(jax.jit, donate_argnames=("pool",))
def _kernel_copy(pool, src, dst):
    return cpu_decoder.copy_blocks(pool, src, dst)


def choose_backend(engine: EngineConfig, params, config: ModelConfig) -> str:
    """"kernel" or "xla" for EngineConfig.step_backend ("auto": the kernel wherever it runs
    this model). Self-speculation drafts through the target's XLA pool: always "xla"."""
    if engine.step_backend == "xla":
        return "xla"
    if engine.speculative == "self":
        reason = "self-speculation drafts through the XLA pool"
    else:  # generate()'s rule: CPU, float32 compute, the kernel built and the model supported
        reason = kernel_unsupported(params, config, DTYPES[engine.dtype], engine.kv_dtype)
    if reason is None:
        return "kernel"
    if engine.step_backend == "kernel":
        raise ConfigError(f"step_backend='kernel': {reason}")
    return "xla"


class PagedModel:
    """Parameters, the block pool (a PagedKVCache), and the jitted passes over it."""

    def __init__(self, params, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype=jnp.float32, kv_dtype: str = "float32", unroll_layers: bool = True,
                 backend: str = "xla"):
        self.backend = backend
        if backend == "kernel":  # the kernel's own weight layout and pool; no XLA pass
            self.params, self.config, self.dtype = params, config, dtype
            self.weights = cpu_decoder.prepare(params, config)
            self.pool = cpu_decoder.create_pool(config, num_blocks, block_size, kv_dtype)
            return
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

    def run_ragged(self, batch: FlatBatch):
        """One ragged pass (hpllm.infer.ragged): (R, V) float32 logits on device."""
        # numpy straight into the jitted call: its C++ path transfers them (jnp.asarray per
        # array was ~1.3 ms of host time per step, a sixth of a single-stream int8 step)
        args = (batch.tokens, batch.positions, batch.seq_index, batch.tables)
        index = batch.logits_index
        if self.backend == "kernel":
            logits, self.pool = _kernel_step(self.weights, self.pool, *args, index,
                                             self.config)
            return logits
        hidden, self.pool = ragged_stack(self.params, self.pool, *args, self.config,
                                         self.dtype)
        return ragged_head(self.params, hidden, index, self.config)

    def copy_blocks(self, pairs) -> None:
        """Copy-on-write copies (src, dst), padded to a power of two (from 4) with null-block
        self-copies so few shapes compile."""
        if pairs:
            n = pow2_bucket(len(pairs), 4)
            src, dst = (np.array(list(x) + [0] * (n - len(pairs)), np.int32)
                        for x in zip(*pairs))
            copy = _kernel_copy if self.backend == "kernel" else copy_blocks
            self.pool = copy(self.pool, src, dst)


def block_tables(chunks: list[Chunk], rows: int, width: int) -> np.ndarray:
    """(rows, width) block ids of the chunks' sequences, zero (the null block) padded. One
    width for the engine's whole life (paged attention only visits the blocks a row can see),
    so the table never adds compiled variants."""
    tables = np.zeros((rows, width), np.int32)
    for r, c in enumerate(chunks):
        tables[r, :len(c.seq.table.blocks)] = c.seq.table.blocks
    return tables

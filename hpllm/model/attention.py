"""The one attention entry point of the model.

Every caller (training, prefill, decode with a KV cache) goes through `attention`, so faster
implementations (flash, Pallas, paged) can be swapped in by name without touching the model.
Masking is by positions and segment ids (the rule is in `hpllm.kernels.masking`, beside
`reference_attention`), which makes the same code serve packed training sequences and a
KV cache.
"""

import jax.numpy as jnp

from hpllm.kernels import cpu_attention
from hpllm.kernels.decode_attention import flash_decode
from hpllm.kernels.flash_attention import flash_attention
from hpllm.kernels.masking import reference_attention
from hpllm.kernels.pallas_attention import pallas_attention

# Crossovers measured on CPU (bench/attention.py, docs/perf/attention.md): the blockwise
# kernel wins from ~512 queries (1.6x fwd+bwd at 512, 4.8x fwd at 4K); splitting the KV of a
# few decode queries wins from a few thousand keys.
FLASH_MIN_QUERIES = 512
DECODE_MAX_QUERIES = 16
DECODE_MIN_KEYS = 2048


def choose_implementation(n_queries: int, n_keys: int) -> str:
    """What `impl="auto"` runs for these static lengths. The Pallas kernel stays opt-in
    (`impl="pallas"`) until it has been compiled and measured on a GPU/TPU."""
    if n_queries <= DECODE_MAX_QUERIES and n_keys >= DECODE_MIN_KEYS:
        return "flash_decode"
    if n_queries >= FLASH_MIN_QUERIES:
        return "flash"
    return "reference"


def _auto(q, k, *args, **kw):
    return IMPLEMENTATIONS[choose_implementation(q.shape[1], k.shape[1])](q, k, *args, **kw)


IMPLEMENTATIONS = {"reference": reference_attention, "flash": flash_attention,
                   "flash_decode": flash_decode, "pallas": pallas_attention, "auto": _auto}


def attention(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None, impl="reference", window=None):
    """Causal grouped-query attention. Positions (B,S)/(B,T) int; segment ids default to 1."""
    if q_seg is None:
        q_seg = jnp.ones(q_pos.shape, jnp.int32)
    if kv_seg is None:
        kv_seg = jnp.ones(kv_pos.shape, jnp.int32)
    if impl in ("reference", "auto") and cpu_attention.routed(q, k):  # CPU training step
        return cpu_attention.attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window)
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"unknown attention implementation {impl!r}; "
                         f"known: {', '.join(IMPLEMENTATIONS)}") from None
    return fn(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window)

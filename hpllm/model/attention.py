"""The one attention entry point of the model.

Every caller (training, prefill, decode with a KV cache) goes through `attention`, so faster
implementations (flash, Pallas, paged) can be swapped in by name without touching the model.
Masking is expressed by positions and segment ids rather than by array index, which makes
the same code serve packed training sequences and a KV cache:
  a query may see a key iff  kv_pos <= q_pos  and  kv_seg == q_seg  (and kv_seg != 0),
  and, with a sliding window w, q_pos - kv_pos < w.
"""

import jax
import jax.numpy as jnp

_NEG_INF = -1e30  # finite, so a fully masked row gives zeros instead of NaNs


def visible(q_pos, kv_pos, q_seg, kv_seg, window=None):
    """The masking rule above, elementwise on arrays that broadcast to (..., queries, keys);
    every implementation (reference, blockwise, decode, Pallas) masks through it."""
    mask = (kv_pos <= q_pos) & (kv_seg == q_seg) & (kv_seg != 0)
    if window is not None:  # sliding window: only the `window` most recent positions
        mask &= (q_pos - kv_pos) < window
    return mask


def reference_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, window=None):
    """Materialises the (S, T) score matrix. q: (B,S,H,D); k, v: (B,T,KV,D).

    Grouped-query attention without repeating K/V: the H query heads are viewed as
    (KV, H/KV) so each group of queries reads its shared K/V head in place.
    """
    b, s, h, d = q.shape
    n_kv = k.shape[2]
    q = q.reshape(b, s, n_kv, h // n_kv, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    mask = visible(q_pos[:, :, None], kv_pos[:, None, :], q_seg[:, :, None], kv_seg[:, None, :],
                   window)
    scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask[:, None, None], probs, 0.0)  # rows with no visible key -> 0
    out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, s, h, d).astype(q.dtype)


def _flash(*args, **kw):
    from hpllm.kernels.flash_attention import flash_attention  # kernels import this module

    return flash_attention(*args, **kw)


def _flash_decode(*args, **kw):
    from hpllm.kernels.decode_attention import flash_decode

    return flash_decode(*args, **kw)


def _pallas(*args, **kw):
    from hpllm.kernels.pallas_attention import pallas_attention

    return pallas_attention(*args, **kw)


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


IMPLEMENTATIONS = {"reference": reference_attention, "flash": _flash,
                   "flash_decode": _flash_decode, "pallas": _pallas, "auto": _auto}


def attention(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None, impl="reference", window=None):
    """Causal grouped-query attention. Positions (B,S)/(B,T) int; segment ids default to 1."""
    if q_seg is None:
        q_seg = jnp.ones(q_pos.shape, jnp.int32)
    if kv_seg is None:
        kv_seg = jnp.ones(kv_pos.shape, jnp.int32)
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"unknown attention implementation {impl!r}; "
                         f"known: {', '.join(IMPLEMENTATIONS)}") from None
    return fn(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window)

"""The attention masking rule every implementation shares, the helpers the kernels apply it
with, and `reference_attention`: the obviously-correct twin each kernel is tested against.

Masking is expressed by positions and segment ids rather than by array index, which makes
the same code serve packed training sequences and a KV cache:
  a query may see a key iff  kv_pos <= q_pos  and  kv_seg == q_seg  (and kv_seg != 0),
  and, with a sliding window w, q_pos - kv_pos < w.
Segment 0 is padding: padded keys are never visible, padded queries see nothing.
"""

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so a fully masked row gives zeros instead of NaNs


def visible(q_pos, kv_pos, q_seg, kv_seg, window=None):
    """The masking rule above, elementwise on arrays that broadcast to (..., queries, keys);
    every implementation (reference, blockwise, decode, Pallas, paged) masks through it."""
    mask = (kv_pos <= q_pos) & (kv_seg == q_seg) & (kv_seg != 0)
    if window is not None:  # sliding window: only the `window` most recent positions
        mask &= (q_pos - kv_pos) < window
    return mask


def block_visible(qp, kp, qs, ks, window):
    """Whether any (query, key) pair of a block pair can be visible, from ranges only (any
    shapes: only min/max are taken). A block of padding keys only has its key-position
    minimum at the int maximum, so it is never visible."""
    valid = ks != 0
    kp_min = jnp.min(jnp.where(valid, kp, jnp.iinfo(kp.dtype).max))
    kp_max = jnp.max(jnp.where(valid, kp, jnp.iinfo(kp.dtype).min))
    ks_min = jnp.min(jnp.where(valid, ks, jnp.iinfo(ks.dtype).max))
    ks_max = jnp.max(jnp.where(valid, ks, jnp.iinfo(ks.dtype).min))
    ok = (kp_min <= jnp.max(qp)) & (ks_min <= jnp.max(qs)) & (ks_max >= jnp.min(qs))
    if window is not None:
        ok &= (jnp.min(qp) - kp_max) < window
    return ok


def pad_to(x, multiple: int, axis: int, value=0):
    """x padded with `value` along `axis` to a multiple of `multiple`."""
    pad = (-x.shape[axis]) % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


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
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask[:, None, None], probs, 0.0)  # rows with no visible key -> 0
    out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, s, h, d).astype(q.dtype)

"""Flash decoding: attention of a few new queries against a long KV cache, split along the
key/value length so the chunks are processed in parallel, then merged exactly.

Each of the `num_splits` chunks yields its softmax-normalised partial output o_c and the
log-sum-exp lse_c of its scores; the full result is sum_c w_c o_c with
w_c = exp(lse_c - logsumexp_c(lse_c)). Plain decode attention (the reference) has only
B x heads x queries rows of work, too few to keep a machine busy when T is long; the split
adds a parallel axis of size num_splits. Same masking contract as `hpllm.kernels.masking`.
"""

from __future__ import annotations

import jax.numpy as jnp

from hpllm.kernels.masking import NEG_INF, pad_to, visible


def flash_decode(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, window=None, num_splits: int = 8):
    """q (B,S,H,D) with small S; k, v (B,T,K,D). Returns (B,S,H,D) in q's dtype."""
    b, s, h, d = q.shape
    kh = k.shape[2]
    n = max(1, min(num_splits, k.shape[1]))
    k, v = pad_to(k, n, 1), pad_to(v, n, 1)
    kv_pos, kv_seg = pad_to(kv_pos, n, 1), pad_to(kv_seg, n, 1)  # padding: segment 0, invisible
    chunk = k.shape[1] // n
    kc = k.reshape(b, n, chunk, kh, d)
    vc = v.reshape(b, n, chunk, kh, d)
    pc, sc = kv_pos.reshape(b, n, chunk), kv_seg.reshape(b, n, chunk)
    qg = q.reshape(b, s, kh, h // kh, d)

    scores = jnp.einsum("bqkgd,bctkd->bckgqt", qg, kc,
                        preferred_element_type=jnp.float32) * d ** -0.5
    mask = visible(q_pos[:, None, :, None], pc[:, :, None, :], q_seg[:, None, :, None],
                   sc[:, :, None, :], window)  # (B, n, S, chunk)
    mask = mask[:, :, None, None]  # (B, n, 1, 1, S, chunk)
    scores = jnp.where(mask, scores, NEG_INF)
    m = scores.max(-1)  # (B, n, K, G, S)
    p = jnp.where(mask, jnp.exp(scores - m[..., None]), 0.0)
    l = p.sum(-1)
    partial = jnp.einsum("bckgqt,bctkd->bckgqd", p.astype(v.dtype), vc,
                         preferred_element_type=jnp.float32)
    partial = partial / jnp.where(l > 0, l, 1.0)[..., None]
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), NEG_INF)  # empty chunk: weight 0
    # Merge the chunks: weights exp(lse_c - max) renormalised; rows seeing nothing give 0.
    top = lse.max(axis=1, keepdims=True)
    w = jnp.where(lse > NEG_INF / 2, jnp.exp(lse - top), 0.0)
    total = w.sum(axis=1)
    out = (partial * w[..., None]).sum(axis=1) / jnp.where(total > 0, total, 1.0)[..., None]
    # (B, K, G, S, D) -> (B, S, H, D)
    return jnp.moveaxis(out, 3, 1).reshape(b, s, h, d).astype(q.dtype)

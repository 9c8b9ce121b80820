"""Blockwise ("flash") attention in pure JAX: online softmax, never the (S, T) matrix.

Forward (FlashAttention-2 order): for each query block, walk the key/value blocks keeping a
running max m, normaliser l and unnormalised output; rescale by exp(m_old - m_new) whenever
the max grows. Only the log-sum-exp per query row is saved for the backward pass, which
recomputes each score block (custom VJP): memory is O(S) instead of O(S·T).

Blocks that the mask hides entirely (above the causal diagonal, outside a sliding window,
or in no shared segment) are skipped with `lax.cond`, judged from per-block position and
segment ranges. Masking follows `hpllm.kernels.masking`: a query may see a key iff
kv_pos <= q_pos, the segment ids are equal and non-zero, and (with a window w)
q_pos - kv_pos < w. Grouped-query attention reads each K/V head in place for its group of
query heads. Inputs may be bfloat16; scores, softmax statistics and accumulators are float32.
Any lengths: the inputs are padded to whole blocks (padding keys get segment 0).

The reference it is tested against is `hpllm.kernels.masking.reference_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hpllm.kernels.masking import NEG_INF, block_visible, pad_to, visible


def _blocks(x, size: int):
    """(B, L, ...) -> (L/size, B, size, ...)."""
    b, length = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, length // size, size, *x.shape[2:]), 1, 0)


def _unblock(x):
    n, b, size = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * size, *x.shape[3:])


def _mask(qp, kp, qs, ks, window):
    """(B, bq, bk) visibility of one block pair."""
    return visible(qp[:, :, None], kp[:, None, :], qs[:, :, None], ks[:, None, :], window)


def _scores(q, k, scale):
    # q (B, bq, K, G, D), k (B, bk, K, D) -> (B, K, G, bq, bk) float32
    return jnp.einsum("bqkgd,btkd->bkgqt", q, k, preferred_element_type=jnp.float32) * scale


def _forward_blocks(qb, kb, vb, qpb, kpb, qsb, ksb, scale, window):
    """Online-softmax forward over blocked inputs. Returns blocked output and lse."""
    nk = kb.shape[0]

    def one_query_block(args):
        q, qp, qs = args  # (B, bq, K, G, D), (B, bq), (B, bq)
        b, bq, kh, g, d = q.shape
        init = (jnp.full((b, kh, g, bq), NEG_INF, jnp.float32),
                jnp.zeros((b, kh, g, bq), jnp.float32), jnp.zeros((b, kh, g, bq, d), jnp.float32))

        def step(carry, j):
            k, v, kp, ks = kb[j], vb[j], kpb[j], ksb[j]

            def update(carry):
                m, l, acc = carry
                mask = _mask(qp, kp, qs, ks, window)[:, None, None]
                s = jnp.where(mask, _scores(q, k, scale), NEG_INF)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                alpha = jnp.exp(m - m_new)
                pv = jnp.einsum("bkgqt,btkd->bkgqd", p.astype(v.dtype), v,
                                preferred_element_type=jnp.float32)
                return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

            return jax.lax.cond(block_visible(qp, kp, qs, ks, window), update, lambda c: c,
                                carry), None

        (m, l, acc), _ = jax.lax.scan(step, init, jnp.arange(nk))
        out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
        # rows seeing nothing: a huge lse, so exp(s - lse) = 0 in the backward pass
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -NEG_INF)
        return out, lse  # (B, K, G, bq, D), (B, K, G, bq)

    return jax.lax.map(one_query_block, (qb, qpb, qsb))


def _prepare(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k):
    b, s, h, d = q.shape
    kh = k.shape[2]
    bq, bk = min(block_q, s), min(block_k, k.shape[1])
    qb = _blocks(pad_to(q, bq, 1).reshape(b, -1, kh, h // kh, d), bq)
    qpb = _blocks(pad_to(q_pos, bq, 1), bq)
    qsb = _blocks(pad_to(q_seg, bq, 1), bq)  # padded queries: segment 0, see nothing
    kb, vb = _blocks(pad_to(k, bk, 1), bk), _blocks(pad_to(v, bk, 1), bk)
    kpb = _blocks(pad_to(kv_pos, bk, 1), bk)
    ksb = _blocks(pad_to(kv_seg, bk, 1), bk)
    return qb, kb, vb, qpb, kpb, qsb, ksb


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k, window):
    return _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k, window)[0]


def _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k, window):
    b, s, h, d = q.shape
    blocked = _prepare(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k)
    out_b, lse_b = _forward_blocks(*blocked, d ** -0.5, window)
    # (nq, B, K, G, bq, D) -> (B, S, H, D)
    out = jnp.moveaxis(out_b, 4, 2)  # (nq, B, bq, K, G, D)
    out = _unblock(out).reshape(b, -1, h, d)[:, :s].astype(q.dtype)
    return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse_b)


def _flash_bwd(block_q, block_k, window, residuals, d_out):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse_b = residuals
    b, s, h, d = q.shape
    kh = k.shape[2]
    scale = d ** -0.5
    qb, kb, vb, qpb, kpb, qsb, ksb = _prepare(q, k, v, q_pos, kv_pos, q_seg, kv_seg,
                                              block_q, block_k)
    bq = qb.shape[2]
    # delta_i = sum_d dO_i · O_i: the softmax-gradient correction, per query row.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (B, S, H)
    dob = _blocks(pad_to(d_out, bq, 1).reshape(b, -1, kh, h // kh, d), bq)
    deltab = jnp.moveaxis(_blocks(pad_to(delta, bq, 1).reshape(b, -1, kh, h // kh), bq),
                          2, 4)  # (nq, B, K, G, bq)
    nq = qb.shape[0]

    def one_key_block(dq_acc, j):
        k_j, v_j, kp, ks = kb[j], vb[j], kpb[j], ksb[j]

        def step(carry, i):
            dk, dv, dq_acc = carry
            q_i, qp, qs = qb[i], qpb[i], qsb[i]

            def update(carry):
                dk, dv, dq_acc = carry
                mask = _mask(qp, kp, qs, ks, window)[:, None, None]
                p = jnp.where(mask, jnp.exp(_scores(q_i, k_j, scale) - lse_b[i][..., None]), 0.0)
                do = dob[i]  # (B, bq, K, G, D)
                dv = dv + jnp.einsum("bkgqt,bqkgd->btkd", p.astype(do.dtype), do,
                                     preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqkgd,btkd->bkgqt", do, v_j, preferred_element_type=jnp.float32)
                ds = p * (dp - deltab[i][..., None]) * scale
                dk = dk + jnp.einsum("bkgqt,bqkgd->btkd", ds.astype(q_i.dtype), q_i,
                                     preferred_element_type=jnp.float32)
                dq_i = jnp.einsum("bkgqt,btkd->bqkgd", ds.astype(k_j.dtype), k_j,
                                  preferred_element_type=jnp.float32)
                return dk, dv, dq_acc.at[i].add(dq_i)

            return jax.lax.cond(block_visible(qp, kp, qs, ks, window), update, lambda c: c,
                                carry), None

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        (dk, dv, dq_acc), _ = jax.lax.scan(step, (zeros, zeros, dq_acc), jnp.arange(nq))
        return dq_acc, (dk, dv)

    dq0 = jnp.zeros(qb.shape, jnp.float32)
    dq_b, (dk_b, dv_b) = jax.lax.scan(one_key_block, dq0, jnp.arange(kb.shape[0]))
    dq = _unblock(dq_b).reshape(b, -1, h, d)[:, :s].astype(q.dtype)
    t = k.shape[1]
    dk = _unblock(dk_b)[:, :t].astype(k.dtype)
    dv = _unblock(dv_b)[:, :t].astype(v.dtype)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, window=None, block_q=128,
                    block_k=128):
    """Same contract as reference_attention: q (B,S,H,D); k, v (B,T,K,D); positions and
    segment ids (B,S)/(B,T) int32. Returns (B,S,H,D) in q's dtype."""
    return _flash(q, k, v, q_pos.astype(jnp.int32), kv_pos.astype(jnp.int32),
                  q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32), block_q, block_k, window)

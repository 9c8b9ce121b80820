"""Flash attention as Pallas kernels: forward, and a backward of two kernels (dK/dV, dQ).

The algorithm is the one in `flash_attention.py` (online softmax, log-sum-exp saved for the
backward pass, score blocks recomputed there); here each piece is one `pallas_call` whose
program instance owns one tile and keeps its accumulators on chip:

  forward  grid (batch, query head, query block):  loop over key blocks -> O tile, lse
  dK, dV   grid (batch, query head, key block):    loop over query blocks -> dK, dV tiles
  dQ       grid (batch, query head, query block):  loop over key blocks -> dQ tile

Grouped-query attention never copies K/V: the BlockSpec index map sends query head h to
K/V head h // group. dK/dV are produced per query head and summed over each group outside
the kernel (one small reduction instead of atomics). Blocks the mask hides entirely (above
the causal diagonal, outside the window, no shared segment) are skipped with `lax.cond`
judged from the block's position and segment ranges, as in the pure-JAX version; masking
follows `hpllm.kernels.masking` (positions and segment ids, segment 0 = padding).

The kernels use only portable Pallas (ref slicing, `jnp.dot`, `lax.fori_loop`, `lax.cond`),
so they lower with the GPU (Triton) backend and run on CPU with `interpret=True`, which is
how the tests check them against `reference_attention`. Each program reads the whole K/V
of its head by dynamic slices, which suits GPU shared memory/L2 but would need a key-block
grid axis with scratch accumulators to fit TPU VMEM at long lengths; that variant is not
written yet. Head dims and block sizes are padded to powers of two (Triton needs them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hpllm.kernels.masking import NEG_INF, block_visible, pad_to, visible


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dot(a, b, trans_b=False):
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _dot_ta(a, b):
    """a.T @ b without materialising the transpose."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ---------------------------------------------------------------- forward

def _forward_kernel(q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, o_ref, lse_ref, *,
                    scale, block_k, window):
    q = q_ref[...]
    qp, qs = qp_ref[...], qs_ref[...]
    bq, d = q.shape

    def body(j, carry):
        sl = pl.ds(j * block_k, block_k)
        kp, ks = kp_ref[:, sl], ks_ref[:, sl]

        def update(carry):
            m, l, acc = carry
            mask = visible(qp, kp, qs, ks, window)
            s = jnp.where(mask, _dot(q, k_ref[sl, :], trans_b=True) * scale, NEG_INF)
            m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
            alpha = jnp.exp(m - m_new)
            v = v_ref[sl, :]
            acc = acc * alpha + _dot(p.astype(v.dtype), v)
            return m_new, l * alpha + p.sum(axis=1, keepdims=True), acc

        return lax.cond(block_visible(qp, kp, qs, ks, window), update, lambda c: c, carry)

    init = (jnp.full((bq, 1), NEG_INF, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, d), jnp.float32))
    m, l, acc = lax.fori_loop(0, k_ref.shape[0] // block_k, body, init)
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen, acc / safe_l, 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), -NEG_INF)  # nothing seen: p = 0 later


# ---------------------------------------------------------------- backward

def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qp_ref, qs_ref, kp_ref,
                 ks_ref, dk_ref, dv_ref, *, scale, block_q, window):
    k, v = k_ref[...], v_ref[...]
    kp, ks = kp_ref[...], ks_ref[...]

    def body(i, carry):
        sl = pl.ds(i * block_q, block_q)
        qp, qs = qp_ref[sl, :], qs_ref[sl, :]

        def update(carry):
            dk, dv = carry
            q, do = q_ref[sl, :], do_ref[sl, :]
            mask = visible(qp, kp, qs, ks, window)
            p = jnp.where(mask, jnp.exp(_dot(q, k, trans_b=True) * scale
                                        - lse_ref[sl, :]), 0.0)
            dv = dv + _dot_ta(p.astype(do.dtype), do)
            ds = p * (_dot(do, v, trans_b=True) - delta_ref[sl, :]) * scale
            dk = dk + _dot_ta(ds.astype(q.dtype), q)
            return dk, dv

        return lax.cond(block_visible(qp, kp, qs, ks, window), update, lambda c: c, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, q_ref.shape[0] // block_q, body, (zeros, zeros))
    dk_ref[...] = dk
    dv_ref[...] = dv


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qp_ref, qs_ref, kp_ref,
               ks_ref, dq_ref, *, scale, block_k, window):
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    qp, qs = qp_ref[...], qs_ref[...]

    def body(j, dq):
        sl = pl.ds(j * block_k, block_k)
        kp, ks = kp_ref[:, sl], ks_ref[:, sl]

        def update(dq):
            k, v = k_ref[sl, :], v_ref[sl, :]
            mask = visible(qp, kp, qs, ks, window)
            p = jnp.where(mask, jnp.exp(_dot(q, k, trans_b=True) * scale - lse), 0.0)
            ds = p * (_dot(do, v, trans_b=True) - delta) * scale
            return dq + _dot(ds.astype(k.dtype), k)

        return lax.cond(block_visible(qp, kp, qs, ks, window), update, lambda c: c, dq)

    dq = lax.fori_loop(0, k_ref.shape[0] // block_k, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


# ---------------------------------------------------------------- specs and wrappers

def _specs(group, bq, bk, sp, tp, d, tile_over_queries):
    """BlockSpecs for grid (batch, query head, tile): the tile walks query blocks (forward,
    dQ) or key blocks (dK/dV); the other sequence is read whole and sliced in the kernel.
    Per-query vectors (positions, segments, lse, delta) are columns (L, 1) and per-key
    vectors rows (1, L), so they broadcast against (bq, bk) scores without a transpose."""
    if tile_over_queries:
        q_tile = pl.BlockSpec((None, None, bq, d), lambda b, h, i: (b, h, i, 0))
        row = pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0))
        qvec = pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0))
        kv = pl.BlockSpec((None, None, tp, d), lambda b, h, i: (b, h // group, 0, 0))
        kvec = pl.BlockSpec((None, 1, tp), lambda b, h, i: (b, 0, 0))
    else:
        q_tile = pl.BlockSpec((None, None, sp, d), lambda b, h, i: (b, h, 0, 0))
        row = pl.BlockSpec((None, None, sp, 1), lambda b, h, i: (b, h, 0, 0))
        qvec = pl.BlockSpec((None, sp, 1), lambda b, h, i: (b, 0, 0))
        kv = pl.BlockSpec((None, None, bk, d), lambda b, h, i: (b, h // group, i, 0))
        kvec = pl.BlockSpec((None, 1, bk), lambda b, h, i: (b, 0, i))
    return q_tile, kv, row, qvec, kvec


def _layout(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k):
    """Heads-major, padded to whole power-of-two blocks and head dim."""
    s, t, d = q.shape[1], k.shape[1], q.shape[3]
    bq = min(block_q, max(16, _next_pow2(s)))
    bk = min(block_k, max(16, _next_pow2(t)))
    dp = max(16, _next_pow2(d))  # Triton wants power-of-two tiles
    qh = pad_to(pad_to(jnp.swapaxes(q, 1, 2), bq, 2), dp, 3)  # (B, H, Sp, Dp)
    kh = pad_to(pad_to(jnp.swapaxes(k, 1, 2), bk, 2), dp, 3)
    vh = pad_to(pad_to(jnp.swapaxes(v, 1, 2), bk, 2), dp, 3)
    vecs = (pad_to(q_pos, bq, 1)[:, :, None], pad_to(q_seg, bq, 1)[:, :, None],
            pad_to(kv_pos, bk, 1)[:, None, :], pad_to(kv_seg, bk, 1)[:, None, :])
    return qh, kh, vh, vecs, bq, bk


def _call_options(target: str, grid_rank: int = 3) -> dict:
    """pallas_call keywords for a target: "interpret" (CPU), "gpu" (Triton), "tpu" (Mosaic)."""
    if target == "interpret":
        return {"interpret": True}
    if target == "gpu":
        from jax.experimental.pallas import triton as pl_triton

        return {"compiler_params": pl_triton.CompilerParams(num_warps=4, num_stages=2)}
    if target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return {"compiler_params": pltpu.CompilerParams(
            dimension_semantics=("parallel",) * grid_rank)}
    raise ValueError(f"unknown Pallas target {target!r}: interpret, gpu or tpu")


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _pallas_flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k, window, target):
    return _fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k, window, target)[0]


def _fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k, window, target):
    b, s, h, d = q.shape
    group = h // k.shape[2]
    qh, kh, vh, vecs, bq, bk = _layout(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k)
    sp, tp, dp = qh.shape[2], kh.shape[2], qh.shape[3]
    q_tile, kv, row, qvec, kvec = _specs(group, bq, bk, sp, tp, dp, True)
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, scale=d ** -0.5, block_k=bk, window=window),
        grid=(b, h, sp // bq),
        in_specs=[q_tile, kv, kv, qvec, qvec, kvec, kvec],
        out_specs=[q_tile, row],
        out_shape=[jax.ShapeDtypeStruct(qh.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, sp, 1), jnp.float32)],
        **_call_options(target), name="hpllm_flash_forward",
    )(qh, kh, vh, *vecs)
    o = jnp.swapaxes(out[:, :, :s, :d], 1, 2)
    return o, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse)


def _bwd(block_q, block_k, window, target, residuals, d_out):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse = residuals
    b, s, h, d = q.shape
    n_kv, t = k.shape[2], k.shape[1]
    group = h // n_kv
    qh, kh, vh, vecs, bq, bk = _layout(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k)
    sp, tp, dp = qh.shape[2], kh.shape[2], qh.shape[3]
    doh = pad_to(pad_to(jnp.swapaxes(d_out, 1, 2), bq, 2), dp, 3)
    # delta_i = dO_i . O_i, the softmax-gradient correction per query row (padding rows: 0).
    # It equals rowsum(P * dP) (what autodiff of a softmax uses) but needs no pass over the
    # keys first, as in FlashAttention-2; the two cancel in dP - delta only to rounding, so
    # a row seeing one key gets dS ~ eps |dP| rather than the exact 0.
    delta = jnp.einsum("bshd,bshd->bhs", d_out.astype(jnp.float32), o.astype(jnp.float32))
    delta = pad_to(delta, bq, 2)[..., None]
    scale = d ** -0.5
    operands = (qh, kh, vh, doh, lse, delta, *vecs)

    q_tile, kv, row, qvec, kvec = _specs(group, bq, bk, sp, tp, dp, False)
    per_head_kv = pl.BlockSpec((None, None, bk, dp), lambda b, h, i: (b, h, i, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, scale=scale, block_q=bq, window=window),
        grid=(b, h, tp // bk),
        in_specs=[q_tile, kv, kv, q_tile, row, row, qvec, qvec, kvec, kvec],
        out_specs=[per_head_kv, per_head_kv],
        out_shape=[jax.ShapeDtypeStruct((b, h, tp, dp), jnp.float32)] * 2,
        **_call_options(target), name="hpllm_flash_dkdv",
    )(*operands)

    q_tile, kv, row, qvec, kvec = _specs(group, bq, bk, sp, tp, dp, True)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=bk, window=window),
        grid=(b, h, sp // bq),
        in_specs=[q_tile, kv, kv, q_tile, row, row, qvec, qvec, kvec, kvec],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        **_call_options(target), name="hpllm_flash_dq",
    )(*operands)

    def kv_grad(x, like):  # (B, H, Tp, Dp) per query head -> (B, T, KV, D) summed per group
        x = x[:, :, :t, :d].reshape(b, n_kv, group, t, d).sum(axis=2)
        return jnp.swapaxes(x, 1, 2).astype(like.dtype)

    dq = jnp.swapaxes(dq[:, :, :s, :d], 1, 2)
    return dq, kv_grad(dk, k), kv_grad(dv, v), None, None, None, None


_pallas_flash.defvjp(_fwd, _bwd)


def default_target() -> str:
    """Where the kernels go on this JAX backend: compiled on GPU/TPU, interpreted on CPU."""
    return {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(
        jax.default_backend(), "interpret")


def pallas_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, window=None, block_q=128,
                     block_k=128, target=None):
    """Same contract as `reference_attention`. `target`: "interpret", "gpu" (Triton) or
    "tpu" (Mosaic); default from the JAX backend."""
    target = target or default_target()
    _call_options(target)  # reject an unknown target before tracing
    return _pallas_flash(q, k, v, q_pos.astype(jnp.int32), kv_pos.astype(jnp.int32),
                         q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32), block_q, block_k,
                         window, target)

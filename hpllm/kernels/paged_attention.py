"""Paged attention: queries attend to a KV cache stored in fixed-size blocks of a shared pool.

Layout (one layer): k_pages, v_pages (num_blocks, block_size, KV, D). Sequence b's logical
slot j lives at pages[block_tables[b, j // block_size], j % block_size] and holds the key of
position j. A query at position p sees slots 0..p (causal; the slots past a sequence's length
are never visible because their positions exceed every query's). Unused table entries may
point anywhere (the engine uses block 0, a reserved null block). A query with position -1
is padding: it sees nothing and returns zeros. Every query position must lie inside its
table (p < M * block_size). Masking goes through `hpllm.kernels.masking.visible` with one
segment, so a sliding window means what it means everywhere else.

Three implementations of that contract:
  gather   gather the whole table into a dense (B, M*bs) cache, then `reference_attention`:
           the obviously-correct twin; costs M*bs keys per sequence whatever the length.
  online   pure JAX: walk the table a few pages at a time with an online softmax (flash
           decoding's merge, done sequentially), only over the pages some query can see, so
           the cost follows the longest context in the batch, not M, and no dense copy of
           the cache is ever made.
  pallas   one program per (sequence, KV head, query tile) with the tile's G query heads
           stacked as rows, looping over only the pages that tile can see:
             kernel="loop"      (GPU/Triton, and interpret) reads page ids from the table
                                and gathers `pages_per_step` pages per step with dynamic loads;
             kernel="prefetch"  (TPU/Mosaic, and interpret) puts the table in SMEM by scalar
                                prefetch and lets it drive the K/V BlockSpec index_map, one
                                page per step of a last grid axis over the table; steps
                                outside the visible range keep the previous block index (no
                                DMA) and skip the compute, though each still costs a grid
                                step. The pool is viewed as (blocks, bs, KV*D) (free) so a
                                block is (bs, heads*D): Mosaic wants 128-lane multiples, so
                                with D < 128 one program takes 128/D KV heads.
           Neither splits a long context across programs (flash decoding's extra parallel
           axis): a decode batch of B sequences runs B*KV programs.
Both Pallas kernels are checked in interpret mode and lowered for CUDA/TPU in the tests; they
have not been compiled or timed on a GPU/TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hpllm.kernels.masking import NEG_INF, pad_to, reference_attention, visible
from hpllm.kernels.pallas_attention import _call_options, _dot, _next_pow2, default_target

_INT_MAX = jnp.iinfo(jnp.int32).max


def gather_pages(pages, block_tables):
    """(num_blocks, bs, KV, D) pages, (B, M) table -> the dense (B, M*bs, KV, D) view."""
    b, m = block_tables.shape
    g = pages[block_tables]  # (B, M, bs, KV, D)
    return g.reshape(b, m * pages.shape[1], *pages.shape[2:])


def paged_attention_gather(q, k_pages, v_pages, block_tables, q_pos, *, window=None):
    """Pure-JAX version: gather the sequence's blocks into a dense view, then plain attention.
    q (B, S, H, D), q_pos (B, S). Returns (B, S, H, D) in q's dtype."""
    k = gather_pages(k_pages, block_tables).astype(q.dtype)
    v = gather_pages(v_pages, block_tables).astype(q.dtype)
    b, t = k.shape[:2]
    kv_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q_seg = jnp.where(q_pos >= 0, 1, 2).astype(jnp.int32)  # padding queries match no key
    kv_seg = jnp.ones((b, t), jnp.int32)
    return reference_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window)


def _sees(q_pos, kv_pos, window):
    """The model's masking rule with every query and key in segment 1; padding queries
    (position -1) see nothing because no key position is <= -1."""
    return visible(q_pos, kv_pos, 1, 1, window)


def visible_pages(q_pos, block_size: int, window=None, n_pages=None):
    """q_pos (..., n) -> (first, end) int32 (...): the pages [first, end) of a table hold every
    key the n queries can see; first = end = 0 when all n are padding. `end` is capped at the
    table's `n_pages`, so a position past the table cannot send a kernel outside it."""
    last = jnp.max(q_pos, axis=-1)
    any_valid = last >= 0
    end = jnp.where(any_valid, last // block_size + 1, 0)
    if n_pages is not None:
        end = jnp.minimum(end, n_pages)
    if window is None:
        return jnp.zeros_like(end), end
    lowest = jnp.min(jnp.where(q_pos >= 0, q_pos, _INT_MAX), axis=-1)
    first = jnp.where(any_valid, jnp.maximum(lowest - window + 1, 0) // block_size, 0)
    return jnp.minimum(first, end), end


# ---------------------------------------------------------------- pure JAX, online softmax

# Keys per step of the online version: large enough that the per-iteration cost of XLA:CPU's
# while loop is amortised, small enough that the gathered chunk (B x 256 x KV x D) stays in
# cache. 64-1024 were timed (bench/paged_attention.py --step-tokens) on a loaded machine
# with no consistent winner; 256 was never far from the best (docs/perf/paged_attention.md).
ONLINE_STEP_TOKENS = 256


def paged_attention_online(q, k_pages, v_pages, block_tables, q_pos, *, window=None,
                           pages_per_step=None):
    """Same contract as `paged_attention_gather`, without the dense copy: a loop over steps of
    `pages_per_step` table entries (default ~ONLINE_STEP_TOKENS keys), from the first page any
    query of the batch can see to the last, with a running max / normaliser / output."""
    b, s, h, d = q.shape
    bs, n_kv = k_pages.shape[1], k_pages.shape[2]
    g = h // n_kv
    per = pages_per_step or max(1, ONLINE_STEP_TOKENS // bs)
    tables = pad_to(block_tables, per, 1)  # extra entries: positions past every query's
    first, end = visible_pages(q_pos.reshape(-1), bs, window, block_tables.shape[1])
    step_lo, step_hi = first // per, (end + per - 1) // per
    qg = q.reshape(b, s, n_kv, g, d)
    qp = q_pos[:, None, None, :, None]  # (B, 1, 1, S, 1) against key positions (T,)
    scale = d ** -0.5

    def step(c, carry):
        m, l, acc = carry
        ids = lax.dynamic_slice_in_dim(tables, c * per, per, axis=1)  # (B, per)
        k = k_pages[ids].reshape(b, per * bs, n_kv, d).astype(q.dtype)
        v = v_pages[ids].reshape(b, per * bs, n_kv, d).astype(q.dtype)
        mask = _sees(qp, c * per * bs + jnp.arange(per * bs, dtype=jnp.int32), window)
        scores = jnp.einsum("bskgd,btkd->bkgst", qg, k,
                            preferred_element_type=jnp.float32) * scale
        scores = jnp.where(mask, scores, NEG_INF)
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgst,btkd->bkgsd", p.astype(v.dtype), v,
                        preferred_element_type=jnp.float32)
        return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

    init = (jnp.full((b, n_kv, g, s), NEG_INF, jnp.float32),
            jnp.zeros((b, n_kv, g, s), jnp.float32), jnp.zeros((b, n_kv, g, s, d), jnp.float32))
    _, l, acc = lax.fori_loop(step_lo, step_hi, step, init)
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    return jnp.moveaxis(out, 3, 1).reshape(b, s, h, d).astype(q.dtype)  # (B,K,G,S,D) -> (B,S,H,D)


# ---------------------------------------------------------------- Pallas

def _online_update(q, k, v, kp, qp, carry, scale, window):
    """One online-softmax step of a tile: q (R, D) rows at positions qp (R, 1) against keys
    k, v (T, D) at positions kp (1, T). Statistics (R, 1) and accumulator (R, D) in f32."""
    m, l, acc = carry
    k, v = k.astype(q.dtype), v.astype(q.dtype)  # a pool stored narrower than the queries
    mask = _sees(qp, kp, window)
    s = jnp.where(mask, _dot(q, k, trans_b=True) * scale, NEG_INF)
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    acc = acc * alpha + _dot(p.astype(v.dtype), v)
    return m_new, l * alpha + p.sum(axis=1, keepdims=True), acc


def _finish(l, acc, dtype):
    seen = l > 0
    return jnp.where(seen, acc / jnp.where(seen, l, 1.0), 0.0).astype(dtype)


def _loop_kernel(lo_ref, hi_ref, tables_ref, qp_ref, q_ref, k_ref, v_ref, o_ref, *, scale,
                 per, window):
    """Program (b, h, i): rows of query tile i of KV head h; k_ref/v_ref (blocks, bs, D) are
    head h of the whole pool, read `per` pages at a time at ids from the table."""
    q, qp = q_ref[...], qp_ref[...]
    rows, d = q.shape
    t = per * k_ref.shape[1]

    def body(c, carry):
        ids = tables_ref[pl.ds(c * per, per)]
        k = k_ref[ids].reshape(t, d)
        v = v_ref[ids].reshape(t, d)
        kp = c * t + lax.broadcasted_iota(jnp.int32, (1, t), 1)
        return _online_update(q, k, v, kp, qp, carry, scale, window)

    init = (jnp.full((rows, 1), NEG_INF, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, d), jnp.float32))
    _, l, acc = lax.fori_loop(lo_ref[0], hi_ref[0], body, init)
    o_ref[...] = _finish(l, acc, o_ref.dtype)


def _prefetch_kernel(tables_ref, lo_ref, hi_ref, qp_ref, q_ref, k_ref, v_ref, o_ref,
                     m_ref, l_ref, acc_ref, *, scale, n_tiles, window):
    """Program (b, head group, i, j): page j of the table for query tile i of a group of KV
    heads (one head unless Mosaic's 128-lane rule needs several); k_ref/v_ref (bs, heads*D)
    were fetched by the index map. Statistics live in scratch across j."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    tile = b * n_tiles + i
    n_h, _, d = q_ref.shape
    bs = k_ref.shape[0]

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((j >= lo_ref[tile]) & (j < hi_ref[tile]))
    def _():
        kp = j * bs + lax.broadcasted_iota(jnp.int32, (1, bs), 1)
        qp = qp_ref[...]
        for g in range(n_h):  # static: heads of this program
            cols = slice(g * d, (g + 1) * d)
            m, l, acc = _online_update(q_ref[g], k_ref[:, cols], v_ref[:, cols], kp, qp,
                                       (m_ref[g], l_ref[g], acc_ref[g]), scale, window)
            m_ref[g], l_ref[g], acc_ref[g] = m, l, acc

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        for g in range(n_h):
            o_ref[g] = _finish(l_ref[g], acc_ref[g], o_ref.dtype)


def _heads_per_program(n_kv: int, d: int) -> int:
    """KV heads one prefetch program takes: Mosaic wants the last block dim (heads x D of
    the (blocks, bs, KV*D) pool view) a multiple of 128 lanes, or all of it."""
    for n in range(1, n_kv):
        if n_kv % n == 0 and (n * d) % 128 == 0:
            return n
    return n_kv


def _tiles(q, q_pos, n_kv, block_rows):
    """(B, S, H, D) -> (B, KV, R, D) rows ordered (query, head in group), padded to whole
    tiles of `rows` (a power of two >= 16, as Triton dots and TPU sublanes want), and the
    row positions (B, R, 1), padding rows at -1."""
    b, s, h, d = q.shape
    g = h // n_kv
    rows = min(block_rows, max(16, _next_pow2(s * g)))
    qt = jnp.swapaxes(q.reshape(b, s, n_kv, g, d), 1, 2).reshape(b, n_kv, s * g, d)
    qp = jnp.repeat(q_pos.astype(jnp.int32), g, axis=1)
    return pad_to(qt, rows, 2), pad_to(qp, rows, 1, value=-1)[..., None], rows


def paged_attention_pallas(q, k_pages, v_pages, block_tables, q_pos, *, window=None,
                           target=None, kernel=None, block_rows=64, pages_per_step=None):
    """Same contract as `paged_attention_gather`, as a Pallas kernel. `target`: "interpret",
    "gpu" (Triton) or "tpu" (Mosaic), default from the JAX backend; `kernel`: "loop" or
    "prefetch" (default: prefetch on TPU, loop elsewhere). `block_rows` caps the rows
    (queries x heads per KV head) of one program; `pages_per_step` (loop kernel) defaults to
    enough pages for 64 keys."""
    target = target or default_target()
    options = _call_options(target, grid_rank=4)  # also rejects an unknown target
    kernel = kernel or ("prefetch" if target == "tpu" else "loop")
    b, s, h, d = q.shape
    _, bs, n_kv, _ = k_pages.shape
    per = pages_per_step or max(1, 64 // bs)
    if target == "gpu" and (bs & (bs - 1) or d & (d - 1) or per & (per - 1)):
        raise ValueError(f"the gpu (Triton) paged kernel needs power-of-two block_size, head "
                         f"dim and pages_per_step, got {bs}, {d} and {per}")
    if target == "tpu" and kernel == "loop":
        raise ValueError("the loop paged kernel is for GPU/interpret; TPU runs kernel='prefetch'")
    qt, qp, rows = _tiles(q, q_pos, n_kv, block_rows)
    n_tiles = qt.shape[2] // rows
    first, end = visible_pages(qp[..., 0].reshape(b, n_tiles, rows), bs, window,
                               block_tables.shape[1])  # (B, tiles)
    scale = d ** -0.5
    q_spec = pl.BlockSpec((None, None, rows, d), lambda b, h, i, *_: (b, h, i, 0))
    qp_spec = pl.BlockSpec((None, rows, 1), lambda b, h, i, *_: (b, i, 0))
    out_shape = jax.ShapeDtypeStruct(qt.shape, q.dtype)
    if kernel == "loop":
        tables = pad_to(block_tables.astype(jnp.int32), per, 1)
        lo, hi = first // per, (end + per - 1) // per  # in steps of `per` pages
        step_spec = pl.BlockSpec((None, None, 1), lambda b, h, i: (b, i, 0))
        pool_spec = pl.BlockSpec((k_pages.shape[0], bs, None, d), lambda b, h, i: (0, 0, h, 0))
        out = pl.pallas_call(
            functools.partial(_loop_kernel, scale=scale, per=per, window=window),
            grid=(b, n_kv, n_tiles),
            in_specs=[step_spec, step_spec, pl.BlockSpec((None, tables.shape[1]),
                                                         lambda b, h, i: (b, 0)),
                      qp_spec, q_spec, pool_spec, pool_spec],
            out_specs=q_spec, out_shape=out_shape, **options, name="hpllm_paged_loop",
        )(lo[..., None], hi[..., None], tables, qp, qt, k_pages, v_pages)
    elif kernel == "prefetch":
        from jax.experimental.pallas import tpu as pltpu

        m, n_h = block_tables.shape[1], _heads_per_program(n_kv, d)

        def page(b, h, i, j, tables, lo, hi):  # clamped to the visible range: no new DMA
            tile = b * n_tiles + i
            j = jnp.minimum(jnp.maximum(j, lo[tile]), jnp.maximum(hi[tile] - 1, lo[tile]))
            return tables[b * m + j], 0, h

        heads_spec = pl.BlockSpec((None, n_h, rows, d), lambda b, h, i, *_: (b, h, i, 0))
        page_spec = pl.BlockSpec((None, bs, n_h * d), page)
        if target == "tpu":  # the page axis carries the accumulators: not parallel
            options = {"compiler_params": dataclasses.replace(
                options["compiler_params"],
                dimension_semantics=("parallel",) * 3 + ("arbitrary",))}
        out = pl.pallas_call(
            functools.partial(_prefetch_kernel, scale=scale, n_tiles=n_tiles, window=window),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=3, grid=(b, n_kv // n_h, n_tiles, m),
                in_specs=[qp_spec, heads_spec, page_spec, page_spec], out_specs=heads_spec,
                scratch_shapes=[pltpu.VMEM((n_h, rows, 1), jnp.float32),
                                pltpu.VMEM((n_h, rows, 1), jnp.float32),
                                pltpu.VMEM((n_h, rows, d), jnp.float32)]),
            out_shape=out_shape, **options, name="hpllm_paged_prefetch",
        )(block_tables.astype(jnp.int32).reshape(-1), first.reshape(-1), end.reshape(-1),
          qp, qt, *(x.reshape(x.shape[0], bs, n_kv * d) for x in (k_pages, v_pages)))
    else:
        raise ValueError(f"unknown paged Pallas kernel {kernel!r}: loop or prefetch")
    g = h // n_kv
    out = out[:, :, :s * g].reshape(b, n_kv, s, g, d)
    return jnp.swapaxes(out, 1, 2).reshape(b, s, h, d)


# ---------------------------------------------------------------- entry point

def _check(q, k_pages, v_pages, block_tables, q_pos):
    if q.ndim != 4 or k_pages.ndim != 4:
        raise ValueError(f"paged attention wants q (B, S, H, D) and pages (blocks, block_size, "
                         f"KV, D), got {q.shape} and {k_pages.shape}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    b, s, h, d = q.shape
    if k_pages.shape[3] != d or h % k_pages.shape[2]:
        raise ValueError(f"q {q.shape} does not fit pages {k_pages.shape}: head dims must match "
                         f"and query heads be a multiple of KV heads")
    if block_tables.ndim != 2 or block_tables.shape[0] != b or q_pos.shape != (b, s):
        raise ValueError(f"block_tables {block_tables.shape} must be (B={b}, M) and q_pos "
                         f"{q_pos.shape} must be (B={b}, S={s})")
    for name, x in (("block_tables", block_tables), ("q_pos", q_pos)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integer, got {x.dtype}")


# Crossover measured on CPU (bench/paged_attention.py, docs/perf/paged_attention.md): below
# ~128 table tokens one gather is as cheap as anything, and the online version's while loop
# costs tens to hundreds of microseconds; from 128 up online was level or faster (1.2-10x
# at 512-16K), and with a table sized past the context (an engine sizes it for
# max_model_len) faster by up to the ratio of capacity to context: gather pays for the
# capacity. Prefill chunks over a cached prefix: online 1.3-1.9x faster too.
AUTO_ONLINE_MIN_TABLE_TOKENS = 128


def choose_implementation(n_queries: int, table_tokens: int) -> str:
    """What `impl="auto"` runs for these static sizes (block_tables.shape[1] * block_size
    table tokens). The Pallas kernel stays opt-in (`impl="pallas"`) until it has been
    compiled and measured on a GPU/TPU, as in `hpllm.model.attention`."""
    del n_queries  # online also won for prefill chunks; kept like the model's chooser
    return "online" if table_tokens >= AUTO_ONLINE_MIN_TABLE_TOKENS else "gather"


IMPLEMENTATIONS = {"gather": paged_attention_gather, "online": paged_attention_online,
                   "pallas": paged_attention_pallas}


def paged_attention(q, k_pages, v_pages, block_tables, q_pos, *, window=None, impl="auto"):
    """The entry point the model calls with a paged cache. impl: "gather", "online",
    "pallas" (compiled on GPU/TPU, interpreted on CPU) or "auto"."""
    _check(q, k_pages, v_pages, block_tables, q_pos)
    if impl == "auto":
        impl = choose_implementation(q.shape[1], block_tables.shape[1] * k_pages.shape[1])
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"unknown paged attention implementation {impl!r}; known: "
                         f"{', '.join(IMPLEMENTATIONS)}, auto") from None
    return fn(q, k_pages, v_pages, block_tables, q_pos, window=window)

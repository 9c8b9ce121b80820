"""Paged attention (gather, online, Pallas loop/prefetch kernels) vs a float64 NumPy reference
and vs `reference_attention` on the same cache stored densely. Random inputs with odd sizes:
block sizes 1/5/16, ragged lengths, GQA groups 1/3/8, sliding windows, padding queries,
prefill chunks starting mid-block, and pools whose blocks are shuffled so that physical order
is not logical order. The Pallas kernels run with interpret=True on CPU; they are also lowered
for CUDA (Triton) and TPU (Mosaic) without the hardware, which checks the block-shape rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hpllm.kernels import paged_attention as pa
from hpllm.kernels.masking import reference_attention
from numerics import rel_err


def paged_case(rng, lengths, n_new, heads, kv_heads, dim, block, dtype, spare_slots=1,
               null_fill=0.0):
    """Sequences of `lengths` tokens, the last `n_new` of each being the queries (a prefill
    chunk, or decode for n_new = 1); shorter query rows are padded with position -1. Every
    sequence's table has `spare_slots` unused entries past its blocks pointing at the null
    block 0, whose contents are `null_fill` (garbage no query may see)."""
    b = len(lengths)
    m = max(-(-n // block) for n in lengths) + spare_slots
    q = rng.standard_normal((b, n_new, heads, dim))
    dense_k = rng.standard_normal((b, m * block, kv_heads, dim))
    dense_v = rng.standard_normal((b, m * block, kv_heads, dim))
    used = [-(-n // block) for n in lengths]
    ids = 1 + rng.permutation(sum(used))  # shuffled: physical order != logical order
    pool_k = np.full((1 + sum(used), block, kv_heads, dim), null_fill)
    pool_v = np.full_like(pool_k, null_fill)
    tables = np.zeros((b, m), np.int32)
    q_pos = np.full((b, n_new), -1, np.int32)
    start = 0
    for i, n in enumerate(lengths):
        tables[i, :used[i]] = ids[start:start + used[i]]
        start += used[i]
        for j in range(used[i]):
            pool_k[tables[i, j]] = dense_k[i, j * block:(j + 1) * block]
            pool_v[tables[i, j]] = dense_v[i, j * block:(j + 1) * block]
        new = min(n, n_new - i % 2)  # odd rows: one padding query at the end
        q_pos[i, :new] = np.arange(n - new, n)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return (cast(q), cast(pool_k), cast(pool_v), jnp.asarray(tables), jnp.asarray(q_pos),
            cast(dense_k), cast(dense_v))


def numpy_paged_reference(q, k_pages, v_pages, tables, q_pos, window):
    """float64, one query and head at a time, reading slots straight through the table."""
    q, kp, vp = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    tables, q_pos = np.asarray(tables), np.asarray(q_pos)
    b, s, h, d = q.shape
    block, n_kv = kp.shape[1], kp.shape[2]
    out = np.zeros((b, s, h, d))
    for i in range(b):
        for t in range(s):
            p = q_pos[i, t]
            if p < 0:
                continue
            seen = [j for j in range(p + 1) if window is None or p - j < window]
            blocks, offsets = tables[i, np.array(seen) // block], np.array(seen) % block
            for head in range(h):
                kv = head // (h // n_kv)
                keys, values = kp[blocks, offsets, kv], vp[blocks, offsets, kv]
                scores = keys @ q[i, t, head] / np.sqrt(d)
                w = np.exp(scores - scores.max())
                out[i, t, head] = w @ values / w.sum()
    return out


def run_impl(impl, *args, window, **kw):
    if impl == "online/1":  # one page per step: many steps, a boundary inside every block
        return pa.paged_attention_online(*args, window=window, pages_per_step=1)
    if impl == "online":
        return jax.jit(lambda *a: pa.paged_attention_online(*a, window=window, **kw))(*args)
    if impl in ("loop", "prefetch"):
        return pa.paged_attention_pallas(*args, window=window, target="interpret", kernel=impl,
                                         **kw)
    return jax.jit(lambda *a: pa.paged_attention(*a, window=window, impl=impl))(*args)


CASES = [  # lengths, new tokens, heads, kv heads, head dim, block, window
    ((1, 7, 13), 1, 2, 2, 8, 1, None),      # block size 1, GQA 1, decode, ragged
    ((12, 23), 7, 6, 2, 16, 5, 6),          # block 5, GQA 3, prefill from mid-block, window
    ((40, 17, 3), 1, 8, 1, 32, 16, None),   # block 16, GQA 8 (MQA), decode
    ((37, 70), 20, 8, 1, 8, 16, 9),         # GQA 8, a chunk crossing blocks, window
    ((9, 30), 4, 8, 4, 64, 5, None),        # prefetch takes 2 of 4 KV heads per program
]
IMPLS = ["gather", "online", "online/1", "loop", "prefetch"]
PALLAS = ["loop", "prefetch"]
F32, BF16 = (jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)


def matrix():
    """Every implementation on every case in float32 and bfloat16; by default (interpret mode
    and compiles make each case seconds) bfloat16 only on two cases of the new kernels, and
    one page per step only on the block sizes 1 and 5 and the chunk crossing blocks; the rest
    under -m slow."""
    for impl in IMPLS:
        for i, case in enumerate(CASES):
            fast = impl != "online/1" or i in (0, 1, 3)
            yield pytest.param(impl, case, *F32, id=f"{impl}-f32-{i}",
                               marks=() if fast else pytest.mark.slow)
            fast = impl not in ("gather", "online/1") and i in (1, 3)
            yield pytest.param(impl, case, *BF16, id=f"{impl}-bf16-{i}",
                               marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize("impl, case, dtype, tol", matrix())
def test_matches_numpy_and_dense_reference(impl, case, dtype, tol):
    lengths, n_new, heads, kv_heads, dim, block, window = case
    rng = np.random.default_rng(CASES.index(case))
    q, kp, vp, tables, q_pos, dense_k, dense_v = paged_case(
        rng, lengths, n_new, heads, kv_heads, dim, block, dtype)
    out = run_impl(impl, q, kp, vp, tables, q_pos, window=window)
    assert out.shape == q.shape and out.dtype == dtype
    expected = numpy_paged_reference(q, kp, vp, tables, q_pos, window)
    assert rel_err(out, expected) < tol
    assert np.all(np.asarray(out, np.float32)[np.asarray(q_pos) < 0] == 0)  # padding -> 0
    # The same keys/values stored contiguously, through the model's reference attention.
    b, t = dense_k.shape[:2]
    kv_pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    ones = jnp.ones((b, t), jnp.int32)
    dense = jax.jit(lambda *a: reference_attention(*a, window=window))(
        q, dense_k, dense_v, q_pos, kv_pos, jnp.ones_like(q_pos), ones)
    assert rel_err(out, dense) < tol


@pytest.mark.parametrize("impl", ["loop", "prefetch", "online"])
def test_reads_only_visible_pages(impl):
    """Pages past a sequence's length, before its window, and the null block are NaN: an
    implementation that read one (even with zero weight: 0 * NaN = NaN) would return NaN.
    The Pallas kernels bound the loop per sequence and query tile, the online version per
    batch, so it gets one sequence; the cost follows the context, not the table. One page
    per step, since a step of several pages reads (and masks) whole steps."""
    rng = np.random.default_rng(7)
    lengths = (45,) if impl == "online" else (45, 9, 30)
    q, kp, vp, tables, q_pos, _, _ = paged_case(rng, lengths, 3, 4, 2, 16, 4, jnp.float32,
                                                spare_slots=5, null_fill=np.nan)
    window = 10
    tables_np = np.asarray(tables)
    hidden = np.zeros(kp.shape[0], bool)  # blocks holding only keys no query can see
    for i, n in enumerate(lengths):
        lowest = np.asarray(q_pos[i])[np.asarray(q_pos[i]) >= 0].min()
        for j in range(-(-n // 4)):
            hidden[tables_np[i, j]] = (j + 1) * 4 <= lowest - window + 1
    kp = kp.at[hidden].set(np.nan)
    vp = vp.at[hidden].set(np.nan)
    assert hidden.sum() >= len(lengths)  # the test hides something in every sequence
    kw = {} if impl == "prefetch" else {"pages_per_step": 1}
    out = run_impl(impl, q, kp, vp, tables, q_pos, window=window, **kw)
    expected = numpy_paged_reference(np.asarray(q), np.nan_to_num(np.asarray(kp)),
                                     np.nan_to_num(np.asarray(vp)), tables, q_pos, window)
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, expected) < 1e-5


def test_pool_narrower_than_queries():
    """bfloat16 pages with float32 queries: every implementation upcasts the pages."""
    rng = np.random.default_rng(3)
    q, kp, vp, tables, q_pos, _, _ = paged_case(rng, (20, 11), 3, 6, 2, 16, 5, jnp.float32)
    kp, vp = kp.astype(jnp.bfloat16), vp.astype(jnp.bfloat16)
    expected = numpy_paged_reference(q, kp, vp, tables, q_pos, None)
    for impl in ["gather", "online", "loop", "prefetch"]:
        out = run_impl(impl, q, kp, vp, tables, q_pos, window=None)
        assert out.dtype == jnp.float32 and rel_err(out, expected) < 1e-5, impl


def test_auto_picks_by_table_size():
    small, large = pa.AUTO_ONLINE_MIN_TABLE_TOKENS - 1, pa.AUTO_ONLINE_MIN_TABLE_TOKENS
    assert pa.choose_implementation(1, small) == "gather"
    assert pa.choose_implementation(1, large) == "online"
    rng = np.random.default_rng(11)
    for lengths, block in (((3, 2), 1), ((90, 130), 16)):  # a tiny table and a large one
        q, kp, vp, tables, q_pos, _, _ = paged_case(rng, lengths, 2, 4, 2, 8, block,
                                                    jnp.float32)
        out = pa.paged_attention(q, kp, vp, tables, q_pos)  # impl="auto" is the default
        assert rel_err(out, numpy_paged_reference(q, kp, vp, tables, q_pos, None)) < 1e-5


def bad_inputs():
    q = jnp.zeros((2, 1, 4, 8))
    pages = jnp.zeros((5, 4, 2, 8))
    tables = jnp.zeros((2, 3), jnp.int32)
    pos = jnp.zeros((2, 1), jnp.int32)
    return {
        "wants q \\(B, S, H, D\\)": (q[0], pages, pages, tables, pos),
        "differ": (q, pages, pages[:4], tables, pos),
        "head dims must match": (q, pages[..., :4], pages[..., :4], tables, pos),
        "multiple of KV heads": (jnp.zeros((2, 1, 3, 8)), pages, pages, tables, pos),
        "must be \\(B=2, M\\)": (q, pages, pages, tables[:1], pos),
        "must be \\(B=2, S=1\\)": (q, pages, pages, tables, pos[:, :0]),
        "block_tables must be integer": (q, pages, pages, tables.astype(jnp.float32), pos),
    }


@pytest.mark.parametrize("message", list(bad_inputs()))
def test_bad_shapes_are_rejected(message):
    with pytest.raises(ValueError, match=message):
        pa.paged_attention(*bad_inputs()[message])


def test_bad_options_are_rejected():
    args = bad_inputs()["differ"][:2] + (jnp.zeros((5, 4, 2, 8)),) + bad_inputs()["differ"][3:]
    with pytest.raises(ValueError, match="unknown paged attention implementation 'dense'"):
        pa.paged_attention(*args, impl="dense")
    with pytest.raises(ValueError, match="unknown Pallas target 'cuda'"):
        pa.paged_attention_pallas(*args, target="cuda")
    with pytest.raises(ValueError, match="unknown paged Pallas kernel 'grid'"):
        pa.paged_attention_pallas(*args, target="interpret", kernel="grid")
    odd = (args[0], jnp.zeros((5, 5, 2, 8)), jnp.zeros((5, 5, 2, 8))) + args[3:]
    with pytest.raises(ValueError, match="power-of-two block_size"):
        pa.paged_attention_pallas(*odd, target="gpu")
    with pytest.raises(ValueError, match="TPU runs kernel='prefetch'"):
        pa.paged_attention_pallas(*args, target="tpu", kernel="loop")


# ---------------------------------------------------------------- lowering without hardware

def lowered_text(platform, target, n_new, kv_heads, dim, block, dtype, window):
    shapes = (jax.ShapeDtypeStruct((3, n_new, 8, dim), dtype),
              jax.ShapeDtypeStruct((40, block, kv_heads, dim), dtype),
              jax.ShapeDtypeStruct((40, block, kv_heads, dim), dtype),
              jax.ShapeDtypeStruct((3, 12), jnp.int32),
              jax.ShapeDtypeStruct((3, n_new), jnp.int32))

    def fn(q, k, v, tables, pos):
        return pa.paged_attention_pallas(q, k, v, tables, pos, window=window, target=target)

    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()


LOWERING = [  # new tokens, kv heads, head dim, block size, dtype, window
    (1, 2, 128, 16, jnp.bfloat16, None),   # decode, one KV head per program on TPU
    (33, 2, 64, 8, jnp.float32, 100),      # prefill chunk, two query tiles; 2 heads/program
    (1, 1, 64, 32, jnp.bfloat16, 7),       # MQA: the whole 64-lane pool row per program
]


@pytest.mark.parametrize("case", LOWERING, ids=[str(c) for c in LOWERING])
def test_lowers_to_triton_for_gpu(case):
    assert lowered_text("cuda", "gpu", *case).count("@__gpu$xla.gpu.triton(") == 1


@pytest.mark.parametrize("case", LOWERING, ids=[str(c) for c in LOWERING])
def test_lowers_to_mosaic_for_tpu(case, monkeypatch):
    # Mosaic asks the default device which TPU generation it targets (as in
    # tests/test_pallas_lowering.py; private API pinned to the tested JAX).
    from jax._src.pallas.mosaic import tpu_info

    monkeypatch.setitem(tpu_info.registry, "cpu", lambda: tpu_info.get_tpu_info_for_chip(
        tpu_info.ChipVersion.TPU_V5E, 1))
    assert lowered_text("tpu", "tpu", *case).count("@tpu_custom_call(") == 1

"""The whole Llama decoder step in one CPU FFI call (csrc/decoder.cc): a ragged batch of
tokens from several sequences over a paged KV pool, the fused path of single-stream
generate() and the engine on CPU.

XLA:CPU runs a decode step as ~36 ops per layer, each a dispatch, a thread-pool hand-off
and often a convert; at SmolLM2's size that, not the weight bytes, set the step time. The
kernel runs embed -> layers -> final norm -> LM head as phases of chunked work that every
pool thread claims through atomic counters, with one generation-counter barrier per phase.

    available() -> bool
    unsupported(config, params, kv_dtype) -> str | None       None: the kernel can run it
    prepare(params, config) -> DecoderWeights                  kernel layout, built once
    create_pool(config, num_blocks, block_size, kv_dtype) -> KVPool
    step(weights, pool, tokens, positions, seq_index, tables, logits_index, *, config)
        -> (logits (R, V) float32, pool)
    copy_blocks(pool, src, dst) -> pool

Token t of sequence s = seq_index[t] at position p = positions[t] writes its key/value at
block tables[s, p // block_size], offset p % block_size, then attends over positions 0..p of
s (within the attention window) in every layer; the tokens of one step see each other
causally. Position -1 is padding: it writes nothing and reads nothing (its logits are
meaningless); so is a token whose table row lacks one of its blocks (an id outside the
pool), and a token id outside the vocabulary is an error. Block 0 is the engine's reserved
null block. The pool (float32, or int8 codes with a float32 scale per token per head as
hpllm.quantized.quantize_kv) is aliased in place: donate it under jit. Weights: float32, int8 per
row ("int8") or int4 per group ("int4") QuantizedWeights; anything else is reported by
`unsupported`. HPLLM_DECODER_THREADS caps the threads a step uses; HPLLM_DECODER_LINGER_US
sets how long the kernel's helper threads spin after a step before sleeping (default 0);
HPLLM_DECODER_PROFILE=1 makes the kernel time its phases (`profile()`). Of hpllm this imports only
hpllm.kernels.native (which builds and registers the kernel).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.kernels import native

SOURCE = pathlib.Path(__file__).parent / "csrc" / "decoder.cc"
HEADERS = (SOURCE.parent / "gemm.h",)
_SYMBOLS = {"": "HpllmDecoderStep", "_kv8": "HpllmDecoderStepKv8"}  # float32 / int8 pools
THREADS_ENV = "HPLLM_DECODER_THREADS"  # cap on the threads a step uses (0/unset: all)
_LAYER_KEYS = frozenset({"attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up",
                         "w_down"})
_SCHEMES = ("int8", "int4")
KV_DTYPES = ("float32", "int8")  # int8: codes + a float32 scale per token per head


def _target(portable: bool, kv: str = "") -> str:
    return "hpllm_decoder_step" + kv + ("_portable" if portable else "")


def _targets(portable: bool) -> dict:
    return {_target(portable, kv): symbol for kv, symbol in _SYMBOLS.items()}


def _status(portable: bool = False) -> str | None:
    return native.load_status("decoder", [SOURCE], HEADERS, _targets(portable),
                              portable=portable)


def available(portable: bool = False) -> bool:
    """Whether the kernel is enabled, built and registered (built on the first call)."""
    return _status(portable) is None


# ------------------------------------------------------------------------- what it runs

def _is_quantized(w) -> bool:  # hpllm.quantized.QuantizedWeight (a higher layer): by shape
    return hasattr(w, "scheme") and hasattr(w, "q") and hasattr(w, "in_axes")


def _layers(params) -> list:
    layers = params["layers"]
    return list(layers) if isinstance(layers, (list, tuple)) else [layers]


def unsupported(config, params, kv_dtype: str = "float32") -> str | None:
    """Why the kernel cannot run this model (None: it can)."""
    c = config
    if c.n_experts:
        return "mixture-of-experts MLPs are not supported"
    if c.pos_embedding != "rope":
        return f"{c.pos_embedding} position embeddings are not supported (RoPE only)"
    if kv_dtype not in KV_DTYPES:
        return f"KV cache dtype {kv_dtype} is not supported ({' or '.join(KV_DTYPES)} only)"
    if not isinstance(params, dict) or "layers" not in params or "embed" not in params:
        return "params are not a decoder parameter tree"
    extra = set(params) - {"embed", "layers", "final_norm", "unembed"}
    if extra:
        return f"unknown parameters {sorted(extra)}"
    leaves = {"embed": params["embed"]}
    if not c.tie_embeddings:
        if "unembed" not in params:
            return "untied model without an unembed matrix"
        leaves["unembed"] = params["unembed"]
    for i, layer in enumerate(_layers(params)):
        if set(layer) != _LAYER_KEYS:
            return f"layer {i} has parameters {sorted(set(layer) ^ _LAYER_KEYS)} the kernel " \
                   "does not know (biases? MoE?)"
        leaves.update({f"{k}[{i}]": v for k, v in layer.items()})
        for group in (("wq", "wk", "wv"), ("w_gate", "w_up")):
            kinds = {_kind(layer[k]) for k in group}
            if len(kinds) > 1:
                return f"layer {i}: {'/'.join(group)} are stored differently ({kinds}); " \
                       "the kernel fuses them"
    for name, w in leaves.items():
        if _is_quantized(w):
            if w.scheme not in _SCHEMES or w.zero is not None:
                return f"{name}: quantization scheme {w.scheme} is not supported " \
                       f"({', '.join(_SCHEMES)} only)"
        elif not jnp.issubdtype(w.dtype, jnp.floating):
            return f"{name}: dtype {w.dtype} is not supported"
    return None


def _kind(w) -> tuple:
    return (w.scheme, w.group_size) if _is_quantized(w) else ("float",)


# --------------------------------------------------------------------------- the layout

@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["embed", "embed_scale", "attn_norm", "wqkv", "wqkv_scale",
                                "wo", "wo_scale", "mlp_norm", "wgu", "wgu_scale", "wdown",
                                "wdown_scale", "final_norm", "head", "head_scale"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DecoderWeights:
    """Every matrix output-major (N, K) and stacked over layers (see csrc/decoder.cc);
    `*_scale` float32 (..., N, groups) for quantized matrices, (1,) for float ones."""
    embed: jax.Array
    embed_scale: jax.Array
    attn_norm: jax.Array
    wqkv: jax.Array
    wqkv_scale: jax.Array
    wo: jax.Array
    wo_scale: jax.Array
    mlp_norm: jax.Array
    wgu: jax.Array
    wgu_scale: jax.Array
    wdown: jax.Array
    wdown_scale: jax.Array
    final_norm: jax.Array
    head: jax.Array
    head_scale: jax.Array


_NO_SCALE = np.ones((1,), np.float32)
# The layout is built in NumPy (host arrays, one copy each): as jnp ops every transpose and
# concatenate of prepare would be a separately compiled XLA program.


def _codes(w) -> tuple:
    """A quantized leaf as (codes, float32 scale) host arrays."""
    return np.asarray(w.q), np.asarray(w.scale, np.float32)


def _nk(w, out_axes: int):
    """A float (..., K, *out) matrix (out_axes trailing output axes) as float32 (..., N, K);
    a quantized one as stored (already (N, K))."""
    if _is_quantized(w):
        return _codes(w)
    w = np.asarray(w, np.float32)
    k_axis = w.ndim - 1 - out_axes
    w = w.reshape(*w.shape[:k_axis + 1], -1)  # (..., K, N)
    return np.ascontiguousarray(np.swapaxes(w, -1, -2)), _NO_SCALE


def _nk_in2(w):
    """wo: float (..., H, Dh, D) -> (..., D, H*Dh); quantized: as stored."""
    if _is_quantized(w):
        return _codes(w)
    w = np.asarray(w, np.float32)
    w = w.reshape(*w.shape[:-3], -1, w.shape[-1])
    return np.ascontiguousarray(np.swapaxes(w, -1, -2)), _NO_SCALE


def _join(pairs: list, combine):
    """(codes, scale) pairs combined (np.stack over layers, or np.concatenate along N)."""
    codes = combine([p[0] for p in pairs])
    if pairs[0][1] is _NO_SCALE:
        return codes, _NO_SCALE
    return codes, combine([p[1] for p in pairs])


def _stack(pairs: list):
    return _join(pairs, np.stack)


def _concat(pairs: list):
    return _join(pairs, lambda parts: np.concatenate(parts, axis=-2))


def prepare(params, config) -> DecoderWeights:
    """The kernel's layout of `params` (stacked or unstacked layers), built once; check
    `unsupported` first."""
    reason = unsupported(config, params)
    if reason is not None:
        raise ValueError(f"cpu_decoder cannot run this model: {reason}")
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        per_layer = list(layers)
    else:
        per_layer = [_slice_layer(layers, i) for i in range(config.n_layers)]
    qkv = _stack([_concat([_nk(w[k], 2) for k in ("wq", "wk", "wv")]) for w in per_layer])
    wo = _stack([_nk_in2(w["wo"]) for w in per_layer])
    gu = _stack([_concat([_nk(w[k], 1) for k in ("w_gate", "w_up")]) for w in per_layer])
    down = _stack([_nk(w["w_down"], 1) for w in per_layer])
    embed = params["embed"]
    emb = _codes(embed) if _is_quantized(embed) else (np.asarray(embed, np.float32), _NO_SCALE)
    head = emb if config.tie_embeddings else _nk(params["unembed"], 1)
    norms = lambda key: np.stack([np.asarray(w[key], np.float32) for w in per_layer])
    arrays = dict(
        embed=emb[0], embed_scale=emb[1], attn_norm=norms("attn_norm"), wqkv=qkv[0],
        wqkv_scale=qkv[1], wo=wo[0], wo_scale=wo[1], mlp_norm=norms("mlp_norm"), wgu=gu[0],
        wgu_scale=gu[1], wdown=down[0], wdown_scale=down[1],
        final_norm=np.asarray(params["final_norm"], np.float32), head=head[0],
        head_scale=head[1])
    if config.tie_embeddings:  # one device copy of the shared table
        arrays["head"], arrays["head_scale"] = emb = (jnp.asarray(emb[0]), jnp.asarray(emb[1]))
        arrays["embed"], arrays["embed_scale"] = emb
    weights = DecoderWeights(**{k: jnp.asarray(v) for k, v in arrays.items()})
    collapse_to_huge_pages(jax.tree.leaves(weights))
    return weights


_MADV_COLLAPSE = 25  # Linux >= 6.1: back a range with 2 MiB pages now (khugepaged is slow)
_HUGE = 2 << 20


def collapse_to_huge_pages(arrays) -> int:
    """Backs the whole 2 MiB pages inside each CPU array's buffer with huge pages
    (madvise MADV_COLLAPSE; ~1 s per 130 MB, once). Why: a decode step streams every weight
    once, and with 4 KiB pages each page starts the hardware prefetcher cold; measured on
    the development Zen 5, one thread's int8 matvec over SmolLM2's matrices read 24-28 GB/s
    on 4 KiB pages and 32-34 GB/s on 2 MiB pages. Advice only: where the kernel refuses
    (older Linux, THP off, not Linux) nothing changes. HPLLM_HUGE_PAGES=0 skips it.
    Returns the bytes advised."""
    if os.environ.get("HPLLM_HUGE_PAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    advised = 0
    jax.block_until_ready(arrays)  # the copies written (collapse refuses pages not yet there)
    for a in arrays:
        if getattr(a, "nbytes", 0) < 2 * _HUGE:
            continue
        try:
            start = a.unsafe_buffer_pointer()
        except Exception:  # not a single-device CPU buffer: leave it
            continue
        lo, hi = -(-start // _HUGE) * _HUGE, (start + a.nbytes) // _HUGE * _HUGE
        if hi > lo and madvise(lo, hi - lo, _MADV_COLLAPSE) == 0:
            advised += hi - lo
    return advised


def _slice_layer(layers: dict, i: int) -> dict:
    """Layer i of stacked layers; quantized leaves sliced on their codes and scales."""
    out = {}
    for k, w in layers.items():
        if _is_quantized(w):
            out[k] = dataclasses.replace(w, q=np.asarray(w.q)[i],
                                         scale=np.asarray(w.scale)[i])
        else:
            out[k] = np.asarray(w)[i]
    return out


# ------------------------------------------------------------------------------ the pool

@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k", "v", "k_scale", "v_scale"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVPool:
    """k, v: (L, num_blocks, block_size, n_kv_heads, head_dim) float32, or int8 codes with
    k_scale, v_scale (L, num_blocks, block_size, n_kv_heads) float32 (None for float32,
    hpllm.quantized.quantize_kv's per-token-per-head scales); block 0 is null."""
    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def kv_dtype(self) -> str:
        return "int8" if self.k.dtype == jnp.int8 else "float32"

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]


def create_pool(config, num_blocks: int, block_size: int, kv_dtype: str = "float32") -> KVPool:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"cpu_decoder pools are {' or '.join(KV_DTYPES)}, got {kv_dtype}")
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, "
                         f"{block_size}")
    shape = (config.n_layers, num_blocks, block_size, config.n_kv_heads, config.head_dim)
    if kv_dtype == "int8":
        return KVPool(jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8),
                      jnp.ones(shape[:-1], jnp.float32), jnp.ones(shape[:-1], jnp.float32))
    return KVPool(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))


def copy_blocks(pool: KVPool, src, dst) -> KVPool:
    """Blocks src[i] copied onto dst[i] in every layer (copy-on-write), scales included."""
    src, dst = jnp.asarray(src, jnp.int32), jnp.asarray(dst, jnp.int32)
    copy = lambda a: None if a is None else a.at[:, dst].set(a[:, src])
    return KVPool(copy(pool.k), copy(pool.v), copy(pool.k_scale), copy(pool.v_scale))


# ------------------------------------------------------------------------------ the step

def _threads() -> int:
    try:
        return max(0, int(os.environ.get(THREADS_ENV, "0")))
    except ValueError:
        return 0


def step(weights: DecoderWeights, pool: KVPool, tokens, positions, seq_index, tables,
         logits_index, *, config, portable: bool = False):
    """One ragged decoder pass: (logits (R, V) float32, the updated pool). Jittable; donate
    `pool` so it is updated in place."""
    reason = _status(portable)
    if reason is not None:
        raise RuntimeError(f"cpu_decoder unavailable: {reason}")
    c = config
    i32 = lambda a: jnp.asarray(a, jnp.int32)
    tokens, positions, seq_index = i32(tokens), i32(positions), i32(seq_index)
    tables, logits_index = i32(tables), i32(logits_index)
    if tables.ndim != 2 or tokens.ndim != 1 or logits_index.ndim != 1:
        raise ValueError("tokens/positions/seq_index must be (T,), tables (S, W), "
                         "logits_index (R,)")
    if positions.shape != tokens.shape or seq_index.shape != tokens.shape:
        raise ValueError(f"positions {positions.shape} and seq_index {seq_index.shape} must "
                         f"match tokens {tokens.shape}")
    vocab = weights.head.shape[0]
    int8 = pool.kv_dtype == "int8"
    pool_arrays = (pool.k, pool.v, pool.k_scale, pool.v_scale) if int8 else (pool.k, pool.v)
    out = (jax.ShapeDtypeStruct((logits_index.shape[0], vocab), jnp.float32),
           *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in pool_arrays))
    call = jax.ffi.ffi_call(_target(portable, "_kv8" if int8 else ""), out,
                            input_output_aliases={5 + i: 1 + i for i in range(len(pool_arrays))})
    w = weights
    logits, *arrays = call(tokens, positions, seq_index, tables, logits_index, *pool_arrays,
                           w.embed, w.embed_scale, w.attn_norm, w.wqkv, w.wqkv_scale, w.wo,
                           w.wo_scale, w.mlp_norm, w.wgu, w.wgu_scale, w.wdown, w.wdown_scale,
                           w.final_norm, w.head, w.head_scale,
                           n_heads=np.int64(c.n_heads), n_kv_heads=np.int64(c.n_kv_heads),
                           rope_theta=np.float32(c.rope_theta),
                           norm_eps=np.float32(c.norm_eps),
                           window=np.int64(c.attention_window),
                           max_threads=np.int64(_threads()))
    return logits, KVPool(*arrays)


PROFILE_ENV = "HPLLM_DECODER_PROFILE"  # =1: the kernel times its phases (read: profile())
PHASES = ("qkv+rope", "attention", "o-proj", "gate/up", "down", "head", "prologue")
# Who did the work (csrc/decoder.cc Counter), summed over steps: chunks claimed by the calling
# thread and by helper threads, helpers that joined a step before its end and the phases they
# joined at, futex sleeps of waiting threads, the threads a step could use, ns from posting a
# step to a helper joining it, ns threads spent waiting at barriers, thread-CPU ns of
# attention run serially, ns from a step's end to the next one's start, helpers that found a
# step while still spinning after the previous one (not asleep).
COUNTERS = ("caller_chunks", "helper_chunks", "helpers_joined", "join_phase_sum", "sleeps",
            "threads_sum", "join_ns", "wait_ns", "attention_cpu_ns", "gap_ns",
            "caught_spinning")


def profile(reset: bool = True) -> dict:
    """Seconds spent per phase kind (PHASES) since the last reset, the steps counted and
    COUNTERS under "counts"; all zero unless HPLLM_DECODER_PROFILE=1 was set before the first
    step."""
    lib = native.library("decoder", [SOURCE], HEADERS, _targets(False))
    if lib is None:
        return {}
    n = len(PHASES)
    out = (ctypes.c_double * (n + 1 + len(COUNTERS)))()
    lib.HpllmDecoderProfile(out, int(reset))
    return {**dict(zip(PHASES, out[:n])), "steps": int(out[n]),
            "counts": {k: int(v) for k, v in zip(COUNTERS, out[n + 1:])}}

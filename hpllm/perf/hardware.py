"""What the hardware allows: a table of accelerator specs, and measured figures for CPUs.

MFU and the roofline need a peak. For accelerators the vendor's dense (no-sparsity) figure is
the convention; a CPU has no honest datasheet number for XLA, so we measure once per machine
and cache the figures under ~/.cache/hpllm/hardware.json, with the load average and date of
the measurement:

- matmul peak per dtype: a large jitted matmul (XLA:CPU runs it on all cores), and for
  bfloat16 also hpllm's AVX512-BF16 kernel (kernels/cpu_matmul.py, what CPU training runs
  its projections on): XLA's own bf16 dot reaches a third of the machine's bf16 peak;
- read and copy bandwidth: a small C++ probe (kernels/csrc/memory_probe.cc, built like the
  quantized-matmul kernels) with one thread per core, or NumPy in threads without a compiler.
  A jitted reduction runs on one XLA thread and sees about half of what the cores can read.
- what a decode step's pieces cost through the runtime: one-row weight dots by size, batched
  weight matmuls at a few rows, attention over a dense cache and the engine's paged one, the
  cost per launched op (the roofline's CPU terms, XLA's program);
- what the fused CPU decoder kernel (kernels/cpu_decoder.py, what generate() and the engine
  run on CPU) costs, timed on the kernel itself: its weight streaming rate per format, FLOP/s
  and attention FLOP/s by tokens, its fixed costs per layer and per call (measure_decoder;
  cached on their own with the kernel's source hash, measured when a prediction needs them).

A measurement taken while other work runs (1-minute load average above half the cores) is
used but not cached, unless forced: it would make every later prediction wrong.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.cache import cache_dir
from hpllm.kernels import (cpu_attention, cpu_decoder, cpu_elementwise, cpu_matmul,
                           cpu_quant_matmul, native, paged_attention)
from hpllm.config import ModelConfig
from hpllm.model.kv_cache import DenseKVCache
from hpllm.quantized import QuantizedWeight


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: dict  # dtype name -> dense FLOP/s per device
    hbm_bytes: float  # memory capacity per device
    hbm_bandwidth: float  # bytes/s per device (reading; on CPU a measured large read)
    link_bandwidth: float  # bytes/s per device, one direction, per interconnect link
    source: str
    measured: bool = False
    # What a ring collective over one mesh axis can send per device (bytes/s): both
    # directions of a torus axis on TPU, the NVLink injection bandwidth on GPU.
    axis_bandwidth: float = 0.0
    # All interconnect bandwidth of a device, both directions of every link: the "W_ici" of
    # the FSDP/tensor-parallel compute-bound conditions.
    ici_bandwidth: float = 0.0
    tdp_watts: float = 0.0  # board power at full load (0: not published); `hpllm cost`
    # Measured on CPUs (0 elsewhere: not a term there). What XLA's dot reaches streaming a
    # weight matrix beyond the caches at one row (decode's weight reads): often well under
    # what the cores can read, which is what a better mat-vec kernel could gain.
    matvec_bandwidth: float = 0.0
    op_overhead_s: float = 0.0  # the runtime's cost per launched op (thunk) of a program
    call_overhead_s: float = 0.0  # and per call of a jitted program
    # The same chain through the CPU int8 kernel (bytes of codes + scales per second), and
    # the FLOP/s of the chains at a few rows ({"float32"|"int8": {rows: FLOP/s}}): a
    # batched decode step's matmuls, far below the large-matmul peak at 8 or 32 rows.
    int8_matvec_bandwidth: float = 0.0
    # The fixed cost of each weight dot at one row beyond streaming its bytes, XLA's and the
    # int8 kernel's: it dominates a small model's projections (SmolLM2's are 0.1-3.5 MB).
    matvec_dot_s: float = 0.0
    int8_matvec_dot_s: float = 0.0
    batched_flops: dict = dataclasses.field(default_factory=dict)
    # Seconds of one weight dot at one row by the matrix's bytes ({"float32"|"int8": [[bytes,
    # seconds], ...]}): small matrices cost more per byte (fixed cost, fork/join, caches),
    # which one bandwidth and one per-dot figure miss (measure_matvec_seconds).
    matvec_seconds: dict = dataclasses.field(default_factory=dict)
    # FLOP/s of the paged engine's online attention at a few rows ({rows: FLOP/s}): gathering
    # the blocks and the small per-head dots run far below the matmul peak.
    paged_attention_flops: dict = dataclasses.field(default_factory=dict)
    # And of one-token decode attention over a dense cache (FLOP/s): XLA:CPU transposes the
    # layer's whole cache into a copy for its dots, far slower than reading it.
    decode_attention_flops: float = 0.0
    # The fused CPU decoder kernel's figures (measure_decoder), what generate() and the
    # engine run on CPU: {"stream_bandwidth": {fmt: bytes/s}, "matmul_flops": {fmt: {rows:
    # FLOP/s}}, "attention_flops", "layer_s", "call_s": {rows: ...}, "source": its hash}.
    decoder: dict = dataclasses.field(default_factory=dict)

    def peak(self, dtype: str = "bfloat16") -> float:
        return self.peak_flops.get(dtype) or self.peak_flops["bfloat16"]


_T, _G = 1e12, 1e9
# Dense figures (no 2:4 sparsity); memory in decimal GB as the datasheets give it. Sources:
# vendor datasheets; TPU link figures as tabulated in "How to Scale Your Model" (Austin et
# al., 2025): 45 GB/s (v4, v5e) or 90 GB/s (v5p, v6e) one direction per ICI link, a 3D torus
# on v4/v5p (6 links) and a 2D torus on v5e/v6e (4 links).
CHIPS = {
    "tpu-v4": Chip("TPU v4", {"bfloat16": 275 * _T, "int8": 275 * _T}, 32 * _G, 1228 * _G,
                   45 * _G, "cloud.google.com/tpu/docs/v4; power: Jouppi et al., ISCA 2023 "
                   "(TPU v4 paper, max 192 W)", axis_bandwidth=90 * _G,
                   ici_bandwidth=270 * _G, tdp_watts=192),
    "tpu-v5e": Chip("TPU v5e", {"bfloat16": 197 * _T, "int8": 394 * _T}, 16 * _G, 819 * _G,
                    45 * _G, "cloud.google.com/tpu/docs/v5e", axis_bandwidth=90 * _G,
                    ici_bandwidth=180 * _G),
    "tpu-v5p": Chip("TPU v5p", {"bfloat16": 459 * _T, "int8": 918 * _T}, 95 * _G, 2765 * _G,
                    90 * _G, "cloud.google.com/tpu/docs/v5p", axis_bandwidth=180 * _G,
                    ici_bandwidth=540 * _G),
    "tpu-v6e": Chip("TPU v6e", {"bfloat16": 918 * _T, "int8": 1836 * _T}, 32 * _G, 1640 * _G,
                    90 * _G, "cloud.google.com/tpu/docs/v6e", axis_bandwidth=180 * _G,
                    ici_bandwidth=360 * _G),
    "a100": Chip("NVIDIA A100 SXM 80GB", {"bfloat16": 312 * _T, "float16": 312 * _T,
                                          "float32": 19.5 * _T, "tf32": 156 * _T},
                 80 * _G, 2039 * _G, 300 * _G, "NVIDIA A100 datasheet (NVLink 600 GB/s bidir; "
                 "SXM max TDP 400 W)", axis_bandwidth=300 * _G, ici_bandwidth=600 * _G,
                 tdp_watts=400),
    "h100": Chip("NVIDIA H100 SXM", {"bfloat16": 989 * _T, "float16": 989 * _T,
                                     "float32": 67 * _T, "float8": 1979 * _T},
                 80 * _G, 3350 * _G, 450 * _G, "NVIDIA H100 datasheet (NVLink 900 GB/s bidir; "
                 "SXM max TDP 700 W)", axis_bandwidth=450 * _G, ici_bandwidth=900 * _G,
                 tdp_watts=700),
    "h200": Chip("NVIDIA H200 SXM", {"bfloat16": 989 * _T, "float16": 989 * _T,
                                     "float32": 67 * _T, "float8": 1979 * _T},
                 141 * _G, 4800 * _G, 450 * _G, "NVIDIA H200 datasheet (NVLink 900 GB/s bidir; "
                 "SXM max TDP 700 W)", axis_bandwidth=450 * _G, ici_bandwidth=900 * _G,
                 tdp_watts=700),
    "b200": Chip("NVIDIA B200", {"bfloat16": 2250 * _T, "float16": 2250 * _T,
                                 "float32": 75 * _T, "float8": 4500 * _T},
                 180 * _G, 7700 * _G, 900 * _G,
                 "NVIDIA HGX B200 datasheet (NVLink5 1.8 TB/s bidir; 1000 W per GPU)",
                 axis_bandwidth=900 * _G, ici_bandwidth=1800 * _G, tdp_watts=1000),
    # AWS g5 instances (the course's serving example). NVIDIA publishes no A10G sheet; the
    # figures are the A10's (same GA102 die and memory), PCIe Gen4 x16 between GPUs.
    "a10g": Chip("NVIDIA A10G", {"bfloat16": 125 * _T, "float16": 125 * _T,
                                 "float32": 31.2 * _T},
                 24 * _G, 600 * _G, 32 * _G, "NVIDIA A10 datasheet (PCIe Gen4 64 GB/s bidir; "
                 "150 W)", axis_bandwidth=32 * _G, ici_bandwidth=64 * _G, tdp_watts=150),
}

# device_kind strings as JAX reports them -> table key (first substring match wins).
_KIND_PATTERNS = [("v5 lite", "tpu-v5e"), ("v5e", "tpu-v5e"), ("v5p", "tpu-v5p"), ("v5", "tpu-v5p"),
                  ("v6", "tpu-v6e"), ("v4", "tpu-v4"), ("a100", "a100"), ("h100", "h100"),
                  ("h200", "h200"), ("b200", "b200"), ("gh200", "h200"), ("a10g", "a10g")]


def lookup(device_kind: str) -> Chip | None:
    kind = device_kind.lower()
    for pattern, key in _KIND_PATTERNS:
        if pattern in kind:
            return CHIPS[key]
    return None


def time_calls(run, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `run()` (waited on), after one untimed call
    that compiles and warms up. Peaks take the best; workloads the median."""
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    return times


MATMUL_DTYPES = ("float32", "bfloat16", "float16", "int8")


def measure_matmul_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of a jitted n×n×n matmul on the default device (int8: int8
    operands accumulated in int32, the ops of a quantized matmul)."""
    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32).astype(dtype)
    accumulate = jnp.int32 if dtype == "int8" else None
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=accumulate))
    return 2 * n**3 / min(time_calls(lambda: matmul(a, b), repeats))


def measure_bf16_kernel_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of the CPU bf16 matmul kernel on n×n×n (0 without it)."""
    if not cpu_matmul.available():
        return 0.0
    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.bfloat16)
    matmul = jax.jit(lambda a, b: cpu_matmul.matmul(a, b, out_dtype=jnp.float32))
    return 2 * n**3 / min(time_calls(lambda: matmul(a, b), repeats))


def cores() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


PROBE_SOURCE = native.CSRC / "memory_probe.cc"


@functools.cache
def _probe_library():
    """The compiled memory probe (ctypes), or None without a working g++."""
    try:
        library = ctypes.CDLL(str(native.build("memory_probe", [PROBE_SOURCE])))
    except (OSError, native.NativeBuildError):
        return None
    for fn in (library.hpllm_read_bandwidth, library.hpllm_copy_bandwidth):
        fn.restype = ctypes.c_double
        fn.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    return library


def probe_method(method: str = "auto") -> str:
    """"c++" when the compiled probe loads (and `method` allows it), else "numpy"."""
    if method not in ("auto", "c++", "numpy"):
        raise ValueError(f"probe method must be auto, c++ or numpy, got {method!r}")
    if method == "numpy" or (method == "auto" and _probe_library() is None):
        return "numpy"
    if _probe_library() is None:
        raise RuntimeError("the C++ memory probe could not be built (is g++ on PATH?)")
    return "c++"


def _numpy_threads(nbytes: int, threads: int, repeats: int, copy: bool) -> float:
    """The portable probe: each thread reduces (or scales into a second buffer) its slice of
    one array; NumPy releases the GIL inside both loops. Best seconds of one repeat."""
    n = nbytes // 4
    src = np.ones(n, np.float32)
    dst = np.zeros(n, np.float32) if copy else None
    bounds = [(n * t // threads, n * (t + 1) // threads) for t in range(threads)]

    def work(b):
        if copy:
            np.multiply(src[b[0]:b[1]], np.float32(1.0001), out=dst[b[0]:b[1]])
        else:
            np.add.reduce(src[b[0]:b[1]])

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        # time_calls' untimed first call starts the threads and touches the pages
        return min(time_calls(lambda: list(pool.map(work, bounds)), repeats))


def measure_read_bandwidth(nbytes: int = 2**30, repeats: int = 5, threads: int = 0,
                           method: str = "auto") -> float:
    """Best bytes/s of reading `nbytes` (well beyond the caches) with one thread per core
    (`threads` = 0) or `threads`: what a decode step streaming its weights can reach."""
    threads = threads or cores()
    if probe_method(method) == "c++":
        return _probe_library().hpllm_read_bandwidth(nbytes, threads, repeats)
    return nbytes / _numpy_threads(nbytes, threads, repeats, copy=False)


def measure_copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5, threads: int = 0,
                           method: str = "auto") -> float:
    """Best bytes/s, read + write counted (as STREAM does), of dst = src * 1.0001 over two
    `nbytes` buffers with one thread per core (`threads` = 0) or `threads`."""
    threads = threads or cores()
    if probe_method(method) == "c++":
        return _probe_library().hpllm_copy_bandwidth(nbytes, threads, repeats)
    return 2 * nbytes / _numpy_threads(nbytes, threads, repeats, copy=True)


def _dot_chain(rows: int, nbytes: int, matrix_bytes: int, repeats: int, dtype: str = "float32",
               int8: bool = False) -> tuple[float, float, int]:
    """(weight bytes, best seconds, matrices) of a jitted chain of dependent (rows, K) @
    (K, K) dots, each on its own matrix of `matrix_bytes` (a transformer layer's projection)
    and `nbytes` in all (beyond the caches): XLA's dot in `dtype`, or with `int8` the CPU
    int8 kernel (hpllm/kernels/cpu_quant_matmul.py; codes + float32 row scales as bytes)."""
    itemsize = 1 if int8 else jnp.dtype(dtype).itemsize
    # K a multiple of 64, as models' are: the int8 kernel's K % 32 tail loop would otherwise
    # add a cost no model pays (a 724-wide int8 row ran 2x slower than a 704-wide one)
    k = max(64, round((matrix_bytes / itemsize) ** 0.5 / 64) * 64)
    count = max(1, nbytes // matrix_bytes)
    # Separate arrays, as a model's parameters are: slices of one stacked array would be
    # fused into the dots, which XLA:CPU then runs as a plain loop. x stays at ones.
    if int8:
        ws = [(jnp.ones((k, k), jnp.int8), jnp.full((k,), 1 / k, jnp.float32))
              for _ in range(count)]
        x = jnp.ones((rows, k), jnp.float32)
        chain = jax.jit(lambda x, ws: functools.reduce(
            lambda y, w: cpu_quant_matmul.int8_matmul(y, *w), ws, x))
    else:
        ws = [jnp.full((k, k), 1 / k, dtype) for _ in range(count)]
        x = jnp.ones((rows, k), dtype)
        chain = jax.jit(lambda x, ws: functools.reduce(lambda y, w: y @ w, ws, x))
    seconds = min(time_calls(lambda: chain(x, ws), repeats))
    return sum(a.nbytes for a in jax.tree.leaves(ws)), seconds, count


def measure_matvec(nbytes: int = 128 * 2**20, matrix_bytes: int = 4 * 2**20,
                   small_bytes: int = 512 * 2**10, repeats: int = 7, dtype: str = "float32",
                   int8: bool = False) -> tuple[float, float]:
    """(weight bytes/s, seconds per dot) of decode's weight reads: one-row chains (see
    _dot_chain) over the same `nbytes` in matrices of `matrix_bytes` and of `small_bytes`
    (a small model's projection). The extra time of the chain of many small dots is a fixed
    cost per dot (the kernel's fork/join over the cores, beyond XLA's launch of an op); the
    rest streams at the returned rate. With `int8` the CPU int8 kernel's (0, 0 where it is
    not available)."""
    if int8 and not cpu_quant_matmul.available():
        return 0.0, 0.0
    big_bytes, big_s, big_n = _dot_chain(1, nbytes, matrix_bytes, repeats, dtype, int8)
    _, small_s, small_n = _dot_chain(1, nbytes, small_bytes, repeats, dtype, int8)
    per_dot = max(small_s - big_s, 0.0) / max(small_n - big_n, 1)
    if big_n * per_dot >= big_s:  # noise (a loaded machine): no fixed cost to split off
        per_dot = 0.0
    return big_bytes / (big_s - big_n * per_dot), per_dot


# Rows (tokens) of the batched-decode dot chains: the engine pads a step's rows to a power of
# two, up to its 32 sequences (and the int8 kernel takes up to 64 rows).
BATCH_ROWS = (2, 4, 8, 16, 32, 64)


def _layer_chain_flops(rows: int, nbytes: int, dim: int, int8: bool, repeats: int) -> float:
    """FLOP/s of a jitted chain of a Llama layer's seven weight matmuls (q, k, v: dim to
    dim, dim / 3 (grouped KV), dim / 3; o; gate, up to 8 dim / 3; down) at `rows` tokens,
    each layer its own weights, `nbytes` in all; through XLA's float32 dot or the int8 kernel.
    The thin KV and the long down projection run well below a square matmul's rate."""
    kv, hidden = dim // 3, 8 * dim // 3
    shapes = [(dim, dim), (dim, kv), (dim, kv), (dim, dim), (dim, hidden), (dim, hidden),
              (hidden, dim)]  # (K, N)
    per_layer = sum(k * n for k, n in shapes)
    if int8:
        def weight(k, n):
            return jnp.ones((n, k), jnp.int8), jnp.full((n,), 1 / k, jnp.float32)

        def mm(x, w):
            return cpu_quant_matmul.int8_matmul(x, *w)
    else:
        def weight(k, n):
            return jnp.full((k, n), 1 / k, jnp.float32)

        def mm(x, w):
            return x @ w
    layers = [[weight(k, n) for k, n in shapes]
              for _ in range(max(1, nbytes // (per_layer * (1 if int8 else 4))))]

    def chain(x, layers):
        for wq, wk, wv, wo, w_gate, w_up, w_down in layers:  # dependent, as in the model
            side = jnp.sum(mm(x, wk)) + jnp.sum(mm(x, wv))
            x = x + 1e-3 * mm(mm(x, wq), wo)
            x = x + 1e-3 * mm(mm(x, w_gate) * mm(x, w_up), w_down) + 0 * side
        return x

    run = jax.jit(chain)
    x = jnp.ones((rows, dim), jnp.float32)
    return 2 * rows * per_layer * len(layers) / min(time_calls(lambda: run(x, layers), repeats))


def measure_batched_flops(int8: bool = False, rows=BATCH_ROWS, nbytes: int = 128 * 2**20,
                          dim: int = 768) -> dict:
    """{rows (str): FLOP/s} of a batched decode step's weight matmuls: the chain of Llama
    layers of `dim` (_layer_chain_flops) at each count of rows, float32 XLA dots or the int8
    kernel; between streaming the weights (few rows) and the large-matmul peak (many).
    Empty where the int8 kernel is unavailable."""
    if int8 and not cpu_quant_matmul.available():
        return {}
    return {str(m): _layer_chain_flops(m, nbytes, dim, int8, 20) for m in rows}


# Matrix sizes (bytes) of the one-row dot table: a small model's projections (SmolLM2's int8
# K/V are 110 KB) up to where a dot streams at the memory's rate.
MATVEC_SIZES = tuple(2**p for p in range(16, 23))  # 64 KiB .. 4 MiB


def measure_matvec_seconds(int8: bool = False, sizes=None, nbytes: int = 256 * 2**20,
                           repeats: int = 20) -> list:
    """[[bytes of one matrix, seconds per dot], ...] of one-row dot chains (_dot_chain, each
    over `nbytes` of separate square matrices, 8x the 32 MiB L3 of the development machine:
    over 64 MiB part of each pass still hit it, 10-35 % faster) at each of `sizes`: what
    one weight dot of a decode step costs, streaming and fixed costs together; the roofline
    interpolates it at each of a model's matrices. XLA's float32 dot from 256 KiB (the same
    shapes as the int8 kernel's from 64 KiB; and compiling a chain of a thousand XLA dots
    takes minutes), or the int8 kernel (empty where it is not available)."""
    if int8 and not cpu_quant_matmul.available():
        return []
    sizes = sizes or (MATVEC_SIZES if int8 else MATVEC_SIZES[2:])
    table = []
    for size in sizes:
        weight_bytes, seconds, count = _dot_chain(1, max(nbytes, 4 * size), size, repeats,
                                                  int8=int8)
        table.append([weight_bytes / count, seconds / count])
    return table


def measure_paged_attention(rows=BATCH_ROWS, keys: int = 256, layers: int = 8,
                            n_kv_heads: int = 3, group: int = 3, head_dim: int = 64,
                            block_size: int = 16, table_pages: int = 512,
                            repeats: int = 10) -> dict:
    """{rows (str): FLOP/s} of the paged engine's decode attention (the online kernel of
    hpllm/kernels/paged_attention.py, as the engine runs it on CPU): one query per row over
    `keys` keys in blocks of its own, `layers` dependent calls on pools of their own (beyond
    the caches at many rows), block tables `table_pages` wide as the engine makes them (8k
    tokens; XLA:CPU ran a table exactly one kernel step wide 8x slower); FLOPs counted as
    4 x heads x head_dim x keys per row. Gathering the blocks and the small per-head dots,
    not the memory's bandwidth, set the rate."""
    pages, heads = keys // block_size, n_kv_heads * group
    out = {}
    for m in rows:
        shape = (1 + m * pages, block_size, n_kv_heads, head_dim)
        pools = [(jnp.full(shape, 0.01, jnp.float32), jnp.full(shape, 0.01, jnp.float32))
                 for _ in range(layers)]
        tables = jnp.zeros((m, max(table_pages, pages)), jnp.int32).at[:, :pages].set(
            1 + jnp.arange(m * pages, dtype=jnp.int32).reshape(m, pages))
        positions = jnp.full((m, 1), keys - 1, jnp.int32)

        def chain(q, pools, tables, positions):  # arguments, as the engine's are
            for k, v in pools:  # dependent, as the layers are
                q = q + paged_attention.paged_attention_online(q, k, v, tables, positions)
            return q

        run = jax.jit(chain)
        q = jnp.ones((m, 1, heads, head_dim), jnp.float32)
        seconds = min(time_calls(lambda: run(q, pools, tables, positions), repeats))
        out[str(m)] = 4 * m * heads * head_dim * keys * layers / seconds
    return out


def measure_decode_attention(keys: int = 256, layers: int = 30, n_kv_heads: int = 3,
                             group: int = 3, head_dim: int = 64, repeats: int = 20) -> float:
    """FLOP/s (4 x heads x head_dim x keys per token) of one token's attention over a dense
    KV cache of `keys` slots, as a decode step runs it: each of `layers` dependent layers
    writes its new key and value into the stacked cache (donated, updated in place) and
    attends over it (DenseKVCache.update and attend, impl "auto")."""
    heads = n_kv_heads * group
    config = ModelConfig(dim=heads * head_dim, n_layers=layers, n_heads=heads,
                         n_kv_heads=n_kv_heads, max_seq_len=keys)
    positions = jnp.full((1, 1), keys - 1, jnp.int32)

    def chain(q, cache, positions):
        for layer in range(layers):
            new = q[:, :, :n_kv_heads]
            cache = cache.update(layer, new, new, positions)
            q = q + cache.attend(layer, q, positions, impl="auto")
        return q, cache

    run = jax.jit(chain, donate_argnums=1)
    q = jnp.full((1, 1, heads, head_dim), 0.01, jnp.float32)
    state = [DenseKVCache.create(config, 1, keys)]

    def step():
        out, state[0] = run(q, state[0], positions)
        return out

    seconds = min(time_calls(step, repeats))
    return 4 * heads * head_dim * keys * layers / seconds


# ---------------------------------------------------------------- the fused decoder step
# On CPU generate() and the engine run the whole step as one FFI call (kernels/cpu_decoder.py):
# its phases stream each weight matrix once with every thread, one barrier each. Its time is
# four figures, each timed on the kernel itself at each token count (measure_decoder).
DECODER_ROWS = (1, 2, 4, 8, 16, 32, 64)  # tokens per step: decode, engine batches (pow2)
DECODER_FORMATS = ("float32", "int8")  # weight formats the roofline predicts it for


def decoder_source_id() -> str:
    """A hash of the kernel's sources: figures measured on other sources are stale."""
    digest = hashlib.sha256()
    for path in (cpu_decoder.SOURCE, *cpu_decoder.HEADERS):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _probe_params(config: ModelConfig, fmt: str) -> dict:
    """Constant weights of `config` as a model's parameter tree (float32, or int8 codes with
    row scales): the kernel's time does not depend on their values."""
    c = config
    h, kv, dh = c.n_heads, c.n_kv_heads, c.head_dim

    def mat(ins: tuple, outs: tuple):
        if fmt == "float32":
            return np.full(ins + outs, 1e-3, np.float32)
        n, k = math.prod(outs), math.prod(ins)
        return QuantizedWeight(np.ones((n, k), np.int8), np.full((n, 1), 1e-3, np.float32),
                               None, "int8", ins + outs, tuple(range(len(ins))))

    ones = np.ones(c.dim, np.float32)
    layer = lambda: dict(attn_norm=ones, wq=mat((c.dim,), (h, dh)), wk=mat((c.dim,), (kv, dh)),
                         wv=mat((c.dim,), (kv, dh)), wo=mat((h, dh), (c.dim,)), mlp_norm=ones,
                         w_gate=mat((c.dim,), (c.hidden_dim,)),
                         w_up=mat((c.dim,), (c.hidden_dim,)),
                         w_down=mat((c.hidden_dim,), (c.dim,)))
    embed = (np.full((c.vocab_size, c.dim), 1e-3, np.float32) if fmt == "float32" else
             QuantizedWeight(np.ones((c.vocab_size, c.dim), np.int8),
                             np.full((c.vocab_size, 1), 1e-3, np.float32), None, "int8",
                             (c.vocab_size, c.dim), (1,)))
    return dict(embed=embed, layers=[layer() for _ in range(c.n_layers)], final_norm=ones)


def _decoder_runner(config: ModelConfig, fmt: str, block_size: int = 16):
    """seconds(rows, keys, repeats): the best time of the kernel's step (jitted, pool
    donated, as the engine runs it) of `config` with constant `fmt` weights, `rows`
    sequences of `keys` tokens each in blocks of their own, one new token each."""
    weights = cpu_decoder.prepare(_probe_params(config, fmt), config)
    step = jax.jit(functools.partial(cpu_decoder.step, config=config), donate_argnums=1)

    def seconds(m: int, keys: int = 1, repeats: int = 5) -> float:
        pages = -(-keys // block_size)
        state = [cpu_decoder.create_pool(config, 1 + m * pages, block_size)]
        # host arrays, as the engine passes them (eager jnp ops would each compile)
        tables = 1 + np.arange(m * pages, dtype=np.int32).reshape(m, pages)
        tokens, index = np.zeros(m, np.int32), np.arange(m, dtype=np.int32)
        positions = np.full(m, keys - 1, np.int32)

        def run():
            logits, state[0] = step(weights, state[0], tokens, positions, index, tables, index)
            return logits

        return min(time_calls(run, repeats))

    return seconds


def _paired_seconds(first, second, rows, rounds: int = 2) -> tuple[dict, dict]:
    """{rows: best seconds} of two steps (callables of rows), timed alternately `rounds`
    times at each row count: a loaded machine's drift then hits both, not their difference."""
    a, b = {}, {}
    for m in rows:
        for _ in range(rounds):
            a[m] = min(a.get(m, math.inf), first(m))
            b[m] = min(b.get(m, math.inf), second(m))
    return a, b


def _stream_config(fmt: str, nbytes: int) -> ModelConfig:
    """Layers of a 1024-wide Llama (16 heads, 4 KV heads, MLP 2816: matrices of 0.5-11 MB as
    float32), as many as hold `nbytes` of `fmt` weights: streamed from memory, beyond L3."""
    per_layer = 1024 * (1024 + 2 * 256) + 1024 * 1024 + 3 * 1024 * 2816
    item = 4 if fmt == "float32" else 1
    return ModelConfig(vocab_size=4096, dim=1024, n_heads=16, n_kv_heads=4, ffn_dim=2816,
                       max_seq_len=64, n_layers=max(1, round(nbytes / (per_layer * item))))


def decoder_weight_bytes(config: ModelConfig, fmt: str) -> tuple[int, int]:
    """(bytes, weights) of the matrices one kernel step reads: each layer's q/k/v/o and
    gate/up/down and the (tied) LM head, int8 codes with one float32 scale per row."""
    c = config
    qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    shapes = [(qkv, c.dim), (c.dim, c.n_heads * c.head_dim), (2 * c.hidden_dim, c.dim),
              (c.dim, c.hidden_dim)]
    weights = c.n_layers * sum(n * k for n, k in shapes) + c.vocab_size * c.dim
    rows = c.n_layers * sum(n for n, _ in shapes) + c.vocab_size
    return (4 * weights if fmt == "float32" else weights + 4 * rows), weights


def measure_decoder(rows=DECODER_ROWS, stream_bytes: int = 160 * 2**20, repeats: int = 5,
                    formats=DECODER_FORMATS) -> dict:
    """The fused decoder kernel's figures, each from steps of the kernel on constant
    weights (empty where it is not available), at each token count of `rows`:
    - layer_s, call_s: a 64-wide decoder of 16 and 48 layers (no work to speak of): the
      extra time per layer is its phases' barriers and serial pieces, the rest the call's
      fixed cost (jit dispatch, the FFI call, waking the pool);
    - stream_bandwidth {fmt: bytes/s} (1 token) and matmul_flops {fmt: {rows: FLOP/s}}: a
      decoder of `stream_bytes` of weights (_stream_config) less the fixed costs above;
    - attention_flops {rows: FLOP/s}: SmolLM2's heads (3 KV x 3 query of 64), 8 layers of a
      hidden-64 MLP, int8 weights, over 32 + max(256, 1024 / rows) against 32 keys: the
      extra time per extra FLOP (4 x heads x head_dim per key and token).
    Each pair whose difference is a figure is timed alternately (_paired_seconds)."""
    if not cpu_decoder.available():
        return {}
    rows = list(rows)
    tiny = lambda layers: ModelConfig(vocab_size=64, dim=64, n_heads=1, n_kv_heads=1,
                                      ffn_dim=64, max_seq_len=64, n_layers=layers)
    short, deep = (_decoder_runner(tiny(n), "float32") for n in (16, 48))
    short, deep = _paired_seconds(lambda m: short(m, repeats=2 * repeats),
                                  lambda m: deep(m, repeats=2 * repeats), rows)
    layer_s = {m: max(deep[m] - short[m], 0.0) / 32 for m in rows}
    call_s = {m: max(short[m] - 16 * layer_s[m], 0.0) for m in rows}
    stream, flops = {}, {}
    for fmt in formats:
        config = _stream_config(fmt, stream_bytes)
        nbytes, weights = decoder_weight_bytes(config, fmt)
        run = _decoder_runner(config, fmt)
        own = {}
        for m in rows:  # the step less its fixed costs; where noise made those exceed the
            total = run(m, repeats=repeats)  # step, none to split off (as measure_matvec)
            fixed = call_s[m] + config.n_layers * layer_s[m]
            own[m] = total - fixed if total > fixed else total
        stream[fmt] = nbytes / own[rows[0]]
        flops[fmt] = {str(m): 2 * m * weights / own[m] for m in rows}
    # int8 projections: the least time besides the attention in the difference
    heads = _decoder_runner(ModelConfig(vocab_size=64, dim=576, n_heads=9, n_kv_heads=3,
                                        ffn_dim=64, max_seq_len=2048, n_layers=8), "int8")
    extra = lambda m: max(256, 1024 // m)  # keys beyond the near 32: ~2 ms of work at 1 row
    near, far = _paired_seconds(lambda m: heads(m, 32, repeats),
                                lambda m: heads(m, 32 + extra(m), repeats), rows)
    # a difference lost in noise (not positive) is no figure: the roofline takes the next
    attention = {str(m): 4 * m * 8 * 9 * 64 * extra(m) / (far[m] - near[m])
                 for m in rows if far[m] > near[m]}
    return {"source": decoder_source_id(), "threads": cores(),
            "layer_s": {str(m): v for m, v in layer_s.items()},
            "call_s": {str(m): v for m, v in call_s.items()},
            "stream_bandwidth": stream, "matmul_flops": flops, "attention_flops": attention}


def measure_dispatch_overhead(ops: int = 256, repeats: int = 20) -> tuple[float, float]:
    """(seconds per op, seconds per call) of XLA's runtime: jitted chains of `ops` and
    2·`ops` dependent 8x8 dots, whose compute is negligible; the difference is the cost of
    the extra ops, the rest the call's fixed cost."""
    def chain_seconds(n):
        ws = jnp.broadcast_to(jnp.eye(8, dtype=jnp.float32), (n, 8, 8))
        run = jax.jit(lambda x, ws: functools.reduce(lambda y, w: y @ w, ws, x))
        x = jnp.ones((8, 8), jnp.float32)
        return min(time_calls(lambda: run(x, ws), repeats))

    one, two = chain_seconds(ops), chain_seconds(2 * ops)
    per_op = max(two - one, 0.0) / ops
    return per_op, max(one - ops * per_op, 0.0)


def measure_all_gather_bandwidth(nbytes: int = 64 * 2**20, repeats: int = 5) -> float | None:
    """Bus bandwidth (bytes each device receives per second, (n-1)/n of the gathered array)
    of jax.lax.all_gather over all local devices; None with a single device."""
    devices = jax.local_devices()
    n = len(devices)
    if n < 2:
        return None
    mesh = jax.sharding.Mesh(devices, ("d",))
    spec = jax.sharding.PartitionSpec("d")
    x = jax.device_put(jnp.ones((n, nbytes // 4 // n), jnp.float32),
                       jax.sharding.NamedSharding(mesh, spec))
    gather = jax.jit(jax.shard_map(lambda b: jax.lax.all_gather(b, "d", tiled=True), mesh=mesh,
                                   in_specs=spec, out_specs=spec))
    return (n - 1) / n * nbytes / min(time_calls(lambda: gather(x), repeats))


def _meminfo_bytes() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_fingerprint() -> str:
    return f"{cpu_name()}|{os.cpu_count()}cpu|jax{jax.__version__}"


# Entries of older probes (one-thread reads, no load recorded; no int8-kernel, per-dot or
# layer-shaped batched chains; no one-row dot table or attention rates) are measured again;
# probe 6's lacks only the bf16 kernel's peak, which is measured alone and added. The decoder
# kernel's figures are an entry's "decoder", versioned on their own and measured only when a
# prediction needs them (decoder_figures).
PROBE_VERSION = 7
_KERNEL_ONLY_VERSION = 6
DECODER_PROBE_VERSION = 1
_UNCACHED: dict = {}  # fingerprint -> figures measured on a busy machine, this process only


def load_average() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages (zeros where the OS has none)."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return (0.0, 0.0, 0.0)


def is_busy(load1: float, n_cores: int) -> bool:
    """Other work is running: more than half the cores' worth of runnable threads."""
    return load1 > n_cores / 2


def measure_cpu(n_devices: int = 1, method: str = "auto") -> dict:
    """Every figure of this CPU, with the load average when the measurement began."""
    load, n = load_average(), cores()
    entry = {dtype: measure_matmul_flops(dtype) for dtype in MATMUL_DTYPES}
    entry["bfloat16_kernel"] = measure_bf16_kernel_flops()
    per_op, per_call = measure_dispatch_overhead()
    matvec, matvec_dot = measure_matvec()
    int8_matvec, int8_dot = measure_matvec(int8=True)
    entry.update(read_bandwidth=measure_read_bandwidth(method=method),
                 matvec_bandwidth=matvec, matvec_dot_s=matvec_dot, op_overhead_s=per_op,
                 call_overhead_s=per_call,
                 int8_matvec_bandwidth=int8_matvec, int8_matvec_dot_s=int8_dot,
                 batched_flops={"float32": measure_batched_flops(),
                                "int8": measure_batched_flops(int8=True)},
                 matvec_seconds={"float32": measure_matvec_seconds(),
                                 "int8": measure_matvec_seconds(int8=True)},
                 paged_attention_flops=measure_paged_attention(),
                 decode_attention_flops=measure_decode_attention(),
                 copy_bandwidth=measure_copy_bandwidth(method=method),
                 probe=f"{probe_method(method)}, {n} threads", probe_version=PROBE_VERSION,
                 cores=n, load_average=list(load), busy=is_busy(load[0], n),
                 measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if n_devices > 1:
        entry[f"all_gather_bandwidth_{n_devices}dev"] = measure_all_gather_bandwidth()
    return entry


def _read_cache() -> dict:
    try:
        return json.loads((cache_dir() / "hardware.json").read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(cached: dict) -> None:
    path = cache_dir() / "hardware.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cached, indent=1))
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


def _not_caching(log, load: float, n: int, command: str) -> None:
    (log or (lambda line: print(line, file=sys.stderr)))(
        f"hpllm: not caching these figures: load average {load:.2f} on {n} cores (other work "
        f"is running, so they read low); measure again on an idle machine, or force it "
        f"(`{command}`)")


def decoder_fresh(figures: dict) -> bool:
    """Measured by this probe on the kernel's present sources (it changes, they are stale)."""
    return (figures.get("version") == DECODER_PROBE_VERSION
            and figures.get("source") == decoder_source_id())


def decoder_figures(refresh: bool = False, force: bool = False, log=None) -> dict:
    """The fused decoder kernel's figures (measure_decoder, with the load and date): cached
    in this CPU's entry as "decoder" while the kernel's sources are the same, else measured
    now and cached unless the machine is busy and not `force` (as cpu_figures). {} where
    the kernel is not available."""
    fingerprint = _cpu_fingerprint()
    figures = (_read_cache().get(fingerprint) or {}).get("decoder") or {}
    if decoder_fresh(figures) and not refresh:
        return figures
    uncached = _UNCACHED.get(("decoder", fingerprint))
    if uncached is not None and not refresh and not force:
        return uncached
    load, n = load_average(), cores()
    figures = measure_decoder()
    if not figures:
        return {}
    figures.update(version=DECODER_PROBE_VERSION, load_average=list(load),
                   busy=is_busy(load[0], n), measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return _keep_own("decoder", fingerprint, figures, force, log, "hpllm hw --decoder --force")


def _keep_own(kind: str, fingerprint: str, figures: dict, force: bool, log, command: str):
    """Figures measured on their own (`kind`: "decoder", "train") into this CPU's cache
    entry, or, busy and not `force`, kept for this process only (and `log` says so)."""
    if figures["busy"] and not force:
        _UNCACHED[(kind, fingerprint)] = figures
        _not_caching(log, figures["load_average"][0], cores(), command)
        return figures
    cached = _read_cache()  # again: another process may have written it meanwhile
    cached.setdefault(fingerprint, {})[kind] = figures
    _write_cache(cached)
    return figures


# ------------------------------------------------------------- the CPU training step's kernels
# A bf16 training step on CPU is a sequence of hpllm's FFI kernel calls (the matmul's forward
# and both gradients, attention, SwiGLU, RMSNorm, RoPE, the loss) and XLA's loop fusions
# between them (residual adds, casts, AdamW). Its prediction (roofline.train_kernel_prediction)
# takes each call's seconds timed alone at the step's own shapes and the fusions' bytes at
# the rate XLA:CPU runs such fusions: both measured here, cached with the kernels' sources.
TRAIN_PROBE_VERSION = 1
TRAIN_SOURCES = (cpu_matmul.SOURCE, cpu_attention.SOURCE, cpu_elementwise.SOURCE,
                 *cpu_matmul.HEADERS, *cpu_attention.HEADERS, *cpu_elementwise.HEADERS)


def train_source_id() -> str:
    """A hash of the training kernels' sources: calls timed on other sources are stale."""
    digest = hashlib.sha256()
    for path in sorted(set(TRAIN_SOURCES)):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _call_operands(target: str, operands: list) -> list:
    """Inputs of one kernel call of the given (dtype, dims): floats standard normal; int32
    positions (arange) and segment ids (ones) for attention, token ids below the logits'
    width for the loss: what the kernel's time depends on (its masks)."""
    rng = np.random.default_rng(0)
    out, ints = [], [i for i, (dt, _) in enumerate(operands) if dt == "s32"]
    for i, (dt, dims) in enumerate(operands):
        if dt != "s32":
            out.append(jnp.asarray(rng.standard_normal(dims), _jax_dtype(dt)))
        elif "attention" in target and ints.index(i) < 2:  # q_pos, kv_pos
            out.append(jnp.broadcast_to(jnp.arange(dims[-1], dtype=jnp.int32), dims))
        elif "attention" in target:  # one segment
            out.append(jnp.ones(dims, jnp.int32))
        else:  # the loss's targets, below the logits' last axis
            out.append(jnp.asarray(rng.integers(0, operands[0][1][-1], dims), jnp.int32))
    return out


def _jax_dtype(hlo_dtype: str):
    return {"bf16": jnp.bfloat16, "f32": jnp.float32, "s32": jnp.int32}[hlo_dtype]


def jit_call_seconds(repeats: int = 50) -> float:
    """Median seconds of a jitted call that does nothing to speak of (one scalar add): the
    fixed cost that timing one op alone adds to it."""
    run, x = jax.jit(lambda x: x + 1), jnp.float32(0)
    return float(np.median(time_calls(lambda: run(x), repeats)))


def measure_kernel_call(call: dict, repeats: int = 7, per_call: float = 0.0) -> float:
    """Median seconds of one FFI kernel call as the step makes it (`call`: "target",
    "operands" and "results" as [(HLO dtype, dims)], "attrs" {name: value}) on inputs of its
    shapes (_call_operands), less `per_call` (jit_call_seconds: in the step a kernel is one
    op of a larger program, not a call of its own)."""
    results = [jax.ShapeDtypeStruct(dims, _jax_dtype(dt)) for dt, dims in call["results"]]
    attrs = {k: (np.float32(v) if isinstance(v, float) else np.int64(v))
             for k, v in call["attrs"].items()}
    fn = jax.jit(lambda *a: jax.ffi.ffi_call(call["target"], results)(*a, **attrs))
    args = _call_operands(call["target"], call["operands"])
    seconds = float(np.median(time_calls(lambda: fn(*args), repeats)))
    return max(seconds - per_call, seconds / 2)


def measure_fusion_bandwidth(tokens: int = 4096, dim: int = 256, hidden: int = 704,
                             repeats: int = 10) -> float:
    """Bytes/s (operands read + results written) of XLA:CPU's loop fusions of the kinds a
    bf16 training step runs between its kernels, each its own jitted call on arrays of that
    step's sizes: a bf16 residual add (tokens x dim), the float32 -> bf16 cast of a weight
    (dim x hidden) and its bf16 gradient added into float32, and AdamW's update of a float32
    parameter with its two moments. Total bytes over total median seconds."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (tokens, dim), jnp.bfloat16)
    w = jax.random.normal(key, (dim, hidden), jnp.float32)
    g = w.astype(jnp.bfloat16)

    def adamw(p, g, m, v):
        m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
        return p - 1e-3 * (m / (jnp.sqrt(v) + 1e-8) + 0.1 * p), m, v

    cases = [(lambda a: a + a * 0.5, (x,), 3 * x.nbytes),
             (lambda a: a.astype(jnp.bfloat16), (w,), 1.5 * w.nbytes),
             (lambda a, b: a + b.astype(jnp.float32), (w, g), 2 * w.nbytes + g.nbytes),
             (adamw, (w, w * 0.1, w * 0.01, w * w), 7 * w.nbytes)]
    seconds, per_call = 0.0, jit_call_seconds()
    for fn, args, _ in cases:
        run = jax.jit(fn)
        seconds += float(np.median(time_calls(lambda: run(*args), repeats)))
    return sum(c[2] for c in cases) / max(seconds - len(cases) * per_call, seconds / 2)


def call_key(call: dict) -> str:
    """The cache key of a kernel call: its target, operand types and attributes."""
    types = ",".join(f"{dt}{list(dims)}" for dt, dims in call["operands"])
    attrs = ",".join(f"{k}={v}" for k, v in sorted(call["attrs"].items()))
    return f"{call['target']}({types}){{{attrs}}}"


def train_fresh(figures: dict) -> bool:
    return (figures.get("version") == TRAIN_PROBE_VERSION
            and figures.get("source") == train_source_id())


def train_figures(calls: list, refresh: bool = False, force: bool = False, log=None) -> dict:
    """{"calls": {call_key: seconds}, "fusion_bandwidth": bytes/s, ...}: every call of
    `calls` timed alone (measure_kernel_call) and the fusion probe, from this CPU's cached
    "train" entry where it holds them for the kernels' present sources, else measured now
    and cached unless the machine is busy and not `force` (as decoder_figures)."""
    fingerprint = _cpu_fingerprint()
    cached = (_read_cache().get(fingerprint) or {}).get("train") or {}
    figures = cached if train_fresh(cached) and not refresh else {}
    figures = {**_UNCACHED.get(("train", fingerprint), {}), **figures} if not refresh else {}
    figures.setdefault("calls", {})
    missing = {call_key(c): c for c in calls if call_key(c) not in figures["calls"]}
    if not missing and "fusion_bandwidth" in figures:
        return figures
    load, n = load_average(), cores()
    figures = {**figures, "calls": dict(figures["calls"])}
    per_call = jit_call_seconds() if missing else 0.0
    for key, call in missing.items():
        figures["calls"][key] = measure_kernel_call(call, per_call=per_call)
    if "fusion_bandwidth" not in figures:
        figures["fusion_bandwidth"] = measure_fusion_bandwidth()
    busy = is_busy(load[0], n)
    figures.update(version=TRAIN_PROBE_VERSION, source=train_source_id(),
                   load_average=list(load), busy=figures.get("busy", False) or busy,
                   measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return _keep_own("train", fingerprint, figures, force, log,
                     "hpllm roofline --workload train, on an idle machine")


def cpu_figures(refresh: bool = False, force: bool = False, log=None) -> dict:
    """This CPU's measured figures: from the cache, else measured now and cached, unless the
    machine is busy and not `force` (then kept for this process only, and `log` says so in
    one line; default: stderr). The result's "cached" says which. The decoder kernel's
    figures ("decoder", see decoder_figures) are kept as they are."""
    fingerprint = _cpu_fingerprint()
    entry = _read_cache().get(fingerprint) or {}
    n_devices = len(jax.local_devices())
    gather_key = f"all_gather_bandwidth_{n_devices}dev"
    fresh = entry.get("probe_version") == PROBE_VERSION and (
        n_devices == 1 or gather_key in entry)
    if fresh and not refresh:
        return dict(entry, cached=True)
    if fingerprint in _UNCACHED and not refresh and not force:
        return dict(_UNCACHED[fingerprint], cached=False)
    if entry.get("probe_version") == _KERNEL_ONLY_VERSION and not refresh:
        load = load_average()
        measured = {**entry, "bfloat16_kernel": measure_bf16_kernel_flops(),
                    "probe_version": PROBE_VERSION, "kernel_load_average": list(load)}
        measured["busy"] = entry["busy"] or is_busy(load[0], cores())
    else:
        measured = measure_cpu(n_devices)
    if fresh:  # keep the all-gather figures of other device counts
        measured = {**{k: v for k, v in entry.items() if k.startswith("all_gather")},
                    **measured}
    for own in ("decoder", "train"):  # measured on their own (decoder_figures, train_figures)
        if entry.get(own):
            measured[own] = entry[own]
    if measured["busy"] and not force:
        _UNCACHED[fingerprint] = measured
        _not_caching(log, measured.get("kernel_load_average", measured["load_average"])[0],
                     measured["cores"], "hpllm hw --refresh --force")
        return dict(measured, cached=False)
    cached = _read_cache()  # again: another process may have written it meanwhile
    cached[fingerprint] = measured
    _write_cache(cached)
    return dict(measured, cached=True)


def measured_cpu(refresh: bool = False, force: bool = False) -> Chip:
    """This CPU as a Chip: measured peaks and all-core read bandwidth (see cpu_figures)."""
    entry = cpu_figures(refresh, force)
    n_devices = len(jax.local_devices())
    gather_key = f"all_gather_bandwidth_{n_devices}dev"
    # XLA:CPU runs the dots of a bf16 program as float32 XNNPACK fusions (converts around
    # them), which beat its standalone bf16 matmul; a bf16 training step on CPU runs its
    # projections on the AVX512-BF16 kernel, faster than both. The peak a bf16 program can
    # reach is the best of the three, and dividing by it keeps MFU from being inflated.
    low = max(entry["bfloat16"], entry["float32"], entry.get("bfloat16_kernel", 0.0))
    flops = {"float32": entry["float32"], "bfloat16": low,
             "float16": max(entry["float16"], entry["float32"]), "int8": entry["int8"]}
    gather = entry.get(gather_key, 0.0)
    load = entry["load_average"][0]
    return Chip(f"CPU ({cpu_name()})", flops, _meminfo_bytes(),
                entry["read_bandwidth"], gather, f"measured {entry['measured_at']} at load "
                f"{load:.2f} on {entry['cores']} cores{' (busy: low)' if entry['busy'] else ''}:"
                f" jitted 2048^3 matmul"
                + (" (bf16: hpllm's kernel)" if entry.get("bfloat16_kernel", 0.0) == low else "")
                + f"; 1 GiB read, {entry['probe']} "
                f"(copy {entry['copy_bandwidth'] / 1e9:.1f} GB/s)"
                + (f", all-gather over {n_devices} devices" if gather else ""),
                measured=True, axis_bandwidth=gather, ici_bandwidth=gather,
                matvec_bandwidth=entry["matvec_bandwidth"], op_overhead_s=entry["op_overhead_s"],
                call_overhead_s=entry["call_overhead_s"],
                int8_matvec_bandwidth=entry.get("int8_matvec_bandwidth", 0.0),
                matvec_dot_s=entry.get("matvec_dot_s", 0.0),
                int8_matvec_dot_s=entry.get("int8_matvec_dot_s", 0.0),
                batched_flops=entry.get("batched_flops", {}),
                matvec_seconds=entry.get("matvec_seconds", {}),
                paged_attention_flops=entry.get("paged_attention_flops", {}),
                decode_attention_flops=entry.get("decode_attention_flops", 0.0),
                decoder=entry["decoder"] if decoder_fresh(entry.get("decoder") or {}) else {})


def current_chip() -> Chip:
    """The chip of jax.devices()[0]: from the table, else measured (CPU or unknown)."""
    device = jax.devices()[0]
    chip = lookup(getattr(device, "device_kind", ""))
    if chip is not None and device.platform != "cpu":
        return chip
    return measured_cpu()

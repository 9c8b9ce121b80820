"""Quantized-weight mat-vec/mat-mat on CPU: the C++ kernel (hpllm/kernels/cpu_quant_matmul.py)
against XLA's paths, on SmolLM2-135M's matrix shapes, next to the memory roofline.

    python bench/quant_matmul.py [--rows 1,8] [--working-set-mib 64] [--repeats 5]
    python bench/quant_matmul.py --sweep 1,2,4,8,16,32,64,128   # where XLA's GEMM wins

For each shape (K inputs -> N outputs; the tied LM head is 576 -> 49152) and M rows of x:
  f32 XLA       x @ W with W float32 (what a float32 model runs)
  int8 XLA      hpllm's XLA path for int8 weights: (x @ q.astype(f32)) * scale
  int8 kernel   the FFI kernel on the int8 codes
  int4 XLA / int4 kernel   the same for int4 codes in groups of 64
Each timed call runs R matmuls on R different weight copies (R chosen so that the int8 copies
hold --working-set-mib, twice this CPU's 32 MiB L3): weights come from memory, not cache, as
in a decode step. Reported: microseconds per matmul (median of --repeats calls), the bytes one
kernel matmul reads (codes + scales + x, and y written), the GB/s that makes, and the memory
roofline (those bytes / the measured read bandwidth of hpllm.perf.hardware.current_chip()).
Ratios are against f32 XLA and int8 XLA measured in the same run.

--sweep times one shape (576 -> 1536) over many M: the kernel against XLA dequantize-then-GEMM
(dequantize once, then the float matmul), to choose quantize.CPU_KERNEL_MAX_ROWS.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hpllm import quantized as qt
from hpllm.kernels import cpu_quant_matmul as kernel
from hpllm.perf.hardware import current_chip, time_calls

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from report import emit  # noqa: E402

# (name, K, N) of SmolLM2-135M's projections (dim 576, 3 KV heads x 64, ffn 1536, vocab 49152)
SHAPES = [("wq, wo 576->576", 576, 576), ("wk, wv 576->192", 576, 192),
          ("gate, up 576->1536", 576, 1536), ("down 1536->576", 1536, 576),
          ("tied head 576->49152", 576, 49152)]
TIED = "tied head 576->49152"  # float32 models contract the (V, D) table itself
GROUP = 64


def copies_for(k: int, n: int, working_set: float) -> int:
    return max(2, min(256, math.ceil(working_set / (n * k))))


def methods(k: int, tied: bool):
    """name -> (jitted fn of (x, weights list), weight builder from a float (N, K) matrix)."""
    def many(one):
        return jax.jit(lambda x, ws: [one(x, w) for w in ws])

    def as_qw(scheme):
        def build(w):
            return qt.quantize(w, scheme, (1,), group_size=GROUP)
        return build

    return {
        # float32 weights in the model's layout: (K, N) projections, the (N, K) tied table
        "f32 XLA": (many(lambda x, w: x @ w.T) if tied else many(lambda x, w: x @ w),
                    (lambda w: w) if tied else (lambda w: w.T.copy())),
        "int8 XLA": (many(qt._xla_matmul_nk), as_qw("int8")),
        "int8 kernel": (many(lambda x, w: kernel.int8_matmul(x, w.q, w.scale)), as_qw("int8")),
        "int4 XLA": (many(qt._xla_matmul_nk), as_qw("int4")),
        "int4 kernel": (many(lambda x, w: kernel.int4_matmul(x, w.q, w.scale, k, GROUP)),
                        as_qw("int4")),
    }


def kernel_bytes(scheme: str, k: int, n: int, m: int) -> int:
    """Bytes one kernel matmul moves: codes + scales read, x read, y written."""
    if scheme == "int8":
        weights = n * k + 4 * n
    else:
        kp = -(-k // GROUP) * GROUP
        weights = n * kp // 2 + 4 * n * kp // GROUP
    return weights + 4 * m * k + 4 * m * n


def time_per_matmul(fn, x, ws, repeats: int) -> float:
    return float(np.median(time_calls(lambda: fn(x, ws), repeats))) / len(ws)


def table(args, chip) -> list[str]:
    bw = chip.hbm_bandwidth
    rows = [int(r) for r in args.rows.split(",")]
    lines = ["| matrix | M | copies | f32 XLA us | int8 XLA us | int8 kernel us | int8 kernel "
             "MB | int8 kernel GB/s | int8 roofline us | int4 XLA us | int4 kernel us | "
             "int4 kernel GB/s | int4 roofline us | int8 kernel vs f32 | vs int8 XLA | "
             "int4 kernel vs f32 |", "|" + "---|" * 16]
    rng = np.random.default_rng(0)
    for name, k, n in SHAPES:
        copies = copies_for(k, n, args.working_set_mib * 2**20)
        floats = [jnp.asarray(rng.standard_normal((n, k), np.float32)) for _ in range(copies)]
        fns = methods(k, name == TIED)
        weights = {label: [build(w) for w in floats] for label, (_, build) in fns.items()}
        del floats
        for m in rows:
            x = jnp.asarray(rng.standard_normal((m, k), np.float32))
            t = {label: time_per_matmul(fn, x, weights[label], args.repeats)
                 for label, (fn, _) in fns.items()}
            b8, b4 = kernel_bytes("int8", k, n, m), kernel_bytes("int4", k, n, m)
            lines.append(
                f"| {name} | {m} | {copies} | {t['f32 XLA'] * 1e6:.1f} | "
                f"{t['int8 XLA'] * 1e6:.1f} | {t['int8 kernel'] * 1e6:.1f} | {b8 / 1e6:.2f} | "
                f"{b8 / t['int8 kernel'] / 1e9:.1f} | {b8 / bw * 1e6:.1f} | "
                f"{t['int4 XLA'] * 1e6:.1f} | {t['int4 kernel'] * 1e6:.1f} | "
                f"{b4 / t['int4 kernel'] / 1e9:.1f} | {b4 / bw * 1e6:.1f} | "
                f"{t['f32 XLA'] / t['int8 kernel']:.2f}x | "
                f"{t['int8 XLA'] / t['int8 kernel']:.2f}x | "
                f"{t['f32 XLA'] / t['int4 kernel']:.2f}x |")
            print(lines[-1], file=sys.stderr, flush=True)
        del weights
    return lines


def sweep(args) -> list[str]:
    """Kernel vs XLA dequantize-then-GEMM over M, on the 576 -> 1536 matrix."""
    k, n = 576, 1536
    copies = copies_for(k, n, args.working_set_mib * 2**20)
    rng = np.random.default_rng(1)
    ws = [qt.quantize(jnp.asarray(rng.standard_normal((n, k), np.float32)), "int8", (1,))
          for _ in range(copies)]
    f32 = [qt.dequantize(w).T.copy() for w in ws]  # (K, N)
    kern = jax.jit(lambda x, ws: [kernel.int8_matmul(x, w.q, w.scale) for w in ws])
    xla = jax.jit(lambda x, ws: [qt._xla_matmul_nk(x, w) for w in ws])
    dense = jax.jit(lambda x, ws: [x @ w for w in ws])
    lines = ["| M | f32 XLA us | int8 XLA us | int8 kernel us | kernel GFLOP/s | "
             "kernel vs int8 XLA |", "|---|---|---|---|---|---|"]
    for m in (int(r) for r in args.sweep.split(",")):
        x = jnp.asarray(rng.standard_normal((m, k), np.float32))
        tf = time_per_matmul(dense, x, f32, args.repeats)
        tx = time_per_matmul(xla, x, ws, args.repeats)
        tk = time_per_matmul(kern, x, ws, args.repeats)
        lines.append(f"| {m} | {tf * 1e6:.1f} | {tx * 1e6:.1f} | {tk * 1e6:.1f} | "
                     f"{2 * m * n * k / tk / 1e9:.1f} | {tx / tk:.2f}x |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,8", help="rows M of x, comma-separated")
    ap.add_argument("--working-set-mib", type=float, default=64.0,
                    help="int8 bytes of distinct weight copies per timed call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sweep", default="", help="M values for the kernel-vs-XLA sweep only")
    ap.add_argument("--out", default="", help="also write the report (markdown) here")
    args = ap.parse_args(argv)
    if not kernel.available():
        print("the CPU kernels are unavailable (see the warning); nothing to measure")
        return 1
    chip = current_chip()
    command = "python bench/quant_matmul.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = [f"Command: `{command.strip()}`  ",
            f"Machine: {chip.name}, {jax.device_count()} device(s); read bandwidth "
            f"{chip.hbm_bandwidth / 1e9:.1f} GB/s ({chip.source}); jax {jax.__version__}", ""]
    body = sweep(args) if args.sweep else table(args, chip)
    return emit(head + body + [""], args.out)


if __name__ == "__main__":
    sys.exit(main())

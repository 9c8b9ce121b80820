"""CPU matmuls on gemm.h (hpllm/kernels/cpu_quant_matmul.py) against XLA's float32 dot, on
SmolLM2-135M's matrix shapes, next to the roofline.

    python bench/quant_matmul.py [--rows 1,8,32,128,512] [--shapes head,ffn] [--rounds 3]

For each shape (K inputs -> N outputs; the tied LM head is 576 -> 49152) and M rows of x:
  f32 XLA       x @ W with W float32 (K, N): what a float32 model runs, the reference
  f32 kernel    gemm.h on the float32 (N, K) matrix
  int8 kernel   gemm.h on int8 codes (per-row scale): converted to float in registers for
                few rows; from 6 rows x at 15 bits per row, int8 x int16 products (vpdpwssd)
  int8 VNNI     x quantized per 64 k, int8 x int8 products (where the CPU has VNNI)
  int4 kernel   gemm.h on int4 codes in groups of 64: up to 47 rows x at 8 bits per 8 k,
                int4 x int8 products (vpdpbusd); for more, codes converted to float panels
  int8 XLA      hpllm's XLA path for int8 weights: (x @ q.astype(f32)) * scale
Each timed call runs R matmuls on R different weight copies (R such that they hold
--working-set-mib, beyond this CPU's 32 MiB L3): weights come from memory, as in a decode step.
The methods are timed in interleaved rounds (other work on a shared machine drifts); each
method's best round is reported, with `uptime`'s 1-minute load when its row was measured.
Reported: microseconds per matmul, the weight bytes over that time (GB/s), GFLOP/s (2 M N K),
the roofline (max of all bytes moved / the read bandwidth, and FLOPs / the float32 or int8
peak of hpllm.perf.hardware.current_chip()) and the time against f32 XLA's.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hpllm import quantized as qt
from hpllm.kernels import cpu_quant_matmul as kernel
from hpllm.perf.hardware import current_chip

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from report import emit  # noqa: E402

# name -> (K, N) of SmolLM2-135M's projections (dim 576, 3 KV heads x 64, ffn 1536, vocab 49152)
SHAPES = {"wq": (576, 576), "wk": (576, 192), "ffn": (576, 1536), "down": (1536, 576),
          "head": (576, 49152)}
GROUP = 64


def methods(k: int):
    """name -> (fn of (x, one weight), weight builder from a float (N, K) matrix, format)."""
    def quantized(scheme):
        return lambda w: qt.quantize(w, scheme, (1,), group_size=GROUP)

    table = {
        "f32 XLA": (lambda x, w: x @ w, lambda w: w.T.copy(), "f32"),
        "f32 kernel": (kernel.f32_matmul, lambda w: w, "f32"),
        "int8 kernel": (lambda x, w: kernel.int8_matmul(x, w.q, w.scale, prepared=False),
                        quantized("int8"), "int8"),
        "int8 VNNI": (lambda x, w: kernel.int8_matmul(x, w.q, w.scale, prepared=True),
                      quantized("int8"), "vnni"),
        "int4 kernel": (lambda x, w: kernel.int4_matmul(x, w.q, w.scale, k, GROUP),
                        quantized("int4"), "int4"),
        "int8 XLA": (qt._xla_matmul_nk, quantized("int8"), "int8 xla"),
    }
    if not kernel.prepared_supported():
        del table["int8 VNNI"]
    return table


def weight_bytes(fmt: str, k: int, n: int) -> int:
    if fmt == "f32":
        return 4 * n * k
    if fmt in ("int8", "vnni", "int8 xla"):
        return n * k + 4 * n
    kp = -(-k // GROUP) * GROUP
    return n * kp // 2 + 4 * n * kp // GROUP


def roofline_s(chip, fmt: str, k: int, n: int, m: int) -> float:
    """All bytes moved (weights, x read, y written) over the read bandwidth, or the FLOPs over
    the peak of the arithmetic the method runs (int8 for VNNI and int4 x int8, half of it for
    int8 x int16), whichever binds."""
    moved = weight_bytes(fmt, k, n) + 4 * m * k + 4 * m * n
    peak = chip.peak_flops["float32"]
    if fmt == "vnni" or (fmt == "int4" and m <= kernel.int4_x8_max_rows(GROUP)):
        peak = chip.peak_flops["int8"]
    elif fmt == "int8" and 0 < kernel.int8_x16_min_rows() <= m:
        peak = chip.peak_flops["int8"] / 2
    return max(moved / chip.hbm_bandwidth, 2 * m * n * k / peak)


def table(args, chip) -> list[str]:
    rows = [int(r) for r in args.rows.split(",")]
    lines = ["| matrix | M | method | us | weight GB/s | GFLOP/s | roofline us | vs f32 XLA | "
             "load |", "|" + "---|" * 9]
    rng = np.random.default_rng(0)
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        copies = max(2, min(64, math.ceil(args.working_set_mib * 2**20 / (n * k))))
        floats = [jnp.asarray(rng.standard_normal((n, k), np.float32)) for _ in range(copies)]
        fns = methods(k)
        built = {label: [build(w) for w in floats] for label, (_, build, _) in fns.items()}
        del floats
        many = {label: jax.jit(lambda x, ws, one=one: [one(x, w) for w in ws])
                for label, (one, _, _) in fns.items()}
        for m in rows:
            x = jnp.asarray(rng.standard_normal((m, k), np.float32))
            best, load = {}, {}
            for label in fns:  # compile and warm up
                jax.block_until_ready(many[label](x, built[label]))
            for _ in range(args.rounds):  # interleaved: each method once per round
                for label in fns:
                    t0 = time.perf_counter()
                    jax.block_until_ready(many[label](x, built[label]))
                    t = (time.perf_counter() - t0) / copies
                    if t < best.get(label, math.inf):
                        best[label], load[label] = t, os.getloadavg()[0]
            for label, (_, _, fmt) in fns.items():
                t = best[label]
                lines.append(
                    f"| {name} {k}->{n} | {m} | {label} | {t * 1e6:.1f} | "
                    f"{weight_bytes(fmt, k, n) / t / 1e9:.1f} | {2 * m * n * k / t / 1e9:.1f} | "
                    f"{roofline_s(chip, fmt, k, n, m) * 1e6:.1f} | "
                    f"{best['f32 XLA'] / t:.2f}x | {load[label]:.1f} |")
                print(lines[-1], file=sys.stderr, flush=True)
        del built
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,8,32,128,512", help="rows M of x, comma-separated")
    ap.add_argument("--shapes", default="ffn,down,head",
                    help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--working-set-mib", type=float, default=64.0,
                    help="int8 bytes of distinct weight copies per timed call")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best is kept")
    ap.add_argument("--out", default="", help="also write the report (markdown) here")
    args = ap.parse_args(argv)
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        ap.error(f"unknown shapes {sorted(unknown)}: choose from {', '.join(SHAPES)}")
    if not kernel.available():
        print("the CPU kernels are unavailable (see the warning); nothing to measure")
        return 1
    chip = current_chip()
    command = "python bench/quant_matmul.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = [f"Command: `{command.strip()}`  ",
            f"Machine: {chip.name}, {os.cpu_count()} cores; read bandwidth "
            f"{chip.hbm_bandwidth / 1e9:.1f} GB/s, float32 peak "
            f"{chip.peak_flops['float32'] / 1e9:.0f} GFLOP/s, int8 peak "
            f"{chip.peak_flops['int8'] / 1e9:.0f} ({chip.source}); jax {jax.__version__}", ""]
    return emit(head + table(args, chip) + [""], args.out)


if __name__ == "__main__":
    sys.exit(main())

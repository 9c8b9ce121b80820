"""Training-step throughput: measured vs the compute roofline, for several model sizes.

    python bench/train_step.py [--sizes tiny,shakespeare,small] [--steps 5] [--rounds 3]
                               [--kernels on,matmul,off] [--json out.json]

For each size, compute dtype and (bf16 on CPU) with all CPU kernels (on: the bf16 matmul of
hpllm/kernels/cpu_matmul.py, the attention of cpu_attention.py and the SwiGLU, RMSNorm, RoPE
and loss kernels of cpu_elementwise.py), the matmul alone, or none
(off) it times the jitted train step (random tokens, the real step
function), the variants interleaved in rounds so a busy machine slows them alike, and prints
tokens/s, TFLOP/s per device, MFU against this machine's peak (measured matmul FLOP/s on
CPU, datasheet on accelerators), the predicted step time FLOPs/peak, the ratio
measured/predicted, and the 1-minute load average. The float32 step of each size is the
same-run baseline the others are compared with.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from hpllm.config import make_config
from hpllm.kernels import cpu_matmul
from hpllm.model.transformer import count_params
from hpllm.perf.hardware import current_chip
from hpllm.perf.roofline import train_flops_per_token
from hpllm.train.data import random_batch
from hpllm.train.state import init_state
from hpllm.train.step import jit_train_step


# --kernels names -> jit_train_step's cpu_kernels
KERNEL_MODES = {"on": True, "matmul": ("matmul",), "off": False}


def prepare(config, kernels):
    """A compiled step with its state and batch; compile seconds."""
    state = jax.jit(init_state, static_argnums=0)(config, jax.random.key(0))
    step_fn = jit_train_step(config, cpu_kernels=kernels)
    batch = jax.device_put(random_batch(config))
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch)
    metrics["loss"].block_until_ready()
    return {"fn": step_fn, "state": state, "batch": batch,
            "compile_s": time.perf_counter() - t0, "times": []}


def run_steps(run: dict, steps: int) -> None:
    for _ in range(steps):
        t0 = time.perf_counter()
        run["state"], metrics = run["fn"](run["state"], run["batch"])
        metrics["loss"].block_until_ready()
        run["times"].append(time.perf_counter() - t0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,shakespeare,small")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kernels", default="on,off",
                        help="bf16 steps with all CPU kernels (on), the matmul kernel only "
                             "(matmul), none (off)")
    parser.add_argument("--batch_size", type=int, default=0, help="0: each preset's own")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    chip = current_chip()
    print(f"device: {chip.name} x {jax.device_count()}; peaks "
          + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in chip.peak_flops.items())
          + f" ({chip.source})")
    header = (f"{'preset':<12}{'params':>8}{'dtype':>15}{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
              f"{'step ms':>9}{'pred ms':>9}{'meas/pred':>10}{'vs f32':>8}{'load':>6}")
    print(header)
    rows = []
    on_cpu = jax.default_backend() == "cpu" and cpu_matmul.available()
    for size in args.sizes.split(","):
        variants = []
        for dtype in args.dtypes.split(","):
            kernel_modes = ["off"]
            if dtype == "bfloat16" and on_cpu:
                kernel_modes = args.kernels.split(",")
            for kernels in kernel_modes:
                overrides = [f"--compute_dtype={dtype}"]
                if args.batch_size:
                    overrides.append(f"--batch_size={args.batch_size}")
                config = make_config(size, overrides)
                variants.append((dtype, kernels, config, prepare(config, KERNEL_MODES[kernels])))
        loads = []
        for _ in range(args.rounds):
            for *_, run in variants:
                loads.append(os.getloadavg()[0])
                run_steps(run, args.steps)
        baseline = None
        for dtype, kernels, config, run in variants:
            tokens = config.train.batch_size * config.train.seq_len
            flops = train_flops_per_token(config.model, config.train.seq_len) * tokens
            peak = chip.peak(dtype)
            step_s = float(np.median(run["times"]))
            baseline = baseline or step_s
            name = dtype + ("" if kernels == "off" else f"+{kernels}")
            row = {"preset": size, "params": count_params(config.model), "dtype": dtype,
                   "cpu_kernels": kernels, "batch_size": config.train.batch_size,
                   "seq_len": config.train.seq_len,
                   "tokens_per_s": tokens / step_s, "tflops_per_device": flops / step_s / 1e12,
                   "mfu": flops / step_s / peak, "step_ms": 1e3 * step_s,
                   "predicted_ms": 1e3 * flops / peak, "speedup_vs_float32": baseline / step_s,
                   "compile_s": run["compile_s"], "step_s": step_s,
                   "step_s_min": float(np.min(run["times"])), "load_average": float(np.mean(loads))}
            rows.append(row)
            print(f"{size:<12}{row['params'] / 1e6:>7.2f}M{name:>15}{row['tokens_per_s']:>10.0f}"
                  f"{row['tflops_per_device']:>9.3f}{100 * row['mfu']:>6.1f}%"
                  f"{row['step_ms']:>9.1f}{row['predicted_ms']:>9.1f}"
                  f"{row['step_ms'] / row['predicted_ms']:>10.2f}{row['speedup_vs_float32']:>7.2f}x"
                  f"{row['load_average']:>6.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": chip.name, "peaks": chip.peak_flops, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

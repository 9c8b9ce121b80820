"""Sharding strategies side by side: step time, TFLOP/s per device, compiled memory per device
and collectives, next to the roofline's predicted step, bound and memory, and the same-run
one-device step as the baseline.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/sharding.py \
        [--preset shakespeare] [--steps 5] [--strategies dp,fsdp,tp,fsdp_tp,...] [--json F]

On a CPU the 8 "devices" are threads sharing the machine's cores: the step time shows the
cost of partitioning and collectives, not a speed-up, and the prediction (which gives each
device the whole chip's peak) is a per-device ideal. On an accelerator slice the same
command measures the real thing.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from hpllm.config import MeshConfig, make_config
from hpllm.parallel import sharding as S
from hpllm.parallel.mesh import describe, make_mesh
from hpllm.perf import roofline
from hpllm.perf.hardware import current_chip, time_calls
from hpllm.perf.hlo import collective_counts
from hpllm.train.data import random_batch
from hpllm.train.state import init_sharded_state, init_state
from hpllm.train.step import jit_train_step

# name -> (mesh, extra overrides). Pipeline and MoE rows use part B's code (GPipe over
# `stage`, experts over `expert`); they are skipped with the reason if it cannot run.
STRATEGIES = {
    "one device": ("", []),
    "dp": ("data=-1", []),
    "fsdp": ("fsdp=-1", []),
    "tp": ("tensor=-1", []),
    "tp_ring": ("tensor=-1", ["--collective_matmul=ring"]),  # the ring collective matmuls
    "fsdp_tp": ("fsdp=-1,tensor=2", []),
    "dp_fsdp_tp": ("data=2,fsdp=-1,tensor=2", []),
    "pipeline": ("data=-1,stage=2", ["--microbatches=4"]),
    "moe_ep": ("data=-1,expert=4", ["--n_experts=4", "--experts_per_token=2"]),
}


def run(preset: str, mesh_text: str, extra: list[str], steps: int, chip) -> dict:
    config = make_config(preset, extra + ([f"--mesh={mesh_text}"] if mesh_text else []))
    batch = random_batch(config)
    if not mesh_text:
        mesh = None
        state = jax.jit(init_state, static_argnums=0)(config, jax.random.key(0))
        step = jit_train_step(config)
        placed = jax.device_put(batch)
    else:
        mesh = make_mesh(config.mesh)
        state = init_sharded_state(config, mesh, jax.random.key(0))
        step = jit_train_step(config, mesh)
        placed = S.shard_batch(batch, mesh)
    compiled = step.lower(state, placed).compile()
    holder = {"state": state}

    def one():
        holder["state"], metrics = compiled(holder["state"], placed)
        return metrics["loss"]

    times = time_calls(one, steps)
    mem = compiled.memory_analysis()
    shape = dict(mesh.shape) if mesh is not None else {}
    n = mesh.size if mesh is not None else 1
    pred = roofline.predict(
        config.model, roofline.Workload("train", config.train.batch_size, config.train.seq_len),
        chip, roofline.MeshShape(data=shape.get("data", 1), fsdp=shape.get("fsdp", 1),
                                 tensor=shape.get("tensor", 1)),
        param_dtype=config.train.param_dtype, compute_dtype=config.train.compute_dtype,
        remat=config.train.remat, attention=config.model.attention)
    step_s = float(np.median(times))
    tokens = config.train.batch_size * config.train.seq_len
    flops = roofline.train_flops_per_token(config.model, config.train.seq_len) * tokens
    compiled_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                      - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    return {"mesh": describe(mesh) if mesh is not None else "1 device", "devices": n,
            "step_ms": 1e3 * step_s, "tflops_per_device": flops / step_s / n / 1e12,
            "pred_ms": 1e3 * pred.step_s, "bound": pred.bound,
            "mem_mib": compiled_bytes / 2**20, "pred_mem_mib": pred.memory["total"] / 2**20,
            "state_mib": (mem.argument_size_in_bytes) / 2**20,
            "collectives": collective_counts(compiled.as_text())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shakespeare")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--overrides", default="--compute_dtype=float32",
                        help="config overrides for every row, space separated")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    chip = current_chip()
    print(f"{jax.device_count()} x {jax.devices()[0].platform} devices; chip {chip.name}, "
          f"peak {chip.peak('float32') / 1e12:.3f} TFLOP/s float32 per device ({chip.source}); "
          f"preset {args.preset} {args.overrides}")
    print(f"{'strategy':<12}{'mesh':<24}{'step ms':>9}{'vs 1 dev':>9}{'TFLOP/s/dev':>12}"
          f"{'pred ms':>9}{'bound':>14}{'MiB/dev':>9}{'pred MiB':>9}{'mem/pred':>9}  collectives")
    rows, baseline = [], None
    for name in args.strategies.split(","):
        mesh_text, extra = STRATEGIES[name]
        if mesh_text:
            try:  # a mesh this machine cannot form (too few devices) is a skip, not a crash
                make_mesh(MeshConfig.parse(mesh_text))
            except Exception as e:  # noqa: BLE001
                print(f"{name:<12}skipped: {e}")
                continue
        try:
            row = run(args.preset, mesh_text, args.overrides.split() + extra, args.steps, chip)
        except Exception as e:  # noqa: BLE001 (part B's rows may not run yet: say why)
            print(f"{name:<12}failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        baseline = baseline or row["step_ms"]
        coll = ", ".join(f"{k} {v}" for k, v in row["collectives"].items() if v)
        print(f"{name:<12}{row['mesh']:<24}{row['step_ms']:>9.1f}{row['step_ms'] / baseline:>9.2f}"
              f"{row['tflops_per_device']:>12.4f}{row['pred_ms']:>9.2f}{row['bound']:>14}"
              f"{row['mem_mib']:>9.2f}{row['pred_mem_mib']:>9.2f}"
              f"{row['mem_mib'] / row['pred_mem_mib']:>9.2f}  {coll or '-'}")
        rows.append({"strategy": name, **row})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Sharding strategies side by side: step time, TFLOP/s per device, compiled memory per device
and collectives, next to the predicted step (the roofline's, plus the pipeline bubble, the
stage-to-stage transfers and MoE's all-to-alls: hpllm/perf/strategy.py), bound and memory,
and the same-run one-device step as the baseline.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/sharding.py \
        [--preset shakespeare] [--steps 5] [--strategies dp,fsdp,tp,fsdp_tp,...] [--json F]

On a CPU the 8 "devices" are threads sharing the machine's cores: the step time shows the
cost of partitioning and collectives, not a speed-up, and the prediction (which gives each
device the whole chip's peak) is a per-device ideal. On an accelerator slice the same
command measures the real thing. --json FILE writes one record per strategy: the mesh's axis
sizes, the pipeline schedule, the parameters + optimizer state bytes on one device (from the
compiled step's input shardings), the measured step and the predicted terms.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import numpy as np

from hpllm.config import MESH_AXES, MeshConfig, make_config
from hpllm.parallel import sharding as S
from hpllm.parallel.mesh import describe, make_mesh
from hpllm.perf import roofline, strategy
from hpllm.perf.hardware import current_chip, time_calls
from hpllm.perf.hlo import collective_counts
from hpllm.train.data import random_batch
from hpllm.train.state import init_sharded_state, init_state
from hpllm.train.step import jit_train_step

# name -> (mesh, extra overrides). A row whose configuration the code refuses prints why and
# is left out of the table and the JSON.
STRATEGIES = {
    "one device": ("", []),
    "dp": ("data=-1", []),
    "fsdp": ("fsdp=-1", []),
    "tp": ("tensor=-1", []),
    "tp_ring": ("tensor=-1", ["--collective_matmul=ring"]),  # the ring collective matmuls
    "fsdp_tp": ("fsdp=-1,tensor=2", []),
    "dp_fsdp_tp": ("data=2,fsdp=-1,tensor=2", []),
    "pp2_gpipe": ("data=-1,stage=2", ["--microbatches=4"]),
    "pp2_1f1b": ("data=-1,stage=2", ["--microbatches=4", "--pipeline_schedule=1f1b"]),
    "pp4_gpipe": ("data=-1,stage=4", ["--microbatches=8"]),
    "pp4_1f1b": ("data=-1,stage=4", ["--microbatches=8", "--pipeline_schedule=1f1b"]),
    "moe_ep": ("data=-1,expert=4", ["--n_experts=4", "--experts_per_token=2"]),
    "moe_pp_ep": ("data=-1,stage=2,expert=2", ["--microbatches=4", "--n_experts=4",
                                               "--experts_per_token=2"]),
}


def param_opt_bytes(compiled, state) -> int:
    """Bytes of the parameters and optimizer state one device holds, as the compiled step
    takes them (its input shardings: the shard shape of every leaf)."""
    shardings = compiled.input_shardings[0][0]
    return sum(math.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize
               for part in ("params", "opt_state")
               for x, sh in zip(jax.tree.leaves(state[part]),
                                jax.tree.leaves(shardings[part])))


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

    param_opt = param_opt_bytes(compiled, state)  # before the first step donates `state`
    times = time_calls(one, steps)
    mem = compiled.memory_analysis()
    shape = {k: int(v) for k, v in mesh.shape.items()} if mesh is not None else {}
    n = mesh.size if mesh is not None else 1
    pipelined = shape.get("stage", 1) > 1
    schedule = config.train.pipeline_schedule if pipelined else "none"
    pred = strategy.predict_step(
        config.model, roofline.Workload("train", config.train.batch_size, config.train.seq_len),
        chip, strategy.Strategy.from_mesh(shape, config.train.microbatches,
                                          schedule if pipelined else "gpipe"),
        param_dtype=config.train.param_dtype, compute_dtype=config.train.compute_dtype,
        remat=config.train.remat, attention=config.model.attention)
    step_s = float(np.median(times))
    tokens = config.train.batch_size * config.train.seq_len
    flops = roofline.train_flops_per_token(config.model, config.train.seq_len) * tokens
    compiled_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                      - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    terms = pred.to_dict()
    return {"mesh": {a: shape.get(a, 1) for a in MESH_AXES},
            "mesh_text": describe(mesh) if mesh is not None else "1 device",
            "devices": n, "schedule": schedule,
            "microbatches": config.train.microbatches if pipelined else 1,
            "step_ms": 1e3 * step_s, "tflops_per_device": flops / step_s / n / 1e12,
            "pred_ms": terms["total_ms"], "measured_over_predicted": 1e3 * step_s
            / terms["total_ms"], "bound": pred.bound,
            "predicted": {k: terms[k] for k in ("base_ms", "collectives_ms", "bubble_fraction",
                                                "bubble_ms", "transfer_ms", "all_to_all_ms",
                                                "total_ms", "traffic")},
            "param_opt_bytes_per_device": param_opt,
            "pred_param_opt_bytes_per_device": terms["param_opt_bytes_per_device"],
            "mem_mib": compiled_bytes / 2**20,
            "pred_mem_mib": pred.base.memory["total"] / 2**20,
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
    print("pred ms = the roofline's step + bubble + stage transfers (xfer) + all-to-alls (a2a); "
          "P+O = parameters + optimizer state per device (compiled), pred P+O its napkin")
    print(f"{'strategy':<11}{'mesh':<24}{'sched':>6}{'step ms':>9}{'vs 1 dev':>9}{'pred ms':>9}"
          f"{'meas/pred':>10}{'bubble':>8}{'xfer':>8}{'a2a':>8}{'P+O MiB':>9}{'pred P+O':>9}"
          f"{'MiB/dev':>9}{'pred MiB':>9}{'bound':>16}  collectives")
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
        p = row["predicted"]
        print(f"{name:<11}{row['mesh_text']:<24}{row['schedule']:>6}{row['step_ms']:>9.1f}"
              f"{row['step_ms'] / baseline:>9.2f}{row['pred_ms']:>9.2f}"
              f"{row['measured_over_predicted']:>10.1f}{p['bubble_ms']:>8.2f}"
              f"{p['transfer_ms']:>8.2f}{p['all_to_all_ms']:>8.2f}"
              f"{row['param_opt_bytes_per_device'] / 2**20:>9.2f}"
              f"{row['pred_param_opt_bytes_per_device'] / 2**20:>9.2f}"
              f"{row['mem_mib']:>9.2f}{row['pred_mem_mib']:>9.2f}{row['bound']:>16}"
              f"  {coll or '-'}")
        rows.append({"strategy": name, **row})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Mixture of experts and GPipe: measured vs predicted, each against a same-run baseline.

    python bench/moe_pipeline.py [--repeats 5] [--json out.json]

Runs on 8 simulated CPU devices (it sets XLA_FLAGS itself) or on a machine's real devices.

1. MoE layer (forward + backward), dispatch by index with capacity vs the dense reference
   that runs every expert on every token: predicted ratio = their FLOP ratio.
2. Training step of a small MoE model: one device vs expert parallel (mesh data=2,
   expert=4); the HLO's collectives are listed. Simulated devices share the same cores, so
   the prediction is "no faster": the point is the all-to-alls and their cost.
3. GPipe: the same dense model, P = 4 stages (x data=2) with M = 1, 2, 4, 8 microbatches, vs
   pure data parallelism over the same 8 devices (no bubble). In SPMD every stage computes in
   every time step, idle ones on padding, so the total work is (M+P-1)/M of the
   data-parallel step's: that ratio, 1 / (1 - bubble), is the prediction.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hpllm.config import make_config  # noqa: E402
from hpllm.model import moe  # noqa: E402
from hpllm.parallel import sharding  # noqa: E402
from hpllm.parallel.pipeline import bubble_fraction  # noqa: E402
from hpllm.perf.hardware import time_calls  # noqa: E402
from hpllm.perf.hlo import collective_counts  # noqa: E402
from hpllm.train.data import random_batch  # noqa: E402
from hpllm.train.state import init_sharded_state, init_state  # noqa: E402
from hpllm.train.step import jit_train_step  # noqa: E402


def median_ms(run, repeats):
    return 1e3 * statistics.median(time_calls(run, repeats))


def bench_layer(repeats):
    config = make_config("shakespeare", n_experts=8, experts_per_token=2,
                         capacity_factor=1.25).model
    b, s, d, f, e, k = 8, 128, config.dim, config.hidden_dim, config.n_experts, 2
    keys = jax.random.split(jax.random.key(0), 5)
    w = {"router": jax.random.normal(keys[0], (d, e)) * 0.02,
         "w_gate": jax.random.normal(keys[1], (e, d, f)) * 0.02,
         "w_up": jax.random.normal(keys[2], (e, d, f)) * 0.02,
         "w_down": jax.random.normal(keys[3], (e, f, d)) * 0.02}
    x = jax.random.normal(keys[4], (b, s, d))

    def grad_of(fn):
        def loss(x, w):
            out = fn(x, w, config)
            return jnp.sum((out[0] if isinstance(out, tuple) else out) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    cap = moe.capacity(s, e, k, config.capacity_factor)
    expert_flops = 3 * 3 * 2 * d * f  # fwd + bwd, three matmuls
    flops = {"dispatch": expert_flops * b * e * cap, "dense reference": expert_flops * b * s * e}
    ms = {name: median_ms(functools.partial(grad_of(fn), x, w), repeats)
          for name, fn in (("dispatch", moe.moe_mlp), ("dense reference", moe.dense_moe_reference))}
    print(f"\n1. MoE layer fwd+bwd, B={b} S={s} D={d} F={f} E={e} k={k}, capacity {cap} "
          f"slots/expert/row")
    for name in ms:
        print(f"   {name:<16} {ms[name]:8.2f} ms   {flops[name] / 1e9:6.2f} GFLOP")
    predicted = flops["dense reference"] / flops["dispatch"]
    print(f"   dense / dispatch: measured {ms['dense reference'] / ms['dispatch']:.2f}x, "
          f"predicted (FLOPs) {predicted:.2f}x")
    return {"ms": ms, "gflop": {k_: v / 1e9 for k_, v in flops.items()},
            "predicted_ratio": predicted}


def time_train_step(config, repeats):
    mesh = sharding.training_mesh(config)
    batch = random_batch(config)
    if mesh is None:
        state = jax.jit(init_state, static_argnums=0)(config, jax.random.key(0))
        batch = jax.device_put(batch)
    else:
        state = init_sharded_state(config, mesh, jax.random.key(0))
        batch = sharding.shard_batch(batch, mesh)
    compiled = jit_train_step(config, mesh).lower(state, batch).compile()
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics["loss"]

    ms = median_ms(run, repeats)
    return ms, collective_counts(compiled.as_text())


def bench_expert_parallel(repeats):
    kw = dict(n_experts=8, experts_per_token=2, batch_size=16, seq_len=128, steps=10,
              compute_dtype="float32")
    one, _ = time_train_step(make_config("shakespeare", **kw), repeats)
    ep, coll = time_train_step(make_config("shakespeare", mesh="data=2,expert=4", **kw), repeats)
    print("\n2. MoE train step, shakespeare preset with 8 experts (top-2), 16 x 128 tokens, f32")
    print(f"   1 device           {one:8.1f} ms")
    print(f"   data=2 expert=4    {ep:8.1f} ms  ({ep / one:.2f}x; collectives "
          f"{ {k: v for k, v in coll.items() if v} })")
    return {"one_device_ms": one, "expert_parallel_ms": ep, "collectives": coll}


def bench_pipeline(repeats):
    kw = dict(n_layers=4, batch_size=16, seq_len=128, steps=10, compute_dtype="float32")
    base, _ = time_train_step(make_config("shakespeare", mesh="data=8", **kw), repeats)
    print("\n3. GPipe, shakespeare preset (4 layers), 16 x 128 tokens, f32; baseline data=8 "
          f"{base:.1f} ms")
    print(f"   {'M':>3} {'bubble':>7} {'step ms':>9} {'measured x':>11} {'predicted x':>12}")
    rows = []
    for m in (1, 2, 4, 8):
        config = make_config("shakespeare", mesh="stage=4,data=2", microbatches=m, **kw)
        ms, coll = time_train_step(config, repeats)
        bubble = bubble_fraction(4, m)
        rows.append({"microbatches": m, "bubble": bubble, "ms": ms, "ratio": ms / base,
                     "predicted_ratio": 1 / (1 - bubble), "collectives": coll})
        print(f"   {m:>3} {100 * bubble:6.1f}% {ms:9.1f} {ms / base:10.2f}x "
              f"{1 / (1 - bubble):11.2f}x")
    return {"data_parallel_ms": base, "pipeline": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})")
    out = {"devices": jax.device_count(), "layer": bench_layer(args.repeats),
           "expert_parallel": bench_expert_parallel(args.repeats),
           "pipeline": bench_pipeline(args.repeats)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

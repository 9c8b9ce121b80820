"""Single-stream decode speed of the fused CPU decoder step (hpllm/kernels/cpu_decoder.py)
against generate()'s XLA path, in interleaved rounds, per weight format.

    python bench/cpu_decoder.py [--model smollm2-135m] [--tokens 128] [--rounds 2]
                                [--formats float32,int8,int4] [--paths kernel,xla]
                                [--batch 8,32] [--kv-dtype float32|int8]

Each (round, format, path) generates --tokens greedy tokens from the same prompt through
generate() (cpu_kernel=True or False), once to compile and once timed. A token's time is the
wall time between two tokens generate() yields (its loop queues each step a token ahead, so
this is the step plus whatever the loop does not hide); tok/s is 1 / the median. `cpu ms/step` is the process CPU time per step (all threads; spinning counts), which
moves less than wall time on a shared machine. The 1-minute load average is printed beside
every number. With HPLLM_DECODER_PROFILE=1 the kernel also reports where a step's wall time
goes, per phase kind (cpu_decoder.profile()). At the end: whether both paths produced the
same greedy tokens. --batch R,...: instead, kernel steps of R decode rows (one token for each
of R sequences with 64 tokens of context, one compiled step), wall median / best of 20 and the
per-phase profile.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.checkpoints.registry import load_model
from hpllm.compress.quantize import quantize_params
from hpllm.infer import generate as gen
from hpllm.kernels import cpu_decoder

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time,"


def timed_generate(params, config, prompt: list[int], n: int, kv_dtype: str, cpu_kernel: bool):
    """(greedy ids, wall seconds per token, cpu seconds per token) of generate() itself: the
    time between consecutive tokens it yields after the first (the prefill's), as a streaming
    caller sees them (its loop dispatches each step a token ahead)."""
    tokens = gen.generate(params, config, prompt, n, kv_dtype=kv_dtype, cpu_kernel=cpu_kernel)
    ids, wall, cpu = [next(tokens)], [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for token in tokens:
        t1, c1 = time.perf_counter(), time.process_time()
        ids.append(token)
        wall.append(t1 - t0)
        cpu.append(c1 - c0)
        t0, c0 = t1, c1
    return ids, wall, cpu


def kernel_run(params, config, prompt: list[int], n: int, kv_dtype: str = "float32"):
    return timed_generate(params, config, prompt, n, kv_dtype, cpu_kernel=True)


def xla_run(params, config, prompt: list[int], n: int, kv_dtype: str = "float32"):
    return timed_generate(params, config, prompt, n, kv_dtype, cpu_kernel=False)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnums=1)
def _batch_step(weights, pool, tokens, positions, seq_index, tables, logits_index, config):
    return cpu_decoder.step(weights, pool, tokens, positions, seq_index, tables, logits_index,
                            config=config)


def batch_run(params, config, rows: int, kv_dtype: str, context: int = 64, steps: int = 20):
    """(wall seconds per step, profile) of `steps` decode steps of `rows` sequences."""
    weights = gen.prepared_weights(params, config)
    block, per_seq = 16, -(-(context + steps + 4) // 16)
    pool = cpu_decoder.create_pool(config, rows * per_seq + 1, block, kv_dtype)
    tables = jnp.asarray(1 + np.arange(rows * per_seq).reshape(rows, per_seq), jnp.int32)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, config.vocab_size, rows * context), jnp.int32)
    positions = jnp.asarray(np.tile(np.arange(context), rows), jnp.int32)
    seqs = jnp.asarray(np.repeat(np.arange(rows), context), jnp.int32)
    rows_index = jnp.arange(rows, dtype=jnp.int32)
    _, pool = _batch_step(weights, pool, prompt, positions, seqs, tables, rows_index, config)
    tokens, wall = jnp.zeros(rows, jnp.int32), []
    for i in range(steps + 3):  # 3 to compile and warm up
        if i == 3:
            cpu_decoder.profile(reset=True)
        t0 = time.perf_counter()
        out, pool = _batch_step(weights, pool, tokens, jnp.full(rows, context + i, jnp.int32),
                                rows_index, tables, rows_index, config)
        out.block_until_ready()
        if i >= 3:
            wall.append(time.perf_counter() - t0)
    return wall, cpu_decoder.profile(reset=True)


def profile_line(phases: dict) -> str:
    steps = phases.pop("steps", 0)
    counts = phases.pop("counts", {})
    if not steps:
        return ""
    return ("  | ms/step: " + " ".join(f"{k} {v / steps * 1e3:.2f}" for k, v in phases.items())
            + "  | per step: " + " ".join(f"{k} {v / steps:.1f}" for k, v in counts.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--formats", default="float32,int8,int4")
    ap.add_argument("--paths", default="kernel,xla")
    ap.add_argument("--batch", default="", help="decode rows per kernel step, e.g. 8,32")
    ap.add_argument("--kv-dtype", default="float32", choices=cpu_decoder.KV_DTYPES)
    args = ap.parse_args()
    model = load_model(args.model, progress=False)
    config, prompt = model.config, model.tokenizer.encode(PROMPT)
    formats, paths = args.formats.split(","), args.paths.split(",")
    params = {f: model.params if f == "float32" else quantize_params(model.params, f)
              for f in formats}
    if args.batch:
        for r in range(args.rounds):
            for f in formats:
                for rows in map(int, args.batch.split(",")):
                    wall, phases = batch_run(params[f], config, rows, args.kv_dtype)
                    med = statistics.median(wall)
                    print(f"round {r} {f:8s} kernel rows {rows:3d} kv {args.kv_dtype}: "
                          f"{rows / med:7.1f} tok/s (median step {med * 1e3:6.2f} ms, best "
                          f"{min(wall) * 1e3:6.2f} ms)  load {os.getloadavg()[0]:.2f}"
                          + profile_line(phases), flush=True)
        return
    ids = {}
    for r in range(args.rounds):
        for f in formats:
            for path in paths:
                run = kernel_run if path == "kernel" else xla_run
                run(params[f], config, prompt, args.tokens, args.kv_dtype)  # compile
                cpu_decoder.profile(reset=True)
                got, wall, cpu = run(params[f], config, prompt, args.tokens, args.kv_dtype)
                phases = cpu_decoder.profile(reset=True)
                ids[f, path] = got
                med = statistics.median(wall)
                load = os.getloadavg()[0]
                line = (f"round {r} {f:8s} {path:6s} {1 / med:6.1f} tok/s (median step "
                        f"{med * 1e3:6.2f} ms, best {1 / min(wall):6.1f} tok/s)  kv "
                        f"{args.kv_dtype}  cpu {statistics.median(cpu) * 1e3:6.2f} ms/step  "
                        f"load {load:.2f}")
                print(line + profile_line(phases), flush=True)
    for f in formats:
        if (f, "kernel") in ids and (f, "xla") in ids:
            print(f"{f}: kernel and XLA greedy tokens identical: "
                  f"{ids[f, 'kernel'] == ids[f, 'xla']}")


if __name__ == "__main__":
    main()

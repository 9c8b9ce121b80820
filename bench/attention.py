"""Attention implementations: compiled peak memory and time vs sequence length, and flash
decoding vs plain decode attention vs context length.

    python bench/attention.py [--lengths 1024,...,32768] [--time-max 8192] [--json out.json]

Part 1 (causal self-attention, batch 1, 8 query / 4 KV heads, head dim 64, float32): for the
dense `reference` and the blockwise `flash`, forward and forward+backward, the temporary
memory XLA allocates (compiled memory analysis: no need to run it) and, up to --time-max
tokens (and --ref-time-max for the reference, whose S x S scores outgrow RAM), the median
time next to the compute-roofline prediction (causal FLOPs / measured peak).

Part 2 (one new token, 8 query / 2 KV heads, head dim 64): plain decode attention vs flash
decoding (KV split in chunks) at contexts 4K-64K, next to the memory-roofline prediction
(K and V bytes / measured bandwidth), with the speedup.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.kernels.decode_attention import flash_decode
from hpllm.kernels.flash_attention import flash_attention
from hpllm.model.attention import reference_attention
from hpllm.perf.hardware import current_chip


def median_time(fn, *args, repeats=3):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def self_attention_fns(impl, length):
    pos = jnp.arange(length)[None]
    seg = jnp.ones((1, length), jnp.int32)
    attn = reference_attention if impl == "reference" else flash_attention

    def fwd(q, k, v):
        return attn(q, k, v, pos, pos, seg, seg)

    def fwd_bwd(q, k, v):
        return jax.grad(lambda q, k, v: fwd(q, k, v).sum(), argnums=(0, 1, 2))(q, k, v)

    return {"fwd": jax.jit(fwd), "fwd+bwd": jax.jit(fwd_bwd)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--time-max", type=int, default=8192)
    parser.add_argument("--ref-time-max", type=int, default=4096)
    parser.add_argument("--contexts", default="4096,16384,65536")
    parser.add_argument("--splits", type=int, default=16)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    chip = current_chip()
    peak, bandwidth = chip.peak("float32"), chip.hbm_bandwidth
    heads, kv_heads, dim = 8, 4, 64
    print(f"{chip.name}: peak {peak / 1e12:.3f} TFLOP/s float32, {bandwidth / 1e9:.1f} GB/s")
    print(f"{'S':>6} {'impl':<10}{'pass':<8}{'temp MiB':>10}{'time ms':>10}{'pred ms':>9}"
          f"{'meas/pred':>10}")
    rows = []
    memory = {}
    for length in map(int, args.lengths.split(",")):
        q = jax.ShapeDtypeStruct((1, length, heads, dim), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, length, kv_heads, dim), jnp.float32)
        causal_flops = 4 * heads * dim * length * (length + 1) / 2  # QK^T and PV, triangle
        for impl in ("reference", "flash"):
            for name, fn in self_attention_fns(impl, length).items():
                mib = fn.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes / 2**20
                memory[impl, name, length] = mib
                flops = causal_flops * (1 if name == "fwd" else 3.5)  # bwd: 5 matmuls vs 2
                limit = args.ref_time_max if impl == "reference" else args.time_max
                t = None
                if length <= limit:
                    rng = np.random.default_rng(0)
                    arrays = [jnp.asarray(rng.standard_normal(s.shape), jnp.float32)
                              for s in (q, kv, kv)]
                    t = median_time(fn, *arrays)
                pred = flops / peak
                rows.append({"length": length, "impl": impl, "pass": name, "temp_mib": mib,
                             "time_s": t, "predicted_s": pred})
                timing = (f"{t * 1e3:>10.1f}{pred * 1e3:>9.1f}{t / pred:>10.2f}" if t
                          else f"{'-':>10}{pred * 1e3:>9.1f}{'-':>10}")
                print(f"{length:>6} {impl:<10}{name:<8}{mib:>10.1f}{timing}")
    for name in ("fwd", "fwd+bwd"):
        at = 16384 if ("flash", name, 16384) in memory else max(k[2] for k in memory)
        ratio = memory["reference", name, at] / max(memory["flash", name, at], 1e-9)
        print(f"{name}: reference / flash temporary memory at S={at}: {ratio:.0f}x")

    print(f"\n{'context':>8} {'impl':<14}{'time us':>10}{'pred us':>9}{'meas/pred':>10}"
          f"{'speedup':>9}")
    dec_heads, dec_kv = 8, 2
    for context in map(int, args.contexts.split(",")):
        rng = np.random.default_rng(context)
        q = jnp.asarray(rng.standard_normal((1, 1, dec_heads, dim)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((1, context, dec_kv, dim)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((1, context, dec_kv, dim)), jnp.float32)
        q_pos = jnp.asarray([[context - 1]])
        kv_pos = jnp.arange(context)[None]
        ones_q, ones_k = jnp.ones((1, 1), jnp.int32), jnp.ones((1, context), jnp.int32)
        pred = 2 * k.size * 4 / bandwidth  # reading K and V once
        base = None
        for impl, fn in [("plain", lambda q, k, v: reference_attention(
                              q, k, v, q_pos, kv_pos, ones_q, ones_k)),
                         (f"flash_decode/{args.splits}", lambda q, k, v: flash_decode(
                              q, k, v, q_pos, kv_pos, ones_q, ones_k, num_splits=args.splits))]:
            t = median_time(jax.jit(fn), q, k, v, repeats=10)
            base = base or t
            rows.append({"context": context, "impl": impl, "time_s": t, "predicted_s": pred})
            print(f"{context:>8} {impl:<14}{t * 1e6:>10.0f}{pred * 1e6:>9.0f}{t / pred:>10.2f}"
                  f"{base / t:>8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": chip.name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

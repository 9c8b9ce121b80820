"""Decode attention through a paged KV cache vs a dense one, against the memory roofline.

    python bench/paged_attention.py [--contexts 512,...,16384] [--batches 1,8] [--json out.json]

One new token per sequence, 8 query / 2 KV heads, head dim 64, float32, block size 16, every
sequence at the same context; the pool's blocks are handed out in shuffled order, so the
physical order is not the logical one (as in a long-running engine). Implementations:

  dense/reference   `reference_attention` on a contiguous (B, T, KV, D) cache: the baseline
  dense/flash_dec   `flash_decode` (KV split in 16 chunks) on the same contiguous cache
  paged/gather      `paged_attention_gather`: dense copy of the table, then the reference
  paged/online      `paged_attention_online`: pages walked a chunk at a time, online softmax
  .../cap           the same with the table sized for the largest context (--capacity),
                    as an engine sizes it for max_model_len: gather pays for the capacity,
                    online only for the context

Prediction: memory-bound, K and V read once, 2·B·T·KV·D·4 bytes / the measured read
bandwidth (`hpllm hw`, or --bandwidth GB/s when the cached figure is suspect, e.g. measured
under load); the paged
versions are predicted the same (the table is tiny). Printed: median time, prediction,
measured/predicted, achieved GB/s and the speedup over dense/reference in the same run
(>1 = faster than the baseline).

Part 2 (--prefill BxCONTEXTxCHUNK,...): a prefill chunk over a cached prefix (the chunk's
queries at the last CHUNK positions of CONTEXT), paged gather vs online, predicted as the
larger of the attention FLOPs (4·B·CHUNK·H·D·CONTEXT) / the float32 matmul peak and the
K/V bytes / bandwidth (--peak overrides the cached peak); the speedup is over gather.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.kernels.decode_attention import flash_decode
from hpllm.kernels.masking import reference_attention
from hpllm.kernels.paged_attention import paged_attention_gather, paged_attention_online
from hpllm.perf.hardware import current_chip, time_calls

HEADS, KV_HEADS, DIM, BLOCK = 8, 2, 64, 16


def median_time(fn, *args, repeats):
    return float(np.median(time_calls(lambda: fn(*args), repeats)))


def case(batch, context, capacity, rng):
    """Dense cache and the same keys/values in a shuffled paged pool (block 0 reserved)."""
    q = jnp.asarray(rng.standard_normal((batch, 1, HEADS, DIM)), jnp.float32)
    k, v = (rng.standard_normal((batch, context, KV_HEADS, DIM)).astype(np.float32)
            for _ in range(2))
    used = context // BLOCK
    slots = capacity // BLOCK
    ids = 1 + rng.permutation(batch * used).reshape(batch, used)
    tables = np.zeros((batch, slots), np.int32)  # unused entries -> the null block 0
    tables[:, :used] = ids
    pools = []
    for dense in (k, v):
        pool = np.zeros((1 + batch * used, BLOCK, KV_HEADS, DIM), np.float32)
        pool[ids.reshape(-1)] = dense.reshape(batch * used, BLOCK, KV_HEADS, DIM)
        pools.append(jnp.asarray(pool))
    q_pos = jnp.full((batch, 1), context - 1, jnp.int32)
    return q, jnp.asarray(k), jnp.asarray(v), pools, jnp.asarray(tables), q_pos


def prefill(spec, peak, bandwidth, repeats):
    print(f"\nprefill over a cached prefix (float32 peak {peak / 1e9:.0f} GFLOP/s)")
    print(f"{'B':>2}{'context':>8}{'chunk':>6} {'impl':<8}{'time ms':>9}{'pred ms':>9}"
          f"{'meas/pred':>10}{'vs gather':>10}")
    rows = []
    for item in spec.split(","):
        batch, context, chunk = map(int, item.split("x"))
        rng = np.random.default_rng(context + chunk)
        _, k, _, (kp, vp), tables, _ = case(batch, context, context, rng)
        q = jnp.asarray(rng.standard_normal((batch, chunk, HEADS, DIM)), jnp.float32)
        q_pos = jnp.broadcast_to(jnp.arange(context - chunk, context, dtype=jnp.int32),
                                 (batch, chunk))
        pred = max(4 * batch * chunk * HEADS * DIM * context / peak, 2 * k.size * 4 / bandwidth)
        base = None
        for name, fn in (("gather", paged_attention_gather), ("online", paged_attention_online)):
            t = median_time(jax.jit(lambda q, kp, vp, t, fn=fn: fn(q, kp, vp, t, q_pos)),
                            q, kp, vp, tables, repeats=repeats)
            base = base or t
            rows.append({"batch": batch, "context": context, "chunk": chunk, "impl": name,
                         "time_s": t, "predicted_s": pred})
            print(f"{batch:>2}{context:>8}{chunk:>6} {name:<8}{t * 1e3:>9.2f}{pred * 1e3:>9.2f}"
                  f"{t / pred:>10.2f}{base / t:>9.2f}x", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--capacity", type=int, default=0, help="table tokens for .../cap "
                        "(default: the largest context)")
    parser.add_argument("--step-tokens", default="", help="also time online with these keys "
                        "per step, e.g. 64,128,512")
    parser.add_argument("--prefill", default="1x4096x64,4x2048x128,1x1024x512")
    parser.add_argument("--bandwidth", type=float, default=0.0,
                        help="GB/s for the prediction instead of the cached measurement")
    parser.add_argument("--peak", type=float, default=0.0,
                        help="float32 GFLOP/s for the prefill prediction instead of the cache")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    chip = current_chip()
    bandwidth = args.bandwidth * 1e9 or chip.hbm_bandwidth
    contexts = [int(c) for c in args.contexts.split(",")]
    capacity = args.capacity or max(contexts)
    print(f"{chip.name}: read bandwidth {bandwidth / 1e9:.1f} GB/s; {HEADS}/{KV_HEADS} heads, "
          f"head dim {DIM}, float32, block size {BLOCK}, table capacity for /cap {capacity}")
    print(f"{'B':>2}{'context':>8} {'impl':<18}{'time us':>10}{'pred us':>9}{'meas/pred':>10}"
          f"{'GB/s':>7}{'vs dense':>9}")
    rows = []
    for batch in map(int, args.batches.split(",")):
        for context in contexts:
            rng = np.random.default_rng(batch * 100003 + context)
            q, k, v, (kp, vp), tables, q_pos = case(batch, context, context, rng)
            cap_tables = jnp.pad(tables, ((0, 0), (0, (capacity - context) // BLOCK)))
            kv_pos = jnp.broadcast_to(jnp.arange(context), (batch, context))
            ones_q, ones_k = jnp.ones((batch, 1), jnp.int32), jnp.ones((batch, context), jnp.int32)
            nbytes = 2 * k.size * 4
            pred = nbytes / bandwidth
            impls = [
                ("dense/reference", lambda q, k, v: reference_attention(
                    q, k, v, q_pos, kv_pos, ones_q, ones_k), (q, k, v)),
                ("dense/flash_dec", lambda q, k, v: flash_decode(
                    q, k, v, q_pos, kv_pos, ones_q, ones_k, num_splits=16), (q, k, v)),
                ("paged/gather", lambda q, kp, vp, t: paged_attention_gather(
                    q, kp, vp, t, q_pos), (q, kp, vp, tables)),
                ("paged/online", lambda q, kp, vp, t: paged_attention_online(
                    q, kp, vp, t, q_pos), (q, kp, vp, tables)),
            ]
            for tokens in filter(None, args.step_tokens.split(",")):
                per = max(1, int(tokens) // BLOCK)
                impls.append((f"paged/online/{tokens}", lambda q, kp, vp, t, per=per:
                              paged_attention_online(q, kp, vp, t, q_pos, pages_per_step=per),
                              (q, kp, vp, tables)))
            if capacity > context:
                impls += [(name + "/cap", fn, (q, kp, vp, cap_tables))
                          for name, fn, _ in impls if name in ("paged/gather", "paged/online")]
            base = None
            for name, fn, operands in impls:
                t = median_time(jax.jit(fn), *operands, repeats=args.repeats)
                base = base or t
                rows.append({"batch": batch, "context": context, "impl": name, "time_s": t,
                             "predicted_s": pred})
                print(f"{batch:>2}{context:>8} {name:<18}{t * 1e6:>10.0f}{pred * 1e6:>9.0f}"
                      f"{t / pred:>10.2f}{nbytes / t / 1e9:>7.1f}{base / t:>8.2f}x", flush=True)
    if args.prefill:
        peak = args.peak * 1e9 or chip.peak("float32")
        rows += prefill(args.prefill, peak, bandwidth, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": chip.name, "bandwidth": bandwidth, "capacity": capacity,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

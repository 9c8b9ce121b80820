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

Part 3 (GPU only; `--only kernels` skips parts 1-2): TFLOP/s of the Pallas kernel and the
pure-JAX `flash` against `jax.nn.dot_product_attention(implementation="cudnn")`, bfloat16,
batch 4 x 16 heads, head dim 64/128, 2K-16K tokens, causal and not, forward and
forward+backward, as a fraction of the chip's bf16 peak and a ratio to cuDNN.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.kernels.decode_attention import flash_decode
from hpllm.kernels.flash_attention import flash_attention
from hpllm.kernels.masking import reference_attention
from hpllm.kernels.pallas_attention import pallas_attention
from hpllm.perf.hardware import current_chip, time_calls


def median_time(fn, *args, repeats=3):
    return float(np.median(time_calls(lambda: fn(*args), repeats)))


def self_attention_fns(impl, length):
    pos = jnp.arange(length)[None]
    seg = jnp.ones((1, length), jnp.int32)
    attn = reference_attention if impl == "reference" else flash_attention

    def fwd(q, k, v):
        return attn(q, k, v, pos, pos, seg, seg)

    def fwd_bwd(q, k, v):
        return jax.grad(lambda q, k, v: fwd(q, k, v).sum(), argnums=(0, 1, 2))(q, k, v)

    return {"fwd": jax.jit(fwd), "fwd+bwd": jax.jit(fwd_bwd)}


def kernels_vs_cudnn(chip, lengths=(2048, 4096, 8192, 16384), dims=(64, 128)):
    """Part 3: attention TFLOP/s on a GPU, ours vs cuDNN measured in the same run."""
    peak = chip.peak("bfloat16")
    batch, heads = 4, 16
    print(f"\n{'D':>4}{'S':>7} {'causal':<7}{'pass':<8}{'impl':<8}{'ms':>9}{'TFLOP/s':>9}"
          f"{'% peak':>8}{'vs cuDNN':>9}")
    rows = []
    for dim in dims:
        for length in lengths:
            rng = np.random.default_rng(length + dim)
            q, k, v = (jnp.asarray(rng.standard_normal((batch, length, heads, dim)),
                                   jnp.bfloat16) for _ in range(3))
            for causal in (True, False):
                kv_pos = jnp.broadcast_to(jnp.arange(length), (batch, length))
                # Not causal: every query sits after every key.
                q_pos = kv_pos if causal else jnp.full_like(kv_pos, length)
                seg = jnp.ones_like(kv_pos)
                impls = {
                    "cudnn": lambda q, k, v: jax.nn.dot_product_attention(
                        q, k, v, is_causal=causal, implementation="cudnn"),
                    "pallas": lambda q, k, v: pallas_attention(q, k, v, q_pos, kv_pos, seg, seg),
                    "flash": lambda q, k, v: flash_attention(q, k, v, q_pos, kv_pos, seg, seg),
                }
                flops = 4 * batch * heads * dim * length * length * (0.5 if causal else 1.0)
                for name, passes in (("fwd", 1.0), ("fwd+bwd", 3.5)):
                    base = None
                    for impl, fn in impls.items():
                        if name == "fwd+bwd":
                            fn = jax.grad(lambda q, k, v, fn=fn: fn(q, k, v).astype(
                                jnp.float32).sum(), argnums=(0, 1, 2))
                        try:
                            t = median_time(jax.jit(fn), q, k, v, repeats=5)
                        except Exception as e:  # report a kernel that fails to compile, go on
                            print(f"{dim:>4}{length:>7} {causal!s:<7}{name:<8}{impl:<8} "
                                  f"failed: {type(e).__name__}: {str(e)[:200]}")
                            continue
                        base = t if impl == "cudnn" else base
                        rate = flops * passes / t
                        rows.append({"dim": dim, "length": length, "causal": causal,
                                     "pass": name, "impl": impl, "time_s": t,
                                     "tflops": rate / 1e12})
                        print(f"{dim:>4}{length:>7} {causal!s:<7}{name:<8}{impl:<8}"
                              f"{t * 1e3:>9.2f}{rate / 1e12:>9.1f}{100 * rate / peak:>7.1f}%"
                              + (f"{base / t:>8.2f}x" if base else f"{'-':>9}"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--time-max", type=int, default=8192)
    parser.add_argument("--ref-time-max", type=int, default=4096)
    parser.add_argument("--contexts", default="4096,16384,65536")
    parser.add_argument("--splits", type=int, default=16)
    parser.add_argument("--json", default="")
    parser.add_argument("--only", choices=("all", "kernels"), default="all")
    args = parser.parse_args(argv)
    chip = current_chip()
    rows = []
    if jax.default_backend() == "gpu":
        rows += kernels_vs_cudnn(chip)
    else:
        print("part 3 (Pallas and flash vs cuDNN TFLOP/s) needs a GPU: skipped")
    if args.only == "kernels":
        return _save(args.json, chip, rows)
    peak, bandwidth = chip.peak("float32"), chip.hbm_bandwidth
    heads, kv_heads, dim = 8, 4, 64
    print(f"{chip.name}: peak {peak / 1e12:.3f} TFLOP/s float32, {bandwidth / 1e9:.1f} GB/s")
    print(f"{'S':>6} {'impl':<10}{'pass':<8}{'temp MiB':>10}{'time ms':>10}{'pred ms':>9}"
          f"{'meas/pred':>10}")
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
    _save(args.json, chip, rows)


def _save(path, chip, rows):
    if path:
        with open(path, "w") as f:
            json.dump({"device": chip.name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

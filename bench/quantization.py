"""Weight quantization and pruning on a pretrained model, in one run: for each scheme the
weight bytes, perplexity and bits per byte on the Shakespeare validation split (the change
vs float32), greedy agreement with float32, and single-stream decode tokens/s next to the
roofline prediction; plus the int8 KV cache (agreement, decode speed, sequences per memory
budget).

    python bench/quantization.py [--model smollm2-135m] [--tokens 2048] [--window 512]
                                 [--decode-tokens 32] [--group-size 64] [--out FILE]

Perplexity reuses hpllm.infer.perplexity.evaluate_texts; decoding reuses generate's jitted
prefill/decode steps (the path `hpllm generate` runs), timed as bench/decode.py times it:
the median wall time of a decode step of the second (warm) run, prefill excluded.

Roofline: a batch-1 decode step must read every weight once (the tied embedding as the
output projection) and the KV cache it attends over, so predicted tokens/s = read bandwidth
/ bytes per step. For quantized weights two predictions are printed: reading only the codes
(what a fused dequantize-matmul achieves) and "materialised", where XLA converts each matrix
to a float32 copy before the dot (codes read + f32 copy written and read back).

On CPU the int8, int8-zp and int4 decode matmuls run the C++ kernel
(hpllm/kernels/cpu_quant_matmul.py) when it is available; `--decode-only` times just the
decode of float32 and those schemes (no perplexity, pruning or KV cache) and, with
`--xla-path`, the same schemes again with the kernel off (HPLLM_CPU_KERNELS=0), in one run:

    python bench/quantization.py --decode-only [--xla-path] [--rounds 3] [--decode-tokens 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import statistics
import sys

import jax

from hpllm import quantized as qt
from hpllm.checkpoints.registry import load_model
from hpllm.compress import prune as pr
from hpllm.compress import quantize as qz
from hpllm.config import KV_DTYPES
from hpllm.infer.perplexity import evaluate_texts
from hpllm.infer.sampling import pow2_bucket
from hpllm.kernels import cpu_quant_matmul
from hpllm.model.kv_cache import kv_bytes_per_token
from hpllm.perf.hardware import current_chip
from hpllm.train.data import shakespeare_validation_texts

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from decode import decode_steps  # noqa: E402
from report import emit  # noqa: E402

PROMPT = "The capital of France is"


def decode_run(params, config, prompt: list[int], n: int, kv_dtype="float32"):
    """(greedy ids, per-step seconds) of a warm run of generate's decode steps."""
    ids, times, _ = decode_steps(params, config, prompt, n, kv_dtype)
    return ids, times


def matrix_elements(params) -> int:
    """Elements of the quantized matrices (what a materialised f32 copy would hold)."""
    return sum(w.n * w.k * math.prod(w.q.shape[:-2])
               for w in jax.tree.leaves(params, is_leaf=qt.is_quantized) if qt.is_quantized(w))


def variants(params, group_size: int):
    yield "float32", "", lambda: params
    yield "int8 (absmax, per channel)", "int8", lambda: qz.quantize_params(params, "int8")
    yield "int8-zp (per channel)", "int8-zp", lambda: qz.quantize_params(params, "int8-zp")
    yield (f"int4 (groups of {group_size})", "int4",
           lambda: qz.quantize_params(params, "int4", group_size=group_size))
    yield "llm.int8 (threshold 6)", "llm.int8", lambda: qz.quantize_params(params, "llm.int8")
    yield ("pruned 50 % magnitude (no recovery)", "prune",
           lambda: pr.prune(params, "magnitude", 0.5)[0])
    yield "pruned 2:4 (no recovery)", "prune", lambda: pr.prune(params, "2:4")[0]


def decode_only(args, base, prompt, chip, context, kv_f32) -> int:
    """Decode tokens/s of float32, int8, int8-zp and int4 in one run, through the CPU kernel
    and (--xla-path) through XLA with the kernel off, against the codes-only roofline. The
    kernel rows are timed --rounds times in turn (load on a shared machine drifts between
    schemes; the median round is reported, with the range); the slow XLA rows once."""
    import os

    kernel = cpu_quant_matmul.available()
    models = [(label, scheme, build()) for label, scheme, build in
              variants(base.params, args.group_size) if scheme in ("", "int8", "int8-zp", "int4")]
    rows = [dict(label=label, path="kernel" if kernel and scheme else "XLA",
                 bytes=qz.param_bytes(params), params=params, steps=[]) for
            label, scheme, params in models]
    if args.xla_path and kernel:
        rows += [dict(r, path="XLA (kernel off)", steps=[]) for r, (_, scheme, _) in
                 zip(list(rows), models) if scheme]
    for rnd in range(args.rounds):
        for r in rows:
            off = r["path"] == "XLA (kernel off)"
            if off and rnd:
                continue
            if off:
                os.environ[cpu_quant_matmul.ENV_SWITCH] = "0"
                jax.clear_caches()  # the kernel switch is read while tracing
            try:
                r["ids"], times = decode_run(r["params"], base.config, prompt, args.decode_tokens)
            finally:
                if off:
                    os.environ.pop(cpu_quant_matmul.ENV_SWITCH, None)
                    jax.clear_caches()
            r["steps"].append(statistics.median(times))
            print(f"round {rnd}: {r['label']} [{r['path']}]: {1 / r['steps'][-1]:.1f} tok/s",
                  file=sys.stderr, flush=True)
    for r in rows:
        r["step"] = statistics.median(r["steps"])
        r["roof"] = (r["bytes"] + kv_f32) / chip.hbm_bandwidth
    ref = rows[0]
    table = ["| weights | MiB | decode matmuls | decode tok/s (median round) | range over "
             "rounds | vs float32 | roofline tok/s (codes + KV at read bandwidth) | "
             "measured / roofline | greedy tokens = float32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['label']} | {r['bytes'] / 2**20:.1f} | {r['path']} | "
                     f"{1 / r['step']:.1f} | {1 / max(r['steps']):.1f}-{1 / min(r['steps']):.1f} "
                     f"| {ref['step'] / r['step']:.2f}x | "
                     f"{1 / r['roof']:.0f} | {r['roof'] / r['step']:.0%} | "
                     f"{sum(a == b for a, b in zip(r['ids'], ref['ids']))}/{len(ref['ids'])} |")
    lines = [f"# Decode with quantized weights: {base.path.name}", "",
             "Command: `python bench/quantization.py --decode-only"
             + (" --xla-path" if args.xla_path else "")
             + f" --rounds {args.rounds} --decode-tokens {args.decode_tokens} --group-size "
             f"{args.group_size}`  ",
             f"Machine: {jax.default_backend()} ({chip.name}; read bandwidth "
             f"{chip.hbm_bandwidth / 1e9:.1f} GB/s, {chip.source}); jax {jax.__version__}", "",
             f"Prompt {PROMPT!r}, {args.decode_tokens} greedy tokens, batch 1, KV cache of "
             f"{context} float32 slots, median step of a warm run.", "", *table, ""]
    return emit(lines, args.out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=2048, help="validation tokens to score")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=64, help="int4 group size")
    ap.add_argument("--budget-gib", type=float, default=1.0,
                    help="KV memory budget for the sequences-that-fit figure")
    ap.add_argument("--out", default="", help="also write the report (markdown) here")
    ap.add_argument("--decode-only", action="store_true",
                    help="only decode speed of float32, int8, int8-zp and int4")
    ap.add_argument("--xla-path", action="store_true",
                    help="with --decode-only: also time the schemes with the CPU kernel off")
    ap.add_argument("--rounds", type=int, default=3,
                    help="with --decode-only: times each kernel/float32 row is measured")
    args = ap.parse_args(argv)

    base = load_model(args.model, progress=False)
    config = base.config
    texts = shakespeare_validation_texts()
    prompt = base.tokenizer.encode(PROMPT)
    chip = current_chip()
    bw = chip.hbm_bandwidth
    context = pow2_bucket(len(prompt) + args.decode_tokens, 256, config.max_seq_len)
    kv_f32 = kv_bytes_per_token(config, "float32") * context
    if args.decode_only:
        return decode_only(args, base, prompt, chip, context, kv_f32)

    rows, ref = [], None
    for label, scheme, build in variants(base.params, args.group_size):
        params = build()
        jax.block_until_ready(params)
        result = evaluate_texts(dataclasses.replace(base, params=params), texts, args.tokens,
                                args.window, progress=False)
        ids, times = decode_run(params, config, prompt, args.decode_tokens)
        step = statistics.median(times)
        nbytes = qz.param_bytes(params)
        fused = (nbytes + kv_f32) / bw
        materialised = (nbytes + 8 * matrix_elements(params) + kv_f32) / bw
        row = dict(label=label, scheme=scheme, bytes=nbytes, ppl=result["perplexity"],
                   bpb=result["bits_per_byte"], step=step, ids=ids, fused=fused,
                   materialised=materialised)
        ref = ref or row
        rows.append(row)
        print(f"{label}: {nbytes / 2**20:.1f} MiB, ppl {row['ppl']:.3f}, "
              f"{1 / step:.1f} tok/s", file=sys.stderr, flush=True)
        del params

    kv_rows = []
    for kv in ("float32", "int8"):
        ids, times = decode_run(base.params, config, prompt, args.decode_tokens, kv)
        kv_rows.append((kv, ids, statistics.median(times)))

    def same(a, b):
        return sum(x == y for x, y in zip(a, b))

    table = ["| weights | MiB | vs fp32 bytes | perplexity | Δ ppl | bits/byte | greedy "
             "tokens = fp32 | decode tok/s | vs fp32 | roofline tok/s (codes only / "
             "materialised f32) | measured / codes-only roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        roof = (f"{1 / r['fused']:.0f} / {1 / r['materialised']:.0f}"
                if r["materialised"] != r["fused"] else f"{1 / r['fused']:.0f}")
        table.append(
            f"| {r['label']} | {r['bytes'] / 2**20:.1f} | {r['bytes'] / ref['bytes']:.2f}x | "
            f"{r['ppl']:.3f} | {100 * (r['ppl'] / ref['ppl'] - 1):+.2f} % | {r['bpb']:.4f} | "
            f"{same(r['ids'], ref['ids'])}/{len(ref['ids'])} | {1 / r['step']:.1f} | "
            f"{ref['step'] / r['step']:.2f}x | {roof} | {r['fused'] / r['step']:.0%} |")

    per_token = {d: kv_bytes_per_token(config, d) for d in KV_DTYPES}
    budget = args.budget_gib * 2**30
    ctx = config.max_seq_len if config.max_seq_len <= 4096 else 2048
    kv_table = ["| KV cache | bytes/token | sequences of "
                f"{ctx} tokens in {args.budget_gib:g} GiB | greedy tokens = float32 cache | "
                "decode tok/s |", "|---|---|---|---|---|"]
    f_ids = kv_rows[0][1]
    for d in ("float32", "bfloat16", "int8"):
        run = next((r for r in kv_rows if r[0] == d), None)
        kv_table.append(
            f"| {d} | {per_token[d]} | {int(budget // (per_token[d] * ctx))} | "
            + (f"{same(run[1], f_ids)}/{len(f_ids)} | {1 / run[2]:.1f} |" if run
               else "(not run) | |"))

    lines = [f"# Quantization and pruning: {base.path.name}", "",
             f"Command: `python bench/quantization.py --tokens {args.tokens} --window "
             f"{args.window} --decode-tokens {args.decode_tokens} --group-size "
             f"{args.group_size}`  ",
             f"Machine: {jax.default_backend()} ({chip.name}; read bandwidth "
             f"{bw / 1e9:.1f} GB/s, {chip.source}); jax {jax.__version__}", "",
             f"Perplexity over the first {args.tokens} predicted tokens of the "
             f"Shakespeare validation split (windows of {args.window}); decode: prompt "
             f"{PROMPT!r}, {args.decode_tokens} greedy tokens, batch 1, KV cache of {context} "
             "float32 slots, median step of a warm run. int8, int8-zp and int4 decode "
             "matmuls: " + ("the CPU kernel (hpllm/kernels/cpu_quant_matmul.py)."
                            if cpu_quant_matmul.available() else "XLA (the CPU kernel is off)."),
             "", *table, "",
             "## int8 KV cache (float32 weights)", "", *kv_table, ""]
    return emit(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())

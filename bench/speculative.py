"""Speculative decoding on a pretrained model (default SmolLM2-135M), against plain decoding
measured in the same run, interleaved.

    python bench/speculative.py [--model smollm2-135m] [--quants float32,int8] [--tokens 64]
        [--prompts 2] [--gammas 1,2,3] [--repeats 3] [--draft-layers 10] [--out FILE]
        [--early-exit [--thresholds 0.9,0.6,0.3] [--eval-tokens 96]]

For each target (float32 weights, then each --quants scheme; on CPU both plain and
speculative decoding run through the fused decoder kernel) and each draft (prompt-lookup
n-gram; the distilled draft `hpllm distill` cached, quantized like the target; the target's
first k layers when --draft-layers is given) and gamma (fixed, and the adaptive choice of
control.CostModelGamma): greedy generation of --tokens tokens from the first --prompts
held-out Shakespeare passages. Every configuration runs once to compile, then --repeats
rounds run every configuration once each in turn (so load drifts on a shared machine hit
all alike); the median round is reported. Timed: from the first token (the target's
prefill excluded, the draft's included) to the last.

Printed per row: alpha (accepted / proposed drafts), tokens per target pass, v (seconds of a
verify pass of that many rows over a one-row decode step, measured up front), tok/s, the
speedup over plain decoding, the speedup predicted from the measured alpha, v and c (the
draft's seconds per token over a decode step) by Leviathan et al.'s formula
(1 - a^(g+1)) / ((1 - a)(g c + v)), and whether the greedy output equals plain decoding's.

--early-exit adds CALM-style early-exit decoding (XLA path): bits per byte, average layers
and tokens/s per confidence threshold over --eval-tokens teacher-forced validation tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.checkpoints.distilled import distilled_dir, load_distilled
from hpllm.checkpoints.registry import load_model
from hpllm.compress.quantize import quantize_params
from hpllm.infer.early_exit import evaluate_early_exit
from hpllm.infer.generate import prepared_weights, generate
from hpllm.infer.speculative.control import SpeculativeStats, expected_tokens
from hpllm.infer.speculative.proposers import NgramDraft
from hpllm.infer.speculative.single_stream import (KernelModel, model_draft, self_draft,
                                                   speculative_generate, use_kernel)
from hpllm.train.data import shakespeare_validation_texts


def predicted_speedup(alpha: float, gamma: float, cost: float, verify_cost: float) -> float:
    """Leviathan et al.'s expected tokens per round over the round's cost in decode steps:
    gamma draft steps of relative cost c plus one verification pass of relative cost v."""
    return expected_tokens(alpha, gamma) / (gamma * cost + verify_cost)


def _median_seconds(fn, repeats: int) -> float:
    fn()
    fn()  # compile, warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_costs(params, config, max_rows: int, context: int = 200, repeats: int = 15) -> dict:
    """{rows: seconds} of one kernel pass of the target scoring `rows` tokens (logits for
    each) after `context` tokens, for rows = 1..max_rows; rows = 1 is a decode step."""
    model = KernelModel(prepared_weights(params, config), config, context + max_rows + 1)
    model.prefill(list(range(context)))
    out = {}
    for rows in range(1, max_rows + 1):
        tokens = jnp.arange(rows, dtype=jnp.int32) + 7
        drafts = tokens[1:]

        def verify():
            n, _ = model.verify(tokens, context, None, drafts, jax.random.key(0),
                                dict(temperature=0.0, top_k=0, top_p=1.0))
            n.block_until_ready()
        out[rows] = _median_seconds(verify, repeats)
    return out


def draft_step_seconds(draft, context: int = 200, repeats: int = 15) -> float:
    """Seconds per token of a model draft proposing (one kernel or XLA step each)."""
    tokens = list(range(context))
    draft.start(tokens, context + 64, kernel=True)

    def propose():
        draft.n_cached = context - 1
        draft.propose(tokens, 4, jax.random.key(0))
    return _median_seconds(propose, repeats) / 4


class Run:
    """One configuration: its stream function and what its timed runs recorded."""

    def __init__(self, name, gamma, fn):
        self.name, self.gamma, self.fn = name, gamma, fn
        self.seconds, self.outputs = [], []
        self.stats = SpeculativeStats()

    def __call__(self, prompts, record: bool):
        total, outs = 0.0, []
        if record:
            self.stats = SpeculativeStats()
        for prompt in prompts:
            stream = self.fn(prompt, self.stats if record else SpeculativeStats())
            out = [next(stream)]  # after the target's prefill
            start = time.perf_counter()
            out += list(stream)
            total += time.perf_counter() - start
            outs.append(out)
        if record:
            self.seconds.append(total)
            self.outputs = outs
        return outs


def bench_target(label, params, config, prompts, drafts, args, log):
    gammas = [int(x) for x in args.gammas.split(",")]
    if not use_kernel(params, config, jnp.float32, None):
        log(f"{label}: the cpu_decoder kernel cannot run this target; XLA path")
    costs = step_costs(params, config, max(gammas + [args.max_gamma]) + 1)
    step = costs[1]
    log(f"{label}: decode step {step * 1e3:.2f} ms; verify pass of g+1 rows / decode step: " +
        ", ".join(f"g={r - 1}: {s / step:.2f}" for r, s in costs.items() if r > 1))
    n = args.tokens
    runs = [Run("plain", "-", lambda p, st: generate(params, config, p, n))]
    draft_costs = {"plain": 0.0}
    for name, draft in drafts:
        draft_costs[name] = 0.0 if name == "ngram" else draft_step_seconds(draft) / step
        for g in gammas + ["adaptive"]:
            adaptive = g == "adaptive"
            runs.append(Run(name, g, lambda p, st, d=draft, g=g, a=adaptive: speculative_generate(
                params, config, p, n, d, gamma=2 if a else g, adaptive=a,
                max_gamma=args.max_gamma, stats=st)))
    log(f"{label}: draft step / decode step: " +
        ", ".join(f"{k}: {v:.3f}" for k, v in draft_costs.items() if k != "plain"))
    for run in runs:
        run(prompts, record=False)  # compile
    for _ in range(args.repeats):
        for run in runs:
            run(prompts, record=True)
    plain = runs[0]
    plain_s = statistics.median(plain.seconds)
    tokens = sum(len(o) - 1 for o in plain.outputs)
    log()
    log(f"{label}: plain decoding {tokens / plain_s:.1f} tok/s")
    log()
    log("| target | draft | gamma | alpha | tokens/pass | v | tok/s | speedup | predicted | "
        "greedy == plain |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for run in runs[1:]:
        st = run.stats
        seconds = statistics.median(run.seconds)
        mean_g = float(np.mean(st.gammas)) if st.gammas else 0.0
        lo = int(mean_g)
        hi = min(lo + 1, max(costs) - 1)
        v = np.interp(mean_g, [lo, hi], [costs[lo + 1], costs[hi + 1]]) / step
        pred = predicted_speedup(st.acceptance_rate, mean_g, draft_costs[run.name], v)
        gamma = f"adaptive (mean {mean_g:.1f})" if run.gamma == "adaptive" else run.gamma
        log(f"| {label} | {run.name} | {gamma} | {st.acceptance_rate:.2f} | "
            f"{st.tokens_per_round:.2f} | {v:.2f} | {tokens / seconds:.1f} | "
            f"{plain_s / seconds:.2f}x | {pred:.2f}x | {run.outputs == plain.outputs} |")
    log()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quants", default="float32,int8",
                    help="targets: float32 and/or quantization schemes (int8, int4)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=192)
    ap.add_argument("--prompts", type=int, default=2, help="held-out passages, one run each")
    ap.add_argument("--gammas", default="1,2,3")
    ap.add_argument("--max-gamma", type=int, default=6, help="the adaptive choice's limit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draft-layers", default="", help="self-drafts: first k layers (e.g. 10)")
    ap.add_argument("--early-exit", action="store_true")
    ap.add_argument("--thresholds", default="0.9,0.6,0.3")
    ap.add_argument("--exit-layers", default="10,15,20,25")
    ap.add_argument("--eval-tokens", type=int, default=96)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    model = load_model(args.model, progress=False)
    texts = shakespeare_validation_texts()
    prompts = [model.tokenizer.encode(t)[:args.prompt_tokens] for t in texts[:args.prompts]]
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    log(f"model {args.model}, {len(prompts)} prompts of {args.prompt_tokens} tokens of "
        f"held-out Shakespeare, {args.tokens} greedy tokens each, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}, load average {os.getloadavg()[0]:.2f}")
    try:
        student_config, student = load_distilled(args.model)
        log(f"distilled draft: {distilled_dir(args.model)}: {student_config.n_layers} layers, "
            f"dim {student_config.dim}")
    except FileNotFoundError as e:
        student = None
        log(f"distilled draft: not available ({e})")
    for quant in args.quants.split(","):
        params = model.params if quant == "float32" else quantize_params(model.params, quant)
        drafts = [("ngram", NgramDraft(model.config.vocab_size))]
        if student is not None:
            sp = student if quant == "float32" else quantize_params(student, quant)
            drafts.append(("distilled", model_draft(sp, student_config, model.config)))
        for k in [int(x) for x in args.draft_layers.split(",") if x]:
            drafts.append((f"self-{k}", self_draft(params, model.config, k)))
        bench_target(quant, params, model.config, prompts, drafts, args, log)
    log(f"load average at the end {os.getloadavg()[0]:.2f}")

    if args.early_exit:
        exits = [int(x) for x in args.exit_layers.split(",")]
        log()
        log(f"early exit: exits after layers {exits} of {model.config.n_layers}, "
            f"{args.eval_tokens} teacher-forced validation tokens")
        log("| threshold | bits/byte | avg layers | tok/s | vs full |")
        log("|---|---|---|---|---|")
        base = None
        for threshold in [1.01] + [float(x) for x in args.thresholds.split(",")]:
            r = evaluate_early_exit(model, texts[1:], args.eval_tokens, exits, threshold)
            base = base or r["tokens_per_second"]
            log(f"| {'full' if threshold > 1 else threshold} | {r['bits_per_byte']:.3f} | "
                f"{r['average_layers']:.1f} | {r['tokens_per_second']:.1f} | "
                f"{r['tokens_per_second'] / base:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

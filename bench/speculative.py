"""Speculative decoding and early exit on a pretrained model (default SmolLM2-135M), against
plain decoding measured in the same run.

    python bench/speculative.py [--model smollm2-135m] [--tokens 64] [--gammas 2,4]
        [--draft-layers 4,8] [--thresholds 0.9,0.7,0.5] [--eval-tokens 128] [--out FILE]

Speculative: greedy generation of --tokens tokens from a Shakespeare passage of the held-out
split, for each draft (prompt-lookup n-gram, self-speculation with the first k layers, the
distilled draft if `hpllm distill` has cached one) and gamma (fixed, and adaptive). Each
configuration runs once to compile and once timed (prefill included in both plain and
speculative timings). Printed: acceptance rate alpha, tokens per target pass, tokens/s, the
speedup over plain decoding, and the speedup predicted from the measured alpha by Leviathan et
al.'s formula (1 - a^(g+1)) / ((1 - a)(g c + v)), with c the draft/target cost ratio taken as
their weight-byte ratio (batch-1 decode is memory-bound; the roofline of hpllm.perf) and v the
cost of a (g+1)-token verification pass over a 1-token decode step, which the roofline puts at
~1 and which is measured here in the same run (on XLA:CPU it is well above 1).
Every greedy output is checked equal to plain decoding's.

Early exit: teacher-forced decoding of --eval-tokens validation tokens per confidence
threshold: bits per byte, average layers used, tokens/s (threshold > 1 = the full model).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.checkpoints.registry import load_model
from hpllm.infer.early_exit import evaluate_early_exit
from hpllm.infer.generate import generate
from hpllm.infer.speculative.control import SpeculativeStats
from hpllm.infer.speculative.proposers import NgramDraft
from hpllm.infer.speculative.single_stream import model_draft, self_draft, speculative_generate
from hpllm.train.data import shakespeare_validation_texts


def weight_bytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def predicted_speedup(alpha: float, gamma: float, cost: float, verify_cost: float = 1.0) -> float:
    """Leviathan et al.'s expected tokens per pass over the pass's cost in target decode
    steps: gamma draft steps of relative cost c plus one verification pass."""
    expected = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return expected / (gamma * cost + verify_cost)


def verify_costs(params, config, gammas, context: int = 200, repeats: int = 5) -> dict:
    """Seconds of a (g+1)-token verification pass over a 1-token decode step, measured: the
    roofline says ~1 (the weights are read once either way), XLA:CPU's small-M matmuls say
    otherwise."""
    from hpllm.infer.generate import _decode
    from hpllm.infer.speculative.single_stream import _verify
    from hpllm.model.kv_cache import DenseKVCache
    from hpllm.model.transformer import unstack_layers

    params = unstack_layers(params)
    state = {"cache": DenseKVCache.create(config, 1, 512)}

    def per_call(fn):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    def decode():
        logits, state["cache"] = _decode(params, jnp.zeros((1,), jnp.int32), jnp.int32(context),
                                         state["cache"], config, jnp.float32)
        logits.block_until_ready()

    base = per_call(decode)
    out = {}
    for g in gammas:
        q = jnp.zeros((g, config.vocab_size)).at[:, 0].set(1.0)

        def verify():
            _, token, state["cache"] = _verify(
                params, jnp.zeros((1, g + 1), jnp.int32), jnp.int32(context), state["cache"], q,
                jnp.zeros((g,), jnp.int32), jax.random.key(0), config, jnp.float32, 0.0, 0, 1.0)
            token.block_until_ready()
        out[g] = per_call(verify) / base
    return out


def timed(fn):
    list(fn())  # compile
    start = time.perf_counter()
    out = list(fn())
    return out, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=192)
    ap.add_argument("--gammas", default="2,4")
    ap.add_argument("--draft-layers", default="4,10")
    ap.add_argument("--thresholds", default="0.9,0.7,0.5,0.3")
    ap.add_argument("--exit-layers", default="10,15,20,25")
    ap.add_argument("--eval-tokens", type=int, default=128)
    ap.add_argument("--skip-early-exit", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    model = load_model(args.model, progress=False)
    config, params = model.config, model.params
    texts = shakespeare_validation_texts()
    prompt = model.tokenizer.encode(texts[0])[:args.prompt_tokens]
    lines = [f"model {args.model}, prompt {len(prompt)} tokens of held-out Shakespeare, "
             f"{args.tokens} greedy tokens, jax {jax.__version__}, {jax.devices()[0].device_kind}"]

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    plain, plain_s = timed(lambda: generate(params, config, prompt, args.tokens))
    plain_tps = len(plain) / plain_s
    log(f"plain decoding: {plain_tps:.1f} tok/s ({plain_s:.2f} s incl. prefill)")
    target_bytes = weight_bytes(params)

    drafts = [("ngram", lambda: NgramDraft(config.vocab_size), 0.0)]
    for k in [int(x) for x in args.draft_layers.split(",") if x]:
        d = self_draft(params, config, k)
        drafts.append((f"self-{k}", lambda k=k: self_draft(params, config, k),
                       weight_bytes(d.params) / target_bytes))
    try:
        from hpllm.checkpoints.distilled import load_distilled

        student_config, student = load_distilled()
        drafts.append(("distilled", lambda: model_draft(student, student_config, config),
                       weight_bytes(student) / target_bytes))
    except (ImportError, FileNotFoundError) as e:
        log(f"distilled draft: not available ({e})")

    gammas = [int(x) for x in args.gammas.split(",")]
    costs = verify_costs(params, config, sorted(set(gammas + [1, 2, 3])))
    log("verification pass / decode step time (measured; roofline ~1.0): " +
        ", ".join(f"g={g}: {r:.2f}" for g, r in costs.items()))
    log()
    log("| draft | gamma | alpha | tokens/pass | tok/s | speedup | predicted | "
        "greedy == plain |")
    log("|---|---|---|---|---|---|---|---|")
    settings = [(g, False) for g in gammas] + [(2, True)]
    for name, make, cost in drafts:
        for gamma, adaptive in settings:
            st = SpeculativeStats()

            def run():
                st.__init__()
                return speculative_generate(params, config, prompt, args.tokens, make(),
                                            gamma=gamma, adaptive=adaptive, max_gamma=8,
                                            stats=st)

            out, seconds = timed(run)
            tps = len(out) / seconds
            mean_gamma = float(np.mean(st.gammas)) if st.gammas else 0.0
            vcost = costs.get(round(mean_gamma), costs[max(costs)])
            pred = predicted_speedup(st.acceptance_rate, mean_gamma, cost, vcost)
            label = f"adaptive (mean {mean_gamma:.1f})" if adaptive else str(gamma)
            log(f"| {name} | {label} | {st.acceptance_rate:.2f} | {st.tokens_per_round:.2f} | "
                f"{tps:.1f} | {tps / plain_tps:.2f}x | {pred:.2f}x | {out == plain} |")

    if not args.skip_early_exit:
        exits = [int(x) for x in args.exit_layers.split(",")]
        log()
        log(f"early exit: exits after layers {exits} of {config.n_layers}, "
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

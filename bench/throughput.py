"""Offline throughput: continuous batching vs static batching vs one request at a time.

N requests (prompts cut from the Shakespeare validation split, lengths uniform in
--prompt-len, outputs uniform in --output-len with end-of-turn ignored, greedy, seed fixed)
run through the same engine three ways:
  continuous  all requests queued at once; the scheduler admits new ones as others finish
  static      groups of max_num_seqs: a group runs until its longest request is done, then
              the next group starts (no one joins a running batch)
  one         one request at a time
  ngram, self, draft  continuous, with speculative decoding in the engine (infer/speculative):
              prompt lookup, the first --draft-layers layers, or the `hpllm distill` draft
Each mode runs the workload twice; the second run is timed (the first compiles its shapes).
Prints requests/s, output tokens/s, mean batch size per decode step, the ratio to the
one-at-a-time baseline of the same run, and the roofline bound for the mean batch
(decode steps only: weights + KV read once per step at the measured memory bandwidth).

    python bench/throughput.py [--model smollm2-135m --requests 32 --max-num-seqs 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from hpllm.checkpoints.registry import load_model
from hpllm.config import EngineConfig
from hpllm.infer.engine import EngineCore
from hpllm.infer.sampling import SamplingParams
from hpllm.serve.workload import shakespeare_requests
from hpllm.model.kv_cache import kv_bytes_per_token
from hpllm.perf.hardware import current_chip
from hpllm.perf.roofline import Workload, predict


def run(engine: EngineCore, requests, group: int):
    """Feed `requests` in groups of `group` (all at once if group >= len); returns seconds,
    output tokens, the batch size of every decode step and each request's output ids."""
    batches, tokens, outputs = [], 0, {}
    start = time.perf_counter()
    for g in range(0, len(requests), group):
        for i, r in enumerate(requests[g:g + group]):
            engine.add_request(f"{g + i}", r.prompt_ids, SamplingParams(
                temperature=0, max_tokens=r.max_tokens, ignore_eos=True))
        while engine.has_unfinished():
            before = engine.counters["generation_tokens"]
            decoding = sum(1 for s in engine.scheduler.running
                           if len(s.tokens) - s.num_computed == 1)
            for out in engine.step():
                if out.finished:
                    outputs[int(out.request_id)] = out.outputs[0].token_ids
            tokens += engine.counters["generation_tokens"] - before
            if decoding:
                batches.append(decoding)
    seconds = time.perf_counter() - start
    engine.blocks.check_no_leak()
    return seconds, tokens, batches, [outputs[i] for i in range(len(requests))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[32, 256])
    ap.add_argument("--output-len", type=int, nargs=2, default=[16, 128])
    ap.add_argument("--kv-memory-mb", type=float, default=512)
    ap.add_argument("--modes", nargs="+", default=["continuous", "static", "one"],
                    choices=["continuous", "static", "one", "ngram", "self", "draft"])
    ap.add_argument("--gamma", type=int, default=4, help="ngram/self: initial draft tokens")
    ap.add_argument("--draft-layers", type=int, default=0, help="self: 0 = a third")
    ap.add_argument("--step-backend", default="auto", choices=["auto", "xla", "kernel"],
                    help="the engine's pass: the fused CPU decoder step or XLA (EngineConfig)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quant", default="", help="quantize the weights on load (int8, int4, ...)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    model = load_model(args.model, progress=False, quant=args.quant)
    requests = shakespeare_requests(model.tokenizer, args.requests, tuple(args.prompt_len),
                                    tuple(args.output_len), args.seed)
    chip = current_chip()
    print(f"{args.model}, {args.requests} requests: prompt {args.prompt_len[0]}-"
          f"{args.prompt_len[1]} tokens, output {args.output_len[0]}-{args.output_len[1]} "
          f"(uniform, seed {args.seed}, greedy, EOS ignored); max_num_seqs "
          f"{args.max_num_seqs}; weights {args.quant or 'float32'}; step {args.step_backend}; "
          f"{chip.name}")
    results, reference = {}, None
    for mode in args.modes:
        group = {"static": args.max_num_seqs, "one": 1}.get(mode, len(requests))
        spec = mode if mode in ("ngram", "self", "draft") else ""
        engine = EngineCore(model.params, model.config, model.tokenizer, EngineConfig(
            max_num_seqs=1 if mode == "one" else args.max_num_seqs,
            kv_memory_mb=args.kv_memory_mb, enable_prefix_caching=False, speculative=spec,
            num_speculative_tokens=args.gamma, draft_layers=args.draft_layers,
            step_backend=args.step_backend))
        first, *_ = run(engine, requests, group)
        if spec:
            engine.speculator.stats = type(engine.speculator.stats)()  # the timed run's only
        seconds, tokens, batches, outputs = run(engine, requests, group)
        reference = reference or outputs  # greedy: every mode must produce the same tokens
        same = sum(a == b for a, b in zip(outputs, reference))
        mean_batch = float(np.mean(batches))
        context = int(np.mean([len(r.prompt_ids) + r.max_tokens / 2 for r in requests]))
        step = predict(model.config, Workload("decode", max(1, round(mean_batch)), context=context),
                       chip).step_s
        results[mode] = {"seconds": seconds, "first_run_seconds": first,
                         "requests_per_s": len(requests) / seconds,
                         "output_tokens_per_s": tokens / seconds, "mean_batch": mean_batch,
                         "decode_steps": len(batches),
                         "roofline_tokens_per_s": mean_batch / step,
                         "outputs_equal_first_mode": same}
        if spec:
            st = engine.speculator.stats
            results[mode].update(draft=engine.speculator.name,
                                 acceptance_rate=st.acceptance_rate,
                                 tokens_per_round=st.tokens_per_round,
                                 speculating_fraction=st.rounds / max(1, sum(batches)))
    base = results.get("one", {}).get("output_tokens_per_s")
    print(f"{'mode':<11} {'req/s':>7} {'out tok/s':>10} {'mean batch':>11} {'vs one':>7} "
          f"{'roofline tok/s':>15} {'of roofline':>12} {'1st run s':>10}")
    for mode, r in results.items():
        ratio = f"{r['output_tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"{mode:<11} {r['requests_per_s']:>7.3f} {r['output_tokens_per_s']:>10.1f} "
              f"{r['mean_batch']:>11.2f} {ratio:>7} {r['roofline_tokens_per_s']:>15.1f} "
              f"{r['output_tokens_per_s'] / r['roofline_tokens_per_s']:>11.0%} "
              f"{r['first_run_seconds']:>10.1f}")
    for mode, r in results.items():
        print(f"{mode}: {r['outputs_equal_first_mode']}/{len(requests)} outputs equal to "
              f"{next(iter(results))}'s token for token")
        if "draft" in r:
            print(f"{mode}: draft {r['draft']}, acceptance {r['acceptance_rate']:.2f}, "
                  f"{r['tokens_per_round']:.2f} tokens per speculating row-step, "
                  f"{r['speculating_fraction']:.0%} of decode row-steps speculated")
    per_token = kv_bytes_per_token(model.config)
    budget = args.kv_memory_mb * 2**20 / per_token
    live = np.mean([len(r.prompt_ids) + r.max_tokens / 2 for r in requests])
    print(f"KV budget {args.kv_memory_mb:.0f} MiB = {budget:.0f} tokens ({per_token} B/token): "
          f"~{budget / live:.0f} concurrent sequences with paging (mean live length "
          f"{live:.0f}), {budget // model.config.max_seq_len:.0f} when each reserves "
          f"max_model_len {model.config.max_seq_len}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "chip": chip.name, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

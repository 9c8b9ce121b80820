"""Structured outputs: decode rate with a JSON-schema constraint vs unconstrained, at 1 and 8
concurrent requests, on a real model through the engine; grammar compile time; mask time.

    python bench/structured.py [--model smollm2-135m --rounds 3 --tokens 96 --json FILE]

Each round runs the same requests (sampled, seeded, one prompt per request) unconstrained
(end-of-turn ignored, so every request decodes `--tokens` tokens) on one engine and
constrained to SCHEMA on another (same weights); the two engines take steps in turn, so a
change in the machine's load hits both. The decode
rate counts only steps in which all `concurrency` sequences decode (no prefill, none finished
yet): tokens emitted / seconds of those steps, so the figure is the cost of the same decode
step with and without the masks, whatever length each output ends up. The first round of
each mode is a warm-up (compiles) and is not reported; the ratio printed is the median over
the timed rounds of constrained / unconstrained.
Compile time: the schema compiled with an empty grammar cache (the llguidance tokenizer is
built once per model beforehand, timed separately). Mask time: fill_masks for 1 and 8 rows,
replaying a constrained output's tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from hpllm.checkpoints.registry import load_model
from hpllm.config import EngineConfig
from hpllm.infer import structured as S
from hpllm.infer.engine import EngineCore
from hpllm.infer.sampling import SamplingParams

SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["title", "items"],
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "items": {"type": "array", "minItems": 1, "maxItems": 8, "items": {
            "type": "object", "additionalProperties": False,
            "required": ["name", "colour", "price", "tags"],
            "properties": {
                "name": {"type": "string", "maxLength": 24},
                "colour": {"enum": ["red", "green", "yellow", "orange", "purple", "brown"]},
                "price": {"type": "integer", "minimum": 0, "maximum": 1000},
                "tags": {"type": "array", "maxItems": 3,
                         "items": {"type": "string", "maxLength": 12}}}}}}}
SO = S.StructuredOutput("json_schema", json.dumps(SCHEMA))
PROMPTS = ["A shopping list of fruit, as JSON:", "Fruits at the market today, as JSON:",
           "Eight fruits and their prices, in JSON:", "A JSON catalogue of fruit:",
           "The fruit stall's stock, as a JSON object:", "Describe some fruits in JSON:",
           "My favourite fruits, as JSON:", "A fruit price list in JSON:"]


def decode_rates(engines: dict, prompts, params: dict):
    """Per mode: (decode tokens/s over full-batch decode steps, outputs' texts). Each mode
    runs on its own engine and the engines step in turn, so that the machine's load (shared
    here) falls on both alike."""
    stats = {mode: [0, 0.0, []] for mode in engines}  # tokens, seconds, texts
    for mode, engine in engines.items():
        for i, (prompt, p) in enumerate(zip(prompts, params[mode])):
            engine.add_request(f"r{time.monotonic_ns()}-{i}", prompt, p)
    while any(e.has_unfinished() for e in engines.values()):
        for mode, engine in engines.items():
            if not engine.has_unfinished():
                continue
            running = engine.scheduler.running
            full = len(running) == len(prompts) and not engine.scheduler.waiting and all(
                len(s.tokens) - s.num_computed == 1 for s in running)
            before = engine.counters["generation_tokens"]
            start = time.perf_counter()
            outs = engine.step()
            elapsed = time.perf_counter() - start
            if full:
                stats[mode][0] += engine.counters["generation_tokens"] - before
                stats[mode][1] += elapsed
            stats[mode][2] += [o.outputs[0].text for o in outs if o.finished]
    return {mode: (t / s if s else 0.0, texts) for mode, (t, s, texts) in stats.items()}


def mask_seconds(tokenizer, vocab: int, token_ids: list[int], rows: int) -> float:
    """Median seconds of one fill_masks call for `rows` sequences at each state of a replay."""
    grammar = S.compile_grammar(tokenizer, SO, vocab)
    matchers = [grammar.matcher() for _ in range(rows)]
    times = []
    for t in token_ids:
        start = time.perf_counter()
        S.fill_masks(matchers, rows, vocab)
        times.append(time.perf_counter() - start)
        for m in matchers:
            m.advance(t)
        if matchers[0].done:
            break
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per mode (+1 warm-up)")
    ap.add_argument("--tokens", type=int, default=96, help="max_tokens of every request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    model = load_model(args.model, progress=False)
    tok, vocab = model.tokenizer, model.config.vocab_size
    engines = {mode: EngineCore(model.params, model.config, tok, EngineConfig(max_num_seqs=8))
               for mode in ("plain", "schema")}
    engine = engines["schema"]

    start = time.perf_counter()
    S.ll_tokenizer(tok, vocab)
    tokenizer_s = time.perf_counter() - start
    S.compile_grammar.cache_clear()
    start = time.perf_counter()
    S.compile_grammar(tok, SO, vocab)
    compile_s = time.perf_counter() - start

    result = {"model": args.model, "cpus": os.cpu_count(), "load_before": os.getloadavg(),
              "llguidance_tokenizer_s": tokenizer_s, "compile_s": compile_s, "runs": {}}
    print(f"llguidance tokenizer built in {tokenizer_s * 1e3:.0f} ms (once per model); "
          f"schema compiled in {compile_s * 1e3:.1f} ms (once per schema)")
    valid = 0
    for conc in args.concurrency:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(conc)]
        rates = {"plain": [], "schema": []}
        for r in range(args.rounds + 1):
            params = {mode: [SamplingParams(temperature=0.7, seed=100 * r + i,
                                            max_tokens=args.tokens, ignore_eos=mode == "plain",
                                            structured=SO if mode == "schema" else None)
                             for i in range(conc)] for mode in engines}
            got = decode_rates(engines, prompts, params)
            for text in got["schema"][1]:
                try:
                    json.loads(text)
                    valid += 1
                except json.JSONDecodeError:
                    pass  # cut by max_tokens: counted as not parsed
            if r:  # round 0 compiles
                for mode in engines:
                    rates[mode].append(got[mode][0])
        ratios = [s / p for s, p in zip(rates["schema"], rates["plain"])]
        result["runs"][conc] = {"plain_tok_s": rates["plain"], "schema_tok_s": rates["schema"],
                                "ratio_median": statistics.median(ratios)}
        print(f"concurrency {conc}: unconstrained {statistics.median(rates['plain']):.1f} "
              f"tok/s, schema {statistics.median(rates['schema']):.1f} tok/s, ratio "
              f"{statistics.median(ratios):.3f} (rounds: "
              f"{', '.join(f'{x:.3f}' for x in ratios)})")
    out = None
    engine.add_request("replay", PROMPTS[0], SamplingParams(temperature=0, max_tokens=args.tokens,
                                                            structured=SO))
    while engine.has_unfinished():
        for o in engine.step():
            out = o
    engine_text = out.outputs[0].text
    for rows in (1, 8):
        result[f"mask_ms_{rows}_rows"] = 1e3 * mask_seconds(tok, vocab, out.outputs[0].token_ids,
                                                            rows)
    result["load_after"] = os.getloadavg()
    result["schema_outputs_parsed"] = valid
    print(f"mask per step: {result['mask_ms_1_rows']:.3f} ms (1 row), "
          f"{result['mask_ms_8_rows']:.3f} ms (8 rows); greedy output: "
          f"{json.dumps(engine_text)[:200]}")
    print(f"load average before {result['load_before']}, after {result['load_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

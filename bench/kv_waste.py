"""How much of the allocated KV cache memory holds nothing: paged blocks vs reserving per request.

Replays a workload (prompt and output lengths drawn from a stated distribution, fixed seed)
through the real engine (scheduler, block manager, jitted paged forward passes) on a small
random model (the KV bookkeeping does not depend on the weights), and after every step
compares the KV slots allocated with those holding a computed token:
  paged           blocks referenced by running sequences (shared blocks once)
  reserve max     every running request reserves max_model_len slots (a static dense cache)
  reserve own max every running request reserves prompt + max_tokens slots
Waste = 1 - used / allocated, summed over steps. The prediction for paging: on average half a
block per sequence is empty, i.e. waste ~ (block_size / 2) / mean sequence length.
Also prints how many sequences fit in the same memory with and without paging.

    python bench/kv_waste.py [--requests 64 --block-size 16 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from hpllm.config import EngineConfig, ModelConfig
from hpllm.infer.engine import EngineCore
from hpllm.infer.sampling import SamplingParams
from hpllm.model.transformer import init_params

MODEL = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    max_seq_len=2048)


def workload(n: int, seed: int):
    """Prompt lengths log-uniform in [16, 1024], output lengths log-uniform in [16, 512]
    (chat-like: many short, some long)."""
    rng = np.random.default_rng(seed)
    prompts = np.exp(rng.uniform(np.log(16), np.log(1024), n)).astype(int)
    outputs = np.exp(rng.uniform(np.log(16), np.log(512), n)).astype(int)
    return [(list(rng.integers(0, MODEL.vocab_size, p)), int(o))
            for p, o in zip(prompts, outputs)]


def replay(requests, block_size: int, max_num_seqs: int, kv_tokens: int):
    params = init_params(MODEL, jax.random.key(0))
    engine = EngineCore(params, MODEL, None, EngineConfig(
        block_size=block_size, num_blocks=kv_tokens // block_size + 1,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=512, enable_prefix_caching=False))
    limits = {}
    for i, (prompt, out) in enumerate(requests):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=out))
        limits[str(i)] = len(prompt) + out
    used = paged = own = dense = 0
    batch = []
    while engine.has_unfinished():
        engine.step()
        running = engine.scheduler.running
        blocks = {b for s in running for b in s.table.blocks}
        used += sum(s.num_computed for s in running)
        paged += len(blocks) * block_size
        own += sum(limits[s.request.request_id] for s in running)
        dense += len(running) * MODEL.max_seq_len
        batch.append(len(running))
    engine.blocks.check_no_leak()
    return {"block_size": block_size, "steps": len(batch), "mean_batch": float(np.mean(batch)),
            "waste_paged": 1 - used / paged, "waste_reserve_own_max": 1 - used / own,
            "waste_reserve_max_len": 1 - used / dense,
            "preemptions": engine.scheduler.num_preemptions}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--block-size", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--kv-tokens", type=int, default=16384, help="KV pool size in tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    requests = workload(args.requests, args.seed)
    lengths = np.array([len(p) + o for p, o in requests])
    print(f"workload: {args.requests} requests, prompt 16-1024 and output 16-512 tokens "
          f"log-uniform (seed {args.seed}); mean final length {lengths.mean():.0f}, "
          f"max {lengths.max()}; pool {args.kv_tokens} tokens; max_model_len "
          f"{MODEL.max_seq_len}")
    rows = []
    print(f"{'block':>5} {'steps':>6} {'batch':>6} {'paged waste':>12} {'predicted':>10} "
          f"{'reserve own max':>16} {'reserve max len':>16}")
    for bs in args.block_size:
        r = replay(requests, bs, args.max_num_seqs, args.kv_tokens)
        # mean length of a running sequence over its life ~ prompt + output / 2
        life = np.mean([len(p) + o / 2 for p, o in requests])
        r["predicted_waste_paged"] = (bs / 2) / life
        rows.append(r)
        print(f"{bs:>5} {r['steps']:>6} {r['mean_batch']:>6.1f} {r['waste_paged']:>11.2%} "
              f"{r['predicted_waste_paged']:>9.2%} {r['waste_reserve_own_max']:>15.1%} "
              f"{r['waste_reserve_max_len']:>15.1%}")
    fit_paged = args.kv_tokens / np.mean([len(p) + o / 2 for p, o in requests])
    fit_own = args.kv_tokens / lengths.mean()
    fit_dense = args.kv_tokens // MODEL.max_seq_len
    print(f"sequences that fit in {args.kv_tokens} KV tokens: paged ~{fit_paged:.0f} (mean "
          f"live length), reserving prompt+max_tokens ~{fit_own:.0f}, reserving max_model_len "
          f"{fit_dense}  ->  paging {fit_paged / fit_dense:.1f}x the static cache")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows, "fit": {
                "paged": fit_paged, "reserve_own_max": fit_own, "reserve_max_len": fit_dense}},
                f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

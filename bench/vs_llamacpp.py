"""Decode and prompt speed of hpllm against llama.cpp on this CPU, the same model, one run.

    python bench/vs_llamacpp.py [--rounds 3] [--threads 2] [--quick] [--out FILE]

llama.cpp (a peer, never a dependency: built once under ~/.cache/hpllm/peers by
bench/peers.py) runs SmolLM2-135M-Instruct in Q8_0, Q4_1 and F32 (one file, requantized):
  1 stream     tg128 of `llama-bench -p 512 -n 128 -t 2 -r 1` (from an empty context)
  8, 32        `llama-batched-bench -npp 128 -ntg 128 -npl 1,8,32 -t 2` (S_TG: decode only)
  prompt       pp512 of the same llama-bench run (a separate test of its own)
hpllm runs the same model with int8, int4 and float32 weights through its public APIs, so it
measures whatever generate/engine currently do:
  1 stream     `hpllm.infer.generate.generate` from a one-token prompt, 128 greedy tokens,
               EOS ignored: the wall time of the decode steps (the first token, which the
               prefill makes, is not counted)
  8, 32        `EngineCore` with 8 or 32 requests of 128 prompt tokens and 128 greedy output
               tokens: only the steps after every request has its first token (pure decode)
  prompt       one `EngineCore` step that prefills a 512-token prompt
The engines alternate (for each format pair: llama.cpp, hpllm, llama.cpp batched, hpllm
batched), `--rounds` times after an untimed warm-up of hpllm; each cell is the median of the
rounds. Beside each figure stands its roofline, the step time being the larger of two
bounds: the bytes it must read (the weights as stored + the KV cache of every stream at the
mean context) / the all-core read bandwidth measured by hpllm.perf.hardware, and its
forward FLOPs / the measured matmul peak (which only binds at 32 streams and in the prompt).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from hpllm.checkpoints.gguf import read_gguf
from hpllm.checkpoints.registry import load_model
from hpllm.compress.quantize import param_bytes
from hpllm.config import EngineConfig
from hpllm.infer.engine import EngineCore
from hpllm.infer.generate import generate
from hpllm.infer.sampling import SamplingParams
from hpllm.model.kv_cache import kv_bytes_per_token
from hpllm.model.transformer import unstack_layers
from hpllm.perf.hardware import cpu_name, current_chip
from hpllm.perf.roofline import forward_flops_per_token
from hpllm.serve.workload import shakespeare_requests

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import peers  # noqa: E402
from report import emit  # noqa: E402

PAIRS = (("Q8_0", "int8"), ("Q4_1", "int4"), ("F32", "float32"))  # llama.cpp, hpllm
STREAMS = (1, 8, 32)
LLAMA_KV_BYTES = 2  # llama.cpp's default KV cache type is f16


# -- llama.cpp -------------------------------------------------------------------------------
def _run_json(cmd: list) -> str:
    done = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n"
                           f"{done.stderr[-2000:]}")
    return done.stdout


def llama_bench(bins, gguf, threads: int, n_gen: int, n_prompt: int) -> dict:
    """{"tg": tok/s of n_gen tokens from an empty context, "pp": tok/s of an n_prompt prompt},
    one repetition each (llama-bench warms up first)."""
    out = json.loads(_run_json([bins["llama-bench"], "-m", gguf, "-p", n_prompt, "-n", n_gen,
                                "-t", threads, "-r", 1, "-o", "json"]))
    got = {}
    for test in out:
        if test["n_gen"] and not test["n_prompt"]:
            got["tg"] = test["avg_ts"]
        elif test["n_prompt"] and not test["n_gen"]:
            got["pp"] = test["avg_ts"]
    return got


def llama_batched(bins, gguf, threads: int, npp: int, ntg: int, streams) -> dict:
    """{streams: decode tok/s (S_TG)} of llama-batched-bench, each stream its own prompt."""
    ctx = max(streams) * (npp + ntg)  # every sequence's cells, or the bench skips the case
    out = _run_json([bins["llama-batched-bench"], "-m", gguf, "-c", ctx, "-npp", npp, "-ntg",
                     ntg, "-npl", ",".join(map(str, streams)), "-t", threads,
                     "--output-format", "jsonl"])
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    got = {r["pl"]: r["speed_tg"] for r in rows}
    if set(got) != set(streams):
        raise RuntimeError(f"llama-batched-bench reported streams {sorted(got)}, not {streams}")
    return got


# -- hpllm -----------------------------------------------------------------------------------
class Hpllm:
    """One weight format of hpllm: the model, its unstacked params for generate, an engine."""

    def __init__(self, quant: str, max_streams: int, npp: int, ntg: int, n_prompt: int):
        self.quant = "" if quant == "float32" else quant
        self.model = load_model(peers.MODEL, progress=False, quant=self.quant)
        self.params = unstack_layers(self.model.params)
        ec = EngineConfig(max_num_seqs=max_streams, max_num_batched_tokens=max(512, n_prompt),
                          enable_prefix_caching=False,
                          kv_memory_mb=1.25 * max_streams * (npp + ntg) *
                          kv_bytes_per_token(self.model.config) / 2**20 + 16)
        self.engine = EngineCore(self.model.params, self.model.config, self.model.tokenizer, ec)
        self.calls = 0

    def single(self, prompt: list[int], n_gen: int) -> float:
        tokens = generate(self.params, self.model.config, prompt, n_gen)
        next(tokens)  # the prefill's token
        start, n = time.perf_counter(), sum(1 for _ in tokens)
        return n / (time.perf_counter() - start)

    def _add(self, prompt, max_tokens: int) -> None:
        self.calls += 1
        self.engine.add_request(f"r{self.calls}", prompt, SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True))

    def batched(self, prompts: list[list[int]], ntg: int) -> float:
        """Decode tok/s over the steps after every request has its first token."""
        for p in prompts:
            self._add(p, ntg)
        started, seconds, tokens = set(), 0.0, 0
        while self.engine.has_unfinished():
            decoding = len(started) == len(prompts)
            before = self.engine.counters["generation_tokens"]
            start = time.perf_counter()
            outputs = self.engine.step()
            if decoding:
                seconds += time.perf_counter() - start
                tokens += self.engine.counters["generation_tokens"] - before
            started.update(o.request_id for o in outputs if o.outputs[0].token_ids)
        return tokens / seconds

    def prefill(self, prompt: list[int]) -> float:
        self._add(prompt, 1)
        start = time.perf_counter()
        while self.engine.has_unfinished():
            self.engine.step()
        return len(prompt) / (time.perf_counter() - start)


# -- rooflines -------------------------------------------------------------------------------
def rooflines(weight_bytes: float, kv_per_token: float, chip, peak: float, config,
              n_gen: int, npp: int, ntg: int, n_prompt: int) -> dict:
    """{streams: decode tok/s bound, "pp": prompt tok/s bound} (module docstring): a step
    takes at least its bytes / the read bandwidth and its FLOPs / the matmul peak."""
    bw = chip.hbm_bandwidth
    out = {}
    for s in STREAMS:
        context = n_gen / 2 if s == 1 else npp + ntg / 2  # mean over the decode steps
        step = max((weight_bytes + s * context * kv_per_token) / bw,
                   s * forward_flops_per_token(config, int(context)) / peak)
        out[s] = s / step
    flops = n_prompt * forward_flops_per_token(config, n_prompt)
    out["pp"] = n_prompt / max(weight_bytes / bw, flops / peak)
    return out


def gguf_weight_bytes(path) -> int:
    return sum(t.nbytes for t in read_gguf(path).tensors.values())


def hpllm_path() -> str:
    """Which CPU path hpllm's decode takes, as far as the environment says."""
    try:  # the fused CPU decoder step (hpllm/kernels/cpu_decoder.py), where it exists
        available = importlib.import_module("hpllm.kernels.cpu_decoder").available()
        fused = f"fused CPU decoder {'available' if available else 'unavailable'}"
    except ImportError:
        fused = "no fused CPU decoder module"
    env = {k: v for k, v in os.environ.items() if k.startswith("HPLLM_")}
    return fused + (f"; env {env}" if env else "")


# -- report ----------------------------------------------------------------------------------
def _cell(x, bound) -> str:
    return f"{x:,.0f} ({bound:,.0f}, {x / bound:.0%})" if x else "-"


def table(results: dict, bounds: dict, rounds: int, n_gen: int, npp: int, ntg: int,
          n_prompt: int) -> list:
    cols = [*STREAMS, "pp"]
    lines = [f"| tok/s, median of {rounds} round{'s' * (rounds > 1)} (roofline, % of it) | "
             + " | ".join(f"{s} stream{'s' * (s > 1)}" for s in STREAMS)
             + f" | prompt {n_prompt} |", "|---" * (len(cols) + 1) + "|"]
    for name in results:
        lines.append(f"| {name} | " + " | ".join(
            _cell(statistics.median(results[name][c]) if results[name].get(c) else 0,
                  bounds[name][c]) for c in cols) + " |")
    lines.append("")
    lines.append("| hpllm / llama.cpp | " + " | ".join(map(str, cols)) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    med = {n: {c: statistics.median(v) for c, v in r.items() if v} for n, r in results.items()}
    for peer, ours in PAIRS:
        a, b = f"hpllm {ours}", f"llama.cpp {peer}"
        if a in med and b in med:
            lines.append(f"| {a} / {b} | " + " | ".join(
                f"{med[a][c] / med[b][c]:.2f}x" if c in med[a] and c in med[b] else "-"
                for c in cols) + " |")
    peers_ = [n for n in med if n.startswith("llama.cpp")]
    for ours in [n for n in med if n.startswith("hpllm")]:
        best = {c: max(med[p].get(c, 0) for p in peers_) for c in cols}
        lines.append(f"| {ours} / best llama.cpp | " + " | ".join(
            f"{med[ours][c] / best[c]:.2f}x" if best[c] and c in med[ours] else "-"
            for c in cols) + " |")
    lines.append("")
    lines.append(f"1 stream: {n_gen} tokens from an empty context (hpllm: a one-token prompt); "
                 f"8 and 32 streams: {npp}-token prompts, {ntg} output tokens, decode steps only; "
                 f"prompt: one {n_prompt}-token prefill.")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--tokens", type=int, default=128, help="single-stream decode tokens")
    ap.add_argument("--npp", type=int, default=128, help="batched: prompt tokens per stream")
    ap.add_argument("--ntg", type=int, default=128, help="batched: output tokens per stream")
    ap.add_argument("--prompt", type=int, default=512, help="prompt-processing tokens")
    ap.add_argument("--formats", nargs="+", default=[p for p, _ in PAIRS],
                    choices=[p for p, _ in PAIRS], help="llama.cpp formats (with their hpllm "
                    "pair: Q8_0-int8, Q4_1-int4, F32-float32)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 1 round, 32 tokens; batched 32-token prompts, "
                    "16 tokens; prompt 128")
    ap.add_argument("--out", default=None, help="markdown report (default "
                    "docs/perf/vs_llamacpp.md; none with --quick)")
    ap.add_argument("--json", default="", help="every round's figures")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.tokens, args.npp, args.ntg, args.prompt = 1, 32, 32, 16, 128
    out = args.out if args.out is not None else (
        "" if args.quick else str(peers.REPO / "docs" / "perf" / "vs_llamacpp.md"))
    command = "python bench/vs_llamacpp.py " + " ".join(argv if argv is not None else sys.argv[1:])

    bins = peers.llama_binaries()
    files = peers.gguf_copies(bins)
    chip = current_chip()
    pairs = [(p, q) for p, q in PAIRS if p in args.formats]
    peers.say(f"loading hpllm ({', '.join(q for _, q in pairs)})")
    ours = {q: Hpllm(q, max(STREAMS), args.npp, args.ntg, args.prompt) for _, q in pairs}
    config = next(iter(ours.values())).model.config
    tok = next(iter(ours.values())).model.tokenizer
    single_prompt = shakespeare_requests(tok, 1, (1, 1), (1, 1), 0)[0].prompt_ids
    pp_prompts = [r.prompt_ids for r in shakespeare_requests(
        tok, args.rounds + 1, (args.prompt, args.prompt), (1, 1), 1)]

    def batch(n, seed):
        return [r.prompt_ids for r in shakespeare_requests(tok, n, (args.npp, args.npp),
                                                           (1, 1), seed)]

    bounds = {}
    for peer, q in pairs:
        peak = chip.peak("float32") if q == "float32" else max(chip.peak("float32"),
                                                              chip.peak("int8"))
        bounds[f"llama.cpp {peer}"] = rooflines(
            gguf_weight_bytes(files[peer]), 2 * config.n_layers * config.n_kv_heads *
            config.head_dim * LLAMA_KV_BYTES, chip, peak, config, args.tokens, args.npp,
            args.ntg, args.prompt)
        bounds[f"hpllm {q}"] = rooflines(
            param_bytes(ours[q].model.params), kv_bytes_per_token(config), chip, peak, config,
            args.tokens, args.npp, args.ntg, args.prompt)

    load_start = peers.load_note()
    peers.say(f"warming up hpllm (compiles), {load_start}")
    for _, q in pairs:
        h = ours[q]
        h.single(single_prompt, args.tokens)
        h.prefill(pp_prompts[-1])
        for s in STREAMS[1:]:
            h.batched(batch(s, 100 + s), args.ntg)

    results = {name: {c: [] for c in (*STREAMS, "pp")} for name in bounds}
    loads = []
    for r in range(args.rounds):
        for peer, q in pairs:
            lp, hq = results[f"llama.cpp {peer}"], results[f"hpllm {q}"]
            got = llama_bench(bins, files[peer], args.threads, args.tokens, args.prompt)
            lp[1].append(got["tg"])
            lp["pp"].append(got["pp"])
            hq[1].append(ours[q].single(single_prompt, args.tokens))
            hq["pp"].append(ours[q].prefill(pp_prompts[r]))
            for s, v in llama_batched(bins, files[peer], args.threads, args.npp, args.ntg,
                                      STREAMS).items():
                if s > 1:
                    lp[s].append(v)
            for s in STREAMS[1:]:
                hq[s].append(ours[q].batched(batch(s, 1000 * r + s), args.ntg))
            peers.say(f"round {r + 1}/{args.rounds} {peer}/{q}: llama.cpp "
                      f"{ {c: round(v[-1]) for c, v in lp.items()} } hpllm "
                      f"{ {c: round(v[-1]) for c, v in hq.items()} }  ({peers.load_note()})")
        loads.append(os.getloadavg()[0])

    lines = [
        "# hpllm against llama.cpp on this CPU (issue 18)", "",
        f"`{command}` ({time.strftime('%Y-%m-%d %H:%M')}); machine: {cpu_name()}, "
        f"{os.cpu_count()} CPUs, {args.threads} threads for llama.cpp; hpllm: {hpllm_path()}.",
        f"Load: {load_start} at the start; 1-minute load after each round "
        f"{', '.join(f'{x:.2f}' for x in loads)}."
        + (" **A --quick smoke run: short runs, one round, read the numbers as a check that "
           "everything runs, not as speeds; the full run (`python bench/vs_llamacpp.py`, "
           "~15 min on the idle machine) replaces this file.**" if args.quick else ""), "",
        f"SmolLM2-135M-Instruct, greedy, EOS ignored. llama.cpp: built from the "
        f"{peers.LLAMA_SDIST} source archive (cmake Release, GGML_NATIVE, static), Q8_0 and "
        f"F32 made from the Q4_1 file by `llama-quantize --allow-requantize`; commands "
        f"`llama-bench -p {args.prompt} -n {args.tokens} -t {args.threads} -r 1` and "
        f"`llama-batched-bench -c {max(STREAMS) * (args.npp + args.ntg)} -npp {args.npp} "
        f"-ntg {args.ntg} -npl {','.join(map(str, STREAMS))} -t {args.threads}`. hpllm: "
        f"`generate()` (1 stream) and `EngineCore` (8, 32 streams, prompt) in one process; "
        f"see the docstring of bench/vs_llamacpp.py.", "",
        *table(results, bounds, args.rounds, args.tokens, args.npp, args.ntg, args.prompt), "",
        f"Roofline: tokens per step / max(bytes / bandwidth, FLOPs / peak); a decode step "
        f"reads the weights as each engine stores them (GGUF tensors; hpllm's params) and the"
        f" KV cache of every stream at the mean context (f16 for llama.cpp, float32 for "
        f"hpllm); the prompt, the weights once for {args.prompt} tokens. Bandwidth "
        f"{chip.hbm_bandwidth / 1e9:.1f} GB/s (hpllm.perf.hardware's all-core read: "
        f"{chip.source}); peak float32 "
        f"{chip.peak('float32') / 1e9:.0f} GFLOP/s, int8 {chip.peak('int8') / 1e9:.0f} "
        f"GFLOP/s (quantized rows use the larger). Set HPLLM_CPU_KERNELS=0 to measure hpllm "
        f"without its native CPU kernels.", "",
    ]
    if args.json:
        peers.write_json(args.json, {"command": command, "results": results, "bounds": {
            k: {str(c): v for c, v in b.items()} for k, b in bounds.items()},
            "loads": loads, "load_start": load_start})
    return emit(lines, out)


if __name__ == "__main__":
    sys.exit(main())

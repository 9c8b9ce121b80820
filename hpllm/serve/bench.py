"""`hpllm bench serve`: a load generator for an OpenAI-compatible server, in the manner of
vLLM's benchmark_serving.

Requests are Shakespeare validation windows sent as token ids (exact prompt lengths) to
`/v1/completions` with stream=true, greedy, ignore_eos (so each must return exactly its
max_tokens). Arrivals are a Poisson process at `rate` requests/s (gamma inter-arrival times
with shape `burstiness`: 1 = Poisson, < 1 burstier), or all at once (rate = inf); at most
`concurrency` requests are in flight. Per request it records the time to the first token
(TTFT), the gaps between streamed chunks (ITL), the time per output token after the first
(TPOT = (latency - TTFT) / (tokens - 1)) and the end-to-end latency; a request counts as
complete only if its stream ended with `data: [DONE]`, a finish reason, and the number of
tokens asked for.

A warm-up of other lengths (another seed) runs first and is not measured. Against an hpllm
server the summary also holds what its /stats says once the load has gone: KV blocks still
held (leaked) and executables compiled after ready; other servers have no such endpoint
(None).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from hpllm.checkpoints.gguf import read_gguf
from hpllm.checkpoints.registry import resolve
from hpllm.checkpoints.tokenizer import tokenizer_from_gguf, tokenizer_from_hf_dir
from hpllm.serve.workload import shakespeare_requests


@dataclass
class RequestResult:
    prompt_len: int
    max_tokens: int
    ok: bool = False  # 200, [DONE], a finish reason, max_tokens tokens
    error: str = ""
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    finish_reason: str | None = None


async def _one(client, url: str, model: str, prompt_ids: list[int], max_tokens: int,
               timeout: float) -> RequestResult:
    res = RequestResult(len(prompt_ids), max_tokens)
    payload = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens,
               "temperature": 0.0, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last = None
    done = False
    try:
        async with client.stream("POST", url, json=payload, timeout=timeout) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = f"stream error: {obj['error'].get('message')}"
                    return res
                if obj.get("usage"):
                    res.output_tokens = obj["usage"]["completion_tokens"]
                for choice in obj.get("choices", []):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.finish_reason = choice.get("finish_reason") or res.finish_reason
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - start
    res.ok = done and res.finish_reason is not None and res.output_tokens == max_tokens
    if not res.ok:
        res.error = (f"incomplete: done={done} finish_reason={res.finish_reason} "
                     f"tokens={res.output_tokens}/{max_tokens}")
    return res


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send times (s from the start) of n requests: gamma-distributed gaps of mean 1/rate
    (shape 1 = a Poisson process); all zero when rate is infinite."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), n)
    return np.cumsum(gaps) - gaps[0]


async def run_load(base_url: str, model: str, requests, concurrency: int = 0,
                   rate: float = math.inf, burstiness: float = 1.0, seed: int = 0,
                   timeout: float = 600.0) -> tuple[list[RequestResult], float]:
    """Send `requests` (objects with prompt_ids and max_tokens); returns the results in
    request order and the wall time from the first send to the last response."""
    import httpx  # an optional dependency (the test extra)

    url = base_url.rstrip("/") + "/v1/completions"
    limit = concurrency or len(requests)
    sem = asyncio.Semaphore(limit)
    times = arrival_times(len(requests), rate, burstiness, seed)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()

        async def send(req, at):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            async with sem:
                return await _one(client, url, model, list(req.prompt_ids), req.max_tokens,
                                  timeout)

        results = await asyncio.gather(*(send(r, t) for r, t in zip(requests, times)))
        return list(results), time.perf_counter() - start


def _stats(values) -> dict:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    a = np.asarray(values) * 1e3  # ms
    return {"mean": float(a.mean()), "median": float(np.median(a)),
            "p99": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results), "completed": len(ok), "errors": len(results) - len(ok),
        "first_errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "prompt_tokens": sum(r.prompt_len for r in ok), "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (out_tokens + sum(r.prompt_len for r in ok)) / duration
        if duration else 0.0,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok
                           if r.output_tokens > 1]),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2e_latency_ms": _stats([r.latency for r in ok]),
    }


def format_summary(s: dict) -> str:
    lines = [f"requests: {s['completed']}/{s['requests']} complete, {s['errors']} errors, "
             f"in {s['duration_s']:.2f} s",
             f"request throughput: {s['request_throughput']:.2f} req/s",
             f"output throughput:  {s['output_throughput']:.1f} tok/s "
             f"(total {s['total_token_throughput']:.1f} tok/s incl. prompts)",
             f"{'':18}{'mean':>10}{'median':>10}{'p99':>10}  (ms)"]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                      ("e2e_latency_ms", "E2E latency")):
        st = s[key]
        cells = "".join(f"{st[k]:>10.1f}" if st[k] is not None else f"{'-':>10}"
                        for k in ("mean", "median", "p99"))
        lines.append(f"{name:18}{cells}")
    server = s.get("server")
    if server is not None:
        lines.append(f"server after the load: {server['kv_blocks_leaked']} KV blocks still "
                     f"held, {server['compilations_after_ready']} compilations after ready"
                     + (f", {server['pending']} requests pending" if server["pending"] else ""))
    for e in s["first_errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def load_tokenizer(model: str):
    """Just the tokenizer of a registry name, .gguf file or HF directory (no weights)."""
    path = resolve(model)
    if path.is_dir():
        return tokenizer_from_hf_dir(path)
    return tokenizer_from_gguf(read_gguf(path).metadata, path.name)


def served_model(base_url: str) -> str:
    import httpx  # an optional dependency (the test extra)

    r = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def server_state(base_url: str, timeout: float = 60.0) -> dict | None:
    """An hpllm server's leftovers once nothing is pending (waits up to `timeout` s for
    aborted or finishing requests to be let go): {"kv_blocks_leaked", "compilations_after_
    ready", "pending"}; None for a server without hpllm's /stats."""
    import httpx  # an optional dependency (the test extra)

    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(base_url.rstrip("/") + "/stats", timeout=30)
            stats = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        if not isinstance(stats, dict) or "free_blocks" not in stats:
            return None
        idle = stats.get("pending", 0) == 0 and stats["running"] == 0 and stats["waiting"] == 0
        if idle or time.monotonic() > deadline:
            return {"kv_blocks_leaked": stats["num_blocks"] - stats["free_blocks"],
                    "compilations_after_ready": sum(stats.get("compilations_after_ready",
                                                              {}).values()),
                    "pending": stats.get("pending", 0)}
        time.sleep(0.05)


def bench_serve(base_url: str, num_prompts: int = 100, concurrency: int = 0,
                rate: float = math.inf, burstiness: float = 1.0, prompt_len=(32, 256),
                output_len=(16, 128), seed: int = 0, model: str = "", tokenizer=None,
                timeout: float = 600.0, warmup_prompts: int = 0) -> dict:
    """Benchmark a running OpenAI-compatible server; returns the summary (with the settings
    under "config"). model: the id to send (default: the server's first in /v1/models);
    tokenizer: a tokenizer object, or a registry name / .gguf / HF directory to read one
    from (default: `model`), for servers whose model id is not one; warmup_prompts: requests
    of other lengths sent first, not measured."""
    model = model or served_model(base_url)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer or model))
    if warmup_prompts:
        warm = shakespeare_requests(tokenizer, warmup_prompts, prompt_len, output_len,
                                    seed + 1000)
        asyncio.run(run_load(base_url, model, warm, concurrency, math.inf, 1.0, seed,
                             timeout))
    requests = shakespeare_requests(tokenizer, num_prompts, prompt_len, output_len, seed)
    results, duration = asyncio.run(run_load(base_url, model, requests, concurrency, rate,
                                             burstiness, seed, timeout))
    summary = summarize(results, duration)
    summary["server"] = server_state(base_url)
    summary["config"] = {"base_url": base_url, "model": model, "num_prompts": num_prompts,
                         "concurrency": concurrency, "rate": rate if math.isfinite(rate)
                         else "inf", "burstiness": burstiness, "prompt_len": list(prompt_len),
                         "output_len": list(output_len), "seed": seed,
                         "warmup_prompts": warmup_prompts}
    summary["per_request"] = [{k: v for k, v in asdict(r).items() if k != "itl"}
                              for r in results]
    return summary

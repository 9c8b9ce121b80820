"""The server under stress, for real: it compiles everything before it says ready (and
refuses work until then), compiles nothing after (whatever the lengths, n > 1, streaming),
frees a disconnected client's KV blocks at the next step, never crashes on bad input; a
process killed with SIGKILL, even mid-way through writing its compilation cache, restarts
and serves at once from that cache, and SIGTERM drains running streams.

The default tests use the random tiny Llama of tests/test_serve.py (SmolLM2's tokenizer);
the ones with the real SmolLM2 weights (1,000 requests at concurrency 64, start-up times)
are marked slow.
"""

import concurrent.futures
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from hpllm.cache import cache_dir, remove_broken_entries
from hpllm.cli import main
from hpllm.config import EngineConfig
from hpllm.serve import bench
from test_serve import (NAME, _get, _metric, _post, engine_paused_after,  # noqa: F401
                        model, model_dir, running_server)

ENGINE = EngineConfig(block_size=16, num_blocks=200, max_num_seqs=4, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def srv(model):
    """One server, compiling before it is ready; its warm-up waits at the first executable
    until `compile.set()` (test_compiling_server_refuses_work_until_ready)."""
    compile = threading.Event()

    def progress(done, total):
        compile.wait(120)

    with running_server(model, ENGINE, warmup=True, progress=progress) as s:
        s.compile = compile
        yield s
        compile.set()


def _ready(s, timeout=240.0):
    s.compile.set()
    assert s.engine.ready.wait(timeout), "the warm-up did not finish"
    assert s.engine.error is None, s.engine.error


def _stats(s) -> dict:
    return _get(f"{s.url}/stats").json()


def _idle_stats(s, timeout=60.0) -> dict:
    """/stats once nothing is pending, running or waiting (polled, not slept on)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = _stats(s)
        if stats["pending"] == 0 and stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, f"requests still pending: {stats}"
        time.sleep(0.02)


def _compilations(url) -> float:
    return sum(_metric(url, "hpllm_compilations_after_ready_total", where=w)
               for w in ("engine", "other"))


# -- start-up ---------------------------------------------------------------------------------
def test_compiling_server_refuses_work_until_ready(srv):
    if srv.engine.ready.is_set():
        pytest.fail("the warm-up finished before the test could hold it")
    health = _get(f"{srv.url}/health")
    assert health.status_code == 503 and health.json()["status"] == "compiling", health.text
    assert health.headers["retry-after"] == "1"
    r = _post(f"{srv.url}/v1/completions", json={"prompt": "too early", "max_tokens": 2},
              timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "compiling", r.text
    with pytest.raises(openai.APIStatusError) as e:  # the client sees the 503 as well
        srv.client.chat.completions.create(model=NAME, max_tokens=2, messages=[
            {"role": "user", "content": "hi"}])
    assert e.value.status_code == 503
    assert srv.engine.num_pending == 0  # refused, not queued
    _ready(srv)
    assert _get(f"{srv.url}/health").json() == {"status": "ok"}
    stats = _stats(srv)
    assert stats["ready"] and stats["warmup"]["compiled"] == stats["warmup"]["total"] > 0


def test_no_compilation_after_ready(srv, model):
    """Prompt lengths 1..~200 tokens, outputs 1..40, n up to 3, sampled and greedy, logprobs,
    streamed or not, chat and completions: not one executable built after ready."""
    _ready(srv)
    before = _compilations(srv.url)
    assert before == 0
    rng = random.Random(0)
    words = "to be or not to be that is the question whether tis nobler".split()
    jobs = []
    for i in range(24):
        prompt = " ".join(rng.choice(words) for _ in range(rng.choice([1, 3, 9, 30, 70, 150])))
        kw = dict(max_tokens=rng.randint(1, 40), temperature=0.0)
        if i % 3 == 1:
            kw.update(temperature=0.8, top_p=0.9, n=rng.randint(2, 3), seed=i)
        if i % 4 == 2:
            kw.update(logprobs=2)
        jobs.append((prompt, kw, i % 2 == 0))

    def run(job):
        prompt, kw, stream = job
        if stream:
            chunks = list(srv.client.completions.create(
                model=NAME, prompt=prompt, stream=True, extra_body={"ignore_eos": True}, **kw))
            return sum(1 for c in chunks for ch in c.choices if ch.finish_reason) == kw.get("n", 1)
        r = srv.client.completions.create(model=NAME, prompt=prompt,
                                          extra_body={"ignore_eos": True}, **kw)
        return r.usage.completion_tokens == kw["max_tokens"] * kw.get("n", 1)

    threads = []
    results = [None] * len(jobs)

    def worker(k):
        results[k] = run(jobs[k])

    for k in range(len(jobs)):  # eight at a time: batches of every size meet
        threads.append(threading.Thread(target=worker, args=(k,)))
    for group in range(0, len(threads), 8):
        for t in threads[group:group + 8]:
            t.start()
        for t in threads[group:group + 8]:
            t.join(300)
    assert all(results), results
    chat = srv.client.chat.completions.create(model=NAME, max_tokens=5, stream=True,
                                              messages=[{"role": "user", "content": "hello"}])
    assert any(c.choices and c.choices[0].finish_reason for c in chat)
    stats = _idle_stats(srv)
    assert stats["compilations_after_ready"] == {"engine": 0, "other": 0}, stats
    assert _compilations(srv.url) == 0
    assert stats["free_blocks"] == stats["num_blocks"]


# -- disconnects --------------------------------------------------------------------------
def test_disconnect_mid_stream_frees_blocks_at_the_next_step(srv):
    _ready(srv)
    body = {"prompt": "A tale told by an idiot", "max_tokens": 300, "ignore_eos": True,
            "temperature": 0, "stream": True}
    aborts = _stats(srv)["aborts"]
    with engine_paused_after(srv.engine, 1):  # held in the listener of its first token
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # leaving the block closes the connection mid-stream
        deadline = time.monotonic() + 30
        while _stats(srv)["aborts"] == aborts:  # the server saw the client go
            assert time.monotonic() < deadline, "the disconnect was not noticed"
            time.sleep(0.02)
        held = _stats(srv)
        assert held["free_blocks"] < held["num_blocks"]  # still held: no step boundary yet
        steps = srv.core.counters["steps"]
    stats = _idle_stats(srv)
    # freed at the boundary after the held step, before any further step ran
    assert stats["free_blocks"] == stats["num_blocks"] and stats["steps"] == steps, stats
    srv.core.blocks.check_no_leak()


# -- the load generator ------------------------------------------------------------------
def test_bench_serve_reports_throughput_latency_and_the_servers_leftovers(srv, model_dir,
                                                                           tmp_path, capsys):
    """`hpllm bench serve` against the running server, with a warm-up of other lengths and
    the tokenizer given apart from the model id: every request complete, no block held
    afterwards and no compilation, as its JSON summary and its exit status say."""
    _ready(srv)
    out = tmp_path / "bench.json"
    code = main(["bench", "serve", "--base-url", srv.url, "--model", NAME, "--tokenizer",
                 str(model_dir), "--num-prompts", "12", "--concurrency", "6", "--prompt-len",
                 "4:40", "--output-len", "2:9", "--warmup-prompts", "6", "--json", str(out)])
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert code == 0, printed
    assert summary["completed"] == 12 and summary["errors"] == 0
    assert summary["output_tokens"] == sum(r["max_tokens"] for r in summary["per_request"])
    assert summary["server"] == {"kv_blocks_leaked": 0, "compilations_after_ready": 0,
                                 "pending": 0}
    assert summary["config"]["warmup_prompts"] == 6
    assert summary["ttft_ms"]["median"] > 0 and summary["tpot_ms"]["median"] > 0
    assert "0 KV blocks still held, 0 compilations after ready" in printed
    assert bench.server_state("http://127.0.0.1:9") is None  # nothing listens: no leftovers


# -- bad input ----------------------------------------------------------------------------
def _junk(rng: random.Random, depth=0):
    kinds = [None, True, -1, 0, 2**63, -2**40, 1e308, -0.5, "", "x" * 3000, "\u00e9\ud7ff",
             [], {}, [1, 2, 3], {"a": [None]}, "5", 3.5, [[[]]], {"role": "user"}]
    v = rng.choice(kinds)
    if depth < 2 and rng.random() < 0.2:
        v = [_junk(rng, depth + 1) for _ in range(rng.randint(1, 3))]
    return v


FIELDS = {"/v1/completions": ["prompt", "max_tokens", "temperature", "top_p", "top_k", "n",
                              "stream", "stop", "logprobs", "seed", "echo", "logit_bias",
                              "stream_options", "best_of", "response_format", "min_tokens"],
          "/v1/chat/completions": ["messages", "max_tokens", "temperature", "n", "stream",
                                   "tools", "tool_choice", "logprobs", "top_logprobs",
                                   "response_format", "stop", "max_completion_tokens"],
          "/tokenize": ["prompt", "messages"], "/detokenize": ["tokens"],
          "/v1/embeddings": ["input", "encoding_format", "dimensions"]}
BASE = {"/v1/completions": {"prompt": "x", "max_tokens": 2},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "x"}],
                                 "max_tokens": 2},
        "/tokenize": {"prompt": "x"}, "/detokenize": {"tokens": [1]},
        "/v1/embeddings": {"input": "x"}}


def test_random_bad_input_never_crashes_the_server(srv):
    """Seeded random bodies (fields of wrong types and sizes, raw bytes, deep nesting) at
    every POST route: each answer is a 2xx or a 4xx error object, never a 500, and the
    engine keeps serving with no block held."""
    _ready(srv)
    rng = random.Random(7)
    statuses = []
    client = httpx.Client(timeout=60)  # one connection, kept alive
    for i in range(100):
        path = rng.choice(list(FIELDS))
        if i % 10 == 9:
            content = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        else:
            body = dict(BASE[path])
            for name in rng.sample(FIELDS[path], min(rng.randint(1, 3), len(FIELDS[path]))):
                body[name] = _junk(rng)
            if isinstance(body.get("n"), int) and body["n"] > 4:
                body["n"] = 4  # a valid n that large would only take long
            content = json.dumps(body).encode()
        r = client.post(f"{srv.url}{path}", content=content,
                        headers={"content-type": "application/json"})
        statuses.append(r.status_code)
        assert r.status_code < 500, (path, content[:300], r.text)
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
    client.close()
    assert sum(400 <= s < 500 for s in statuses) > 60  # the bodies were mostly bad
    assert srv.engine.error is None
    r = srv.client.completions.create(model=NAME, prompt="still here", max_tokens=3,
                                      temperature=0)
    assert r.usage.completion_tokens == 3
    stats = _idle_stats(srv)
    assert stats["free_blocks"] == stats["num_blocks"]


# -- SIGKILL, SIGTERM and the compilation cache ----------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# a small batch: few executables for `hpllm serve` to compile before it is ready
SMALL_BATCH = ("--kv-memory", "8", "--max-num-seqs", "2", "--max-num-batched-tokens", "16")


def cold_cache(root):
    """An $HPLLM_CACHE with an empty compilation cache: the downloads and the built C++
    kernels are this session's (linked), so only JAX has to start from nothing."""
    for name in ("models", "datasets", "kernels"):
        (cache_dir() / name).mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(cache_dir() / name, target_is_directory=True)
    return {"HPLLM_CACHE": str(root)}


@contextlib.contextmanager
def server_process(model_dir, *flags, port=None, env=None):
    """`hpllm serve MODEL_DIR` in a subprocess (stdout and stderr to a pipe), killed at the
    end if it still runs; yields (proc, url)."""
    port = port or _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hpllm.cli", "serve", str(model_dir),
                             "--port", str(port), "--served-model-name", NAME, *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "XLA_FLAGS": "", **(env or {})})
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_healthy(proc, url, timeout=240.0) -> None:
    """Until /health says ok (it answers 503 while the server compiles)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()
        with contextlib.suppress(httpx.HTTPError):
            if _get(f"{url}/health", timeout=1).status_code == 200:
                return
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.1)


def _first_tokens(url, n=3) -> int:
    """Stream a completion and read `n` chunks (then leave)."""
    got = 0
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "prompt": "Kill me softly", "max_tokens": 200, "ignore_eos": True,
            "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got == n:
                return got
    return got


def _drained_stream(proc, url) -> None:
    """SIGTERM in the middle of a stream: the stream still ends complete, the process 0."""
    text, finish, done, usage = "", None, False, None
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
            "prompt": "Drain me", "max_tokens": 200, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        for i, line in enumerate(r.iter_lines()):
            if i == 0:
                proc.send_signal(signal.SIGTERM)  # mid-stream
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[len("data: "):])
            for c in chunk["choices"]:
                text += c["text"]
                finish = c["finish_reason"] or finish
            usage = chunk.get("usage") or usage
    assert done and finish == "length" and usage["completion_tokens"] == 200
    assert proc.wait(timeout=60) == 0
    output = proc.stdout.read()
    assert '"event": "ready"' in output and '"event": "stopped"' in output, output
    with pytest.raises(httpx.ConnectError):
        _get(f"{url}/health", timeout=2)


def test_sigterm_drains_running_requests_and_exits_cleanly(model_dir):
    with server_process(model_dir, "--drain-timeout", "60", *SMALL_BATCH) as (proc, url):
        wait_healthy(proc, url)
        _drained_stream(proc, url)


@pytest.mark.slow  # two starts of a process, one of them compiling everything: ~110 s at load 8
def test_sigkill_cut_cache_entry_restart_then_sigterm_drains(model_dir, tmp_path):
    """`hpllm serve` as a process, start to end. Cold: it compiles (and writes the
    compilation cache) before /health is ok; killed with SIGKILL mid-stream; then one cache
    entry is cut short and an empty one added (what a kill inside JAX's cache write leaves).
    Restarted on the same port, it drops the broken entries, loads every other executable
    from the cache, recompiles the cut one, serves its first request, compiles nothing after
    ready; SIGTERM mid-stream then lets that stream finish and exits 0."""
    env = cold_cache(tmp_path)
    with server_process(model_dir, *SMALL_BATCH, env=env) as (proc, url):
        wait_healthy(proc, url)
        cold = _get(f"{url}/stats").json()
        assert cold["jax_cache"]["hit"] == 0 and cold["jax_cache"]["miss"] > 0, cold
        assert _first_tokens(url) == 3
        proc.kill()
        assert proc.wait(30) == -signal.SIGKILL
    entries = sorted((tmp_path / "jax").glob("*-cache"))
    assert len(entries) == cold["jax_cache"]["miss"]  # nothing compiled after ready
    cut = entries[len(entries) // 2]
    data = cut.read_bytes()
    cut.write_bytes(data[:len(data) // 3])
    empty = tmp_path / "jax" / "jit_step-0123456789abcdef-cache"
    empty.write_bytes(b"")
    port = int(url.rsplit(":", 1)[1])
    with server_process(model_dir, "--drain-timeout", "60", *SMALL_BATCH, port=port,
                        env=env) as (proc, url):
        wait_healthy(proc, url)
        r = _post(f"{url}/v1/completions", json={"prompt": "Back again", "max_tokens": 4,
                                                 "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        warm = _get(f"{url}/stats").json()
        # the warm-up met the same executables: all but the cut one came from the cache
        assert warm["jax_cache"] == {"hit": cold["jax_cache"]["miss"] - 1, "miss": 1}, warm
        assert warm["compilations_after_ready"] == {"engine": 0, "other": 0}, warm
        assert not empty.exists() and remove_broken_entries(tmp_path / "jax") == []
        _drained_stream(proc, url)


@pytest.mark.slow
def test_sigkill_while_the_cache_is_written_then_restart(model_dir, tmp_path):
    """A real kill during the cold warm-up, as soon as the first cache entry appears: the
    restart comes up, serves, and leaves no broken entry."""
    env = cold_cache(tmp_path)
    cache = tmp_path / "jax"
    with server_process(model_dir, *SMALL_BATCH, env=env) as (proc, url):
        deadline = time.monotonic() + 240
        while not any(cache.glob("*-cache")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        proc.kill()
        proc.wait(30)
    with server_process(model_dir, *SMALL_BATCH, env=env) as (proc, url):
        wait_healthy(proc, url)
        assert _first_tokens(url) == 3
        assert remove_broken_entries(cache) == []


# -- SmolLM2 (slow) -------------------------------------------------------------------------
def _leave_after_first_chunks(url, n: int, chunks: int = 2) -> int:
    """n streamed requests, one after another, each closed after `chunks` chunks (a client
    that goes away mid-stream); returns how many got that far."""
    left = 0
    for i in range(n):
        with httpx.stream("POST", f"{url}/v1/completions", timeout=600, json={
                "prompt": f"Client {i} will not wait for the end of", "max_tokens": 64,
                "ignore_eos": True, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: ") and line != "data: [DONE]"
                if got == chunks:
                    left += 1
                    break
    return left


@pytest.mark.slow
def test_smollm2_load_1000_requests_at_concurrency_64(tmp_path):
    """1,000 streamed requests at concurrency 64 through `hpllm bench serve`'s load
    generator, while 32 other clients leave mid-stream: 0 errors, every response complete,
    no KV block held afterwards (the leavers' freed too), 0 compilations after ready. Then
    SIGKILL and a restart on the same cache, which serves at once. Prints the start-up
    times to ready with an empty compilation cache, with the one the first start wrote, and
    after the kill."""
    env = cold_cache(tmp_path)
    times, port = [], _free_port()
    for attempt in ("cold", "warm", "after SIGKILL"):
        start = time.monotonic()
        with server_process("smollm2-135m", port=port, env=env) as (proc, url):
            wait_healthy(proc, url, timeout=900)
            times.append(time.monotonic() - start)
            if attempt == "warm":
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    leavers = pool.submit(_leave_after_first_chunks, url, 32)
                    summary = bench.bench_serve(url, num_prompts=1000, concurrency=64,
                                                prompt_len=(16, 96), output_len=(4, 24),
                                                seed=5, model=NAME, tokenizer="smollm2-135m",
                                                warmup_prompts=16)
                    assert leavers.result() == 32
                # the leavers' blocks too: server_state waited for the engine to go idle
                summary["server"] = bench.server_state(url)
                stats = _get(f"{url}/stats").json()
                proc.kill()  # mid-life, no drain: the restart must not find a broken cache
                assert proc.wait(30) == -signal.SIGKILL
            elif attempt == "after SIGKILL":
                assert _first_tokens(url) == 3
    print(f"\nstart-up to ready: cold {times[0]:.1f} s, warm {times[1]:.1f} s, after SIGKILL "
          f"{times[2]:.1f} s\n" + bench.format_summary(summary))
    assert summary["errors"] == 0, summary["first_errors"]
    assert summary["completed"] == 1000
    assert summary["output_tokens"] == sum(r["max_tokens"] for r in summary["per_request"])
    assert summary["server"] == {"kv_blocks_leaked": 0, "compilations_after_ready": 0,
                                 "pending": 0}, summary["server"]
    assert stats["aborts"] >= 32, stats

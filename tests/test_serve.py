"""The OpenAI-compatible server, started for real on a loopback port and driven with the
official `openai` client and raw httpx: results equal the offline engine's, bad input gets
4xx error objects and the server keeps serving, disconnects free KV blocks, metrics count
what was served, and a bounded load test completes without errors. Start-up, SIGKILL and
SIGTERM, and compilations: tests/test_serve_robustness.py.

The model is a random tiny Llama written as a Hugging Face directory with SmolLM2's real
tokenizer (and chat template), so the same directory serves in-process and via `hpllm serve`.
"""

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import save_file

from hpllm.checkpoints.gguf import read_gguf
from hpllm.checkpoints.registry import load_model, pull
from hpllm.checkpoints.tokenizer import tokenizer_from_gguf
from hpllm.config import EngineConfig
from hpllm.infer.async_engine import AsyncEngine
from hpllm.infer.engine import EngineCore
from hpllm.infer.llm import LLM
from hpllm.infer.sampling import SamplingParams
from hpllm.serve.workload import shakespeare_requests
from hpllm.serve import bench
from hpllm.serve.api import create_app
from llama_numpy import random_llama_tensors

CONTEXT = 512
ENGINE = EngineConfig(block_size=16, num_blocks=300, max_num_seqs=16, max_num_batched_tokens=256)
NAME = "tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 2-layer Llama with SmolLM2's tokenizer, as an HF directory."""
    tok = tokenizer_from_gguf(read_gguf(pull("smollm2-135m", quiet=True)).metadata)
    d = tmp_path_factory.mktemp("tiny-smol")
    V, D, L, H, K, F = tok.vocab_size, 64, 2, 4, 2, 128
    save_file(random_llama_tensors(np.random.default_rng(0), L=L, D=D, H=H, K=K, F=F, V=V),
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V,
        "hidden_size": D, "num_hidden_layers": L, "num_attention_heads": H,
        "num_key_value_heads": K, "intermediate_size": F, "max_position_embeddings": CONTEXT,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "float32"}))
    tok.hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tok.hf.id_to_token(tok.bos_id), "eos_token": tok.hf.id_to_token(tok.eos_id),
        "add_bos_token": tok.add_bos, "chat_template": tok.chat_template}))
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(str(model_dir), progress=False)


@pytest.fixture(scope="module")
def offline(model):
    return LLM(model, engine_config=ENGINE)


@contextlib.contextmanager
def running_server(model, engine_config=ENGINE, warmup=False, progress=None, **app_kw):
    """warmup, progress: AsyncEngine's (compile everything before ready)."""
    core = EngineCore(model.params, model.config, model.tokenizer, engine_config)
    engine = AsyncEngine(core, warmup=warmup, progress=progress)
    app = create_app(engine, model.tokenizer, NAME, **app_kw)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", engine=engine, core=core,
                              client=openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                                   api_key="none", max_retries=0))
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown()


@pytest.fixture(scope="module")
def srv(model):
    with running_server(model) as s:
        yield s


def _settled(url, timeout=30.0) -> dict:
    """The engine's stats once nothing is pending any more."""
    deadline = time.monotonic() + timeout
    while True:
        stats = _get(f"{url}/stats").json()
        if stats["pending"] == 0 and stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, f"requests still pending: {stats}"
        time.sleep(0.05)


def _all_blocks_free(s) -> None:
    stats = _settled(s.url)
    assert stats["free_blocks"] == stats["num_blocks"]
    s.core.blocks.check_no_leak()


def _post(url, **kw):  # generous timeouts: the first request of a shape compiles it
    return httpx.post(url, **{"timeout": 120, **kw})


def _get(url, **kw):
    return httpx.get(url, **{"timeout": 120, **kw})


@contextlib.contextmanager
def engine_paused_after(engine, tokens: int):
    """Hold the engine thread (in a step listener) once `tokens` more tokens have been
    generated, until the block exits: a request stays in flight for as long as a test needs,
    however fast the machine."""
    gate = threading.Event()
    start = engine.core.counters["generation_tokens"]

    def hold(core, outputs):
        if core.counters["generation_tokens"] - start >= tokens:
            gate.wait(60)

    engine.step_listeners.append(hold)
    try:
        yield
    finally:
        gate.set()
        engine.step_listeners.remove(hold)


PROMPTS = ["To be, or not to be", "The capital of France is", "Once upon a time, in a land",
           "ROMEO:\n", "1 2 3 4 5", "日本語のテキスト"]


# -- priority 1: completions and chat, streaming and not, equal to the offline engine --------
def test_completions_equal_the_offline_engine(srv, offline, model):
    tok = model.tokenizer
    max_tokens = [int(m) for m in np.random.default_rng(0).integers(1, 40, len(PROMPTS))]
    want = offline.generate([tok.encode(p) for p in PROMPTS],
                            [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens])

    def plain(i):
        return srv.client.completions.create(model=NAME, prompt=PROMPTS[i], temperature=0,
                                             max_tokens=max_tokens[i])

    def streamed(i):
        chunks = list(srv.client.completions.create(
            model=NAME, prompt=PROMPTS[i], temperature=0, max_tokens=max_tokens[i],
            stream=True, stream_options={"include_usage": True}))
        return chunks

    with ThreadPoolExecutor(8) as pool:  # concurrent, so the server batches them
        plains = list(pool.map(plain, range(len(PROMPTS))))
        streams = list(pool.map(streamed, range(len(PROMPTS))))
    for w, r, chunks in zip(want, plains, streams):
        out = w.outputs[0]
        assert r.choices[0].text == out.text
        assert r.choices[0].finish_reason == out.finish_reason
        assert r.usage.completion_tokens == len(out.token_ids)
        assert r.usage.prompt_tokens == len(w.prompt_token_ids)
        text_chunks = [c for c in chunks if c.choices]
        assert "".join(c.choices[0].text for c in text_chunks) == out.text
        assert text_chunks[-1].choices[0].finish_reason == out.finish_reason
        assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
            out.token_ids)
    # a batch of prompts in one request: choices in prompt order
    r = srv.client.completions.create(model=NAME, prompt=PROMPTS[:3], temperature=0,
                                      max_tokens=5)
    again = offline.generate([tok.encode(p) for p in PROMPTS[:3]],
                             SamplingParams(temperature=0, max_tokens=5))
    assert [c.text for c in r.choices] == [w.outputs[0].text for w in again]
    assert [c.index for c in r.choices] == [0, 1, 2]


def test_completion_logprobs_and_token_prompts(srv, offline, model):
    ids = model.tokenizer.encode("Wherefore art thou")
    r = srv.client.completions.create(model=NAME, prompt=ids, temperature=0, max_tokens=6,
                                      logprobs=3)
    w = offline.generate([ids], SamplingParams(temperature=0, max_tokens=6, logprobs=3))[0]
    lp = r.choices[0].logprobs
    out = w.outputs[0]
    np.testing.assert_allclose(lp.token_logprobs, [e["logprob"] for e in out.logprobs],
                               rtol=1e-5, atol=1e-5)
    assert lp.tokens == [model.tokenizer.decode([t]) for t in out.token_ids]
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    echo = srv.client.completions.create(model=NAME, prompt="Wherefore art thou",
                                         temperature=0, max_tokens=6, echo=True)
    assert echo.choices[0].text == "Wherefore art thou" + out.text


def _chat_ids(tok, messages):
    return tok.encode(tok.apply_chat_template(messages), special=True, bos=False)


def test_chat_equals_the_offline_engine(srv, offline, model):
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "Name a play."},
         {"role": "assistant", "content": "Hamlet."},
         {"role": "user", "content": [{"type": "text", "text": "Another one?"}]}],
    ]
    for messages in conversations:
        ids = _chat_ids(model.tokenizer, [{"role": m["role"], "content": m["content"] if
                                           isinstance(m["content"], str) else
                                           m["content"][0]["text"]} for m in messages])
        want = offline.generate([ids], SamplingParams(temperature=0, max_tokens=20))[0]
        out = want.outputs[0]
        r = srv.client.chat.completions.create(model=NAME, messages=messages, temperature=0,
                                               max_tokens=20)
        assert r.choices[0].message.content == out.text
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == out.finish_reason
        assert r.usage.prompt_tokens == len(ids)
        chunks = list(srv.client.chat.completions.create(
            model=NAME, messages=messages, temperature=0, max_tokens=20, stream=True,
            stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == out.text
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == out.finish_reason and not any(finishes[:-1])
        assert chunks[-1].usage.completion_tokens == len(out.token_ids)


def test_raw_stream_is_server_sent_events_ending_in_done(srv):
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        assert json.loads(e[len("data: "):])["object"] == "chat.completion.chunk"


def test_every_sampling_parameter_reaches_the_engine(srv, offline, model):
    prompt = "Now is the winter of our discontent"
    sp = SamplingParams(n=2, max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, min_p=0.01,
                        repetition_penalty=1.1, presence_penalty=0.3, frequency_penalty=0.2,
                        seed=1234, min_tokens=3, stop_token_ids=(5,), ignore_eos=True)
    want = offline.generate([model.tokenizer.encode(prompt)], sp)[0]
    r = srv.client.completions.create(
        model=NAME, prompt=prompt, n=2, max_tokens=12, temperature=0.9, top_p=0.9,
        presence_penalty=0.3, frequency_penalty=0.2, seed=1234,
        extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1, "min_tokens": 3,
                    "stop_token_ids": [5], "ignore_eos": True})
    assert [c.text for c in r.choices] == [o.text for o in want.outputs]
    assert r.choices[0].text != r.choices[1].text  # two different samples
    streamed = {0: "", 1: ""}
    for chunk in srv.client.completions.create(
            model=NAME, prompt=prompt, n=2, max_tokens=12, temperature=0.9, top_p=0.9,
            presence_penalty=0.3, frequency_penalty=0.2, seed=1234, stream=True,
            extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1,
                        "min_tokens": 3, "stop_token_ids": [5], "ignore_eos": True}):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[0], streamed[1]] == [o.text for o in want.outputs]


def test_stop_strings_cut_streams_like_whole_responses(srv, offline, model):
    prompt = "It was the best of times"
    full = offline.generate([model.tokenizer.encode(prompt)],
                            SamplingParams(temperature=0, max_tokens=30))[0].outputs[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3 and stop in full
    expected = full[:full.find(stop)]
    r = srv.client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=30,
                                      stop=[stop, "never-appears-here"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in srv.client.completions.create(
        model=NAME, prompt=prompt, temperature=0, max_tokens=30, stream=True,
        stop=[stop, "never-appears-here"]))
    assert streamed == expected


# -- priority 2: error objects; the server never falls over ---------------------------------
MB_PROMPT = "a" * (1 << 20)
BAD = [
    ("/v1/completions", b'{"prompt": "x",', 400, None),
    ("/v1/completions", b"", 400, None),
    ("/v1/completions", b"null", 400, None),
    ("/v1/completions", b'["prompt"]', 400, None),
    ("/v1/completions", b'{"prompt": "\xff\xfe invalid utf-8"}', 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": "16"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": 17}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2**70}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -7}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 2, "temperature": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**7]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": "1"}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "stream": True, "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"five": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**8]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [-3]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hello " * 600}, 400, "prompt"),
    ("/v1/completions", {"prompt": MB_PROMPT}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-5"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    # unknown top-level fields are ignored (tests/test_fields.py); a mistyped known one is not
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "metadata": "x"}, 400,
     "metadata"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": MB_PROMPT}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": -5}, 400, "max_tokens"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400,
     "prompt"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/v1/embeddings", {"input": ""}, 400, "input"),
]


@pytest.mark.parametrize("path,body,status,param", BAD,
                         ids=[f"{i}-{p}" for i, (p, *_) in enumerate(BAD)])
def test_bad_input_gets_an_error_object(srv, path, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = _post(f"{srv.url}{path}", headers={"content-type": "application/json"},
                   timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    assert _get(f"{srv.url}/health").status_code == 200


def test_server_keeps_serving_after_bad_input(srv):
    errors = _metric(srv.url, "hpllm:request_errors_total", status="400")
    too_big = _post(f"{srv.url}/v1/completions", content=b"x" * (9 << 20), timeout=60)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"
    wrong_method = _get(f"{srv.url}/v1/completions")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    for path, body, *_ in BAD[:12]:  # again, all at once
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        assert _post(f"{srv.url}{path}", **kw).status_code >= 400
    r = srv.client.completions.create(model=NAME, prompt="still here", max_tokens=3,
                                      temperature=0)
    assert r.usage.completion_tokens == 3
    _all_blocks_free(srv)
    assert _metric(srv.url, "hpllm:request_errors_total", status="400") - errors == 12
    assert _metric(srv.url, "hpllm:request_errors_total", status="413") >= 1


def test_queue_full_is_503(model):
    with running_server(model, max_pending=1) as s:
        with engine_paused_after(s.engine, 1):
            with httpx.stream("POST", f"{s.url}/v1/completions", timeout=60, json={
                    "prompt": "a long one", "max_tokens": 400, "ignore_eos": True,
                    "temperature": 0, "stream": True}) as long:
                next(long.iter_lines())  # it is running (and held there)
                r = _post(f"{s.url}/v1/completions", json={"prompt": "x",
                                                                   "max_tokens": 2})
                assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
                assert r.headers["retry-after"] == "1"
        _all_blocks_free(s)  # once it is gone, requests are taken again
        r = _post(f"{s.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200


# -- priority 3: metrics --------------------------------------------------------------------
def _metrics(url) -> dict:
    samples = {}
    for family in text_string_to_metric_families(_get(f"{url}/metrics").text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _metric(url, name, **labels) -> float:
    labels = {"model_name": NAME, **labels}
    return _metrics(url).get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_was_served(srv, model):
    names = ["hpllm:time_to_first_token_seconds", "hpllm:inter_token_latency_seconds",
             "hpllm:e2e_request_latency_seconds", "hpllm:request_queue_time_seconds"]
    before = _metrics(srv.url)
    prompts = ["Good morrow", "What light through yonder window breaks", "Alas"]
    usage = [srv.client.completions.create(model=NAME, prompt=p, max_tokens=7,
                                           temperature=0, extra_body={"ignore_eos": True}).usage
             for p in prompts]
    _settled(srv.url)
    after = _metrics(srv.url)
    lab = (("model_name", NAME),)

    def delta(name, labels=lab):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    for name in names:
        assert delta(name + "_count") == (len(prompts) * 6 if "inter_token" in name
                                          else len(prompts))
        assert delta(name + "_sum") >= 0
    assert delta("hpllm:prompt_tokens_total") == sum(u.prompt_tokens for u in usage)
    assert delta("hpllm:generation_tokens_total") == 7 * len(prompts)
    assert delta("hpllm:request_success_total",
                 (("finished_reason", "length"), ("model_name", NAME))) == len(prompts)
    assert delta("hpllm:prefix_cache_queries_total") > 0
    for gauge in ("hpllm:num_requests_running", "hpllm:num_requests_waiting",
                  "hpllm:kv_cache_usage_perc"):
        assert after[(gauge, lab)] == 0
    # the same prompt twice: its full blocks come from the prefix cache the second time
    long_prompt = "Friends, Romans, countrymen, lend me your ears; " * 4
    n_ids = len(model.tokenizer.encode(long_prompt))
    srv.client.completions.create(model=NAME, prompt=long_prompt, max_tokens=2)
    hits = _metric(srv.url, "hpllm:prefix_cache_hits_total")
    srv.client.completions.create(model=NAME, prompt=long_prompt, max_tokens=2)
    assert _metric(srv.url, "hpllm:prefix_cache_hits_total") - hits >= (n_ids - 1) // 16


def test_models_health_tokenize_detokenize(srv, model):
    assert [m.id for m in srv.client.models.list().data] == [NAME]
    assert _get(f"{srv.url}/health").json() == {"status": "ok"}
    text = "Shall I compare thee to a summer's day?"
    r = _post(f"{srv.url}/tokenize", json={"prompt": text}).json()
    assert r["tokens"] == model.tokenizer.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == CONTEXT
    assert _post(f"{srv.url}/detokenize",
                      json={"tokens": r["tokens"]}).json()["prompt"] == text
    messages = [{"role": "user", "content": "hi"}]
    r = _post(f"{srv.url}/tokenize", json={"messages": messages}).json()
    assert r["tokens"] == _chat_ids(model.tokenizer, messages)


# -- priority 4: disconnects ----------------------------------------------------
def test_client_disconnect_aborts_and_frees_blocks(srv):
    finished_before = _get(f"{srv.url}/stats").json()["finished_requests"]
    body = {"prompt": "A long, long story", "max_tokens": 480, "ignore_eos": True,
            "temperature": 0}
    with engine_paused_after(srv.engine, 3):
        with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True},
                          timeout=60) as r:
            got = []
            for line in r.iter_lines():
                got += [line] if line.startswith("data: ") else []
                if len(got) == 3:
                    break  # leaving the block closes the connection mid-stream
    assert len(got) == 3
    _all_blocks_free(srv)
    # not streaming: the client gives up waiting
    with engine_paused_after(srv.engine, 3), pytest.raises(httpx.ReadTimeout):
        _post(f"{srv.url}/v1/completions", json=body, timeout=0.5)
    _all_blocks_free(srv)
    stats = _get(f"{srv.url}/stats").json()
    assert stats["finished_requests"] == finished_before  # both were aborted, not finished


# -- priority 5: load -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def workload(model):
    return shakespeare_requests(model.tokenizer, 500, (8, 24), (2, 8), seed=3)


def _load_test(srv, requests, concurrency):
    results, duration = __import__("asyncio").run(
        bench.run_load(srv.url, NAME, requests, concurrency=concurrency))
    summary = bench.summarize(results, duration)
    print(f"\n{len(requests)} requests at concurrency {concurrency}:\n"
          + bench.format_summary(summary))
    assert summary["errors"] == 0, summary["first_errors"]
    assert all(r.ok and r.output_tokens == q.max_tokens for r, q in zip(results, requests))
    _all_blocks_free(srv)
    return summary


def test_load_64_requests_at_concurrency_16(srv, workload):
    summary = _load_test(srv, workload[:64], 16)
    assert summary["completed"] == 64
    assert summary["output_tokens"] == sum(r.max_tokens for r in workload[:64])


@pytest.mark.slow
def test_load_500_requests_at_concurrency_32(srv, workload):
    summary = _load_test(srv, workload, 32)
    assert summary["completed"] == 500


def test_speculative_server_equals_the_offline_engine(model, offline):
    # --speculative ngram: the running batch is decoded with prompt-lookup drafts; greedy
    # completions through the real client equal the plain offline engine's, streamed or not,
    # and /metrics counts the drafts.
    spec = EngineConfig(block_size=16, num_blocks=300, max_num_seqs=16,
                        max_num_batched_tokens=256, speculative="ngram")
    tok = model.tokenizer
    prompt = "to be or not to be, to be or not to be, to be or not"
    want = offline.generate([tok.encode(prompt)], SamplingParams(temperature=0, max_tokens=24,
                                                                 ignore_eos=True))[0]
    with running_server(model, spec) as s:
        got = s.client.completions.create(model=NAME, prompt=prompt, max_tokens=24,
                                          temperature=0, extra_body={"ignore_eos": True})
        streamed = "".join(c.choices[0].text for c in s.client.completions.create(
            model=NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) if c.choices)
        assert got.choices[0].text == want.outputs[0].text == streamed
        assert got.usage.completion_tokens == 24
        _all_blocks_free(s)
        drafts = _metric(s.url, "hpllm:spec_decode_num_draft_tokens_total")
        accepted = _metric(s.url, "hpllm:spec_decode_num_accepted_tokens_total")
        assert drafts > 0 and 0 <= accepted <= drafts
        assert drafts == s.core.stats()["spec_proposed"]

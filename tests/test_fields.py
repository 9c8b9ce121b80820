"""The request-field policy (hpllm.serve.fields) through the real `openai` client against a
real server: every field the installed client defines is declared; fields that change
nothing are accepted, change nothing, and are named in a response header and the log;
fields nobody defines are ignored the same way (as vLLM does); fields that cannot be honoured
are 400s naming them; a wrongly typed value of a known field is still a 400.
"""

import logging

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file
from openai.types import completion_create_params, embedding_create_params
from openai.types.chat import completion_create_params as chat_create_params

from hpllm.serve import fields
from hpllm.serve import protocol as P
from llama_numpy import llama_logits
from test_serve import NAME, model, model_dir, running_server  # noqa: F401 (fixtures)

MESSAGES = [{"role": "user", "content": "Name a colour."}]

# every OpenAI field that changes nothing here, with a value a client might send
NO_OPS = {"metadata": {"run": "7"}, "store": False, "service_tier": "auto", "user": "u-1",
          "prompt_cache_key": "k", "prompt_cache_options": {"mode": "implicit"},
          "prompt_cache_retention": "24h", "safety_identifier": "s-1",
          "reasoning_effort": "low", "verbosity": "low", "modalities": ["text"],
          "prediction": {"type": "content", "content": "Blue."}}


@pytest.fixture(scope="module")
def srv(model):  # noqa: F811
    with running_server(model) as s:
        yield s


def _keys(typed_dict) -> set[str]:
    return set(typed_dict.__required_keys__ | typed_dict.__optional_keys__)


@pytest.mark.parametrize("request_type,openai_params", [
    (P.CompletionRequest, completion_create_params.CompletionCreateParamsStreaming),
    (P.ChatCompletionRequest, chat_create_params.CompletionCreateParamsStreaming),
    (P.EmbeddingRequest, embedding_create_params.EmbeddingCreateParams),
])
def test_every_field_of_the_installed_client_is_declared(request_type, openai_params):
    # declared fields are typed (a wrong value is a 400) and have a treatment; an undeclared
    # OpenAI field would fall through to "unknown" and be ignored unchecked
    missing = _keys(openai_params) - set(request_type.model_fields)
    assert not missing, f"{request_type.__name__} lacks OpenAI's {sorted(missing)}"


def _chat(srv, **kw):
    raw = srv.client.chat.completions.with_raw_response.create(
        model=NAME, messages=MESSAGES, max_tokens=1, temperature=0, **kw)
    return raw.headers, raw.parse()


def test_no_op_fields_change_nothing_and_are_named(srv, caplog):
    headers, plain = _chat(srv)
    assert fields.IGNORED_HEADER not in headers
    with caplog.at_level(logging.INFO, logger="hpllm.serve"):
        headers, same = _chat(srv, **NO_OPS)
    assert same.choices[0].message.content == plain.choices[0].message.content
    named = headers[fields.IGNORED_HEADER].split(", ")
    assert sorted(named) == sorted(NO_OPS) and fields.UNKNOWN_HEADER not in headers
    # (this module's server skips the warm-up, so compilations after ready are logged too)
    logged = [r for r in caplog.records if r.name == "hpllm.serve"
              and "after ready" not in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.INFO
    assert all(name in logged[0].getMessage() for name in NO_OPS)


def test_unknown_fields_are_ignored_named_and_warned(srv, caplog):
    _, plain = _chat(srv)
    with caplog.at_level(logging.INFO, logger="hpllm.serve"):
        headers, same = _chat(srv, extra_body={"frequency": 1, "zz_vendor_hint": {"a": [1]},
                                               "bad\r\nname": 1})
    assert same.choices[0].message.content == plain.choices[0].message.content
    assert headers[fields.UNKNOWN_HEADER] == "bad\\r\\nname, frequency, zz_vendor_hint"
    assert headers[fields.IGNORED_HEADER] == headers[fields.UNKNOWN_HEADER]
    (record,) = [r for r in caplog.records if r.name == "hpllm.serve"]
    assert record.levelno == logging.WARNING and "zz_vendor_hint" in record.getMessage()


def test_streams_and_other_endpoints_name_ignored_fields_too(srv):
    with srv.client.chat.completions.with_streaming_response.create(
            model=NAME, messages=MESSAGES, max_tokens=1, stream=True, metadata={"a": "b"},
            stream_options={"include_usage": True, "include_obfuscation": False}) as raw:
        assert raw.headers[fields.IGNORED_HEADER] == (
            "metadata, stream_options.include_obfuscation")
        assert list(raw.iter_lines())
    raw = srv.client.embeddings.with_raw_response.create(model=NAME, input="x", user="u")
    assert raw.headers[fields.IGNORED_HEADER] == "user"
    r = httpx.post(f"{srv.url}/tokenize", json={"prompt": "x", "typo_field": 1}, timeout=60)
    assert r.status_code == 200 and r.headers[fields.UNKNOWN_HEADER] == "typo_field"


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"moderation": {"model": "omni-moderation-latest"}},
     "moderation"),
    ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"best_of": 1, "n": 2}, "best_of"),
    ("/v1/completions", {"best_of": 3, "stream": True}, "best_of"),
    ("/v1/completions", {"best_of": 3, "temperature": 0}, "best_of"),
    ("/v1/completions", {"echo": True, "max_tokens": 0, "stream": True}, "max_tokens"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),  # without echo: nothing to return
    # a wrongly typed value of a known field is a 400 whether or not the field is applied
    ("/v1/chat/completions", {"metadata": {"run": 7}}, "metadata"),
    ("/v1/chat/completions", {"store": "yes"}, "store"),
    ("/v1/chat/completions", {"modalities": "text"}, "modalities"),
    ("/v1/completions", {"user": 5}, "user"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": True, "typo": 1}},
     "stream_options.typo"),
])
def test_fields_that_cannot_be_honoured_are_400s_naming_them(srv, path, extra, param):
    body = {"messages": MESSAGES} if "chat" in path else {"prompt": "x"}
    r = httpx.post(f"{srv.url}{path}", json={**body, "max_tokens": 1, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_echo_with_logprobs_scores_the_prompt(srv, model, model_dir):  # noqa: F811
    """echo + logprobs (lm-evaluation-harness's loglikelihood request): the prompt's tokens
    lead, the first without a score, each other scored as the float64 reference does."""
    prompt = "The capital of France is Paris"
    ids = model.tokenizer.encode(prompt)
    r = srv.client.completions.create(model=NAME, prompt=prompt, echo=True, logprobs=2,
                                      max_tokens=1, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt) and len(lp.tokens) == len(ids) + 1
    assert lp.tokens[:len(ids)] == [model.tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    tensors = load_file(str(model_dir / "model.safetensors"))
    logits = llama_logits(tensors.__getitem__, n_layers=2, n_heads=4, n_kv_heads=2,
                          eps=1e-5, theta=10000.0, tokens=ids, tied=False)
    z = logits - logits.max(axis=1, keepdims=True)
    ref = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    want = [ref[j - 1, ids[j]] for j in range(1, len(ids))]
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], want, rtol=0, atol=1e-4)
    for j in range(1, len(ids)):  # the two most likely tokens, as the reference ranks them
        best = np.argsort(ref[j - 1])[::-1][:2]
        assert sorted(lp.top_logprobs[j].values(), reverse=True) == pytest.approx(
            ref[j - 1, best], abs=1e-4)
    # the generated token continues the list; a stream carries the same entries
    assert lp.token_logprobs[-1] == pytest.approx(ref[-1].max(), abs=1e-4)
    streamed = [c.choices[0].logprobs for c in srv.client.completions.create(
        model=NAME, prompt=prompt, echo=True, logprobs=2, max_tokens=1, temperature=0,
        stream=True) if c.choices]
    assert sum((c.tokens for c in streamed), []) == lp.tokens
    assert sum((c.token_logprobs for c in streamed), []) == lp.token_logprobs
    # max_tokens 0 with echo scores the prompt alone
    only = srv.client.completions.create(model=NAME, prompt=prompt, echo=True, logprobs=2,
                                         max_tokens=0)
    assert only.choices[0].text == prompt and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.token_logprobs == lp.token_logprobs[:len(ids)]
    assert only.choices[0].logprobs.tokens == lp.tokens[:len(ids)]


def test_best_of_keeps_the_best_per_token_logprob(srv):
    """best_of=4, n=2 returns the two of the four samples (the same four that n=4 with the
    same seed draws) with the highest mean token logprob, best first."""
    kw = dict(model=NAME, prompt="Once upon a time", max_tokens=6, seed=11, temperature=1.0)
    four = srv.client.completions.create(n=4, logprobs=0, **kw)

    def per_token(c):
        return np.mean(c.logprobs.token_logprobs)

    want = sorted(four.choices, key=per_token, reverse=True)[:2]
    assert [c.index for c in want] != [0, 1]  # (this seed) the first two are not the best
    best = srv.client.completions.create(n=2, best_of=4, **kw)
    assert [c.text for c in best.choices] == [c.text for c in want]
    assert [c.index for c in best.choices] == [0, 1]
    assert all(c.logprobs is None for c in best.choices)  # not asked for
    assert best.usage.completion_tokens == four.usage.completion_tokens  # all four sampled

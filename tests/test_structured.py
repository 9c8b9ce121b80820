"""Structured outputs: the token masks equal an independent reference (the prefixes of a
small regular language), the jitted sampler applies masks and logit_bias exactly, and through
the real `openai` client against a real server every constrained output parses and validates
(with `jsonschema`), greedy and sampled, n > 1, streamed, and ends when its grammar does; bad
constraints are 400s that change nothing.

The model has random weights (tests/test_serve.py's tiny Llama with SmolLM2's tokenizer): a
constraint must hold whatever the model prefers, so that is the point, not a limitation.
"""

import dataclasses
import itertools
import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import openai
import pytest

from hpllm.infer.llm import LLM
from hpllm.infer.sampling import SampleRow, SamplingError, SamplingParams, sample
from hpllm.infer.structured import (StructuredError, StructuredOutput, compile_grammar,
                                    fill_masks, unpack)
from hpllm.infer.text import check_single_stream
from test_serve import ENGINE, model, model_dir, running_server  # noqa: F401 - fixtures

SCHEMAS = {
    "person": {
        "type": "object", "additionalProperties": False,
        "required": ["name", "age", "address"],
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {"type": "object", "additionalProperties": False,
                        "required": ["city", "zip"],
                        "properties": {"city": {"enum": ["Oslo", "Lima", "Pune"]},
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}},
    "lists": {
        "type": "object", "additionalProperties": False, "required": ["tags", "grid"],
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                     "minItems": 1, "maxItems": 3},
            "grid": {"type": "array", "minItems": 2, "maxItems": 2,
                     "items": {"type": "array", "minItems": 0, "maxItems": 2,
                               "items": {"type": "integer", "minimum": -9, "maximum": 9}}}}},
    "variant": {
        "type": "object", "additionalProperties": False, "required": ["kind", "value", "ok"],
        "properties": {
            "kind": {"const": "point"},
            "value": {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5},
                                {"type": "null"},
                                {"type": "string", "pattern": "^[a-z]{1,3}$"}]},
            "ok": {"type": "boolean"}}},
    "word": {"type": "string", "pattern": "^[A-Z][a-z]{1,5}$"},
}
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def srv(model):  # noqa: F811 - the fixture imported above
    with running_server(model) as s:
        yield s


def _response_format(name):
    return {"type": "json_schema",
            "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def _valid(text, schema):
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# -- masks against an independent reference ----------------------------------------------------
def test_masks_equal_the_prefixes_of_the_language(model):  # noqa: F811
    """For the regex [0-9]{2}-(ab|cd) (a 200-string language), the allowed tokens after any
    prefix are exactly those whose text extends it to a prefix of some string, plus the end
    of text once the prefix is a whole string; the walk ends when nothing but the end fits."""
    tok, vocab = model.tokenizer, model.config.vocab_size
    language = {f"{a}{b}-{s}" for a in range(10) for b in range(10) for s in ("ab", "cd")}
    prefixes = {w[:i] for w in language for i in range(len(w) + 1)}
    texts = [b.decode("utf-8", "replace") if i not in tok.special_ids else None
             for i, b in enumerate(tok.token_bytes)]
    matcher = compile_grammar(tok, StructuredOutput("regex", r"[0-9]{2}-(ab|cd)"),
                              vocab).matcher()
    rng = np.random.default_rng(0)
    for walk in range(3):
        m, done = matcher.fork(), ""
        while True:
            expect = np.zeros(vocab, bool)
            expect[[i for i, t in enumerate(texts) if t and done + t in prefixes]] = True
            if done in language:
                expect[list(tok.stop_ids)] = True
            got = m.allowed(vocab)
            assert np.array_equal(got, expect), (done, np.nonzero(got ^ expect)[0][:5])
            if done in language and not any(p.startswith(done) and p != done
                                             for p in prefixes):
                assert m.done
                break
            token = int(rng.choice(np.nonzero(got & ~np.isin(np.arange(vocab),
                                                              list(tok.stop_ids)))[0]))
            assert m.advance(token) and not m.error
            done += texts[token]
        assert done in language


def test_packed_masks_unpack_in_the_jitted_sampler():
    """Odd vocabulary (37: two words, the second partly used): greedy takes the argmax of the
    allowed logits, sampling never draws a forbidden token, unconstrained rows are untouched,
    and logit_bias adds to the named logits."""
    rng = np.random.default_rng(1)
    vocab, rows = 37, 5
    logits = rng.standard_normal((rows, vocab)).astype(np.float32)
    allowed = rng.random((rows, vocab)) < 0.3
    allowed[:, 3] = True
    allowed[4] = True  # an unconstrained row
    words = np.zeros((rows, 2), np.uint32)
    for r, c in zip(*np.nonzero(allowed)):
        words[r, c // 32] |= np.uint32(1) << np.uint32(c % 32)
    mask = words.view(np.int32)
    assert np.array_equal(unpack(mask, vocab), allowed)

    def rows_of(params):
        return [SampleRow(params, seed, 0, 0, [1], []) for seed in range(rows)]

    greedy = sample(jnp.asarray(logits), rows_of(SamplingParams(temperature=0)), mask)
    assert np.array_equal(greedy.tokens, np.where(allowed, logits, -np.inf).argmax(-1))
    for step in range(20):
        rs = [SampleRow(SamplingParams(temperature=2.0, top_k=20), s, 0, step, [1], [])
              for s in range(rows)]
        drawn = sample(jnp.asarray(logits), rs, mask).tokens
        assert allowed[np.arange(rows), drawn].all()
    target = int(np.argmin(logits[0]))
    bias = SamplingParams(temperature=0, logit_bias={str(target): 100.0, "0": -100.0})
    biased = logits.copy()
    biased[:, target] += 100
    biased[:, 0] -= 100
    out = sample(jnp.asarray(logits), rows_of(bias)).tokens
    assert np.array_equal(out, biased.argmax(-1)) and (out == target).all()


def test_bad_constraints_and_params_are_refused(model):  # noqa: F811
    tok, vocab = model.tokenizer, model.config.vocab_size
    bad = [(StructuredOutput("json_schema", '{"type": "objectx"}'), "objectx"),
           (StructuredOutput("json_schema", '{"type": "array", "uniqueItems": true}'),
            "uniqueItems"),
           (StructuredOutput("json_schema", "{nope"), "not valid JSON"),
           (StructuredOutput("regex", "a("), "regex"),
           (StructuredOutput("grammar", "start: missing_rule"), "missing_rule"),
           (StructuredOutput("choice", "[]"), "non-empty list"),
           (StructuredOutput("yaml", ""), "unknown structured output kind")]
    for so, words in bad:
        with pytest.raises(StructuredError, match=re.escape(words)):
            compile_grammar(tok, so, vocab)
    # strict=False: an unimplemented keyword is ignored rather than refused
    compile_grammar(tok, StructuredOutput("json_schema", '{"type": "array", "uniqueItems": '
                                                         'true}', strict=False), vocab)
    for bias, words in [({"5": 101.0}, "[-100, 100]"), ({str(vocab): 1.0}, "not a token id"),
                        ({str(i): 1.0 for i in range(301)}, "at most 300")]:
        with pytest.raises(SamplingError, match=re.escape(words)):
            SamplingParams(logit_bias=bias).validate(vocab)
    with pytest.raises(SamplingError, match="structured"):
        check_single_stream(SamplingParams(structured=StructuredOutput("json_object")))


def test_a_completed_grammar_ends_the_request_and_prefixes_are_shared(srv):
    """A completed grammar ends the request with "stop" well before max_tokens; the second of
    two equal requests reuses the first's prompt blocks and gives the same greedy text."""
    prompt = "Answer with one word of the list: " * 4  # > one KV block, shareable
    kw = dict(model="tiny", prompt=prompt, temperature=0, max_tokens=50,
              extra_body={"guided_choice": ["alpha", "beta", "gamma"]})
    first = srv.client.completions.create(**kw)
    second = srv.client.completions.create(**kw)
    c = first.choices[0]
    assert c.text in ("alpha", "beta", "gamma") and c.finish_reason == "stop"
    assert first.usage.completion_tokens < 10 and second.choices[0].text == c.text
    assert srv.engine.stats["prefix_hits"] > 0


# -- the server, through the openai client -----------------------------------------------------
@pytest.mark.parametrize("name", ["person", "lists", "variant", "word"])
def test_chat_json_schema_outputs_validate_greedy_and_sampled(srv, name):
    schema = SCHEMAS[name]
    messages = [{"role": "user", "content": f"Give me a {name} as JSON."}]
    greedy = srv.client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_tokens=MAX_TOKENS,
        response_format=_response_format(name))
    c = greedy.choices[0]
    assert c.finish_reason == "stop", c.message.content
    _valid(c.message.content, schema)
    sampled = srv.client.chat.completions.create(
        model="tiny", messages=messages, temperature=1.0, seed=7, n=3, max_tokens=MAX_TOKENS,
        response_format=_response_format(name))
    assert len(sampled.choices) == 3
    for c in sampled.choices:
        assert c.finish_reason == "stop", c.message.content
        _valid(c.message.content, schema)


def test_completions_with_every_spelling_of_a_schema(srv):
    """response_format, structured_outputs.json and guided_json reach the same constraint:
    with one seed they give the same text, and it validates."""
    schema = SCHEMAS["person"]
    texts = []
    for extra in ({"response_format": _response_format("person")},
                  {"structured_outputs": {"json": schema}}, {"guided_json": schema},
                  {"guided_json": json.dumps(schema)}):
        out = srv.client.completions.create(model="tiny", prompt="A person:", seed=3,
                                            temperature=0.9, max_tokens=MAX_TOKENS,
                                            extra_body=extra)
        assert out.choices[0].finish_reason == "stop"
        texts.append(out.choices[0].text)
        _valid(texts[-1], schema)
    assert len(set(texts)) == 1


def test_streamed_structured_output_equals_the_whole_response(srv):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Lists please."}],
              temperature=1.0, seed=11, max_tokens=MAX_TOKENS,
              response_format=_response_format("lists"))
    whole = srv.client.chat.completions.create(**kw).choices[0]
    chunks = list(srv.client.chat.completions.create(stream=True, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert text == whole.message.content and finish[-1] == "stop"
    _valid(text, SCHEMAS["lists"])


def test_json_object_regex_and_choice(srv):
    # a random model writes endless strings (its logits spread over ~35 units): the largest
    # bias towards closing them lets the object end within max_tokens, while the grammar
    # keeps every token valid whatever the bias
    closing = {str(srv.core.tokenizer.token_id(t)): 100.0 for t in ('"', '",', '"}', "}", "]")}
    for seed in range(3):
        obj = srv.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "JSON object please"}],
            temperature=1.0, seed=seed, max_tokens=MAX_TOKENS, logit_bias=closing,
            response_format={"type": "json_object"})
        assert obj.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for extra in ({"guided_regex": pattern}, {"structured_outputs": {"regex": pattern}}):
        out = srv.client.completions.create(model="tiny", prompt="Code:", temperature=1.0,
                                            seed=5, n=2, max_tokens=20, extra_body=extra)
        for c in out.choices:
            assert re.fullmatch(pattern, c.text) and c.finish_reason == "stop", c.text
    choices = ["yes", "no", "maybe so"]
    for seed, extra in zip(range(6), itertools.cycle(
            [{"guided_choice": choices}, {"structured_outputs": {"choice": choices}}])):
        out = srv.client.completions.create(model="tiny", prompt="Well?", temperature=1.5,
                                            seed=seed, max_tokens=10, extra_body=extra)
        assert out.choices[0].text in choices
    lark = 'start: "(" num ("," num)* ")"\nnum: /[1-9]/'
    gbnf = 'root ::= "(" num ("," num)* ")"\nnum ::= [1-9]'
    for grammar, extra in ((lark, "guided_grammar"), (gbnf, "structured_outputs")):
        body = {extra: grammar} if extra == "guided_grammar" else {extra: {"grammar": grammar}}
        out = srv.client.completions.create(model="tiny", prompt="Tuple:", temperature=1.0,
                                            seed=2, max_tokens=60, extra_body=body)
        c = out.choices[0]
        assert re.fullmatch(r"\([1-9](,[1-9])*\)", c.text) and c.finish_reason == "stop", c.text


@pytest.mark.parametrize("extra, words", [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "objectx"),
    ({"guided_regex": "a("}, "regex"),
    ({"guided_grammar": "start: nowhere"}, "nowhere"),
    ({"guided_choice": []}, "non-empty"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "give one"),
    ({"response_format": {"type": "json_schema"}}, "needs a json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_bad_constraints_are_400_and_change_nothing(srv, extra, words):
    before = srv.engine.stats
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.completions.create(model="tiny", prompt="x", max_tokens=5, extra_body=extra)
    assert words in str(e.value)
    after = srv.engine.stats
    assert after["prompt_tokens"] == before["prompt_tokens"] and after["running"] == 0


@pytest.mark.slow  # two engines, each compiling its own shapes: ~25 s
def test_speculative_engine_decodes_constrained_rows_plainly(model):  # noqa: F811
    """With prompt-lookup speculation on, a constrained request (which does not speculate)
    batched beside one that does gives the same greedy text as without speculation, and
    validates; the unconstrained neighbour still drafts."""
    tok = model.tokenizer
    prompt = tok.encode("to be or not to be, to be or not to be, to be or not")
    so = StructuredOutput("json_schema", json.dumps(SCHEMAS["variant"]))
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured=so),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)]
    texts = {}
    for speculative in ("", "ngram"):
        llm = LLM(model, engine_config=dataclasses.replace(ENGINE, speculative=speculative))
        outs = llm.generate([prompt, prompt], params)
        texts[speculative] = [o.outputs[0].text for o in outs]
        assert outs[0].outputs[0].finish_reason == "stop"
        _valid(texts[speculative][0], SCHEMAS["variant"])
    assert texts[""] == texts["ngram"]
    assert llm.engine.stats()["spec_proposed"] > 0

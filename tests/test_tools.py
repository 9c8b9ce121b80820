"""Tool calls: the parser on crafted model outputs (whole and streamed prefix by prefix), the
prompt rendering (fallback and template-native), the forcing grammar walked at random, and
the real server driven by the `openai` client: forced calls always parse and validate with
`jsonschema`, a streamed call reassembles to the non-streamed one, the tool round trip is
accepted, and bad tool input is a 400 that changes nothing.

The server's model is test_serve's random tiny Llama with SmolLM2's real tokenizer, whose
template does not read `tools` (so the fallback prompt is what it sees).
"""

import json

import jsonschema
import numpy as np
import openai
import pytest

from hpllm.checkpoints.registry import load_model
from hpllm.checkpoints.tokenizer import TextTokenizer
from hpllm.infer.structured import compile_grammar
from hpllm.serve import tools as T
from test_serve import NAME, _post, _settled, model_dir, srv  # noqa: F401 - fixtures

CONTEXT = 2048  # the fallback prompt of three tools alone is ~600 tokens


@pytest.fixture(scope="module")
def model(model_dir, tmp_path_factory):  # test_serve's `srv` serves this one
    """test_serve's tiny model (same files) with a longer context."""
    d = tmp_path_factory.mktemp("tiny-smol-long")
    for f in model_dir.iterdir():
        (d / f.name).symlink_to(f)
    config = json.loads((model_dir / "config.json").read_text())
    (d / "config.json").unlink()
    (d / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    return load_model(str(d), progress=False)


WEATHER = {"name": "get_weather", "description": "Current weather of a city.", "parameters": {
    "type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}}  # other keys allowed, but not generated when forced
TRIP = {"name": "book_trip", "parameters": {
    "type": "object", "properties": {
        "travellers": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 10},
                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["name", "age"], "additionalProperties": False}},
        "class": {"enum": ["economy", "business"]},
        "dates": {"type": "object", "properties": {
            "from": {"type": "string", "pattern": "^2026-[01][0-9]-[0-3][0-9]$"}},
            "required": ["from"], "additionalProperties": False}},
    "required": ["travellers", "class", "dates"], "additionalProperties": False}}
COLOR = {"name": "set_color", "parameters": {  # $refs into its own $defs
    "$defs": {"level": {"type": "integer", "minimum": 0, "maximum": 255}},
    "type": "object", "properties": {c: {"$ref": "#/$defs/level"} for c in "rgb"},
    "required": ["r", "g", "b"], "additionalProperties": False}}
FUNCTIONS = [WEATHER, TRIP, COLOR]
TOOLS = [{"type": "function", "function": f} for f in FUNCTIONS]
SCHEMA = {f["name"]: f["parameters"] for f in FUNCTIONS}
ASK = [{"role": "user", "content": "Book a trip to Oslo for two, and tell me the weather."}]


def _plan(choice="auto", parallel=True):
    if choice in ("auto", "required"):
        return T.ToolPlan(tuple(FUNCTIONS), choice, None, parallel)
    return T.ToolPlan(tuple(FUNCTIONS), "named", choice, parallel)


def _valid(name, arguments):
    """Forced arguments match the schema and hold no key the schema does not list."""
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMA[name])
    assert set(args) <= set(SCHEMA[name]["properties"])


# -- the parser, no model --------------------------------------------------------------------
W = '{"city": "Oslo", "unit": "celsius"}'
CRAFTED = [  # (model output, parallel) -> (content, [(name, arguments)])
    ("Just text, no call.", True, "Just text, no call.", []),
    (f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {W}}}\n</tool_call>',
     True, "Let me check.", [("get_weather", W)]),
    (f'<tool_call>\n{{"name": "get_weather", "arguments": {W}}}\n</tool_call>\n<tool_call>\n'
     '{"name": "set_color", "arguments": {"r": 1, "g": 2, "b": 3}}\n</tool_call>', True, None,
     [("get_weather", W), ("set_color", '{"r": 1, "g": 2, "b": 3}')]),
    (f'<tool_call>{{"name": "get_weather", "arguments": {W}}}</tool_call> and '
     '<tool_call>{"name": "set_color", "arguments": {}}</tool_call>', False, None,
     [("get_weather", W)]),  # one call at most: the rest is dropped
    ('<tool_call>{"arguments": {"r": 1}, "name": "set_color"}</tool_call>', True, None,
     [("set_color", '{"r": 1}')]),  # keys in another order: parsed whole
    ('A <tool_call>{"name": "rm_rf", "arguments": {}}</tool_call> B', True,
     'A <tool_call>{"name": "rm_rf", "arguments": {}}</tool_call> B', []),  # not a tool
    ("<tool_call>{not json}</tool_call>", True, "<tool_call>{not json}</tool_call>", []),
    ('x <tool_call>\n{"name": "get_weather", "arguments": {"city": "Os', True, "x",
     [("get_weather", '{"city": "Os')]),  # cut short by max_tokens
    ('<tool_call>{"name": "set_color", "arguments": {"r": "}\\"{", "g": [1, {"x": 2}]}} '
     "</tool_call>", True, None, [("set_color", '{"r": "}\\"{", "g": [1, {"x": 2}]}')]),
    ("a <tool_ca", True, "a <tool_ca", []),
]


@pytest.mark.parametrize("text,parallel,content,calls", CRAFTED)
def test_parse_crafted_outputs(text, parallel, content, calls):
    parsed = T.parse(text, _plan("auto", parallel), final=True)
    assert parsed.content(True) == content
    assert [(c.name, c.arguments) for c in parsed.calls] == calls
    assert T.finish_reason(parsed, "stop") == ("tool_calls" if calls else "stop")
    assert T.finish_reason(parsed, "length") == "length"


@pytest.mark.parametrize("text,parallel,content,calls", CRAFTED)
def test_stream_of_every_prefix_reassembles_to_the_parse(text, parallel, content, calls):
    """Fed one character at a time, the deltas add up to the whole parse, a call's first
    delta names it, and held-back text never leaks a piece of the call syntax."""
    stream = T.CallStream(_plan("auto", parallel))
    sent, got = "", {}
    for end in range(1, len(text) + 1):
        new, deltas = stream.update(text[:end], final=end == len(text))
        sent += new
        if end < len(text):  # the call syntax shows only in content that keeps it
            assert "<tool_c" not in sent or "<tool_call>" in (content or "")
        for d in deltas:
            if d["index"] not in got:
                assert d["id"].startswith("call_") and d["type"] == "function"
                got[d["index"]] = [d["function"]["name"], ""]
            got[d["index"]][1] += d["function"]["arguments"]
    assert (sent or None) == content
    assert [tuple(got[i]) for i in sorted(got)] == calls


def test_held_text_is_released_when_it_is_not_a_call():
    stream = T.CallStream(_plan())
    assert stream.update("Hello <tool_", False)[0] == "Hello"
    assert stream.update("Hello <tool_x", False)[0] == " <tool_x"


def test_fallback_rendering_of_tools_and_history():
    p = _plan("required", False)
    history = [{"role": "system", "content": "Be brief."}, *ASK,
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c1", "name": "get_weather", "arguments": W},
                   {"id": "c2", "name": "set_color", "arguments": '{"r":1,"g":2,"b":3}'}]},
               {"role": "tool", "content": "12 C", "tool_call_id": "c1"},
               {"role": "tool", "content": "done", "tool_call_id": "c2"}]
    messages, tools = T.conversation(history, p, native=False)
    assert tools is None
    assert messages[0] == {"role": "system", "content": "Be brief.\n\n" + T.fallback_prompt(p)}
    assert "You must call at least one function. Make one call at most." in messages[0]["content"]
    for f in FUNCTIONS:
        assert json.dumps({"type": "function", "function": f}) in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": T.call_text("get_weather", W) + "\n"
                           + T.call_text("set_color", '{"r": 1, "g": 2, "b": 3}')}
    assert messages[3] == {"role": "user", "content": "<tool_response>\n12 C\n</tool_response>"
                           "\n<tool_response>\ndone\n</tool_response>"}
    assert len(messages) == 4
    # the history's calls are written exactly as the parser reads them back
    parsed = T.parse(messages[2]["content"], _plan(), final=True)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("get_weather", json.loads(W)), ("set_color", {"r": 1, "g": 2, "b": 3})]


def test_native_template_gets_tools_and_hf_messages(model):
    template = ("{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                "{% for c in m.tool_calls or [] %}{{ c.function.name }}"
                "{{ c.function.arguments.city }}{% endfor %}{% endfor %}")
    tok = TextTokenizer(model.tokenizer.hf, chat_template=template)
    assert tok.template_takes_tools and not model.tokenizer.template_takes_tools
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "name": "get_weather", "arguments": W}]},
        {"role": "tool", "content": "12 C", "tool_call_id": "c1"}]
    messages, tools = T.conversation(history, _plan(), native=True)
    assert tools == TOOLS
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == json.loads(W)
    assert tok.apply_chat_template(messages, False, tools=tools) == (
        "[get_weather][book_trip][set_color]<user>" + ASK[0]["content"]
        + "<assistant>get_weatherOslo<tool>12 C")


def test_forced_objects_are_closed_where_the_schema_is_silent():
    point = {"type": "object", "properties": {"x": {"type": "number"}}}
    schema = {"type": "object", "properties": {"a": point, "b": {"items": point}},
              "anyOf": [point], "$defs": {"p": point},
              "additionalProperties": {"type": "object", "properties": {}}}
    closed = {**point, "additionalProperties": False}
    assert T._closed(schema) == {"type": "object", "properties": {"a": closed,
                                 "b": {"items": closed}}, "anyOf": [closed],
                                 "$defs": {"p": closed}, "additionalProperties": {
                                     "type": "object", "properties": {},
                                     "additionalProperties": False}}
    open_ = {"properties": {}, "patternProperties": {"^x": {}}}
    assert T._closed(open_) == open_ and T._closed(True) is True


@pytest.mark.parametrize("choice,parallel", [("required", True), ("required", False),
                                             ("book_trip", True), ("set_color", False)])
def test_forcing_grammar_admits_only_valid_calls(model, choice, parallel):
    """Random walks through the grammar's allowed tokens end, and every one is a call (one,
    unless parallel) whose arguments validate."""
    tok, vocab = model.tokenizer, model.config.vocab_size
    p = T.plan(FUNCTIONS, choice, parallel, tok, vocab)
    grammar = compile_grammar(tok, T.constraint(p), vocab)
    rng = np.random.default_rng(len(choice) + parallel)
    for _ in range(6):
        matcher, ids = grammar.matcher(), []
        while not matcher.done:
            ids.append(int(rng.choice(np.flatnonzero(matcher.allowed(vocab)))))
            assert matcher.advance(ids[-1]) and len(ids) < 2000
        parsed = T.parse(tok.decode(ids), p, final=True)
        assert parsed.content(True) is None and parsed.calls
        assert parallel or len(parsed.calls) == 1
        for c in parsed.calls:
            assert choice == "required" or c.name == choice
            _valid(c.name, c.arguments)


# -- through the server ----------------------------------------------------------------------
def _calls(choice):
    return [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]


def _check_forced(choices, named, parallel):
    for choice in choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        calls = _calls(choice)
        assert calls and (parallel or len(calls) == 1)
        for name, arguments in calls:
            assert name == named or (named is None and name in SCHEMA)
            _valid(name, arguments)
        assert all(c.id.startswith("call_") and c.type == "function"
                   for c in choice.message.tool_calls)


@pytest.mark.parametrize("tool_choice,parallel,tools", [
    ("required", False, TOOLS), ({"type": "function", "function": {"name": "book_trip"}},
                                 False, TOOLS),
    ("required", True, [TOOLS[0], TOOLS[2]])])
def test_forced_calls_always_parse_and_validate(srv, tool_choice, parallel, tools):
    named = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
    kw = dict(model=NAME, messages=ASK, tools=tools, tool_choice=tool_choice,
              max_tokens=CONTEXT - 700, parallel_tool_calls=parallel)
    answers = [srv.client.chat.completions.create(**kw, temperature=0)]
    answers += [srv.client.chat.completions.create(**kw, temperature=1.0, seed=seed)
                for seed in (1, 2)]
    _check_forced([a.choices[0] for a in answers], named, parallel)


@pytest.mark.slow  # n > 1 compiles another batch shape
def test_forced_calls_with_several_choices(srv):
    r = srv.client.chat.completions.create(
        model=NAME, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0,
        seed=7, n=3, max_tokens=CONTEXT - 700)
    _check_forced(r.choices, None, True)
    assert len({c.message.tool_calls[0].id for c in r.choices}) == 3


def _streamed(srv, **kw):
    """A stream's (content, [(name, arguments)], finish_reason, deltas per call)."""
    content, calls, finish, pieces = "", {}, None, {}
    for chunk in srv.client.chat.completions.create(**kw, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or ():
            if d.index not in calls:  # the call's first delta names it
                assert d.id.startswith("call_") and d.type == "function" and d.function.name
                calls[d.index] = [d.function.name, ""]
            else:
                assert d.id is None and d.function.name is None
            calls[d.index][1] += d.function.arguments or ""
            pieces[d.index] = pieces.get(d.index, 0) + 1
        finish = chunk.choices[0].finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish, pieces


def test_streamed_call_reassembles_to_the_same_call(srv):
    kw = dict(model=NAME, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0,
              seed=11, max_tokens=CONTEXT - 700)
    whole = srv.client.chat.completions.create(**kw)
    content, calls, finish, pieces = _streamed(srv, **kw)
    assert content == "" and finish == "tool_calls"
    assert calls == _calls(whole.choices[0])
    assert max(pieces.values()) > 1  # arguments arrive as they are generated
    # auto, and the model answers in text: the same text as without streaming
    kw = dict(model=NAME, messages=ASK, tools=TOOLS, temperature=0, max_tokens=24)
    whole = srv.client.chat.completions.create(**kw).choices[0]
    content, calls, finish, _ = _streamed(srv, **kw)
    assert (content, calls, finish) == (whole.message.content, [], whole.finish_reason)
    assert not whole.message.tool_calls and content


def test_tool_round_trip_is_accepted_and_rendered(srv, model):
    """The client's own response message goes back as history (with the nulls the client
    adds), then the tool's result; the prompt is the documented fallback rendering."""
    first = srv.client.chat.completions.create(
        model=NAME, messages=ASK, tools=TOOLS, temperature=0, max_tokens=CONTEXT - 700,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = first.choices[0].message
    call = message.tool_calls[0]
    history = [*ASK, message, {"role": "tool", "tool_call_id": call.id, "content": "12 C"}]
    r = srv.client.chat.completions.create(model=NAME, messages=history, tools=TOOLS,
                                           temperature=0, max_tokens=8)
    as_given = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": call.id, "name": "get_weather", "arguments": call.function.arguments}]},
        {"role": "tool", "content": "12 C", "tool_call_id": call.id}]
    want = model.tokenizer.apply_chat_template(T.conversation(
        as_given, T.plan(FUNCTIONS, None, None, model.tokenizer, model.config.vocab_size),
        native=False)[0])
    assert "<tool_response>\n12 C\n</tool_response>" in want and "get_weather" in want
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(want, special=True, bos=False))
    # tool_choice "none": the tools are not rendered (the history still is)
    none = srv.client.chat.completions.create(model=NAME, messages=history, tools=TOOLS,
                                              tool_choice="none", temperature=0, max_tokens=8)
    without = model.tokenizer.apply_chat_template(T.conversation(as_given, None, False)[0])
    assert none.usage.prompt_tokens == len(model.tokenizer.encode(without, special=True,
                                                                  bos=False))
    assert none.choices[0].message.tool_calls is None
    # /tokenize renders such a history the same way
    tokens = _post(f"{srv.url}/tokenize", json={"messages": [
        *ASK, message.model_dump(), history[-1]]}).json()
    assert tokens["count"] == none.usage.prompt_tokens
    # a call cut off by max_tokens comes back as the text it was (OpenAI accepts any string)
    cut = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
           "function": {"name": "get_weather", "arguments": '{"city": "Par'}}]}
    r = srv.client.chat.completions.create(model=NAME, messages=[*ASK, cut], tools=TOOLS,
                                           temperature=0, max_tokens=2)
    rendered = model.tokenizer.apply_chat_template(T.conversation(
        [*ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "name": "get_weather", "arguments": '{"city": "Par'}]}],
        T.plan(FUNCTIONS, None, None, model.tokenizer, model.config.vocab_size),
        native=False)[0])
    assert '"arguments": {"city": "Par}' in rendered
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(rendered, special=True,
                                                               bos=False))


BAD = [  # (what changes in the request, the words the 400 must contain)
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice names the function 'nope'"),
    (dict(tools=None, tool_choice="required"), "tool_choice needs tools"),
    (dict(tools=None, parallel_tool_calls=False), "parallel_tool_calls needs tools"),
    (dict(tool_choice="required", response_format={"type": "json_object"}),
     "response_format cannot be combined with a tool_choice that forces a call"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}]),
     "tools[0].function.parameters is not a usable JSON schema"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string"}}}]), "must be a JSON schema of an object"),
    (dict(tools=TOOLS + TOOLS[:1]), "'get_weather' is defined twice"),
    (dict(tools=[{"type": "function", "function": {"name": "get weather"}}]),
     "is not a function name"),
    (dict(messages=ASK + [{"role": "tool", "content": "12 C"}]),
     "a tool message needs tool_call_id"),
]


@pytest.mark.parametrize("change,words", BAD)
def test_bad_tool_input_is_a_400_that_changes_nothing(srv, change, words):
    before = _settled(srv.url)
    kw = {"model": NAME, "messages": ASK, "tools": TOOLS, "max_tokens": 4, **change}
    kw = {k: v for k, v in kw.items() if v is not None}
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.chat.completions.create(**kw)
    assert words in e.value.body["message"], e.value.body
    after = _settled(srv.url)
    assert {k: after[k] for k in ("free_blocks", "prompt_tokens", "steps")} == {
        k: before[k] for k in ("free_blocks", "prompt_tokens", "steps")}

"""Tool (function) calling for chat completions: checking a request's tools, rendering them
into the prompt, constraining the output when a call is required, and parsing calls out of
the text, whole or while it streams.

Calls are written Hermes-style (Qwen2.5, Hermes, SmolLM3 use it), one per tag:
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Oslo"}}
    </tool_call>
Tools reach the model through the chat template when it reads a `tools` variable, else
through `fallback_prompt` in the system message. `tool_choice` "required" or a named
function is enforced by a Lark grammar (`constraint`): the call's frame is literal text and
each tool's arguments are `%json` of its parameters schema (its own root, so `$ref`s to its
`$defs` resolve). "auto" leaves the text free and parses whatever calls it holds.

One parser (`parse`) serves both responses and streams: a stream re-parses the text so far
and sends what grew (`CallStream`), so a streamed call reassembles to the non-streamed one.
The parse of a prefix only ever grows, because text is held back while it could still turn
into a call: a tail of plain text that could begin `<tool_call>`, and an open call until its
`{"name": "...", "arguments": ` head is complete (then argument text is sent as it comes)
or, for a call written any other way, until its closing tag.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass

from hpllm.infer.structured import (JSON_WHITESPACE, StructuredError, StructuredOutput,
                                    compile_grammar)

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_CALLS = 8  # calls per answer when a call is forced and parallel calls are allowed
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
# the head of a call written in the expected key order; the arguments follow it
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


class ToolError(ValueError):
    """Tools, tool_choice or a tool message that cannot be used; names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolPlan:
    """What a request asked of tools (tool_choice "none" makes no plan)."""
    functions: tuple[dict, ...]  # {"name", "description", "parameters"} per tool
    choice: str  # "auto" | "required" | "named"
    named: str | None = None  # the function tool_choice names
    parallel: bool = True  # more than one call per answer

    @functools.cached_property  # read on every streamed delta (parse)
    def names(self) -> frozenset[str]:
        return frozenset(f["name"] for f in self.functions)

    @property
    def enforced(self) -> bool:
        return self.choice != "auto"


def plan(functions: list[dict] | None, tool_choice, parallel: bool | None, tokenizer,
         vocab_size: int) -> ToolPlan | None:
    """The request's tool plan, or None when no tools apply. `functions`: the tools' function
    objects; `tool_choice`: None, "none", "auto", "required" or a function name. Every
    parameters schema is compiled (and cached) for this tokenizer, so one that llguidance
    cannot enforce is a ToolError now, whatever tool_choice says."""
    if not functions:
        if tool_choice is not None:
            raise ToolError("tool_choice needs tools", "tool_choice")
        if parallel is not None:
            raise ToolError("parallel_tool_calls needs tools", "parallel_tool_calls")
        return None
    seen = set()
    checked = []
    for i, f in enumerate(functions):
        where = f"tools[{i}].function"
        name = f["name"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolError(f"{where}.name: {name!r} is not a function name (1-64 of "
                            "a-z, A-Z, 0-9, _ and -)", "tools")
        if name in seen:
            raise ToolError(f"{where}.name: {name!r} is defined twice", "tools")
        seen.add(name)
        params = f.get("parameters")
        params = {"type": "object", "properties": {}} if params is None else params
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ToolError(f"{where}.parameters: must be a JSON schema of an object", "tools")
        try:
            compile_grammar(tokenizer, StructuredOutput("json_schema", json.dumps(params)),
                            vocab_size)
        except StructuredError as e:
            raise ToolError(f"{where}.parameters is not a usable JSON schema: {e}",
                            "tools") from None
        checked.append({"name": name, **({"description": f["description"]}
                                         if f.get("description") else {}),
                        "parameters": params})
    if tool_choice == "none":
        return None
    choice, named = tool_choice or "auto", None
    if choice not in ("auto", "required"):
        if choice not in seen:
            raise ToolError(f"tool_choice names the function {choice!r}, which is not in "
                            f"tools ({', '.join(sorted(seen))})", "tool_choice")
        choice, named = "named", tool_choice
    return ToolPlan(tuple(checked), choice, named, True if parallel is None else parallel)


# -- rendering -------------------------------------------------------------------------------
def fallback_prompt(p: ToolPlan) -> str:
    """The system-prompt text that tells a model whose template knows no tools about them."""
    signatures = "\n".join(json.dumps({"type": "function", "function": f}) for f in p.functions)
    rule = {"auto": "Call a function only when it helps; otherwise answer in plain text.",
            "required": "You must call at least one function.",
            "named": f"You must call the function {p.named!r}."}[p.choice]
    if p.parallel and p.named is None:
        rule += " You may make several calls, one per tag."
    else:
        rule += " Make one call at most."
    return ("# Tools\n\nYou can call functions to help with the user's request. Their "
            "signatures, one JSON object per line:\n<tools>\n" + signatures + "\n</tools>\n\n"
            "To call a function, reply with its name and arguments as JSON inside "
            "<tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function name>, "
            "\"arguments\": <arguments as a JSON object>}\n</tool_call>\n" + rule)


def _arguments(call: dict):
    """A history call's arguments as an object, or its text as sent when that is not JSON
    (OpenAI accepts any string: a call cut off by max_tokens comes back that way)."""
    try:
        return json.loads(call["arguments"])
    except json.JSONDecodeError:
        return call["arguments"]


def conversation(messages: list[dict], p: ToolPlan | None,
                 native: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for the chat template. `messages`: role, content (text) and, where
    given, tool_calls ([{id, name, arguments: JSON text}]), tool_call_id and name. native:
    the template reads `tools`; it then gets HF's message format (arguments as objects).
    Otherwise calls in the history are written in the call format above, tool results go
    to the model as a user turn of <tool_response> blocks, and the tools as fallback_prompt."""
    if native:
        out = []
        for m in messages:
            m = {k: v for k, v in m.items() if v is not None}
            if "tool_calls" in m:
                m["tool_calls"] = [
                    {"id": c["id"], "type": "function", "function": {
                        "name": c["name"],
                        "arguments": _arguments(c)}}
                    for c in m["tool_calls"]]
            out.append({"content": "", **m})
        tools = [{"type": "function", "function": f} for f in p.functions] if p else None
        return out, tools
    out = []
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
            continue
        text = m["content"] or ""
        calls = [call_text(c["name"], _argument_text(c)) for c in m.get("tool_calls") or ()]
        out.append({"role": m["role"], "content": "\n".join(([text] if text else []) + calls)})
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if p is not None:
        if out and out[0]["role"] == "system":
            out[0]["content"] = (out[0]["content"] + "\n\n" + fallback_prompt(p)).lstrip()
        else:
            out.insert(0, {"role": "system", "content": fallback_prompt(p)})
    return out, None


def _argument_text(call: dict) -> str:
    args = _arguments(call)
    return args if isinstance(args, str) else json.dumps(args)


def call_text(name: str, arguments: str) -> str:
    return f'{OPEN}\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n{CLOSE}'


# -- enforcing -------------------------------------------------------------------------------
def constraint(p: ToolPlan) -> StructuredOutput | None:
    """For "required" and a named function: a grammar that admits only calls (of the named
    function, or of any tool), in exactly the text `call_text` writes; one call unless
    parallel calls are allowed (then up to MAX_CALLS, separated by newlines: unbounded, a
    weak model may go on calling until max_tokens). None for "auto"."""
    if not p.enforced:
        return None
    functions = [f for f in p.functions if p.named in (None, f["name"])]
    rules = []
    for i, f in enumerate(functions):
        schema = {**_closed(f["parameters"]),
                  "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}
        head = f'{OPEN}\n{{"name": {json.dumps(f["name"])}, "arguments": '
        rules.append(f"call_{i}: {json.dumps(head)} args_{i} {json.dumps('}' + chr(10) + CLOSE)}")
        rules.append(f"args_{i}: %json {json.dumps(schema)}")
    more = f'("\\n" call){{0,{MAX_CALLS - 1}}}' if p.parallel and p.named is None else ""
    start = f"start: call {more}"
    call = "call: " + " | ".join(f"call_{i}" for i in range(len(functions)))
    return StructuredOutput("grammar", "\n".join([start, call, *rules]))


_SUBSCHEMAS = ("items", "not", "additionalProperties")  # keys holding one subschema
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


def _closed(schema):
    """The schema with `additionalProperties: false` wherever an object lists its
    properties and says nothing about others. JSON schema allows unlisted keys there, and a
    forced model fills them with invented keys until max_tokens; what it then writes is a
    subset of what the schema allows, so it still validates."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMAS:
        if key in out:
            out[key] = _closed(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(x) for x in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: _closed(v) for k, v in out[key].items()}
    if "properties" in out and not {"additionalProperties", "patternProperties"} & out.keys():
        out["additionalProperties"] = False
    return out


# -- parsing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text as the model wrote it (cut short if the output was)


@dataclass(frozen=True)
class Parsed:
    text: str  # the text outside calls (unstripped; see `content`)
    calls: tuple[Call, ...]

    def content(self, final: bool) -> str | None:
        # surrounding whitespace is dropped; a stream holds trailing whitespace meanwhile
        text = self.text.strip() if final else self.text.lstrip().rstrip()
        return text if text or not (final and self.calls) else None


def _value_end(text: str) -> int | None:
    """The end of the JSON value that `text` begins with; None if it is not complete yet."""
    if not text:
        return None
    if text[0] not in '{["':
        m = re.match(r"[^\s,}\]]*(?=[\s,}\]])", text)
        return m.end() if m else None
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 0:
                    return i + 1
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _whole_call(body: str, names) -> Call | None:
    """A call written other than in the expected key order (or with "parameters")."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return Call(obj["name"], json.dumps(args)) if isinstance(args, dict) else None


def _held_prefix(text: str) -> int:
    """Length of the longest end of `text` that could be the start of OPEN."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0


def parse(text: str, p: ToolPlan, final: bool) -> Parsed:
    """The calls in `text` and the text around them. final=False: `text` may still grow;
    what could yet become (part of) a call is left out (see the module note). A call whose
    name is not a tool, or whose JSON does not parse, stays text. Without parallel calls,
    everything after the first call is dropped."""
    outside, calls, pos = [], [], 0
    while pos < len(text) and (p.parallel or not calls):
        start = text.find(OPEN, pos)
        if start < 0:
            rest = text[pos:]
            outside.append(rest if final else rest[:len(rest) - _held_prefix(rest)])
            break
        outside.append(text[pos:start])
        body_at = start + len(OPEN)
        close = text.find(CLOSE, body_at)
        closed = close >= 0
        body = text[body_at:close] if closed else text[body_at:]
        pos = close + len(CLOSE) if closed else len(text)
        head = _HEAD.match(body)
        if head:
            name = json.loads(head.group(1))
            if name in p.names:
                args = body[head.end():]
                end = _value_end(args)
                calls.append(Call(name, args[:end] if end is not None else
                                  args.rstrip() if closed or final else args))
                continue
        elif closed or final:
            call = _whole_call(body, p.names)
            if call is not None:
                calls.append(call)
                continue
        if not (closed or final):
            break  # may still become a call: hold it back
        outside.append(text[start:pos])
    return Parsed("".join(outside), tuple(calls))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def finish_reason(parsed: Parsed, engine_reason: str | None) -> str | None:
    """OpenAI's "tool_calls" when the answer ended (not cut by length) with calls."""
    return "tool_calls" if parsed.calls and engine_reason == "stop" else engine_reason


class CallStream:
    """One streamed choice: the content and tool-call deltas to send as its text grows."""

    def __init__(self, p: ToolPlan):
        self.plan = p
        self.content_sent = 0
        self.calls: list[list] = []  # [id, characters of arguments sent] per call
        self.parsed = Parsed("", ())

    def update(self, text: str, final: bool) -> tuple[str, list[dict]]:
        """(new content, new tool-call deltas as OpenAI streams them) for the text so far."""
        self.parsed = parse(text, self.plan, final)
        content = self.parsed.content(final) or ""
        new_content = content[self.content_sent:]
        self.content_sent = max(self.content_sent, len(content))
        deltas = []
        for index, call in enumerate(self.parsed.calls):
            if index == len(self.calls):
                self.calls.append([new_call_id(), 0])
                deltas.append({"index": index, "id": self.calls[index][0], "type": "function",
                               "function": {"name": call.name, "arguments": call.arguments}})
            elif len(call.arguments) > self.calls[index][1]:
                deltas.append({"index": index, "function": {
                    "arguments": call.arguments[self.calls[index][1]:]}})
            self.calls[index][1] = max(self.calls[index][1], len(call.arguments))
        return new_content, deltas

"""The OpenAI HTTP API as pydantic models, kept apart from the engine's own types.

Values are parsed strictly (no "16" -> 16 coercion), so a wrong type is a 400 naming the
field. At the top level of a request, fields nobody defines are kept (`extra="allow"`) for
hpllm.serve.fields to ignore by name, as vLLM does; nested objects forbid them. The
vLLM-style extras (top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos, min_tokens)
expose every SamplingParams field; OpenAI's response_format and vLLM's structured_outputs
and guided_* fields all become one StructuredOutput (at most one per request).
`to_sampling_params` is the one place a request becomes engine parameters.
"""

from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hpllm.infer.sampling import SamplingParams
from hpllm.infer.structured import StructuredOutput


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Body(BaseModel):
    """A request body: unknown top-level fields land in `model_extra` (hpllm.serve.fields)."""
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with no choices and the request's usage
    include_obfuscation: bool | None = None  # ignored: nothing is obfuscated


class JsonSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, object] | None = Field(None, alias="schema")  # None: any JSON value
    strict: bool | None = None  # False: keywords llguidance lacks are ignored, not a 400


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` (one of these)."""
    json_: dict[str, object] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark (llguidance's dialect) or GBNF
    json_object: bool | None = None


def _constraint(kind: str, value) -> StructuredOutput:
    """A vLLM-style field's value as a StructuredOutput (schemas and choices as JSON text)."""
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind in ("json_schema", "choice") and not isinstance(value, str):
        value = json.dumps(value)
    return StructuredOutput(kind, value)


class _SamplingFields(_Body):
    """Fields shared by completions and chat completions."""
    model: str | None = None  # None: the served model
    n: int = 1
    temperature: float | None = None  # None: 1.0, as OpenAI
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (as text) -> bias in [-100, 100]
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older
    # guided_* names; at most one constraint per request
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, object] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="after")
    def _one_constraint(self):
        given = [name for name, _ in self._constraints()]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} each constrain the output; give one")
        rf = self.response_format
        if rf is not None and rf.type == "json_schema" and rf.json_schema is None:
            raise ValueError("response_format: type json_schema needs a json_schema object")
        return self

    def _constraints(self) -> list[tuple[str, StructuredOutput]]:
        """(field name, constraint) for every constraint the request gives."""
        out, rf, so = [], self.response_format, self.structured_outputs
        if rf is not None and rf.type == "json_object":
            out.append(("response_format", StructuredOutput("json_object")))
        if rf is not None and rf.type == "json_schema" and rf.json_schema is not None:
            js = rf.json_schema
            out.append(("response_format", StructuredOutput(
                "json_schema", json.dumps({} if js.schema_ is None else js.schema_),
                js.strict is not False)))
        vllm = [] if so is None else [
            ("json", "json_schema", so.json_), ("regex", "regex", so.regex),
            ("grammar", "grammar", so.grammar), ("choice", "choice", so.choice),
            ("json_object", "json_object", so.json_object or None)]
        out += [(f"structured_outputs.{name}", _constraint(kind, v)) for name, kind, v in vllm
                if v is not None]
        older = [("guided_json", "json_schema", self.guided_json),
                 ("guided_regex", "regex", self.guided_regex),
                 ("guided_grammar", "grammar", self.guided_grammar),
                 ("guided_choice", "choice", self.guided_choice)]
        out += [(name, _constraint(kind, v)) for name, kind, v in older if v is not None]
        return out

    def structured_output(self) -> tuple[str | None, StructuredOutput | None]:
        """(the field that gave it, the request's output constraint), or (None, None)."""
        given = self._constraints()
        return given[0] if given else (None, None)

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        def given(value, default):
            return default if value is None else value

        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, temperature=given(self.temperature, 1.0),
            top_k=given(self.top_k, 0), top_p=given(self.top_p, 1.0),
            min_p=given(self.min_p, 0.0),
            repetition_penalty=given(self.repetition_penalty, 1.0),
            presence_penalty=given(self.presence_penalty, 0.0),
            frequency_penalty=given(self.frequency_penalty, 0.0), seed=self.seed,
            stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, logprobs=logprobs,
            structured=self.structured_output()[1],
            logit_bias=tuple((self.logit_bias or {}).items()))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    # one prompt (text or token ids) or a batch of them
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # None: up to the context length
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None  # accepted only when equal to n
    suffix: str | None = None  # not supported (no fill-in-the-middle)

    def prompts(self) -> list[str | list[int]]:
        return _one_or_batch(self.prompt)


def _one_or_batch(p) -> list[str | list[int]]:
    """A text, a list of token ids, or a batch of either, as a batch."""
    if isinstance(p, str) or (p and isinstance(p[0], int)):
        return [p]
    return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers
    # what clients replaying a response message send back (ignored)
    refusal: str | None = None
    audio: None = None
    annotations: list | None = None
    function_call: None = None

    @model_validator(mode="after")
    def _check_tool_fields(self):
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError("tool_call_id belongs to tool messages")
        if self.role != "assistant" and self.tool_calls:
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_dict(self) -> dict:
        """The message for hpllm.serve.tools.conversation (which renders tool calls)."""
        # the "developer" role is OpenAI's new name for "system"; templates know only the latter
        m = {"role": "system" if self.role == "developer" else self.role,
             "content": self.text()}
        if self.tool_calls:
            m["tool_calls"] = [{"id": c.id, "name": c.function.name,
                                "arguments": c.function.arguments} for c in self.tool_calls]
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            m["name"] = self.name
        return m


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, object] | None = None  # a JSON schema of an object
    strict: bool | None = None  # calls always match the schema when enforced (tool_choice)


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class _ChatPlatformFields(_Body):
    """OpenAI's chat fields for its own platform, typed so that a wrong value is still a 400;
    hpllm.serve.fields ignores or refuses each one."""
    audio: dict[str, object] | None = None  # refused
    metadata: dict[str, str] | None = None
    modalities: list[Literal["text", "audio"]] | None = None  # ["text"] only
    moderation: dict[str, object] | None = None  # refused
    prediction: dict[str, object] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, object] | None = None
    prompt_cache_retention: str | None = None
    reasoning_effort: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    verbosity: str | None = None
    web_search_options: dict[str, object] | None = None  # refused
    functions: list[dict[str, object]] | None = None  # refused: deprecated for tools
    function_call: str | dict[str, object] | None = None  # refused: deprecated for tool_choice


class ChatCompletionRequest(_SamplingFields, _ChatPlatformFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: up to the context length
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # None: allowed

    def chat_messages(self) -> list[dict]:
        return [m.as_dict() for m in self.messages]

    def tool_functions(self) -> list[dict] | None:
        return [t.function.model_dump() for t in self.tools] if self.tools else None

    def tool_choice_name(self) -> str | None:
        """tool_choice as hpllm.serve.tools.plan takes it: a mode or the named function."""
        c = self.tool_choice
        return c.function.name if isinstance(c, NamedToolChoice) else c


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(_Body):
    # one input (text or token ids) or a batch of them
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # accepted only when equal to the model's
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        return _one_or_batch(self.input)


# -- responses (built by api.py; fields as OpenAI's client parses them) -----------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = []


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class DeltaFunction(BaseModel):
    name: str | None = None  # in the call's first delta
    arguments: str = ""  # the next piece of the arguments' JSON text


class DeltaToolCall(BaseModel):
    index: int  # of the call within the choice
    id: str | None = None  # in the call's first delta
    type: Literal["function"] | None = None
    function: DeltaFunction


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "hpllm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo

"""The HTTP routes, at module level: each handler finds the server's state (engine,
tokenizer, limits, metrics) at `request.app.state.server` (hpllm.serve.state.ServerState)."""

from __future__ import annotations

import base64
import dataclasses

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from hpllm.infer.embeddings import EmbeddingError
from hpllm.serve import protocol as P
from hpllm.serve import tools
from hpllm.serve.metrics import CONTENT_TYPE, JAX_CACHE
from hpllm.serve.state import APIError, ServerState, render_chat, start, usage, validate_sampling
from hpllm.serve.streaming import Delta, hold_back, stream_response

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/health")
async def health(request: Request):
    """200 once every executable is compiled; 503 while compiling (with the progress) or
    when the engine has stopped."""
    server = _state(request)
    server.check_engine()
    if not server.engine.ready.is_set():
        return JSONResponse({"status": "compiling", **server.engine.warmup}, status_code=503,
                            headers={"Retry-After": "1"})
    return {"status": "ok"}


@router.get("/v1/models")
async def models(request: Request):
    server = _state(request)
    return P.ModelList(data=[P.ModelCard(id=server.model_name,
                                         max_model_len=server.max_model_len)])


@router.get("/metrics")
async def metrics(request: Request):
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/stats")
async def stats(request: Request):
    server = _state(request)
    engine = server.engine
    return {**engine.stats, "pending": engine.num_pending, "aborts": engine.aborts,
            "ready": engine.ready.is_set(), "warmup": engine.warmup,
            "compilations_after_ready": server.metrics.after_ready,
            "jax_cache": JAX_CACHE}


@router.post("/tokenize")
async def tokenize(request: Request):
    server = _state(request)
    req = await server.read(request, P.TokenizeRequest)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt")
    if req.messages is not None:
        # tool calls and results in the history render as in a chat request
        text = _render(server, [m.as_dict() for m in req.messages], None,
                       req.add_generation_prompt)
        ids = await server.tokenize(text, True, "messages")
    else:
        ids = await server.tokenize(req.prompt, False, "prompt")
    return {"tokens": ids, "count": len(ids), "max_model_len": server.max_model_len}


@router.post("/detokenize")
async def detokenize(request: Request):
    server = _state(request)
    tokenizer = server.tokenizer
    req = await server.read(request, P.DetokenizeRequest)
    bad = [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is not in [0, {tokenizer.vocab_size})",
                       param="tokens", code="invalid_value")
    return {"prompt": tokenizer.decode(req.tokens)}


@router.post("/v1/embeddings")
async def embeddings(request: Request):
    server = _state(request)
    req = await server.read(request, P.EmbeddingRequest)
    embedder = server.embedder
    if req.dimensions not in (None, embedder.dim):
        raise APIError(400, f"dimensions must be {embedder.dim}, the model's hidden size "
                            f"(shortened embeddings are not supported)", param="dimensions",
                       code="invalid_value")
    inputs = req.inputs()
    if not inputs:
        raise APIError(400, "the input is empty", param="input", code="empty_input")
    server.check_accepting(0)
    ids = [await server.tokenize(x, False, "input") if isinstance(x, str) else list(x)
           for x in inputs]
    try:  # checked and embedded off the event loop and the engine's thread
        vectors = await embedder.embed_async(ids)
    except EmbeddingError as e:
        raise APIError(400, str(e), param="input", code="invalid_input") from None

    def encoded(v):  # base64: little-endian float32, as OpenAI's clients decode it
        if req.encoding_format == "base64":
            return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        return v.tolist()

    tokens = sum(len(x) for x in ids)
    return P.EmbeddingResponse(
        data=[P.EmbeddingData(index=i, embedding=encoded(v)) for i, v in enumerate(vectors)],
        model=server.model_name, usage=P.EmbeddingUsage(prompt_tokens=tokens,
                                                        total_tokens=tokens))


def _best(outputs, n: int) -> list:
    """The n outputs with the highest mean logprob per token, best first, re-indexed."""
    def per_token(c):
        return sum(e["logprob"] for e in c.logprobs) / len(c.logprobs) if c.logprobs else -1e30

    best = sorted(outputs, key=per_token, reverse=True)[:n]
    return [dataclasses.replace(c, index=k) for k, c in enumerate(best)]


async def _echo_only(server: ServerState, req: P.CompletionRequest, texts, ids):
    """echo with max_tokens 0, as vLLM answers it: each prompt itself (`texts`, with its
    tokens' logprobs when asked), nothing generated."""
    if req.stream:
        raise APIError(400, "max_tokens 0 (echo only) cannot be streamed", param="max_tokens")
    choices = []
    for i, (text, x) in enumerate(zip(texts, ids)):
        logprobs = (None if req.logprobs is None else server.completion_logprobs(
            await server.scorer.score_async(x, req.logprobs), 0))
        choices += [P.CompletionChoice(index=i * req.n + k, text=text, logprobs=logprobs,
                                       finish_reason="length") for k in range(req.n)]
    tokens = sum(len(x) for x in ids)
    return P.CompletionResponse(id=server.request_id("cmpl"), model=server.model_name,
                                choices=choices,
                                usage=P.Usage(prompt_tokens=tokens, total_tokens=tokens))


@router.post("/v1/completions")
async def completions(request: Request):
    server = _state(request)
    req = await server.read(request, P.CompletionRequest)
    if req.suffix is not None:
        raise APIError(400, "suffix is not supported", param="suffix")
    # best_of > n: sample best_of, return the n with the highest logprob per token (OpenAI's
    # rule), which is known only at the end
    ranked = req.best_of is not None and req.best_of > req.n
    if req.best_of is not None and req.best_of < req.n:
        raise APIError(400, f"best_of ({req.best_of}) must be at least n ({req.n})",
                       param="best_of")
    if ranked and (req.stream or req.temperature == 0):
        raise APIError(400, "best_of > n cannot be streamed and needs temperature > 0",
                       param="best_of")
    prompts = req.prompts()
    if not prompts:
        raise APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
    params = req.sampling_params(req.max_tokens or max(req.min_tokens, 1),
                                 0 if ranked and req.logprobs is None else req.logprobs)
    if ranked:
        params = dataclasses.replace(params, n=req.best_of)
    params = validate_sampling(params, server.vocab_size)
    server.check_accepting(len(prompts))
    ids = []
    for p in prompts:
        ids.append(await server.tokenize(p, False, "prompt") if isinstance(p, str) else list(p))
        server.check_ids(ids[-1], "prompt")
    echo = [(p if isinstance(p, str) else server.tokenizer.decode(p)) if req.echo else ""
            for p in prompts]
    if req.echo and req.max_tokens == 0:  # a scoring request: nothing to generate
        return await _echo_only(server, req, echo, ids)
    params = [server.final_params(params, req.max_tokens, len(x)) for x in ids]
    # one SamplingParams for the batch: the tightest room any prompt leaves
    params = min(params, key=lambda p: p.max_tokens)
    await server.check_structured(params, req.structured_output()[0])
    # echo with logprobs: the prompt's own tokens, scored by one forward pass each, lead
    echoed = [[] for _ in prompts]
    if req.echo and req.logprobs is not None:
        echoed = [await server.scorer.score_async(x, req.logprobs) for x in ids]
    rid = server.request_id("cmpl")
    results = server.results(ids, params, rid)
    first = await start(request, results, req.stream, "prompt")
    if first is None:
        return Response(status_code=499)
    n = req.n  # choices per prompt

    def choice(i, c, text, entries, offset, finish=None):
        logprobs = (server.completion_logprobs(entries, offset) if req.logprobs is not None
                    else None)
        return P.CompletionChoice(index=i * n + c.index, text=text, logprobs=logprobs,
                                  finish_reason=finish, stop_reason=c.stop_reason)

    def response(choices, **kw):
        return P.CompletionResponse(id=rid, model=server.model_name, choices=choices, **kw)

    if not req.stream:
        outs = [first[i] for i in range(len(prompts))]
        choices = [choice(i, c, echo[i] + c.text, echoed[i] + (c.logprobs or []),
                          0 if echoed[i] else len(echo[i]), c.finish_reason)
                   for i, o in enumerate(outs)
                   for c in (_best(o.outputs, n) if ranked else o.outputs)]
        return response(sorted(choices, key=lambda ch: ch.index), usage=usage(outs))

    def chunks(deltas: list[Delta]):
        def one(d):
            lead = echoed[d.prompt] if d.first else []
            return choice(d.prompt, d.output, (echo[d.prompt] if d.first else "") + d.text,
                          lead + d.logprobs, 0 if lead else len(echo[d.prompt]) + d.offset,
                          d.finish_reason)

        return [response([one(d) for d in deltas])]

    return stream_response(server, first, results, hold_back(params.stop),
                           opens=lambda i: bool(echo[i]), chunks=chunks,
                           last=lambda outs: response([], usage=usage(outs))
                           if req.include_usage else None)


def _tool_error(e: tools.ToolError) -> APIError:
    return APIError(400, str(e), param=e.param, code="invalid_value")


def _render(server: ServerState, messages: list[dict], plan, add_generation_prompt) -> str:
    try:
        messages, tool_defs = tools.conversation(
            messages, plan, getattr(server.tokenizer, "template_takes_tools", False))
    except tools.ToolError as e:
        raise _tool_error(e) from None
    return render_chat(server.tokenizer, messages, add_generation_prompt, tool_defs)


def _tool_prompt(server: ServerState, req: P.ChatCompletionRequest):
    """(tool plan or None, the prompt text): tools checked and rendered with the messages."""
    try:
        plan = tools.plan(req.tool_functions(), req.tool_choice_name(),
                          req.parallel_tool_calls, server.tokenizer, server.vocab_size)
    except tools.ToolError as e:
        raise _tool_error(e) from None
    return plan, _render(server, req.chat_messages(), plan, req.add_generation_prompt)


def _answer(c, plan: tools.ToolPlan | None) -> tuple[P.ChatResponseMessage, str | None]:
    """A finished choice's message (its tool calls parsed out) and finish reason."""
    if plan is None:
        return P.ChatResponseMessage(content=c.text), c.finish_reason
    parsed = tools.parse(c.text, plan, final=True)
    calls = [P.ToolCall(id=tools.new_call_id(),
                        function=P.FunctionCall(name=x.name, arguments=x.arguments))
             for x in parsed.calls]
    return (P.ChatResponseMessage(content=parsed.content(True), tool_calls=calls or None),
            tools.finish_reason(parsed, c.finish_reason))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    server = _state(request)
    req = await server.read(request, P.ChatCompletionRequest)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    max_tokens = (req.max_completion_tokens if req.max_completion_tokens is not None
                  else req.max_tokens)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = validate_sampling(req.sampling_params(max_tokens or max(req.min_tokens, 1),
                                                   logprobs), server.vocab_size)
    tool_plan, text = _tool_prompt(server, req)
    if tool_plan is not None and tool_plan.enforced:
        if params.structured is not None:
            raise APIError(400, f"{req.structured_output()[0]} cannot be combined with a "
                                "tool_choice that forces a call", param="tool_choice")
        params = dataclasses.replace(params, structured=tools.constraint(tool_plan))
    server.check_accepting(1)
    ids = await server.tokenize(text, True, "messages")
    server.check_ids(ids, "messages")
    params = server.final_params(params, max_tokens, len(ids))
    await server.check_structured(params, req.structured_output()[0] or "tools")
    rid = server.request_id("chatcmpl")
    results = server.results([ids], params, rid)
    first = await start(request, results, req.stream, "messages")
    if first is None:
        return Response(status_code=499)

    def logprobs_of(entries):
        return server.chat_logprobs(entries) if req.logprobs else None

    if not req.stream:
        out = first[0]
        choices = [P.ChatChoice(index=c.index, message=message,
                                logprobs=logprobs_of(c.logprobs or []),
                                finish_reason=finish, stop_reason=c.stop_reason)
                   for c in out.outputs for message, finish in [_answer(c, tool_plan)]]
        return P.ChatCompletionResponse(id=rid, model=server.model_name, choices=choices,
                                        usage=usage([out]))

    def chunk(choices, **kw):
        return P.ChatCompletionChunk(id=rid, model=server.model_name, choices=choices, **kw)

    calls: dict[int, tools.CallStream] = {}  # per choice, with tools
    held: dict[int, list] = {}  # logprob entries of text held back by the call parser

    def piece(d: Delta):
        if tool_plan is None:
            return P.DeltaMessage(content=d.text), d.finish_reason, d.logprobs
        stream = calls.setdefault(d.output.index, tools.CallStream(tool_plan))
        text, new_calls = stream.update(d.output.text[:d.offset + len(d.text)],
                                        d.finish_reason is not None)
        entries = held.setdefault(d.output.index, [])
        entries += d.logprobs
        finish = tools.finish_reason(stream.parsed, d.finish_reason)
        if not (text or new_calls or finish):
            return None
        held[d.output.index] = []
        return (P.DeltaMessage(content=text or None,
                               tool_calls=[P.DeltaToolCall(**c) for c in new_calls] or None),
                finish, entries)

    def chunks(deltas: list[Delta]):
        # OpenAI's first chunk of a choice carries only the role; a choice appears once per chunk
        roles = [P.ChatChunkChoice(index=d.output.index,
                                   delta=P.DeltaMessage(role="assistant", content=""))
                 for d in deltas if d.first]
        pieces = [P.ChatChunkChoice(index=d.output.index, delta=delta,
                                    logprobs=logprobs_of(entries), finish_reason=finish,
                                    stop_reason=d.output.stop_reason)
                  for d in deltas if d.content
                  for delta, finish, entries in [piece(d) or (None, None, None)] if delta]
        return [chunk(c) for c in (roles, pieces) if c]

    return stream_response(server, first, results, hold_back(params.stop),
                           opens=lambda i: True, chunks=chunks,
                           last=lambda outs: chunk([], usage=usage(outs))
                           if req.include_usage else None)

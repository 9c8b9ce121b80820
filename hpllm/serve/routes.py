"""The HTTP routes, at module level: each handler finds the server's state (engine,
tokenizer, limits, metrics) at `request.app.state.server` (hpllm.serve.state.ServerState)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from hpllm.serve import protocol as P
from hpllm.serve.metrics import CONTENT_TYPE
from hpllm.serve.state import APIError, ServerState, render_chat, start, usage, validate_sampling
from hpllm.serve.streaming import Delta, hold_back, stream_response

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/health")
async def health(request: Request):
    _state(request).check_engine()
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
    engine = _state(request).engine
    return {**engine.stats, "pending": engine.num_pending}


@router.post("/tokenize")
async def tokenize(request: Request):
    server = _state(request)
    req = await server.read(request, P.TokenizeRequest)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt")
    if req.messages is not None:
        text = render_chat(server.tokenizer, [{"role": m.role, "content": m.text()}
                                              for m in req.messages], req.add_generation_prompt)
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


@router.post("/v1/completions")
async def completions(request: Request):
    server = _state(request)
    req = await server.read(request, P.CompletionRequest)
    if req.suffix is not None:
        raise APIError(400, "suffix is not supported", param="suffix")
    if req.best_of not in (None, req.n):
        raise APIError(400, "best_of must equal n (best-of ranking is not supported)",
                       param="best_of")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported (no prompt logprobs)",
                       param="echo")
    prompts = req.prompts()
    if not prompts:
        raise APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
    params = validate_sampling(req.sampling_params(req.max_tokens or max(req.min_tokens, 1),
                                                   req.logprobs), server.vocab_size)
    server.check_accepting(len(prompts))
    ids = []
    for p in prompts:
        ids.append(await server.tokenize(p, False, "prompt") if isinstance(p, str) else list(p))
        server.check_ids(ids[-1], "prompt")
    params = [server.final_params(params, req.max_tokens, len(x)) for x in ids]
    # one SamplingParams for the batch: the tightest room any prompt leaves
    params = min(params, key=lambda p: p.max_tokens)
    echo = [(p if isinstance(p, str) else server.tokenizer.decode(p)) if req.echo else ""
            for p in prompts]
    rid = server.request_id("cmpl")
    results = server.results(ids, params, rid)
    first = await start(request, results, req.stream, "prompt")
    if first is None:
        return Response(status_code=499)
    n = params.n

    def choice(i, c, text, entries, offset, finish=None):
        logprobs = (server.completion_logprobs(entries, offset) if req.logprobs is not None
                    else None)
        return P.CompletionChoice(index=i * n + c.index, text=text, logprobs=logprobs,
                                  finish_reason=finish, stop_reason=c.stop_reason)

    def response(choices, **kw):
        return P.CompletionResponse(id=rid, model=server.model_name, choices=choices, **kw)

    if not req.stream:
        outs = [first[i] for i in range(len(prompts))]
        choices = [choice(i, c, echo[i] + c.text, c.logprobs or [], len(echo[i]),
                          c.finish_reason) for i, o in enumerate(outs) for c in o.outputs]
        return response(sorted(choices, key=lambda ch: ch.index), usage=usage(outs))

    def chunks(deltas: list[Delta]):
        return [response([choice(d.prompt, d.output, (echo[d.prompt] if d.first else "") + d.text,
                                 d.logprobs, len(echo[d.prompt]) + d.offset, d.finish_reason)
                          for d in deltas])]

    return stream_response(server, first, results, hold_back(params.stop),
                           opens=lambda i: bool(echo[i]), chunks=chunks,
                           last=lambda outs: response([], usage=usage(outs))
                           if req.include_usage else None)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    server = _state(request)
    req = await server.read(request, P.ChatCompletionRequest)
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    max_tokens = (req.max_completion_tokens if req.max_completion_tokens is not None
                  else req.max_tokens)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = validate_sampling(req.sampling_params(max_tokens or max(req.min_tokens, 1),
                                                   logprobs), server.vocab_size)
    server.check_accepting(1)
    text = render_chat(server.tokenizer, req.chat_messages(), req.add_generation_prompt)
    ids = await server.tokenize(text, True, "messages")
    server.check_ids(ids, "messages")
    params = server.final_params(params, max_tokens, len(ids))
    rid = server.request_id("chatcmpl")
    results = server.results([ids], params, rid)
    first = await start(request, results, req.stream, "messages")
    if first is None:
        return Response(status_code=499)

    def logprobs_of(entries):
        return server.chat_logprobs(entries) if req.logprobs else None

    if not req.stream:
        out = first[0]
        choices = [P.ChatChoice(index=c.index, message=P.ChatResponseMessage(content=c.text),
                                logprobs=logprobs_of(c.logprobs or []),
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                   for c in out.outputs]
        return P.ChatCompletionResponse(id=rid, model=server.model_name, choices=choices,
                                        usage=usage([out]))

    def chunk(choices, **kw):
        return P.ChatCompletionChunk(id=rid, model=server.model_name, choices=choices, **kw)

    def chunks(deltas: list[Delta]):
        # OpenAI's first chunk of a choice carries only the role; a choice appears once per chunk
        roles = [P.ChatChunkChoice(index=d.output.index,
                                   delta=P.DeltaMessage(role="assistant", content=""))
                 for d in deltas if d.first]
        pieces = [P.ChatChunkChoice(index=d.output.index, delta=P.DeltaMessage(content=d.text),
                                    logprobs=logprobs_of(d.logprobs),
                                    finish_reason=d.finish_reason,
                                    stop_reason=d.output.stop_reason)
                  for d in deltas if d.content]
        return [chunk(c) for c in (roles, pieces) if c]

    return stream_response(server, first, results, hold_back(params.stop),
                           opens=lambda i: True, chunks=chunks,
                           last=lambda outs: chunk([], usage=usage(outs))
                           if req.include_usage else None)

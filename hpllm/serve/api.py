"""OpenAI-compatible HTTP server over the async engine: `/v1/completions` and
`/v1/chat/completions` (streaming as server-sent events), `/v1/models`, `/health`,
`/tokenize`, `/detokenize`, `/metrics` (Prometheus) and `/stats` (the engine's counters).

    app = create_app(AsyncEngine(core), tokenizer, "smollm2-135m")
    uvicorn.run(app)                 # or: serve("smollm2-135m", port=8000)

Every failure is an OpenAI error object `{"error": {"message", "type", "param", "code"}}`:
400 for a bad body or parameter (the body is parsed here, strictly, so malformed JSON, invalid
UTF-8, wrong types and unknown fields all land in one place), 404 for an unknown model or
route, 413 for a body over `max_body_bytes`, 503 when `max_pending` requests are already held
or the server is draining, 500 for anything unexpected; the server goes on serving.

Prompts are tokenized here (on one worker thread, off the event loop, since the tokenizer
object is not thread-safe), checked against the context, and handed to the engine as token
ids. A client that disconnects, streaming or not, has its request aborted at once, which frees
its KV blocks at the engine's next step boundary.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from hpllm.infer.async_engine import AsyncEngine, EngineDead
from hpllm.infer.generate import PromptError
from hpllm.infer.sampling import SamplingError, SamplingParams
from hpllm.serve import protocol as P
from hpllm.serve.metrics import CONTENT_TYPE, ServerMetrics


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (status, message, type,
                                                                       param, code)

    def response(self) -> JSONResponse:
        body = P.ErrorResponse(error=P.ErrorInfo(message=self.message, type=self.type,
                                                 param=self.param, code=self.code))
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(body.model_dump(), status_code=self.status, headers=headers)


class _ClientGone(Exception):
    """The client disconnected before its response was ready."""


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    if err["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {err['msg']}", code="invalid_json")
    if err["type"] == "model_type" and not loc:
        return APIError(400, "the body must be a JSON object", code="invalid_json")
    if err["type"] == "extra_forbidden":
        return APIError(400, f"unknown field {loc!r}", param=loc, code="unknown_field")
    message = f"{loc}: {err['msg']}" if loc else err["msg"]
    if len(e.errors()) > 1:
        message += f" (and {len(e.errors()) - 1} more)"
    return APIError(400, message, param=loc.split(".")[0] or None, code="invalid_value")


@dataclasses.dataclass
class _Choice:
    """What a stream has already sent of one output (text held back against stop strings)."""
    text_sent: int = 0
    tokens_sent: int = 0
    started: bool = False
    done: bool = False


class _Server:
    def __init__(self, engine: AsyncEngine, tokenizer, model_name: str, max_pending: int,
                 max_body_bytes: int):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.core = engine.core
        self.vocab_size = self.core.config.vocab_size
        self.max_model_len = self.core.max_model_len
        self.max_pending, self.max_body_bytes = max_pending, max_body_bytes
        self.metrics = ServerMetrics(engine, model_name)
        engine.step_listeners.append(self.metrics.on_step)
        self.draining = False
        # the tokenizer flips a flag per call (special tokens or not): one thread at a time
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(1, "hpllm-tokenize")
        # a prompt of more than this many bytes has more tokens than the context even if
        # every token were the longest in the vocabulary: refused without tokenizing
        longest = max((len(b) for b in getattr(tokenizer, "token_bytes", [b"x"])), default=1)
        self.max_prompt_bytes = self.max_model_len * max(longest, 1)
        self._ids = itertools.count()

    # -- parsing and checks ------------------------------------------------------------------
    async def read(self, request: Request, model_type):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise APIError(413, f"the body is {int(length)} bytes; at most "
                                f"{self.max_body_bytes} are accepted", code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise APIError(413, f"the body is over {self.max_body_bytes} bytes",
                               code="body_too_large")
        try:
            req = model_type.model_validate_json(bytes(body))
        except ValidationError as e:
            raise _validation_error(e) from None
        if getattr(req, "model", None) not in (None, self.model_name):
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")
        return req

    def check_accepting(self, count: int) -> None:
        if self.engine.error is not None:
            raise APIError(503, f"the engine stopped: {self.engine.error!r}", "server_error",
                           code="engine_dead")
        if self.draining:
            raise APIError(503, "the server is shutting down", "server_error",
                           code="shutting_down")
        if self.engine.num_pending + count > self.max_pending:
            raise APIError(503, f"the server already holds {self.engine.num_pending} requests "
                                f"(limit {self.max_pending}); retry later", "server_error",
                           code="queue_full")

    async def tokenize(self, text: str, special: bool, param: str) -> list[int]:
        if len(text) * 4 > self.max_prompt_bytes and len(text.encode()) > self.max_prompt_bytes:
            raise APIError(400, f"the {param} ({len(text.encode())} bytes) is longer than the "
                                f"context of {self.max_model_len} tokens", param=param,
                           code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, lambda: self.tokenizer.encode(
            text, special=special, bos=False if special else None))

    def check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, f"the {param} is empty", param=param, code="empty_prompt")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is not in [0, {self.vocab_size})",
                           param=param, code="invalid_value")
        if len(ids) >= self.max_model_len:
            raise APIError(400, f"the {param} has {len(ids)} tokens; the context is "
                                f"{self.max_model_len} tokens and must leave room to generate",
                           param=param, code="context_length_exceeded")

    def final_params(self, params: SamplingParams, max_tokens: int | None,
                     prompt_len: int) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"max_tokens ({max_tokens}) + the prompt's {prompt_len} tokens "
                                f"exceed the context of {self.max_model_len} tokens",
                           param="max_tokens", code="context_length_exceeded")
        return _validate(dataclasses.replace(params, max_tokens=max_tokens), self.vocab_size)

    def request_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:16]}{next(self._ids)}"

    # -- the engine --------------------------------------------------------------------------
    async def results(self, prompts: list[list[int]], params: SamplingParams, base_id: str):
        """(prompt index, RequestOutput) for every step in which one of the prompts advanced,
        interleaved; ends when all finished. Closing it aborts the unfinished ones."""
        if len(prompts) == 1:
            async with contextlib.aclosing(self.engine.generate(prompts[0], params,
                                                                base_id)) as gen:
                async for out in gen:
                    yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, ids):
            try:
                async with contextlib.aclosing(self.engine.generate(ids, params,
                                                                    f"{base_id}-{i}")) as gen:
                    async for out in gen:
                        queue.put_nowait((i, out, None))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((i, None, e))

        tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(prompts)]
        try:
            remaining = len(tasks)
            while remaining:
                i, out, error = await queue.get()
                if error is not None:
                    raise error
                yield i, out
                remaining -= out.finished
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- output formatting -------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def completion_logprobs(self, entries: list[dict], offset: int) -> P.CompletionLogprobs:
        lp = P.CompletionLogprobs()
        for e in entries:
            token = self.token_text(e["token_id"])
            lp.tokens.append(token)
            lp.token_logprobs.append(e["logprob"])
            lp.top_logprobs.append({self.token_text(t): v for t, v in e["top"]})
            lp.text_offset.append(offset)
            offset += len(token)
        return lp

    def chat_logprobs(self, entries: list[dict]) -> P.ChatLogprobs:
        def top(t, v):
            return P.TopLogprob(token=self.token_text(t), logprob=v,
                                bytes=list(self.tokenizer.token_bytes[t]))

        return P.ChatLogprobs(content=[P.TokenLogprob(
            **top(e["token_id"], e["logprob"]).model_dump(),
            top_logprobs=[top(t, v) for t, v in e["top"]]) for e in entries])


def _validate(params: SamplingParams, vocab_size: int) -> SamplingParams:
    try:
        return params.validate(vocab_size)
    except SamplingError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_value") from None


def _sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable):
    """The awaitable's result, or _ClientGone (the awaitable cancelled) if the client leaves
    first. The request's body must have been read already."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise _ClientGone()
    return task.result()


async def _collect(results) -> dict[int, object]:
    final = {}
    async with contextlib.aclosing(results):
        async for i, out in results:
            final[i] = out
    return final


def _hold_back(params: SamplingParams) -> int:
    """Characters a stream keeps unsent until the output finishes: a stop string may be
    completed by the next token, and the engine then cuts the text where it began."""
    return max(map(len, params.stop)) - 1 if params.stop else 0


def _usage(outs) -> P.Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion)


def create_app(engine: AsyncEngine, tokenizer, model_name: str, max_pending: int = 256,
               max_body_bytes: int = 8 << 20) -> FastAPI:
    """The app; the caller owns the engine (and shuts it down after the server stops).
    max_pending: requests held at once (queued, running or being added) before new ones get
    503; max_body_bytes: larger bodies get 413."""
    server = _Server(engine, tokenizer, model_name, max_pending, max_body_bytes)
    app = FastAPI(title="hpllm", docs_url=None, redoc_url=None)
    app.state.server = server

    # -- errors ------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def on_api_error(request, e: APIError):
        server.metrics.count_error(e.status)
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, e: StarletteHTTPException):
        server.metrics.count_error(e.status_code)
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), kind).response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e: RequestValidationError):
        server.metrics.count_error(400)
        return APIError(400, str(e.errors()[:1])).response()

    @app.exception_handler(Exception)
    async def on_unexpected(request, e: Exception):
        server.metrics.count_error(500)
        return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()

    def engine_error(e: Exception, param: str) -> APIError:
        """An error the engine raised while adding a request."""
        if isinstance(e, APIError):
            return e
        if isinstance(e, SamplingError):
            return APIError(400, str(e), param=e.param, code="invalid_value")
        if isinstance(e, PromptError):
            return APIError(400, str(e), param=param, code="invalid_prompt")
        if isinstance(e, EngineDead):
            return APIError(503, str(e), "server_error", code="engine_dead")
        if isinstance(e, ValueError):
            return APIError(400, str(e), param=param)
        raise e

    async def start(request: Request, results, stream: bool, param: str):
        """Non-streaming: all final outputs. Streaming: the first event, so that an error in
        adding the request is still an HTTP error and not a broken stream."""
        try:
            if stream:
                return await _unless_disconnected(request, results.__anext__())
            return await _unless_disconnected(request, _collect(results))
        except _ClientGone:
            return None
        except Exception as e:  # noqa: BLE001
            await results.aclose()
            raise engine_error(e, param) from None

    # -- routes ------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if engine.error is not None:
            raise APIError(503, f"the engine stopped: {engine.error!r}", "server_error",
                           code="engine_dead")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return P.ModelList(data=[P.ModelCard(id=model_name,
                                             max_model_len=server.max_model_len)])

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/stats")
    async def stats():
        return {**engine.stats, "pending": engine.num_pending}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await server.read(request, P.TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            text = _render_chat(tokenizer, [{"role": m.role, "content": m.text()}
                                            for m in req.messages], req.add_generation_prompt)
            ids = await server.tokenize(text, True, "messages")
        else:
            ids = await server.tokenize(req.prompt, False, "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": server.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await server.read(request, P.DetokenizeRequest)
        bad = [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is not in [0, {tokenizer.vocab_size})",
                           param="tokens", code="invalid_value")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
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
        params = _validate(req.sampling_params(req.max_tokens or max(req.min_tokens, 1),
                                               req.logprobs), server.vocab_size)
        server.check_accepting(len(prompts))
        ids = []
        for p in prompts:
            ids.append(await server.tokenize(p, False, "prompt") if isinstance(p, str)
                       else list(p))
            server.check_ids(ids[-1], "prompt")
        params = [server.final_params(params, req.max_tokens, len(x)) for x in ids]
        # one SamplingParams for the batch: the tightest room any prompt leaves
        params = min(params, key=lambda p: p.max_tokens)
        echo = [(p if isinstance(p, str) else tokenizer.decode(p)) if req.echo else ""
                for p in prompts]
        rid = server.request_id("cmpl")
        results = server.results(ids, params, rid)
        first = await start(request, results, req.stream, "prompt")
        if first is None:
            return Response(status_code=499)
        n = params.n

        def choice(i, c, text, entries, offset, finish=None, stop_reason=None):
            logprobs = (server.completion_logprobs(entries, offset) if req.logprobs is not None
                        else None)
            return P.CompletionChoice(index=i * n + c, text=text, logprobs=logprobs,
                                      finish_reason=finish, stop_reason=stop_reason)

        if not req.stream:
            outs = [first[i] for i in range(len(prompts))]
            choices = [choice(i, c.index, echo[i] + c.text, c.logprobs or [], len(echo[i]),
                              c.finish_reason, c.stop_reason)
                       for i, o in enumerate(outs) for c in o.outputs]
            choices.sort(key=lambda ch: ch.index)
            return P.CompletionResponse(id=rid, model=model_name, choices=choices,
                                        usage=_usage(outs))

        hold = _hold_back(params)

        async def events():
            sent: dict[tuple[int, int], _Choice] = {}
            last: dict[int, object] = {}
            async with contextlib.aclosing(results):
                async for i, out in _chain(first, results):
                    last[i] = out
                    pieces = []
                    for c in out.outputs:
                        st = sent.setdefault((i, c.index), _Choice())
                        if st.done:
                            continue
                        end = len(c.text) if c.finished else max(st.text_sent,
                                                                 len(c.text) - hold)
                        text = c.text[st.text_sent:end]
                        prefix = echo[i] if not st.started else ""
                        entries = (c.logprobs or [])[st.tokens_sent:]
                        if not (text or prefix or c.finished):
                            continue
                        pieces.append(choice(i, c.index, prefix + text, entries,
                                             len(echo[i]) + st.text_sent,
                                             c.finish_reason if c.finished else None,
                                             c.stop_reason))
                        st.started, st.done = True, c.finished
                        st.text_sent, st.tokens_sent = end, len(c.token_ids)
                    if pieces:
                        yield _sse(P.CompletionResponse(id=rid, model=model_name,
                                                        choices=pieces))
            if req.include_usage:
                yield _sse(P.CompletionResponse(id=rid, model=model_name, choices=[],
                                                usage=_usage(list(last.values()))))
            yield "data: [DONE]\n\n"

        return _stream_response(events(), server)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await server.read(request, P.ChatCompletionRequest)
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = (req.max_completion_tokens if req.max_completion_tokens is not None
                      else req.max_tokens)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = _validate(req.sampling_params(max_tokens or max(req.min_tokens, 1), logprobs),
                           server.vocab_size)
        server.check_accepting(1)
        text = _render_chat(tokenizer, req.chat_messages(), req.add_generation_prompt)
        ids = await server.tokenize(text, True, "messages")
        server.check_ids(ids, "messages")
        params = server.final_params(params, max_tokens, len(ids))
        rid = server.request_id("chatcmpl")
        results = server.results([ids], params, rid)
        first = await start(request, results, req.stream, "messages")
        if first is None:
            return Response(status_code=499)

        if not req.stream:
            out = first[0]
            choices = [P.ChatChoice(
                index=c.index, message=P.ChatResponseMessage(content=c.text),
                logprobs=server.chat_logprobs(c.logprobs or []) if req.logprobs else None,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                for c in out.outputs]
            return P.ChatCompletionResponse(id=rid, model=model_name, choices=choices,
                                            usage=_usage([out]))

        hold = _hold_back(params)

        async def events():
            sent: dict[int, _Choice] = {}
            out = None
            async with contextlib.aclosing(results):
                async for _, out in _chain(first, results):
                    roles, pieces = [], []
                    for c in out.outputs:
                        st = sent.setdefault(c.index, _Choice())
                        if not st.started:  # OpenAI's first chunk of a choice: the role
                            st.started = True
                            roles.append(P.ChatChunkChoice(
                                index=c.index, delta=P.DeltaMessage(role="assistant",
                                                                    content="")))
                        if st.done:
                            continue
                        end = len(c.text) if c.finished else max(st.text_sent,
                                                                 len(c.text) - hold)
                        delta = c.text[st.text_sent:end]
                        entries = (c.logprobs or [])[st.tokens_sent:]
                        if not (delta or c.finished):
                            continue
                        pieces.append(P.ChatChunkChoice(
                            index=c.index, delta=P.DeltaMessage(content=delta),
                            logprobs=server.chat_logprobs(entries) if req.logprobs else None,
                            finish_reason=c.finish_reason if c.finished else None,
                            stop_reason=c.stop_reason))
                        st.done = c.finished
                        st.text_sent, st.tokens_sent = end, len(c.token_ids)
                    for chunk in (roles, pieces):  # a choice appears once per chunk
                        if chunk:
                            yield _sse(P.ChatCompletionChunk(id=rid, model=model_name,
                                                             choices=chunk))
            if req.include_usage and out is not None:
                yield _sse(P.ChatCompletionChunk(id=rid, model=model_name, choices=[],
                                                 usage=_usage([out])))
            yield "data: [DONE]\n\n"

        return _stream_response(events(), server)

    return app


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    from hpllm.checkpoints import ModelError

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt)
    except ModelError as e:
        raise APIError(400, str(e), param="messages") from None
    except Exception as e:  # noqa: BLE001 - a template may fail on odd input in its own way
        raise APIError(400, f"chat template failed: {type(e).__name__}: {e}",
                       param="messages") from None


async def _chain(first, rest):
    yield first
    async for item in rest:
        yield item


def _stream_response(events, server: _Server) -> StreamingResponse:
    async def guarded():
        # an error once streaming has begun can only be reported inside the stream
        try:
            async for event in events:
                yield event
        except (EngineDead, Exception) as e:  # noqa: BLE001
            server.metrics.count_error(500)
            body = P.ErrorResponse(error=P.ErrorInfo(message=f"{type(e).__name__}: {e}",
                                                     type="server_error"))
            yield f"data: {body.model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


# -- running it ------------------------------------------------------------------------------
def serve(model: str, host: str = "127.0.0.1", port: int = 8000, engine_config=None,
          served_model_name: str = "", max_pending: int = 256, drain_timeout: float = 30.0,
          log_level: str = "info", **load_kw) -> int:
    """Load a model (load_kw: quant, group_size, threshold of `load_model`), start the engine
    and serve until SIGINT/SIGTERM. On a signal the listening socket closes, running requests
    get up to `drain_timeout` seconds to finish (then they are cancelled, which aborts them),
    and the process returns 0."""
    import os
    import signal
    import sys

    import uvicorn

    from hpllm.checkpoints.registry import load_model
    from hpllm.infer.engine import EngineConfig, EngineCore

    loaded = load_model(model, progress=sys.stderr.isatty(), **load_kw)
    core = EngineCore(loaded.params, loaded.config, loaded.tokenizer,
                      engine_config or EngineConfig())
    engine = AsyncEngine(core)
    app = create_app(engine, loaded.tokenizer, served_model_name or model, max_pending)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout, access_log=False)
    server = uvicorn.Server(config)
    # uvicorn re-raises a caught SIGTERM after its graceful shutdown, which would kill us with
    # status 143; a no-op handler underneath turns that into a plain return.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    started = time.monotonic()
    try:
        server.run()
    finally:
        app.state.server.draining = True
        # a step (or a compilation) may still be running: wait for it, since interpreter
        # exit under a running XLA computation aborts the process
        stopped = engine.shutdown(timeout=300)
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps({"event": "stopped", "uptime_s": round(time.monotonic() - started, 1),
                      **{k: engine.stats[k] for k in ("prompt_tokens", "generation_tokens",
                                                      "finished_requests")}}),
          file=sys.stderr, flush=True)
    if not stopped:
        print("hpllm: error: the engine thread did not stop within 300 s", file=sys.stderr,
              flush=True)
        os._exit(1)
    return 0

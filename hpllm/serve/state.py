"""The server's state and the request-handling steps its routes share: strict body parsing,
admission (503 when full or draining), tokenizing off the event loop, context checks, the
engine's results per prompt, and every failure as an OpenAI error object (`APIError`).

Routes (hpllm.serve.routes) find the state at `request.app.state.server`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from hpllm.checkpoints import ModelError
from hpllm.infer.async_engine import AsyncEngine, EngineDead
from hpllm.infer.embeddings import Embedder
from hpllm.infer.prompt_logprobs import PromptScorer
from hpllm.infer.generate import PromptError
from hpllm.infer.sampling import SamplingError, SamplingParams
from hpllm.infer.structured import StructuredError, compile_grammar
from hpllm.serve import fields
from hpllm.serve import protocol as P
from hpllm.serve.metrics import ServerMetrics


class APIError(Exception):
    """A failure as the client sees it: an HTTP status and an OpenAI error object."""

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


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


def validation_error(e: ValidationError) -> APIError:
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


class ServerState:
    """What every route needs: the engine, the tokenizer, the limits, the metrics."""

    def __init__(self, engine: AsyncEngine, tokenizer, model_name: str, max_pending: int,
                 max_body_bytes: int):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.vocab_size = engine.core.config.vocab_size
        self.max_model_len = engine.core.max_model_len
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
        # /v1/embeddings: the engine's own weights, read on the embedder's worker thread
        self.embedder = Embedder(engine.core.model.params, engine.core.config,
                                 self.max_model_len, engine.core.model.dtype)
        # echo with logprobs: the prompt's own logprobs, likewise on a thread of its own
        self.scorer = PromptScorer(engine.core.model.params, engine.core.config,
                                   self.max_model_len, engine.core.model.dtype)

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
            raise validation_error(e) from None
        if getattr(req, "model", None) not in (None, self.model_name):
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")
        refusal = fields.refused(req)
        if refusal is not None:
            raise APIError(400, refusal[1], param=refusal[0], code="unsupported_field")
        fields.note_ignored(request, req)
        return req

    def check_engine(self) -> None:
        if self.engine.error is not None:
            raise APIError(503, f"the engine stopped: {self.engine.error!r}", "server_error",
                           code="engine_dead")

    def check_accepting(self, count: int) -> None:
        self.check_engine()
        if self.draining:
            raise APIError(503, "the server is shutting down", "server_error",
                           code="shutting_down")
        if not self.engine.ready.is_set():  # refused, not queued behind the compilations
            w = self.engine.warmup
            raise APIError(503, f"the server is compiling its executables ({w['compiled']} of "
                                f"{w['total'] or '?'} done); retry when /health says ok",
                           "server_error", code="compiling")
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
        return validate_sampling(dataclasses.replace(params, max_tokens=max_tokens),
                                 self.vocab_size)

    async def check_structured(self, params: SamplingParams, param: str | None) -> None:
        """Compile the request's output constraint (cached) off the event loop: an invalid
        schema or grammar is a 400 naming the problem before anything is queued."""
        if params.structured is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._tokenize_pool, compile_grammar, self.tokenizer,
                                       params.structured, self.vocab_size)
        except StructuredError as e:
            raise APIError(400, str(e), param=param, code="invalid_structured_output") from None

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
            lp.top_logprobs.append(None if e["top"] is None else  # a prompt's first token
                                   {self.token_text(t): v for t, v in e["top"]})
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


def validate_sampling(params: SamplingParams, vocab_size: int) -> SamplingParams:
    try:
        return params.validate(vocab_size)
    except SamplingError as e:
        raise engine_error(e, e.param) from None


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
    adding the request is still an HTTP error and not a broken stream. None: the client left."""
    try:
        if stream:
            return await unless_disconnected(request, results.__anext__())
        return await unless_disconnected(request, collect(results))
    except ClientGone:
        return None
    except Exception as e:  # noqa: BLE001
        await results.aclose()
        raise engine_error(e, param) from None


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, awaitable):
    """The awaitable's result, or ClientGone (the awaitable cancelled) if the client leaves
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
            raise ClientGone()
    return task.result()


async def collect(results) -> dict[int, object]:
    final = {}
    async with contextlib.aclosing(results):
        async for i, out in results:
            final[i] = out
    return final


def usage(outs) -> P.Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool,
                tools: list[dict] | None = None) -> str:
    try:  # tools: only for templates that read `tools` (None otherwise)
        return tokenizer.apply_chat_template(messages, add_generation_prompt, tools=tools)
    except ModelError as e:
        raise APIError(400, str(e), param="messages") from None
    except Exception as e:  # noqa: BLE001 - a template may fail on odd input in its own way
        raise APIError(400, f"chat template failed: {type(e).__name__}: {e}",
                       param="messages") from None

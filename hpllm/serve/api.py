"""OpenAI-compatible HTTP server over the async engine: `/v1/completions` and
`/v1/chat/completions` (streaming as server-sent events), `/v1/embeddings`, `/v1/models`,
`/health`, `/tokenize`, `/detokenize`, `/metrics` (Prometheus) and `/stats` (the engine's counters).

    app = create_app(AsyncEngine(core), tokenizer, "smollm2-135m")
    uvicorn.run(app)                 # or: serve("smollm2-135m", port=8000)

Every failure is an OpenAI error object `{"error": {"message", "type", "param", "code"}}`:
400 for a bad body or parameter (bodies are parsed strictly in one place, `ServerState.read`,
so malformed JSON, invalid UTF-8 and wrong types all land there; which fields are ignored or
refused is hpllm.serve.fields), 404 for an
unknown model or route, 413 for a body over `max_body_bytes`, 503 when `max_pending` requests
are already held or the server is draining, 500 for anything unexpected; the server goes on
serving.

Prompts are tokenized by the server (on one worker thread, off the event loop, since the
tokenizer object is not thread-safe), checked against the context, and handed to the engine
as token ids. A client that disconnects, streaming or not, has its request aborted at once,
which frees its KV blocks at the engine's next step boundary.

This module builds the app and runs it; the routes are in routes.py, the state and checks they
share in state.py, the server-sent events in streaming.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from tqdm import tqdm

from hpllm.cache import enable_compilation_cache
from hpllm.checkpoints.registry import load_model
from hpllm.config import EngineConfig
from hpllm.infer.async_engine import AsyncEngine
from hpllm.infer.engine import EngineCore
from hpllm.serve.fields import IgnoredFieldsHeader
from hpllm.serve.metrics import JAX_CACHE
from hpllm.serve.routes import router
from hpllm.serve.state import APIError, ServerState


def create_app(engine: AsyncEngine, tokenizer, model_name: str, max_pending: int = 256,
               max_body_bytes: int = 8 << 20) -> FastAPI:
    """The app; the caller owns the engine (and shuts it down after the server stops).
    max_pending: requests held at once (queued, running or being added) before new ones get
    503; max_body_bytes: larger bodies get 413."""
    app = FastAPI(title="hpllm", docs_url=None, redoc_url=None)
    app.state.server = ServerState(engine, tokenizer, model_name, max_pending, max_body_bytes)
    app.include_router(router)
    app.add_middleware(IgnoredFieldsHeader)  # names the fields a request had ignored
    for kind, handler in ((APIError, _on_api_error), (StarletteHTTPException, _on_http_error),
                          (RequestValidationError, _on_validation_error),
                          (Exception, _on_unexpected)):
        app.add_exception_handler(kind, handler)
    return app


# -- errors: each counted in the metrics, each an OpenAI error object -------------------------
def _count(request: Request, status: int) -> None:
    request.app.state.server.metrics.count_error(status)


async def _on_api_error(request: Request, e: APIError):
    _count(request, e.status)
    return e.response()


async def _on_http_error(request: Request, e: StarletteHTTPException):
    _count(request, e.status_code)
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return APIError(e.status_code, str(e.detail), kind).response()


async def _on_validation_error(request: Request, e: RequestValidationError):
    _count(request, 400)
    return APIError(400, str(e.errors()[:1])).response()


async def _on_unexpected(request: Request, e: Exception):
    _count(request, 500)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()


# -- running it ------------------------------------------------------------------------------
def _log_to_stderr(level: str) -> None:
    """hpllm.serve's log lines (ignored request fields) beside uvicorn's, at its level."""
    logger = logging.getLogger("hpllm.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def _report_ready(engine: AsyncEngine, bar, started: float) -> None:
    """One JSON line on stderr once the engine is ready: how long start-up took."""
    engine.ready.wait()
    bar.close()
    print(json.dumps({"event": "ready", "startup_s": round(time.monotonic() - started, 1),
                      "compile_s": engine.warmup["seconds"], "executables":
                      engine.warmup["total"], "jax_cache_hits": JAX_CACHE["hit"],
                      "jax_cache_misses": JAX_CACHE["miss"]}), file=sys.stderr, flush=True)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000,
          engine_config: EngineConfig | None = None,
          served_model_name: str = "", max_pending: int = 256, drain_timeout: float = 30.0,
          log_level: str = "info", **load_kw) -> int:
    """Load a model (load_kw: quant, group_size, threshold of `load_model`), start the engine
    and serve until SIGINT/SIGTERM. The socket listens at once, but until the engine has
    compiled every executable (a progress bar on stderr; loaded from JAX's persistent cache
    under cache_dir()/jax when an earlier run wrote them) /health answers 503 and requests
    are refused with 503. On a signal the listening socket closes, running requests
    get up to `drain_timeout` seconds to finish (then they are cancelled, which aborts them),
    and the process returns 0."""
    started = time.monotonic()
    enable_compilation_cache()
    loaded = load_model(model, progress=sys.stderr.isatty(), **load_kw)
    core = EngineCore(loaded.params, loaded.config, loaded.tokenizer,
                      engine_config or EngineConfig())
    bar = tqdm(desc="compiling", unit=" executables", file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    listening = threading.Event()  # /health answers (503) while the engine compiles
    engine = AsyncEngine(core, warmup=True, progress=progress, start_when=listening)
    app = create_app(engine, loaded.tokenizer, served_model_name or model, max_pending)
    app.router.on_startup.append(listening.set)
    threading.Thread(target=_report_ready, args=(engine, bar, started), name="hpllm-ready",
                     daemon=True).start()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout, access_log=False)
    server = uvicorn.Server(config)
    _log_to_stderr(log_level)
    # uvicorn re-raises a caught SIGTERM after its graceful shutdown, which would kill us with
    # status 143; a no-op handler underneath turns that into a plain return.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
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

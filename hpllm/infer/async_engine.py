"""A streaming async front to `EngineCore`, for servers.

The engine steps on one background thread (JAX releases the GIL while a step runs, so the
event loop keeps serving); requests and aborts from the event loop are handed over through a
lock-protected inbox and applied between steps. Each request's outputs come back through an
asyncio queue: `async for out in engine.generate(...)` yields a RequestOutput per step in
which the request advanced, the last one with finished=True. Leaving the loop early (a client
disconnected) aborts the request and frees its blocks at the next step boundary.

With warmup=True the thread first compiles every executable a step can need
(`EngineCore.warmup`) and only then sets `ready`; requests queued meanwhile wait for it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Callable

from hpllm.infer.engine import EngineCore
from hpllm.infer.requests import RequestOutput
from hpllm.infer.sampling import SamplingParams


class EngineDead(RuntimeError):
    """The engine thread stopped (an unexpected error in a step); requests cannot proceed."""


class _Stopped(Exception):
    """Raised through the warm-up's progress callback when shutdown() is called mid-way."""


class AsyncEngine:
    def __init__(self, core: EngineCore, warmup: bool = False,
                 progress: Callable[[int, int], None] | None = None,
                 start_when: threading.Event | None = None):
        """warmup: compile everything before serving (see the module note); progress(done,
        total) is called on the engine thread after each executable; start_when: the
        thread waits for it before warming up (a server lets its socket open first: the
        warm-up holds the GIL much of the time)."""
        self.core = core
        self.ready = threading.Event()
        self.warmup = {"compiled": 0, "total": 0, "seconds": 0.0}  # as of the last progress
        self._warmup, self._progress, self._start_when = warmup, progress, start_when
        self.aborts = 0  # aborts asked for from the event loop (a client left, ...)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list = []  # ("add", id, prompt, params, stream) | ("abort", id)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stop = False
        self.error: BaseException | None = None
        self.step_listeners = []  # callables(core, outputs), called on the engine thread
        # core.stats() as of the last step or inbox change, published by the engine thread
        # (one reference assignment) so other threads never read the core mid-step
        self.stats: dict = core.stats()
        self._thread = threading.Thread(target=self._loop, name="hpllm-engine", daemon=True)
        self._thread.start()

    # -- the engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while self._start_when is not None and not self._start_when.wait(0.1):
                if self._stop:
                    return
            if self._warmup:
                self._compile_all()
            self.ready.set()
            while not self._stop:
                if self._apply_inbox():
                    self.stats = self.core.stats()
                if not self.core.has_unfinished():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                outputs = self.core.step()
                self.stats = self.core.stats()
                for out in outputs:
                    self._deliver(out)
                for listener in self.step_listeners:
                    listener(self.core, outputs)
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - reported to every waiting request
            self.error = e
            for rid in list(self._streams):
                self._deliver_error(rid, e)

    def _compile_all(self) -> None:
        start = time.monotonic()

        def progress(done: int, total: int) -> None:
            self.warmup = {"compiled": done, "total": total,
                           "seconds": round(time.monotonic() - start, 3)}
            if self._progress is not None:
                self._progress(done, total)
            if self._stop:  # shutting down: compiling the rest would only delay the exit
                raise _Stopped()

        done = self.core.warmup(progress)
        progress(done, done)

    def _apply_inbox(self) -> bool:
        """Apply queued adds and aborts; True if there were any."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for item in inbox:
            if item[0] == "add":  # the core is only ever touched on this thread
                _, rid, prompt, params, done = item
                loop = done.get_loop()
                try:
                    self.core.add_request(rid, prompt, params)
                except Exception as e:  # noqa: BLE001 - a bad request, reported to its caller
                    _call_soon(loop, _settle, done, e)
                else:
                    _call_soon(loop, _settle, done, None)
            elif item[0] == "abort":
                out = self.core.abort_request(item[1])
                if out is not None:
                    self._deliver(out)
                else:
                    self._streams.pop(item[1], None)
        return bool(inbox)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished:
            self._streams.pop(out.request_id, None)
        loop, queue = stream
        _call_soon(loop, queue.put_nowait, out)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            loop, queue = stream
            _call_soon(loop, queue.put_nowait, error)

    # -- the event loop side -----------------------------------------------------------------
    @property
    def num_pending(self) -> int:
        return len(self._streams)

    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None):
        """Validates and queues the request (errors are raised here, before the first
        output), then yields its RequestOutputs."""
        if self.error is not None:
            raise EngineDead(f"the engine stopped: {self.error!r}")
        request_id = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._streams[request_id] = (loop, queue)
        try:
            await self._add(request_id, prompt, params)
        except BaseException as e:
            self._streams.pop(request_id, None)
            if not isinstance(e, Exception):  # cancelled while queued: it may still be added
                self.abort(request_id)
            raise
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineDead(f"the engine stopped: {item!r}") from item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    async def _add(self, request_id, prompt, params) -> None:
        done = asyncio.get_running_loop().create_future()
        with self._lock:
            self._inbox.append(("add", request_id, prompt, params, done))
        self._wake.set()
        await done

    @property
    def thread_id(self) -> int | None:
        """The engine thread's identity (to tell its compilations from other threads')."""
        return self._thread.ident

    def abort(self, request_id: str) -> None:
        self.aborts += 1
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    async def drain(self, timeout: float) -> bool:
        """Wait until no request is pending (True) or the timeout passes (False)."""
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._streams

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Stop the engine thread after its current step; True once it has stopped (a
        process must not exit while a step still runs: XLA aborts)."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=timeout)
        return not self._thread.is_alive()


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that event loop is closed: nobody is waiting any more
        pass


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the caller went away meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)

"""Server-sent events for completions and chat: one helper turns the engine's cumulative
outputs into per-choice deltas, each route only says how a delta looks on the wire.

A stream keeps `hold_back` characters of a running output unsent: a stop string may be
completed by the next token, and the engine then cuts the text where the stop string began.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

from fastapi.responses import StreamingResponse

from hpllm.serve import protocol as P


@dataclass
class _Sent:
    """What a stream has already sent of one output."""
    text: int = 0  # characters
    tokens: int = 0
    started: bool = False
    done: bool = False


@dataclass(frozen=True)
class Delta:
    """What is new in one choice since the stream's last event."""
    prompt: int  # index of the request's prompt
    output: object  # the engine's CompletionOutput (cumulative)
    text: str  # the new characters
    logprobs: list  # the new tokens' logprob entries
    offset: int  # characters of this choice sent before `text`
    first: bool  # the choice's first delta
    content: bool  # carries text or the finish (False: only opens the choice)

    @property
    def finish_reason(self):
        return self.output.finish_reason if self.output.finished else None


def hold_back(stop: tuple[str, ...]) -> int:
    """Characters a stream keeps unsent until the output finishes (see the module note)."""
    return max(map(len, stop)) - 1 if stop else 0


def sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"


async def _chain(first, rest):
    yield first
    async for item in rest:
        yield item


async def deltas(first, results, hold: int, opens: Callable[[int], bool]):
    """(deltas, {prompt: its latest output}) per engine event that changed something a client
    sees. `first`: the event already taken from `results` (prompt index, RequestOutput);
    `opens(prompt)`: whether a choice of that prompt is announced before it has text (chat's
    role, an echoed prompt). Closes `results` (aborting what is unfinished) when done."""
    sent: dict[tuple[int, int], _Sent] = {}
    latest: dict[int, object] = {}
    async with contextlib.aclosing(results):
        async for i, out in _chain(first, results):
            latest[i] = out
            batch = []
            for c in out.outputs:
                st = sent.setdefault((i, c.index), _Sent())
                if st.done:
                    continue
                end = len(c.text) if c.finished else max(st.text, len(c.text) - hold)
                text = c.text[st.text:end]
                content = bool(text) or c.finished
                if not (content or (not st.started and opens(i))):
                    continue
                batch.append(Delta(i, c, text, (c.logprobs or [])[st.tokens:] if content else [],
                                   st.text, not st.started, content))
                st.started = True
                if content:
                    st.text, st.tokens, st.done = end, len(c.token_ids), c.finished
            if batch:
                yield batch, latest


def stream_response(server, first, results, hold: int, opens: Callable[[int], bool],
                    chunks: Callable[[list[Delta]], list], last: Callable[[list], object]):
    """The SSE response of a request: `chunks(deltas)` -> the protocol objects of one event,
    `last(outputs)` -> a final object (the usage) or None, then `[DONE]`."""
    async def events():
        latest = {}
        async for batch, latest in deltas(first, results, hold, opens):
            for chunk in chunks(batch):
                yield sse(chunk)
        final = last(list(latest.values()))
        if final is not None:
            yield sse(final)
        yield "data: [DONE]\n\n"

    async def guarded():
        # an error once streaming has begun can only be reported inside the stream
        try:
            async for event in events():
                yield event
        except Exception as e:  # noqa: BLE001
            server.metrics.count_error(500)
            body = P.ErrorResponse(error=P.ErrorInfo(message=f"{type(e).__name__}: {e}",
                                                     type="server_error"))
            yield sse(body)
            yield "data: [DONE]\n\n"

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

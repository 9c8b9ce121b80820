"""A request's life on the host: its prompt checked and tokenized, its outputs (token ids,
log-probabilities, incrementally detokenized text), and when each sample stops (stop token
ids, stop strings cut from the text, max_tokens, the context). The engine (hpllm.infer.engine)
owns the scheduling; a `Request` owns everything a client gets back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from hpllm.infer.generate import PromptError
from hpllm.infer.sampling import SamplingParams
from hpllm.infer.scheduler import Sequence
from hpllm.infer.structured import Grammar


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None  # per token: {"token_id", "logprob", "top": [(id, lp)]}
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)  # every output token's time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0


class Detokenizer:
    """Incremental text of one output: bytes through an incremental UTF-8 decoder."""

    def __init__(self, tokenizer):
        self.stream = tokenizer.stream() if tokenizer is not None else None

    def push(self, token_id: int) -> str:
        return self.stream.push(token_id) if self.stream is not None else ""


def prompt_ids(prompt, tokenizer, vocab_size: int, max_model_len: int):
    """(text or None, token ids) of a prompt given as text (needs a tokenizer) or token ids;
    PromptError when it is empty, out of the vocabulary or leaves no room to generate."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise PromptError("a text prompt needs a tokenizer; give token ids instead")
        text, ids = prompt, tokenizer.encode(prompt)
    else:
        text, ids = None, [int(t) for t in prompt]
    if not ids:
        raise PromptError("the prompt is empty")
    if any(t < 0 or t >= vocab_size for t in ids):
        raise PromptError(f"prompt token ids must be in [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise PromptError(f"prompt of {len(ids)} tokens does not fit the context of "
                          f"{max_model_len} tokens (and leaves no room to generate)")
    return text, ids


def stop_token_ids(tokenizer, params: SamplingParams) -> frozenset:
    """The request's stop ids: its own, plus the model's end-of-turn ids unless ignore_eos."""
    model_stops = set()
    if tokenizer is not None and not params.ignore_eos:
        model_stops = set(tokenizer.stop_ids)
    return frozenset(model_stops | set(params.stop_token_ids))


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset
    metrics: RequestMetrics
    seqs: list[Sequence] = field(default_factory=list)
    outputs: list[CompletionOutput] = field(default_factory=list)
    decoders: list = field(default_factory=list)
    num_cached_tokens: int = 0
    grammar: Grammar | None = None  # the compiled structured-output constraint
    matchers: list = field(default_factory=list)  # each sample's Matcher (None: no grammar)

    @property
    def finished(self) -> bool:
        return len(self.outputs) == self.params.n and all(o.finished for o in self.outputs)

    def add_sample(self, seq: Sequence, tokenizer) -> None:
        """Track one more of the request's samples (its sequence, output and detokenizer)."""
        self.seqs.append(seq)
        self.outputs.append(CompletionOutput(seq.index, logprobs=[] if self.params.logprobs
                                             is not None else None))
        self.decoders.append(Detokenizer(tokenizer))
        self.matchers.append(self.grammar.matcher() if self.grammar is not None else None)

    def append(self, seq: Sequence, token: int, logprob, top, max_model_len: int):
        """Append a generated token to sample seq.index; returns the finish reason ("stop",
        "length") when the token ends the sample, else None. A stop string is cut from the
        text (it may span tokens: the search covers the new piece and what precedes it). A
        sample whose grammar is complete stops."""
        p = self.params
        out, detok = self.outputs[seq.index], self.decoders[seq.index]
        matcher = self.matchers[seq.index]
        complete = False
        if matcher is not None:  # a token the grammar refuses (cannot happen) also ends it
            complete = not matcher.advance(token) or matcher.done
        seq.tokens.append(token)
        out.token_ids.append(token)
        if out.logprobs is not None:
            out.logprobs.append({"token_id": token, "logprob": logprob, "top": top or []})
        now = time.monotonic()
        m = self.metrics
        if m.first_token is None:
            m.first_token = now
        m.last_token = now
        m.token_times.append(now)
        n = seq.num_generated
        if token in self.stop_ids and n > p.min_tokens:
            return self._finish(out, "stop", token)
        piece = detok.push(token)
        if piece:
            before = len(out.text)
            out.text += piece
            if p.stop and n > p.min_tokens:
                longest = max(map(len, p.stop))
                window_start = max(0, before - longest + 1)
                hits = [(out.text.find(s, window_start), s) for s in p.stop]
                hits = [(i, s) for i, s in hits if i >= 0]
                if hits:
                    i, s = min(hits)
                    out.text = out.text[:i]
                    return self._finish(out, "stop", s)
        if complete:
            return self._finish(out, "stop", None)
        if n >= p.max_tokens or len(seq.tokens) >= max_model_len:
            return self._finish(out, "length", None)
        return None

    @staticmethod
    def _finish(out: CompletionOutput, reason: str, stop_reason) -> str:
        out.finish_reason, out.stop_reason = reason, stop_reason
        return reason

    def abort(self) -> None:
        """Mark every unfinished sample (and those never forked) aborted."""
        for out in self.outputs:
            if out.finish_reason is None:
                out.finish_reason = "abort"
        for i in range(len(self.outputs), self.params.n):
            self.outputs.append(CompletionOutput(i, finish_reason="abort"))
        self.metrics.finished = time.monotonic()

    def snapshot(self) -> RequestOutput:
        outs = [CompletionOutput(o.index, o.text, list(o.token_ids),
                                 list(o.logprobs) if o.logprobs is not None else None,
                                 o.finish_reason, o.stop_reason) for o in self.outputs]
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, outs, self.finished,
                             self.metrics, self.num_cached_tokens)

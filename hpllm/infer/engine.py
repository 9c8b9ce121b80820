"""The inference engine: a paged KV cache on device, the scheduler's steps run as jitted
forward passes, sampling, stop conditions, streaming text, and the offline `LLM` API.

    llm = LLM("smollm2-135m")
    outs = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    outs[0].outputs[0].text

One engine step = one schedule: a jitted decode pass (one token for each running sequence)
and a jitted prefill pass (a chunk of each prefilling sequence), both reading and writing the
same block pool through per-row block tables; then one jitted sampling call per pass.
Shapes are bucketed (rows, chunk length, table width to powers of two), so a few compiled
variants serve every batch. `EngineCore` is synchronous and single-threaded; the async
engine (hpllm.infer.async_engine) drives it from a background thread.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.config import ModelConfig
from hpllm.infer.generate import PromptError
from hpllm.infer.kv_cache import BlockManager
from hpllm.infer.sampling import SampleRow, SamplingParams, pow2_bucket, row_arrays, sample
from hpllm.infer.scheduler import Chunk, Scheduler, Sequence
from hpllm.infer.spec_decode import PROPOSERS, Speculator, accept_rows, speculable
from hpllm.model.transformer import forward, unstack_layers

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_KV_DTYPES = (*_DTYPES, "int8")  # int8: codes + a float32 scale per token per head


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_memory_mb: float = 256.0  # the block pool's size, unless num_blocks is given
    num_blocks: int = 0
    max_num_seqs: int = 32  # running sequences per step
    max_num_batched_tokens: int = 256  # tokens per step (decodes + prefill chunks)
    max_model_len: int = 0  # 0: the model's max_seq_len
    dtype: str = "float32"  # compute
    kv_dtype: str = "float32"  # float32, bfloat16 or int8
    enable_prefix_caching: bool = True
    unroll_layers: bool = True  # False: scan the layers (much faster compiles, slower steps)
    seed: int = 0  # draws the seeds of requests that give none
    speculative: str = ""  # "", "ngram" (prompt lookup) or "self" (first layers as draft)
    num_speculative_tokens: int = 4  # gamma: draft tokens per sequence per step (initial)
    speculative_adaptive: bool = True  # per-sequence gamma: +2 on full acceptance, -1 else
    draft_layers: int = 0  # self-speculation: layers in the draft (0: a third)

    def validate(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_blocks < 0 or self.kv_memory_mb <= 0 or self.max_model_len < 0:
            raise ValueError("num_blocks, kv_memory_mb and max_model_len must be positive")
        for name, allowed in (("dtype", _DTYPES), ("kv_dtype", _KV_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got "
                                 f"{getattr(self, name)!r}")
        if self.speculative not in ("", *PROPOSERS):
            raise ValueError(f"speculative must be one of {', '.join(PROPOSERS)} (or empty), "
                             f"got {self.speculative!r}")
        if self.speculative and self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be positive, got "
                             f"{self.num_speculative_tokens}")


def kv_bytes_per_token(config: ModelConfig, kv_dtype: str = "float32") -> int:
    if kv_dtype == "int8":  # one byte per element plus a float32 scale per head
        per_head = config.head_dim + 4
    else:
        per_head = config.head_dim * jnp.dtype(_DTYPES[kv_dtype]).itemsize
    return 2 * config.n_layers * config.n_kv_heads * per_head


def num_blocks_for(config: ModelConfig, engine: EngineConfig) -> int:
    """Blocks in the pool (including the reserved null block)."""
    if engine.num_blocks:
        return engine.num_blocks
    per_block = kv_bytes_per_token(config, engine.kv_dtype) * engine.block_size
    return max(2, int(engine.kv_memory_mb * 2**20 // per_block))


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("pool",))
def _run_model(params, pool, tokens, positions, tables, last, config, dtype):
    cache = {**pool, "block_tables": tables}
    logits, cache = forward(params, tokens, positions, config, cache=cache, dtype=dtype,
                            logits_at=last)
    return logits, {name: cache[name] for name in pool}


@functools.partial(jax.jit, donate_argnames=("pool",))
def _copy_blocks(pool, src, dst):
    def copy(a, axis):
        index = (slice(None),) * axis
        return a.at[index + (dst,)].set(a[index + (src,)])
    return {name: [copy(x, 0) for x in a] if isinstance(a, list) else copy(a, 1)
            for name, a in pool.items()}


class PagedModel:
    """The device half: parameters, the block pool, and the jitted passes over it."""

    def __init__(self, params, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype=jnp.float32, kv_dtype: str = "float32", unroll_layers: bool = True):
        # Unrolled, each layer's weights are their own arrays: XLA:CPU reads them at memory
        # speed, where a scan's dynamic slices are copied first (see unstack_layers).
        self.params = unstack_layers(params) if unroll_layers else params
        self.config, self.dtype = config, dtype
        shape = (config.n_layers, num_blocks, block_size, config.n_kv_heads, config.head_dim)
        if kv_dtype == "int8":
            arrays = {"k": (shape, jnp.int8), "v": (shape, jnp.int8),
                      "k_scale": (shape[:-1], jnp.float32), "v_scale": (shape[:-1], jnp.float32)}
        else:
            arrays = {name: (shape, _DTYPES[kv_dtype]) for name in ("k", "v")}
        # Unrolled: one array per layer, so a step writes and reads a layer's blocks in place
        # (slicing a layer out of one stacked array copied the layer's whole pool per step:
        # SmolLM2 decode 91 -> see docs/perf/engine.md).
        self.pool = {name: [jnp.zeros(s[1:], d) for _ in range(s[0])] if unroll_layers
                     else jnp.zeros(s, d) for name, (s, d) in arrays.items()}

    def run(self, tokens, positions, tables, last):
        """numpy (B, S) tokens and positions (-1 = padding), (B, M) tables, (B,) index of the
        token whose logits to return (None: every position's). Returns (B, V) logits on
        device, or (B, S, V)."""
        last = None if last is None else jnp.asarray(last)
        logits, self.pool = _run_model(self.params, self.pool, jnp.asarray(tokens),
                                       jnp.asarray(positions), jnp.asarray(tables), last,
                                       self.config, self.dtype)
        return logits

    def copy_blocks(self, pairs) -> None:
        if pairs:
            src, dst = (jnp.asarray(x, jnp.int32) for x in zip(*pairs))
            self.pool = _copy_blocks(self.pool, src, dst)


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


@dataclass(eq=False)
class _Request:
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

    @property
    def finished(self) -> bool:
        return len(self.outputs) == self.params.n and all(o.finished for o in self.outputs)

    def snapshot(self) -> RequestOutput:
        outs = [CompletionOutput(o.index, o.text, list(o.token_ids),
                                 list(o.logprobs) if o.logprobs is not None else None,
                                 o.finish_reason, o.stop_reason) for o in self.outputs]
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, outs, self.finished,
                             self.metrics, self.num_cached_tokens)


class _Detokenizer:
    """Incremental text of one output: bytes through an incremental UTF-8 decoder."""

    def __init__(self, tokenizer):
        self.stream = tokenizer.stream() if tokenizer is not None else None

    def push(self, token_id: int) -> str:
        return self.stream.push(token_id) if self.stream is not None else ""


def _distilled_draft():
    from hpllm.compress.distill import load_distilled
    from hpllm.config import ConfigError

    try:
        config, params = load_distilled()
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    return params, config


class EngineCore:
    """Requests in, RequestOutputs out, one `step()` at a time."""

    def __init__(self, params, config: ModelConfig, tokenizer=None,
                 engine_config: EngineConfig | None = None, draft=None):
        """draft: (params, ModelConfig) of the draft model for speculative="draft" (default:
        the one `hpllm distill` cached)."""
        ec = engine_config or EngineConfig()
        ec.validate()
        self.config, self.engine_config, self.tokenizer = config, ec, tokenizer
        self.max_model_len = min(ec.max_model_len or config.max_seq_len, config.max_seq_len)
        num_blocks = num_blocks_for(config, ec)
        self.blocks = BlockManager(num_blocks, ec.block_size, ec.enable_prefix_caching)
        self.model = PagedModel(params, config, num_blocks, ec.block_size, _DTYPES[ec.dtype],
                                ec.kv_dtype, ec.unroll_layers)
        self.speculator = None
        if ec.speculative:
            draft_model = None
            if ec.speculative == "draft":
                draft_params, draft_config = draft or _distilled_draft()
                draft_model = PagedModel(draft_params, draft_config, num_blocks, ec.block_size,
                                         _DTYPES[ec.dtype], ec.kv_dtype, ec.unroll_layers)
            self.speculator = Speculator(ec.speculative, ec.num_speculative_tokens, self.model,
                                         adaptive=ec.speculative_adaptive,
                                         draft_layers=ec.draft_layers, draft_model=draft_model)
        self.scheduler = Scheduler(self.blocks, ec.max_num_seqs, ec.max_num_batched_tokens,
                                   self._lookahead if self.speculator else None)
        self.requests: dict[str, _Request] = {}
        self._rng = np.random.default_rng(ec.seed)
        self.max_table = math.ceil(self.max_model_len / ec.block_size)
        self.table_width = pow2_bucket(self.max_table, 4)
        self.shapes: set[tuple[int, int]] = set()  # (rows, tokens per row) passes compiled
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0,
                         "batched_tokens": 0, "finished_requests": 0}

    # -- requests ----------------------------------------------------------------------------
    def _stop_ids(self, params: SamplingParams) -> frozenset:
        model_stops = set()
        if self.tokenizer is not None and not params.ignore_eos:
            model_stops = set(self.tokenizer.stop_ids)
        return frozenset(model_stops | set(params.stop_token_ids))

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival: float | None = None) -> None:
        """prompt: text (needs a tokenizer) or a list of token ids. Raises PromptError /
        SamplingError / ValueError and changes nothing when the request cannot run."""
        params = (params or SamplingParams()).validate(self.config.vocab_size)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise PromptError("a text prompt needs a tokenizer; give token ids instead")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise PromptError("the prompt is empty")
        if any(t < 0 or t >= self.config.vocab_size for t in ids):
            raise PromptError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise PromptError(f"prompt of {len(ids)} tokens does not fit the context of "
                              f"{self.max_model_len} tokens (and leaves no room to generate)")
        longest = min(len(ids) + params.max_tokens, self.max_model_len)
        if self.blocks.blocks_for(longest) > self.blocks.num_usable:
            raise PromptError(f"a sequence of {longest} tokens needs "
                              f"{self.blocks.blocks_for(longest)} KV blocks; the pool has only "
                              f"{self.blocks.num_usable} (raise kv_memory_mb)")
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**31))
        now = time.monotonic() if arrival is None else arrival
        req = _Request(request_id, text, ids, params, seed, self._stop_ids(params),
                       RequestMetrics(now))
        seq = Sequence(list(ids), len(ids), now, request=req)
        req.seqs.append(seq)
        req.outputs.append(CompletionOutput(0, logprobs=[] if params.logprobs is not None
                                            else None))
        req.decoders.append(_Detokenizer(self.tokenizer))
        self.requests[request_id] = req
        self.scheduler.add(seq)
        self.counters["prompt_tokens"] += len(ids)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown
        or already finished)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq, out in zip(req.seqs, req.outputs):
            self.scheduler.finish(seq, "abort")
            if out.finish_reason is None:
                out.finish_reason = "abort"
        for i in range(len(req.outputs), req.params.n):  # samples never forked
            req.outputs.append(CompletionOutput(i, finish_reason="abort"))
        req.metrics.finished = time.monotonic()
        return req.snapshot()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched:
            if self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler made no progress with requests waiting")
            return []
        now = time.monotonic()
        for chunk in sched.decodes + sched.prefills:
            m = chunk.seq.request.metrics
            m.first_scheduled = m.first_scheduled or now
        for chunk in sched.prefills:
            if chunk.seq.index == 0 and chunk.seq.num_generated == 0:
                chunk.seq.request.num_cached_tokens = chunk.seq.num_cached
        self.model.copy_blocks(sched.copies)
        if self.speculator:
            self.speculator.copy_blocks(sched.copies)
        touched: dict[str, _Request] = {}
        self.counters["steps"] += 1
        self.counters["batched_tokens"] += sched.num_tokens
        for chunks in (sched.decodes, sched.prefills):
            if not chunks:
                continue
            if any(c.lookahead for c in chunks):
                self._speculative_decode(chunks, touched)
                continue
            logits = self._run(chunks)
            for chunk in chunks:
                self.scheduler.commit(chunk)
            self._sample(logits, [c for c in chunks if c.samples], touched)
        outputs = []
        for req in touched.values():
            outputs.append(req.snapshot())
            if req.finished:
                req.metrics.finished = time.monotonic()
                del self.requests[req.request_id]
                self.counters["finished_requests"] += 1
        return outputs

    def _tables(self, chunks: list[Chunk], rows: int):
        # One table width for the engine's whole life (paged attention only visits the
        # blocks a row can see), so the table never adds compiled variants.
        tables = np.zeros((rows, self.table_width), np.int32)
        for r, c in enumerate(chunks):
            tables[r, :len(c.seq.table.blocks)] = c.seq.table.blocks
        return tables

    def _run(self, chunks: list[Chunk], drafts=None, n_proposed=None, tables=None):
        """One pass over the chunks; with drafts (R, G) and n_proposed (R,), decode rows score
        [last token, first n_proposed drafts] and every position's logits come back. tables:
        the chunks' block tables if the caller already built them."""
        # Few shapes, few compiles (seconds each for a real model): rows by powers of two,
        # prefill chunk lengths by powers of four from 16, drafts by powers of two.
        rows = pow2_bucket(len(chunks))
        longest = max(c.length for c in chunks)
        width = 1 if longest == 1 else 16
        while width < longest:
            width *= 4
        if longest > 1:
            width = min(width, pow2_bucket(self.engine_config.max_num_batched_tokens, 16))
        if drafts is not None:
            width = 1 + drafts.shape[1]
        self.shapes.add((rows, width))
        tokens = np.zeros((rows, width), np.int32)
        positions = np.full((rows, width), -1, np.int32)
        last = np.zeros(rows, np.int32)
        for r, c in enumerate(chunks):
            n = c.length if drafts is None else 1 + n_proposed[r]
            tokens[r, :c.length] = c.seq.tokens[c.start:c.start + c.length]
            if drafts is not None:
                tokens[r, 1:n] = drafts[r, :n - 1]
            positions[r, :n] = np.arange(c.start, c.start + n)
            last[r] = c.length - 1
        if tables is None:
            tables = self._tables(chunks, rows)
        return self.model.run(tokens, positions, tables, None if drafts is not None else last)

    # -- speculative decoding (hpllm.infer.spec_decode) ---------------------------------------
    def _lookahead(self, seq: Sequence) -> int:
        p = seq.request.params
        if not speculable(p):
            return 0
        # Never draft past max_tokens or the context: every accepted draft is emitted.
        limit = min(p.max_tokens - seq.num_generated, self.max_model_len - len(seq.tokens)) - 1
        return self.speculator.lookahead(seq, limit)

    def _speculative_decode(self, chunks: list[Chunk], touched: dict) -> None:
        """Decode rows with drafts: propose, score every row's [last, drafts...] in one pass,
        accept/reject per row; rows that cannot speculate sample their first position."""
        rows = pow2_bucket(len(chunks))
        sample_rows = [SampleRow(c.seq.request.params, c.seq.request.seed, c.seq.index,
                                 c.seq.num_generated, c.seq.request.prompt_ids, c.seq.output_ids)
                       for c in chunks]
        arrays = {k: jnp.asarray(v) for k, v in row_arrays(sample_rows, rows).items()}
        filters = any(r.params.has_filters and not r.params.greedy for r in sample_rows)
        tables = self._tables(chunks, rows)
        drafts, n_proposed, q = self.speculator.propose(chunks, tables, arrays, filters)
        logits = self._run(chunks, drafts, n_proposed, tables)
        n_accepted, tokens = jax.device_get(accept_rows(
            logits, jnp.asarray(drafts), q, jnp.asarray(n_proposed), arrays, filters=filters))
        plain = [r for r, c in enumerate(chunks) if not speculable(c.seq.request.params)]
        if plain:
            for r in plain:
                self.scheduler.commit(chunks[r])
            index = np.zeros(pow2_bucket(len(plain)), np.int32)
            index[:len(plain)] = plain
            self._sample(logits[jnp.asarray(index), 0], [chunks[r] for r in plain], touched)
        for r, c in enumerate(chunks):
            if r in plain:
                continue
            seq, n = c.seq, int(n_accepted[r])
            self.speculator.record(seq, c.start, int(n_proposed[r]), n)
            touched[seq.request.request_id] = seq.request
            for token in [*drafts[r, :n].tolist(), int(tokens[r])]:
                self._append(seq, token, None, None)
                if seq.finish_reason is not None:
                    break
            if seq.finish_reason is None:
                c.length = 1 + n  # the last token and the accepted drafts are computed
                self.scheduler.commit(c)

    def _sample(self, logits, chunks: list[Chunk], touched: dict) -> None:
        """Sample the next token of each chunk's sequence; a request's first sample with
        n > 1 draws n tokens from the same logits and forks the other n - 1 sequences."""
        picks, rows, targets = [], [], []
        for r, c in enumerate(chunks):
            seq, req = c.seq, c.seq.request
            forking = req.params.n > 1 and len(req.seqs) == 1 and seq.num_generated == 0
            for index in (range(req.params.n) if forking else [seq.index]):
                picks.append(r)
                rows.append(SampleRow(req.params, req.seed, index, seq.num_generated,
                                      req.prompt_ids, seq.output_ids))
                targets.append((seq, index))
        if not picks:
            return
        index = np.zeros(pow2_bucket(len(picks)), np.int32)
        index[:len(picks)] = picks
        sampled = sample(logits[jnp.asarray(index)], rows)
        # fork before the parent appends its token: children copy the prompt only
        targets = [seq if idx == seq.index else self._fork(seq, idx) for seq, idx in targets]
        for i, seq in enumerate(targets):
            top = None
            if sampled.top_ids is not None:
                k = seq.request.params.logprobs or 0
                top = list(zip(sampled.top_ids[i, :k].tolist(),
                               sampled.top_logprobs[i, :k].tolist()))
            lp = float(sampled.logprobs[i]) if sampled.logprobs is not None else None
            self._append(seq, int(sampled.tokens[i]), lp, top)
            touched[seq.request.request_id] = seq.request

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        req = parent.request
        child = Sequence(list(parent.tokens), parent.prompt_len, parent.arrival, request=req,
                         index=index, table=self.blocks.fork(parent.table),
                         num_computed=parent.num_computed)
        req.seqs.append(child)
        req.outputs.append(CompletionOutput(index, logprobs=[] if req.params.logprobs
                                            is not None else None))
        req.decoders.append(_Detokenizer(self.tokenizer))
        self.scheduler.add_running(child)
        return child

    def _append(self, seq: Sequence, token: int, logprob, top) -> None:
        req, p = seq.request, seq.request.params
        out, detok = req.outputs[seq.index], req.decoders[seq.index]
        seq.tokens.append(token)
        out.token_ids.append(token)
        if out.logprobs is not None:
            out.logprobs.append({"token_id": token, "logprob": logprob, "top": top or []})
        now = time.monotonic()
        m = req.metrics
        if m.first_token is None:
            m.first_token = now
        m.last_token = now
        m.token_times.append(now)
        self.counters["generation_tokens"] += 1
        n = seq.num_generated
        if token in req.stop_ids and n > p.min_tokens:
            return self._finish(seq, "stop", token)
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
                    return self._finish(seq, "stop", s)
        if n >= p.max_tokens or len(seq.tokens) >= self.max_model_len:
            return self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        out = seq.request.outputs[seq.index]
        out.finish_reason, out.stop_reason = reason, stop_reason
        self.scheduler.finish(seq, reason)

    # -- introspection -----------------------------------------------------------------------
    def stats(self) -> dict:
        b = self.blocks
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_usage": b.usage,
            "num_blocks": b.num_usable,
            "free_blocks": b.num_free,
            "prefix_queries": b.stats.prefix_queries,
            "prefix_hits": b.stats.prefix_hits,
            "preemptions": self.scheduler.num_preemptions,
            "compiled_shapes": len(self.shapes),
            **self.counters,
            **({"spec_proposed": self.speculator.stats.proposed,
                "spec_accepted": self.speculator.stats.accepted,
                "spec_rounds": self.speculator.stats.rounds} if self.speculator else {}),
        }


class LLM:
    """Offline batched generation, in the spirit of vLLM's `LLM`."""

    def __init__(self, model, engine_config: EngineConfig | None = None, **engine_kw):
        if isinstance(model, str):
            from hpllm.checkpoints.registry import load_model

            model = load_model(model, progress=False)
        ec = engine_config or EngineConfig(**engine_kw)
        self.model = model
        self.engine = EngineCore(model.params, model.config, model.tokenizer, ec)
        self._counter = 0

    def generate(self, prompts, sampling_params=None, progress: bool = False):
        """prompts: a string, a list of strings, or a list of token-id lists. sampling_params:
        one SamplingParams for all, or one per prompt. Returns RequestOutputs in prompt
        order. All requests are validated before any is queued."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else (
            [sampling_params or SamplingParams()] * len(prompts))
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                self._counter += 1
                ids.append(str(self._counter))
                self.engine.add_request(ids[-1], prompt, p)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        results = {}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), unit="req")
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update()
        if bar is not None:
            bar.close()
        return [results[rid] for rid in ids]

"""The engine core: requests in, RequestOutputs out, one `step()` at a time.

One step = one schedule (hpllm.infer.scheduler): a jitted decode pass (one token for each
running sequence, plus its speculative drafts when enabled) and a jitted prefill pass (a
chunk of each prefilling sequence), both reading and writing the same block pool through
per-row block tables (hpllm.infer.paged_model); then one jitted sampling call per pass
(hpllm.infer.sampling; rows under a structured-output constraint bring their allowed-token
masks, hpllm.infer.structured), and each new token goes to its request
(hpllm.infer.requests: stop conditions, text, the grammar's progress). `EngineCore` is
synchronous and single-threaded; the async engine (hpllm.infer.async_engine) drives it from a
background thread, the offline `LLM` (hpllm.infer.llm) in a loop.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.config import EngineConfig, ModelConfig
from hpllm.infer.generate import PromptError
from hpllm.infer.kv_cache import BlockManager
from hpllm.infer.paged_model import DTYPES, PagedModel, block_tables, num_blocks_for, pad_chunks
from hpllm.infer.requests import (Request, RequestMetrics, RequestOutput, prompt_ids,
                                  stop_token_ids)
from hpllm.infer.sampling import SampleRow, SamplingParams, pow2_bucket, row_arrays, sample
from hpllm.infer.scheduler import Chunk, Scheduler, Sequence
from hpllm.infer.speculative.accept import accept_rows
from hpllm.infer.speculative.control import speculable
from hpllm.infer.speculative.engine_steps import Speculator
from hpllm.infer.speculative.proposers import load_distilled_draft
from hpllm.infer.structured import compile_grammar, fill_masks


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
        self.model = PagedModel(params, config, num_blocks, ec.block_size, DTYPES[ec.dtype],
                                ec.kv_dtype, ec.unroll_layers)
        self.speculator = None
        if ec.speculative:
            draft_model = None
            if ec.speculative == "draft":
                draft_params, draft_config = draft or load_distilled_draft()
                draft_model = PagedModel(draft_params, draft_config, num_blocks, ec.block_size,
                                         DTYPES[ec.dtype], ec.kv_dtype, ec.unroll_layers)
            self.speculator = Speculator(ec.speculative, ec.num_speculative_tokens, self.model,
                                         adaptive=ec.speculative_adaptive,
                                         draft_layers=ec.draft_layers, draft_model=draft_model)
        self.scheduler = Scheduler(self.blocks, ec.max_num_seqs, ec.max_num_batched_tokens,
                                   self._lookahead if self.speculator else None)
        self.requests: dict[str, Request] = {}
        self._rng = np.random.default_rng(ec.seed)
        self.table_width = pow2_bucket(math.ceil(self.max_model_len / ec.block_size), 4)
        self.shapes: set[tuple[int, int]] = set()  # (rows, tokens per row) passes compiled
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0,
                         "batched_tokens": 0, "finished_requests": 0}

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival: float | None = None) -> None:
        """prompt: text (needs a tokenizer) or a list of token ids. Raises PromptError /
        SamplingError / ValueError and changes nothing when the request cannot run."""
        params = (params or SamplingParams()).validate(self.config.vocab_size)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = prompt_ids(prompt, self.tokenizer, self.config.vocab_size,
                               self.max_model_len)
        longest = min(len(ids) + params.max_tokens, self.max_model_len)
        if self.blocks.blocks_for(longest) > self.blocks.num_usable:
            raise PromptError(f"a sequence of {longest} tokens needs "
                              f"{self.blocks.blocks_for(longest)} KV blocks; the pool has only "
                              f"{self.blocks.num_usable} (raise kv_memory_mb)")
        grammar = None if params.structured is None else compile_grammar(
            self.tokenizer, params.structured, self.config.vocab_size)  # cached per schema
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**31))
        now = time.monotonic() if arrival is None else arrival
        req = Request(request_id, text, ids, params, seed,
                      stop_token_ids(self.tokenizer, params), RequestMetrics(now),
                      grammar=grammar)
        seq = Sequence(list(ids), len(ids), now, request=req)
        req.add_sample(seq, self.tokenizer)
        self.requests[request_id] = req
        self.scheduler.add(seq)
        self.counters["prompt_tokens"] += len(ids)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown
        or already finished)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            self.scheduler.finish(seq, "abort")
        req.abort()
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
        touched: dict[str, Request] = {}
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

    def _tables(self, chunks: list[Chunk]):
        return block_tables(chunks, pow2_bucket(len(chunks)), self.table_width)

    def _run(self, chunks: list[Chunk], drafts=None, n_proposed=None, tables=None):
        """One pass over the chunks; with drafts (R, G) and n_proposed (R,), decode rows score
        [last token, first n_proposed drafts] and every position's logits come back. tables:
        the chunks' block tables if the caller already built them."""
        tokens, positions, last = pad_chunks(chunks, pow2_bucket(len(chunks)),
                                             self.engine_config.max_num_batched_tokens,
                                             drafts, n_proposed)
        self.shapes.add(tokens.shape)
        if tables is None:
            tables = self._tables(chunks)
        return self.model.run(tokens, positions, tables, None if drafts is not None else last)

    # -- speculative decoding (hpllm.infer.speculative.engine_steps) --------------------------
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
        sample_rows = [SampleRow(c.seq.request.params, c.seq.request.seed, c.seq.index,
                                 c.seq.num_generated, c.seq.request.prompt_ids, c.seq.output_ids)
                       for c in chunks]
        arrays = {k: jnp.asarray(v)
                  for k, v in row_arrays(sample_rows, pow2_bucket(len(chunks))).items()}
        filters = any(r.params.has_filters for r in sample_rows)
        tables = self._tables(chunks)
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

    # -- sampling and new tokens -------------------------------------------------------------
    def _sample(self, logits, chunks: list[Chunk], touched: dict) -> None:
        """Sample the next token of each chunk's sequence; a request's first sample with
        n > 1 draws n tokens from the same logits and forks the other n - 1 sequences."""
        picks, rows, targets, matchers = [], [], [], []
        for r, c in enumerate(chunks):
            seq, req = c.seq, c.seq.request
            forking = req.params.n > 1 and len(req.seqs) == 1 and seq.num_generated == 0
            for index in (range(req.params.n) if forking else [seq.index]):
                picks.append(r)
                rows.append(SampleRow(req.params, req.seed, index, seq.num_generated,
                                      req.prompt_ids, seq.output_ids))
                targets.append((seq, index))
                matchers.append(req.matchers[seq.index])  # forks start from the parent's
        if not picks:
            return
        index = np.zeros(pow2_bucket(len(picks)), np.int32)
        index[:len(picks)] = picks
        # the masks are computed on the host while the device still runs the forward pass
        mask = (fill_masks(matchers, len(index), self.config.vocab_size)
                if any(m is not None for m in matchers) else None)
        sampled = sample(logits[jnp.asarray(index)], rows, mask)
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
        req.add_sample(child, self.tokenizer)
        self.scheduler.add_running(child)
        return child

    def _append(self, seq: Sequence, token: int, logprob, top) -> None:
        self.counters["generation_tokens"] += 1
        reason = seq.request.append(seq, token, logprob, top, self.max_model_len)
        if reason is not None:
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


"""The engine core: requests in, RequestOutputs out, one `step()` at a time.

One step = one schedule (hpllm.infer.scheduler) run as ONE pass over a flat batch of tokens
(hpllm.infer.ragged): every decoding sequence's token (with its speculative drafts as extra
tokens of its row) and every prefill chunk, end to end, reading and writing one block pool
through the sequences' block tables (hpllm.infer.paged_model: the fused CPU decoder step or
XLA). Passes are bucketed by token count and sampled rows only, so `warmup` can compile all
of them before the first request. Then one jitted sampling call (hpllm.infer.sampling; rows
under a structured-output constraint bring their allowed-token masks,
hpllm.infer.structured), and each new token goes to its request (hpllm.infer.requests: stop
conditions, text, the grammar's progress). `EngineCore` is synchronous and single-threaded;
the async engine (hpllm.infer.async_engine) drives it from a background thread, the offline
`LLM` (hpllm.infer.llm) in a loop.
"""

from __future__ import annotations

import collections
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from hpllm.config import EngineConfig, ModelConfig
from hpllm.infer.generate import PromptError
from hpllm.infer.kv_cache import BlockManager
from hpllm.infer.paged_model import (DTYPES, PagedModel, block_tables, choose_backend,
                                     num_blocks_for)
from hpllm.infer.ragged import (SMALLEST_TOKEN_BUCKET, FlatBatchBuilder, bucket, dummy_batch,
                               pow_buckets)
from hpllm.infer.requests import (Request, RequestMetrics, RequestOutput, prompt_ids,
                                  stop_token_ids)
from hpllm.infer.sampling import SampleRow, SamplingParams, pow2_bucket, sample
from hpllm.infer.scheduler import Chunk, Scheduler, Sequence
from hpllm.infer.speculative.accept import accept_rows
from hpllm.infer.speculative.control import speculable
from hpllm.infer.speculative.engine_steps import Speculator
from hpllm.infer.speculative.proposers import load_distilled_draft
from hpllm.infer.structured import compile_grammar, fill_masks


@jax.jit
def _pick_rows(logits, index):
    return logits[index]


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
        self.backend = choose_backend(ec, params, config)
        self.model = PagedModel(params, config, num_blocks, ec.block_size, DTYPES[ec.dtype],
                                ec.kv_dtype, ec.unroll_layers, self.backend)
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
        # One (num_slots, width) table for the engine's life; passes bucketed by tokens and
        # sampled rows only (speculative rows bring 1 + drafts logits each).
        self.table_width = pow2_bucket(math.ceil(self.max_model_len / ec.block_size), 4)
        self.num_slots = ec.max_num_seqs
        # The fused kernel's executables are one FFI call each (cheap to compile, cheap to
        # warm): buckets from 1 token, so a lone decode does not run as 8 rows (int8 SmolLM2:
        # 25-30 ms in the 8 bucket vs 6-12 ms at 1, load 8). XLA's from 8: each compiles.
        smallest = 1 if self.backend == "kernel" else SMALLEST_TOKEN_BUCKET
        self.token_buckets = pow_buckets(smallest, ec.max_num_batched_tokens)
        max_rows = 2 * ec.max_num_seqs  # headroom for n > 1 forks' repeated rows
        if self.speculator:
            max_rows = (pow2_bucket(ec.max_num_seqs)
                        * (1 + pow2_bucket(self.speculator.max_gamma, 4)) + ec.max_num_seqs)
        # powers of 2 (the sampler's rows too): 4 left 32 decode rows paying for 64 in the
        # LM head, +25% on the XLA step (SmolLM2, docs/perf/engine.md)
        self.row_buckets = pow_buckets(1, max_rows)
        self.shapes: set[tuple[int, int]] = set()  # (tokens, rows) passes run so far
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0,
                         "batched_tokens": 0, "padded_tokens": 0, "step_seconds": 0.0,
                         "finished_requests": 0}
        # the last steps as (decode rows, prefill tokens, padded tokens T, logits rows R,
        # seconds): what the schedule asked for beside what the pass paid for
        self.trace: collections.deque = collections.deque(maxlen=4096)

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
        started = time.perf_counter()
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
        decodes, prefills = sched.decodes, sched.prefills
        spec = None
        if any(c.lookahead for c in decodes):
            spec = self.speculator.propose_rows(decodes, self._tables(decodes))
        builder = FlatBatchBuilder(self.num_slots, self.table_width)
        index = spec.add_rows(builder, decodes) if spec else []
        sampled, last = [], []
        for c in (prefills if spec else decodes + prefills):
            flat = builder.add(c.seq.table.blocks, c.seq.tokens[c.start:c.start + c.length],
                               c.start)
            if c.samples:
                last.append(flat[-1])
                sampled.append(c)
        counts = [self._num_samples(c.seq) for c in sampled]
        # forks' rows laid out by the pass itself (no gather), while the rows fit a bucket
        laid_out = not spec and sum(counts) <= self.row_buckets[-1]
        index += [i for i, k in zip(last, counts) for _ in range(k if laid_out else 1)]
        batch = builder.build(index, self.token_buckets, self.row_buckets)
        self.shapes.add((len(batch.tokens), len(batch.logits_index)))
        logits = self.model.run_ragged(batch)
        for c in (prefills if spec else decodes + prefills):
            self.scheduler.commit(c)
        offset = 0
        if spec:
            offset = spec.num_logits
            self._speculative_decode(decodes, spec, logits, touched)
        self._sample(logits, sampled, touched, offset, forks_laid_out=laid_out)
        seconds = time.perf_counter() - started
        self.counters["padded_tokens"] += len(batch.tokens)
        self.counters["step_seconds"] += seconds
        self.trace.append((len(decodes), sum(c.length for c in prefills), len(batch.tokens),
                           len(batch.logits_index), seconds))
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

    # -- compiling ahead (hpllm serve calls warmup before it reports ready) -------------------
    def buckets(self) -> list[tuple[int, int]]:
        """The (tokens, sampled rows) shapes a step's pass can have; warmup compiles each
        (rows can exceed tokens: n > 1 forks and speculative rows repeat tokens)."""
        return [(t, r) for t in self.token_buckets for r in self.row_buckets]

    def warmup(self, progress=None) -> int:
        """Compile what a step runs, before the first request: the pass for every bucket in
        buckets() (dummy passes that write only the null block), the sampler per row bucket
        (greedy or drawn; top-k/p/min-p filters and logprobs up to 8 are data of those
        executables, hpllm.infer.sampling) and the copy-on-write copies. Changes no engine
        state (every copy is the null block onto itself). progress(done, total) after each;
        returns the count. Not covered: penalties, logit_bias, structured-output masks,
        top_logprobs over 8, speculative accept/reject (they compile on first use)."""
        shapes = self.buckets()
        copies = pow_buckets(4, 2 * self.scheduler.max_num_seqs)  # a decode copies <= 2
        total = len(shapes) + len(self.row_buckets) + len(copies)
        done = 0

        def tick():
            nonlocal done
            done += 1
            if progress:
                progress(done, total)

        for t, r in shapes:
            self.model.run_ragged(dummy_batch(t, r, self.num_slots, self.table_width))
            tick()
        kinds = [SampleRow(SamplingParams(temperature=t, logprobs=k), 0, 0, 0, [], [])
                 for t, k in ((0.0, None), (0.0, 0), (1.0, 0))]
        for r in self.row_buckets:  # plain greedy (no executable on CPU), greedy with
            logits = jnp.zeros((r, self.config.vocab_size), jnp.float32)  # logprobs, drawn
            for row in kinds:
                sample(logits, [row] * r)
            tick()
        for n in copies:
            self.model.copy_blocks([(0, 0)] * n)
            tick()
        jax.block_until_ready(self.model.pool)
        return total

    # -- speculative decoding (hpllm.infer.speculative.engine_steps) --------------------------
    def _lookahead(self, seq: Sequence) -> int:
        p = seq.request.params
        if not speculable(p):
            return 0
        # Never draft past max_tokens or the context: every accepted draft is emitted.
        limit = min(p.max_tokens - seq.num_generated, self.max_model_len - len(seq.tokens)) - 1
        return self.speculator.lookahead(seq, limit)

    def _speculative_decode(self, chunks: list[Chunk], spec, logits, touched: dict) -> None:
        """Decode rows scored [last, drafts...] in this step's pass: accept/reject per row;
        rows that cannot speculate sample their first position."""
        drafts, n_proposed = spec.drafts, spec.n_proposed
        n_accepted, tokens = jax.device_get(accept_rows(
            spec.scores(logits), jnp.asarray(drafts), spec.q, jnp.asarray(n_proposed),
            spec.arrays, filters=spec.filters))
        plain = [r for r, c in enumerate(chunks) if not speculable(c.seq.request.params)]
        for r in plain:
            self.scheduler.commit(chunks[r])
        if plain:
            self._sample(logits, [chunks[r] for r in plain], touched,
                         picks=[r * spec.width for r in plain])
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
    def _sample(self, logits, chunks: list[Chunk], touched: dict, offset: int = 0,
                picks=None, forks_laid_out: bool = False) -> None:
        """Sample the next token of each chunk's sequence from logits row offset + r (or
        picks[r]); a request's first sample with n > 1 draws n tokens from the same logits
        and forks the other n - 1 sequences (from n consecutive rows if forks_laid_out:
        the pass returned that row n times, so no gather is needed)."""
        where, row = [], offset
        for r, c in enumerate(chunks):
            where.append(picks[r] if picks else row)
            row += self._num_samples(c.seq) if forks_laid_out else 1
        picks, rows, targets, matchers = [], [], [], []
        for r, c in enumerate(chunks):
            seq, req = c.seq, c.seq.request
            forking = self._num_samples(seq) > 1
            for j, index in enumerate(range(req.params.n) if forking else [seq.index]):
                picks.append(where[r] + (j if forks_laid_out else 0))
                rows.append(SampleRow(req.params, req.seed, index, seq.num_generated,
                                      req.prompt_ids, seq.output_ids))
                targets.append((seq, index))
                matchers.append(req.matchers[seq.index])  # forks start from the parent's
        if not picks:
            return
        if picks == list(range(len(picks))) and logits.shape[0] >= len(picks):
            n_rows = logits.shape[0]  # the pass returned exactly these rows
        else:
            n_rows = (bucket(len(picks), self.row_buckets) if len(picks) <= self.row_buckets[-1]
                      else pow2_bucket(len(picks)))
            index = np.zeros(n_rows, np.int32)
            index[:len(picks)] = picks
            logits = _pick_rows(logits, index)
        # the masks are computed on the host while the device still runs the forward pass
        mask = (fill_masks(matchers, n_rows, self.config.vocab_size)
                if any(m is not None for m in matchers) else None)
        sampled = sample(logits, rows, mask)
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

    @staticmethod
    def _num_samples(seq: Sequence) -> int:
        """Tokens sampled for this sequence now: n at a request's first sample (it forks)."""
        req = seq.request
        return req.params.n if req.params.n > 1 and len(req.seqs) == 1 and \
            seq.num_generated == 0 else 1

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


"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every sequence is a list of token ids (prompt, then generated) of which the first
`num_computed` have their K/V in the cache; a step computes the next chunk of the rest. A
decoding sequence has exactly one token to compute, a prefilling one many, and a sequence
preempted for lack of memory simply starts again from num_computed = 0 (recomputation), with
its generated tokens treated as part of its prompt. Per step, within a token budget:
  1. running sequences, oldest first: decodes take one token each, unfinished prefills a
     chunk; when a block cannot be had, the newest running sequence is preempted;
  2. then waiting sequences, first come first served, get prefill chunks (chunked prefill)
     while the budget, the sequence limit and free blocks last.
New requests thus join at step boundaries and finished ones leave at once.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field

from hpllm.infer.kv_cache import BlockManager, BlockTable, OutOfBlocks


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    tokens: list[int]  # prompt + generated
    prompt_len: int
    arrival: float  # for first-come-first-served order (equal for a request's samples)
    request: object = None  # the engine's request this sequence belongs to
    index: int = 0  # which of the request's n samples
    seq_id: int = field(default_factory=lambda: next(_ids))
    table: BlockTable = field(default_factory=BlockTable)
    num_computed: int = 0
    num_cached: int = 0  # prompt tokens found in the prefix cache when last admitted
    status: Status = Status.WAITING
    finish_reason: str | None = None
    preemptions: int = 0

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    def order(self):
        return (self.arrival, self.seq_id)


@dataclass
class Chunk:
    seq: Sequence
    start: int  # first position computed
    length: int
    lookahead: int = 0  # speculative slots reserved after a decode token (its drafts' K/V)

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token (its logits are sampled)."""
        return self.start + self.length == len(self.seq.tokens)


@dataclass
class Schedule:
    decodes: list[Chunk] = field(default_factory=list)  # one token each
    prefills: list[Chunk] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) block copies
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(1 + c.lookahead for c in self.decodes) + sum(c.length for c in self.prefills)

    def __bool__(self):
        return bool(self.decodes or self.prefills)


class Scheduler:
    """`lookahead(seq) -> int`, if given, asks how many speculative slots a decoding sequence
    wants this step (speculative decoding: the draft tokens are scored in the same pass)."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int = 32,
                 max_num_batched_tokens: int = 512, lookahead=None):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.blocks = blocks
        self.lookahead = lookahead
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sample that already shares its parent's computed blocks."""
        seq.status = Status.RUNNING
        self.running.append(seq)
        self.running.sort(key=Sequence.order)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence (finished or aborted) and free its blocks at once."""
        if seq.status is Status.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_table(seq.table)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _preempt(self, seq: Sequence, out: Schedule) -> None:
        self.running.remove(seq)
        self.blocks.free_table(seq.table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        # back into the queue in arrival order, so it resumes before younger requests
        waiting = sorted([*self.waiting, seq], key=Sequence.order)
        self.waiting = deque(waiting)
        out.preempted.append(seq)

    def schedule(self) -> Schedule:
        out = Schedule()
        budget = self.max_num_batched_tokens
        i = 0
        # at most max_num_seqs chunks (forked samples can make more running): the step's
        # table has that many rows; the rest wait a step, keeping their blocks
        while i < len(self.running) and budget > 0 and i < self.max_num_seqs:
            seq = self.running[i]
            todo = len(seq.tokens) - seq.num_computed
            n = min(todo, budget)
            extra = 0
            if todo == 1 and self.lookahead is not None:
                extra = max(0, min(self.lookahead(seq), budget - 1))
            try:
                if todo == 1:
                    try:
                        out.copies += self.blocks.prepare_range(
                            seq.table, seq.num_computed, seq.num_computed + 1 + extra)
                    except OutOfBlocks:
                        if not extra:
                            raise
                        extra = 0  # memory is short: decode without speculating first
                        out.copies += self.blocks.prepare_range(
                            seq.table, seq.num_computed, seq.num_computed + 1)
                else:
                    self.blocks.allocate(seq.table, seq.tokens, seq.num_computed + n)
            except OutOfBlocks:
                victim = self.running[-1]  # the newest; never one already scheduled (< i)
                self._preempt(victim, out)
                if victim is seq:
                    break
                continue  # retry this sequence with the freed blocks
            if todo == 1:
                out.decodes.append(Chunk(seq, seq.num_computed, 1, extra))
            else:
                out.prefills.append(Chunk(seq, seq.num_computed, n))
            budget -= n + extra
            i += 1
        # Memory is short when this step preempted: admit nobody (the victim would come
        # straight back and thrash).
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and not out.preempted):
            seq = self.waiting[0]
            cached = len(self.blocks.match_prefix(seq.tokens)[0]) * self.blocks.block_size
            n = min(len(seq.tokens) - cached, budget)
            try:
                seq.num_computed = seq.num_cached = self.blocks.allocate(
                    seq.table, seq.tokens, cached + n)
            except OutOfBlocks:
                break  # wait for running sequences to finish; never preempt for a newcomer
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.prefills.append(Chunk(seq, seq.num_computed, n))
            budget -= n
        return out

    def commit(self, chunk: Chunk) -> None:
        """After the step ran: the chunk's K/V are in the cache."""
        seq = chunk.seq
        seq.num_computed = chunk.start + chunk.length
        self.blocks.register_full_blocks(seq.table, seq.tokens, seq.num_computed)

"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, per-sequence block tables,
reference counts with copy-on-write, and automatic prefix caching.

This module is host-side Python only (vLLM's block manager, as a small testable object); the
device arrays the blocks index live in the engine. Block 0 is reserved: unused block-table
entries and padding tokens point at it, so it is never handed out.

Prefix caching: a block that is full gets a hash chained from its parent's hash and its own
tokens, so equal hashes mean equal prefixes. A full block whose last owner finishes stays in
the cache (evictable, least recently used first) until its memory is needed; a new sequence
whose prompt starts with cached blocks takes them instead of recomputing them.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field

NULL_BLOCK = 0


class OutOfBlocks(RuntimeError):
    """The pool cannot supply the blocks asked for (the scheduler preempts instead)."""


def block_hash(parent: bytes | None, tokens) -> bytes:
    """Hash of a full block given its parent's hash: equal hashes <=> equal token prefixes
    (up to SHA-256 collisions)."""
    h = hashlib.sha256(parent or b"")
    h.update(b",".join(str(int(t)).encode() for t in tokens))
    return h.digest()


@dataclass
class BlockTable:
    """One sequence's blocks in logical order, and the hash of each full block it registered
    or reused (None for blocks not (yet) in the prefix cache)."""
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes | None] = field(default_factory=list)


@dataclass
class Stats:
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which found cached
    evictions: int = 0
    copies: int = 0  # copy-on-write block copies


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is reserved), got "
                             f"{num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() -> 1, 2, ..
        self.cached: dict[bytes, int] = {}  # hash -> block holding that prefix
        self.hash_of: dict[int, bytes] = {}  # the reverse, for registered blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced, LRU first
        self.stats = Stats()

    # -- capacity ----------------------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now: never-used/freed ones plus evictable cached ones."""
        return len(self.free) + len(self.evictable)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by running sequences."""
        return 1.0 - self.num_free / self.num_usable

    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    # -- allocation --------------------------------------------------------------------------
    def _take(self) -> int:
        if self.free:
            block = self.free.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash_of.pop(block)]
            self.stats.evictions += 1
        else:
            raise OutOfBlocks("no free KV blocks")
        self.ref_count[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_count[block] -= 1
        assert self.ref_count[block] >= 0, f"block {block} released twice"
        if self.ref_count[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None  # keep its contents for later prefix hits
            else:
                self.free.append(block)

    def match_prefix(self, tokens) -> tuple[list[int], list[bytes]]:
        """Cached blocks holding a prefix of `tokens`, and their hashes. At most
        (len - 1) // block_size blocks: the last token is always computed, because its logits
        are what the next sample needs."""
        if not self.enable_prefix_caching:
            return [], []
        blocks, hashes, parent = [], [], None
        bs = self.block_size
        for i in range((len(tokens) - 1) // bs):
            parent = block_hash(parent, tokens[i * bs:(i + 1) * bs])
            block = self.cached.get(parent)
            if block is None:
                break
            blocks.append(block)
            hashes.append(parent)
        return blocks, hashes

    def allocate(self, table: BlockTable, tokens, n_tokens: int) -> int:
        """Make `table` cover the first n_tokens of `tokens`. On an empty table, first reuses
        cached prefix blocks; returns how many leading tokens are already computed (a multiple
        of block_size, 0 if none). All-or-nothing: raises OutOfBlocks and changes nothing."""
        reused, hashes = [], []
        if not table.blocks:
            reused, hashes = self.match_prefix(tokens)
        have = len(table.blocks) + len(reused)
        need = max(0, self.blocks_for(n_tokens) - have)
        # Reused blocks that are evictable stop being free once taken: count them too.
        reused_free = sum(1 for b in reused if self.ref_count[b] == 0)
        if need + reused_free > self.num_free:
            raise OutOfBlocks(f"need {need + reused_free} KV blocks, {self.num_free} free")
        if not table.blocks and self.enable_prefix_caching:
            self.stats.prefix_queries += len(tokens)
            self.stats.prefix_hits += len(reused) * self.block_size
        for block in reused:
            if self.ref_count[block] == 0:
                del self.evictable[block]
            self.ref_count[block] += 1
        table.blocks += reused
        table.hashes += hashes
        for _ in range(need):
            table.blocks.append(self._take())
            table.hashes.append(None)
        return len(reused) * self.block_size

    def register_full_blocks(self, table: BlockTable, tokens, n_computed: int) -> None:
        """Enter the blocks that n_computed tokens have filled into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(n_computed // bs):
            if table.hashes[i] is not None:
                continue
            parent = table.hashes[i - 1] if i else None
            h = block_hash(parent, tokens[i * bs:(i + 1) * bs])
            table.hashes[i] = h
            block = table.blocks[i]
            if h not in self.cached and block not in self.hash_of:
                self.cached[h] = block
                self.hash_of[block] = h

    def prepare_append(self, table: BlockTable, position: int) -> tuple[int, int] | None:
        """Before writing the token at `position`: allocate its block if needed, and if that
        block is shared (ref count > 1) copy it first. Returns (src, dst) of a copy the engine
        must do on device before the step, else None. Raises OutOfBlocks, changing nothing."""
        index = position // self.block_size
        if index == len(table.blocks):
            table.blocks.append(self._take())
            table.hashes.append(None)
            return None
        block = table.blocks[index]
        if self.ref_count[block] == 1 and block not in self.hash_of:
            return None
        # Shared with another sequence, or registered in the prefix cache (its contents must
        # stay what its hash says): write into a private copy.
        new = self._take()
        self._release(block)
        table.blocks[index], table.hashes[index] = new, None
        self.stats.copies += 1
        return block, new

    def prepare_range(self, table: BlockTable, start: int, end: int) -> list[tuple[int, int]]:
        """prepare_append for every position in [start, end) (a decode plus speculative
        lookahead slots). All-or-nothing: counts the blocks it needs first, raises OutOfBlocks
        and changes nothing if the pool cannot supply them. Returns the copies to do."""
        bs = self.block_size
        first, last = start // bs, (end - 1) // bs
        need = max(0, last + 1 - len(table.blocks))
        need += sum(1 for i in range(first, min(last + 1, len(table.blocks)))
                    if self.ref_count[table.blocks[i]] > 1 or table.blocks[i] in self.hash_of)
        if need > self.num_free:
            raise OutOfBlocks(f"need {need} KV blocks, {self.num_free} free")
        copies = [self.prepare_append(table, max(start, i * bs)) for i in range(first, last + 1)]
        return [c for c in copies if c]

    def fork(self, table: BlockTable) -> BlockTable:
        """A child sharing all of the parent's blocks (n > 1 samples of one prompt)."""
        for block in table.blocks:
            self.ref_count[block] += 1
        return BlockTable(list(table.blocks), list(table.hashes))

    def free_table(self, table: BlockTable) -> None:
        for block in reversed(table.blocks):  # tail blocks become least recently used last
            self._release(block)
        table.blocks.clear()
        table.hashes.clear()

    def check_no_leak(self) -> None:
        """Every usable block is free or evictable (call when no sequence is alive)."""
        held = [b for b in range(1, self.num_blocks) if self.ref_count[b]]
        if held or self.num_free != self.num_usable:
            raise AssertionError(f"KV blocks still referenced: {held[:10]} "
                                 f"({self.num_free} of {self.num_usable} free)")

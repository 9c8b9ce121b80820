"""Block manager (pool, prefix cache, copy-on-write) and scheduler, host-side only."""

import random

import pytest

from hpllm.infer.kv_cache import NULL_BLOCK, BlockManager, BlockTable, OutOfBlocks
from hpllm.infer.scheduler import Scheduler, Sequence, Status


def test_allocate_covers_tokens_and_free_returns_everything():
    bm = BlockManager(10, 4)
    t = BlockTable()
    assert bm.allocate(t, list(range(10)), 10) == 0
    assert len(t.blocks) == 3 and NULL_BLOCK not in t.blocks
    assert bm.num_free == 9 - 3
    bm.allocate(t, list(range(10)), 13)  # grows by one block
    assert len(t.blocks) == 4
    bm.free_table(t)
    bm.check_no_leak()


def test_out_of_blocks_changes_nothing():
    bm = BlockManager(4, 2)  # 3 usable
    t = BlockTable()
    with pytest.raises(OutOfBlocks):
        bm.allocate(t, list(range(8)), 8)  # needs 4
    assert t.blocks == [] and bm.num_free == 3
    bm.check_no_leak()


def test_prefix_cache_hit_reuses_blocks_and_leaves_last_token_to_compute():
    bm = BlockManager(20, 4)
    prompt = list(range(100, 112))  # exactly 3 full blocks
    a = BlockTable()
    bm.allocate(a, prompt, len(prompt))
    bm.register_full_blocks(a, prompt, len(prompt))
    b = BlockTable()
    cached = bm.allocate(b, prompt, len(prompt))
    # 2 blocks reused, not 3: the last token must be computed to get its logits
    assert cached == 8 and b.blocks[:2] == a.blocks[:2] and b.blocks[2] != a.blocks[2]
    assert bm.ref_count[a.blocks[0]] == 2
    assert bm.stats.prefix_hits == 8 and bm.stats.prefix_queries == 24
    # a different second block: only the first is shared (hash chain)
    c = BlockTable()
    other = prompt[:4] + [1, 2, 3, 4] + prompt[8:] + [7]
    assert bm.allocate(c, other, len(other)) == 4
    for t in (a, b, c):
        bm.free_table(t)
    bm.check_no_leak()


def test_freed_cached_blocks_survive_until_evicted_lru():
    bm = BlockManager(5, 2)  # 4 usable
    p1, p2 = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    t1 = BlockTable()
    bm.allocate(t1, p1, 5)
    bm.register_full_blocks(t1, p1, 5)
    bm.free_table(t1)
    assert bm.num_free == 4 and len(bm.evictable) == 2  # still cached
    t2 = BlockTable()
    assert bm.allocate(t2, p1, 5) == 4  # hit after the owner finished
    bm.free_table(t2)
    # a big unrelated request evicts the cached blocks, least recently used first
    t3 = BlockTable()
    bm.allocate(t3, p2 + [0, 0, 0], 8)
    assert bm.stats.evictions == 2 and not bm.cached
    bm.free_table(t3)
    t4 = BlockTable()
    assert bm.allocate(t4, p1, 5) == 0  # gone
    bm.free_table(t4)
    bm.check_no_leak()


def test_fork_shares_blocks_and_copy_on_write_on_append():
    bm = BlockManager(10, 4)
    prompt = list(range(6))  # one full block + 2 tokens in the second
    parent = BlockTable()
    bm.allocate(parent, prompt, 6)
    child = bm.fork(parent)
    assert child.blocks == parent.blocks and bm.ref_count[parent.blocks[1]] == 2
    copy = bm.prepare_append(child, 6)  # writes into the shared, partial block
    assert copy == (parent.blocks[1], child.blocks[1]) and child.blocks[1] != parent.blocks[1]
    assert bm.prepare_append(parent, 6) is None  # now private again
    assert child.blocks[0] == parent.blocks[0]  # the full block stays shared
    assert bm.prepare_append(parent, 8) is None and len(parent.blocks) == 3
    bm.free_table(parent)
    bm.free_table(child)
    bm.check_no_leak()


def test_random_workload_never_leaks():
    rng = random.Random(0)
    bm = BlockManager(30, 3)
    live = []
    for _ in range(400):
        op = rng.random()
        if op < 0.4 or not live:
            prompt = [rng.randrange(5) for _ in range(rng.randrange(1, 12))]  # many repeats
            t = BlockTable()
            try:
                bm.allocate(t, prompt, len(prompt))
            except OutOfBlocks:
                continue
            bm.register_full_blocks(t, prompt, len(prompt))
            live.append([t, prompt])
        elif op < 0.6:
            t, prompt = live[rng.randrange(len(live))]
            try:
                bm.prepare_append(t, len(prompt))
            except OutOfBlocks:
                continue
            prompt.append(rng.randrange(5))
            bm.register_full_blocks(t, prompt, len(prompt))
        elif op < 0.7:
            t, prompt = live[rng.randrange(len(live))]
            live.append([bm.fork(t), list(prompt)])
        else:
            t, _ = live.pop(rng.randrange(len(live)))
            bm.free_table(t)
        assert all(c >= 0 for c in bm.ref_count)
    for t, _ in live:
        bm.free_table(t)
    bm.check_no_leak()


def _seq(n, arrival):
    return Sequence(list(range(n)), n, arrival)


def test_scheduler_decodes_first_then_chunked_prefill_within_budget():
    bm = BlockManager(100, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    a, b = _seq(3, 0), _seq(25, 1)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert [(c.seq, c.length) for c in out.prefills] == [(a, 3), (b, 7)]
    for c in out.prefills:
        s.commit(c)
    a.tokens.append(5)  # a sampled its first token; b is mid-prefill
    out = s.schedule()
    assert [(c.seq, c.start, c.length) for c in out.decodes] == [(a, 3, 1)]
    assert [(c.seq, c.start, c.length) for c in out.prefills] == [(b, 7, 9)]
    assert not out.prefills[0].samples


def test_scheduler_never_schedules_more_than_max_num_seqs():
    """Forked samples can make more sequences run than max_num_seqs (the step's block table
    has that many rows): the newest wait a step, keeping their blocks, and are not
    preempted."""
    bm = BlockManager(100, 4)
    s = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    parent = _seq(6, 0)
    s.add(parent)
    for c in s.schedule().prefills:
        s.commit(c)
    children = []
    for i in (1, 2):
        child = Sequence(list(parent.tokens), 6, 0, index=i, table=bm.fork(parent.table),
                         num_computed=6)
        s.add_running(child)
        children.append(child)
    for seq in [parent, *children]:
        seq.tokens.append(7)
    out = s.schedule()
    assert [c.seq for c in out.decodes] == [parent, children[0]] and not out.preempted
    assert children[1].table.blocks and children[1] in s.running
    for seq in [parent, *children]:
        s.finish(seq, "stop")
    bm.check_no_leak()


def test_scheduler_preempts_newest_when_blocks_run_out():
    bm = BlockManager(5, 2)  # 4 usable blocks = 8 tokens
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    old, new = _seq(4, 0), _seq(4, 1)
    s.add(old)
    s.add(new)
    for c in s.schedule().prefills:
        s.commit(c)
    assert bm.num_free == 0
    old.tokens.append(1)
    new.tokens.append(1)
    out = s.schedule()  # old needs a 3rd block: new is preempted, its blocks freed
    assert out.preempted == [new] and new.status is Status.WAITING and new.num_computed == 0
    assert [c.seq for c in out.decodes] == [old]
    s.finish(old, "stop")
    out = s.schedule()  # new comes back: its prompt (= old's) is in the prefix cache, so
    # only its generated token is recomputed
    assert [(c.seq, c.start, c.length) for c in out.prefills] == [(new, 4, 1)]
    s.finish(new, "stop")
    bm.check_no_leak()


def test_prepare_range_allocates_copies_shared_blocks_all_or_nothing():
    bm = BlockManager(8, 4)
    parent = BlockTable()
    bm.allocate(parent, list(range(6)), 6)  # blocks for positions 0..7, 6 tokens used
    child = bm.fork(parent)
    # a decode at 6 plus 5 lookahead slots (6..11): copy the shared block 1, add block 2
    copies = bm.prepare_range(child, 6, 12)
    assert copies == [(parent.blocks[1], child.blocks[1])]
    assert len(child.blocks) == 3 and child.blocks[0] == parent.blocks[0]
    assert bm.ref_count[child.blocks[1]] == 1 and bm.ref_count[parent.blocks[1]] == 1
    assert bm.prepare_range(child, 8, 12) == []  # already private: nothing to do
    before = (list(child.blocks), bm.num_free, list(bm.ref_count))
    with pytest.raises(OutOfBlocks):
        bm.prepare_range(child, 8, 4 * 8)  # 5 more blocks, only 3 free
    assert (list(child.blocks), bm.num_free, list(bm.ref_count)) == before
    bm.free_table(child)
    bm.free_table(parent)
    bm.check_no_leak()


def test_scheduler_reserves_lookahead_slots_within_the_budget():
    bm = BlockManager(20, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8, lookahead=lambda s: 5)
    seqs = [Sequence(list(range(3)), 3, float(i)) for i in range(2)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    for c in out.prefills:
        sched.commit(c)
        c.seq.tokens.append(1)
    out = sched.schedule()
    assert [c.lookahead for c in out.decodes] == [5, 1]  # 1 + 5, then 1 + 1: budget 8
    assert out.num_tokens == 8
    for c in out.decodes:  # the reserved slots have blocks
        assert len(c.seq.table.blocks) * 4 >= c.start + 1 + c.lookahead

"""Prefix caching in the block owner and the scheduler: no model, no torch."""

from __future__ import annotations

import pytest

from tandem.core.block_pool import BlockPool
from tandem.core.config import SchedulerConfig
from tandem.core.kv_cache_manager import KVCacheManager
from tandem.core.prefix_hash import block_hash, prefix_hashes, root_hash
from tandem.core.sampling_params import SamplingParams
from tandem.core.scheduler import Scheduler
from tandem.core.sequence import FinishReason, Sequence

BS = 4


def _sched(num_blocks: int = 32, budget: int = 64) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=128)
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=True, salt="model|float32")
    return Scheduler(cfg, kv, frozenset(), True)


def _seq(rid: str, prompt: list[int], max_tokens: int = 2, salt: str = "") -> Sequence:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, cache_salt=salt)
    return Sequence(rid, prompt, sp)


def _run_to_end(sched: Scheduler, token: int = 7) -> list:
    steps = []
    while sched.has_work:
        out = sched.schedule()
        steps.append(out)
        sched.update(out, {c.seq.request_id: token for c in out.chunks if c.samples})
    return steps


def test_hash_chain_depends_on_parent_tokens_and_salt():
    a = prefix_hashes(list(range(12)), BS, "m")
    assert len(a) == 3 and len(set(a)) == 3
    assert prefix_hashes(list(range(12)), BS, "m") == a  # stable, not Python's hash()
    assert prefix_hashes(list(range(13)), BS, "m") == a  # the partial tail is not hashed
    changed = prefix_hashes([99, *range(1, 12)], BS, "m")
    assert all(x != y for x, y in zip(changed, a, strict=True))  # parent flows down
    assert prefix_hashes(list(range(12)), BS, "other-model")[0] != a[0]
    assert prefix_hashes(list(range(12)), BS, "m", "tenant")[0] != a[0]
    assert a[1] == block_hash(a[0], [4, 5, 6, 7])
    assert a[0] == block_hash(root_hash("m"), [0, 1, 2, 3])


def test_second_request_shares_the_prefix_and_computes_only_the_rest():
    sched = _sched()
    prompt = list(range(1, 11))  # 2 full blocks + 2 tokens
    first = _seq("a", prompt)
    sched.add(first)
    _run_to_end(sched)
    assert first.num_cached_tokens == 0
    second = _seq("b", prompt + [50])
    sched.add(second)
    out = sched.schedule()
    (chunk,) = out.chunks
    assert chunk.start == 8 and chunk.num_tokens == 3
    assert second.num_cached_tokens == 8
    stats = sched.kv.prefix_stats
    assert stats.hit_tokens == 8 and stats.queried_tokens == 10 + 11


def test_a_fully_cached_prompt_still_computes_its_last_token():
    sched = _sched()
    prompt = list(range(1, 9))  # exactly 2 blocks
    sched.add(_seq("a", prompt))
    _run_to_end(sched)
    sched.add(_seq("b", prompt))
    (chunk,) = sched.schedule().chunks
    assert chunk.start == 4 and chunk.num_tokens == 4 and chunk.samples


def test_shared_blocks_outlive_an_abort_mid_prefill():
    sched = _sched(budget=6)
    prompt = list(range(1, 17))
    sched.add(_seq("a", prompt))
    _run_to_end(sched)
    holder = _seq("b", prompt + [40, 41])
    sched.add(holder)
    sched.schedule()  # b shares 4 blocks... (16 tokens: 3 usable) and computes on
    shared = list(sched.kv.block_table("b")[:3])
    late = _seq("c", prompt + [60, 61, 62, 63, 64, 65, 66, 67])
    sched.add(late)
    out = sched.schedule()
    assert any(c.seq is late for c in out.chunks)
    assert sched.kv.block_table("c")[:3] == shared
    sched.abort("c")  # mid-prefill, with shared blocks
    for block in shared:
        assert sched.kv.pool.refcount(block) == 1  # b still holds them
    # Fill the pool: the allocator must never hand out a block b references.
    taken = sched.kv.pool.allocate(sched.kv.num_free_blocks)
    assert not set(taken) & set(sched.kv.block_table("b"))


def test_eviction_is_lru_and_forgets_the_hash():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.cache(a, b"ha")
    pool.cache(b, b"hb")
    pool.free([a])
    pool.free([b])
    pool.free([c])
    assert pool.num_free == 3 and pool.num_evictable == 2 and pool.num_cached == 2
    (first,) = pool.allocate(1)
    assert first == c  # a truly free block goes before any cached one
    (second,) = pool.allocate(1)
    assert second == a and pool.cached_block(b"ha") is None  # least recently released
    assert pool.cached_block(b"hb") == b and pool.num_evictions == 1
    pool.share(b)
    assert pool.num_evictable == 0 and pool.refcount(b) == 1
    with pytest.raises(MemoryError):
        pool.allocate(1)


def test_eviction_under_memory_pressure_keeps_output_exact_and_blocks_owned_once():
    sched = _sched(num_blocks=8, budget=16)
    for i in range(6):
        seq = _seq(f"r{i}", [i * 100 + t for t in range(1, 14)], max_tokens=3)
        sched.add(seq)
        _run_to_end(sched)
        assert seq.finish_reason is FinishReason.LENGTH
    pool = sched.kv.pool
    assert pool.num_evictions > 0
    assert pool.num_free == pool.num_blocks  # nothing referenced, nothing leaked
    assert pool.num_cached <= pool.num_blocks


def test_cache_salt_separates_tenants():
    sched = _sched()
    prompt = list(range(1, 11))
    sched.add(_seq("a", prompt, salt="tenant-1"))
    _run_to_end(sched)
    other = _seq("b", prompt, salt="tenant-2")
    sched.add(other)
    (chunk,) = sched.schedule().chunks
    assert chunk.start == 0 and other.num_cached_tokens == 0
    same = _seq("c", prompt, salt="tenant-1")
    sched.add(same)
    chunks = sched.schedule().chunks
    assert [c.start for c in chunks if c.seq is same] == [8]


def test_preempted_sequence_recomputes_only_past_its_cached_blocks():
    sched = _sched(num_blocks=9, budget=32)
    old = _seq("old", list(range(1, 13)), max_tokens=16)
    young = _seq("young", list(range(100, 109)), max_tokens=16)
    sched.add(old)
    sched.add(young)
    preempted = []
    while not preempted:
        out = sched.schedule()
        preempted = out.preempted
        sched.update(out, {c.seq.request_id: 7 for c in out.chunks if c.samples})
    assert preempted == [young] and young.num_computed_tokens == 0
    sched.abort("old")
    (chunk,) = sched.schedule().chunks
    # Every full block it had computed (prompt and output tokens) stayed cached.
    assert chunk.seq is young and chunk.start == (young.num_tokens - 1) // BS * BS > 8
    assert young.num_cached_tokens == 0  # usage counts the first prefill only


def test_caching_off_shares_nothing():
    kv = KVCacheManager(8, BS)
    seq = _seq("a", list(range(1, 10)))
    assert kv.match_prefix(seq) == 0 and not kv.owns("a")


def test_reservation_shares_the_cached_leading_blocks_and_leaves_one_to_fill():
    sched = _sched()
    kv = sched.kv
    prompt = list(range(1, 18))  # 4 full blocks + 1
    sched.add(_seq("turn1", prompt))
    _run_to_end(sched)
    chain = prefix_hashes(prompt + [7], BS, kv.salt)  # what the sender hashes
    blocks, cached = kv.reserve("turn2", 18, chain)
    assert cached == 4 and len(blocks) == 5  # 18 tokens: 4 shared + 1 to fill
    assert all(kv.pool.refcount(b) == 1 for b in blocks)
    assert kv.holds_prefix_of(_seq("turn2", prompt + [7]), cached)
    assert not kv.holds_prefix_of(_seq("turn2", [99, *prompt[1:], 7]), cached)
    kv.free("turn2")
    # A whole-block prompt still gets its last block to fill; a stranger's hashes
    # match nothing; a salted request shares nothing.
    _, cached = kv.reserve("exact", 16, chain)
    assert cached == 3
    kv.free("exact")
    assert kv.reserve("other", 18, prefix_hashes([50] * 18, BS, kv.salt))[1] == 0
    kv.free("other")
    assert kv.reserve("salted", 18, prefix_hashes(prompt, BS, kv.salt, "t"))[1] == 0
    kv.free("salted")
    assert kv.num_used_blocks == 0


def test_a_reservation_that_does_not_fit_keeps_nothing():
    sched = _sched(num_blocks=6)
    kv = sched.kv
    prompt = list(range(1, 18))
    sched.add(_seq("turn1", prompt))
    _run_to_end(sched)
    assert kv.reserve("big", 40, prefix_hashes(prompt, BS, kv.salt)) is None
    assert not kv.owns("big") and kv.num_used_blocks == 0

"""When a decode worker prefills a task itself (core.local_prefill): the age gate, the
gate on the uncached length, the bound on its own tasks in prefill, and room, without
Redis; its settings."""

from __future__ import annotations

import pytest

from tandem.core.config import WorkerConfig
from tandem.core.kv_cache_manager import KVCacheManager
from tandem.core.local_prefill import (
    Backlog,
    CachedLead,
    Claim,
    LocalPrefillGate,
    Room,
    entry_time_ms,
)
from tandem.core.protocol import PrefillTask
from tandem.core.sampling_params import SamplingParams
from tandem.core.sequence import Sequence

GATE = LocalPrefillGate(after_ms=200.0, max_prefills=2, block_size=16)
ROOMY = Room(tasks=1, blocks=100)


NOTHING, NEXT, THIS = Claim.NOTHING, Claim.NEXT, Claim.THIS


def _backlog(age_ms: int, prompt_len: int = 10, generated: int = 0) -> Backlog:
    task = PrefillTask(request_id="r", prompt_token_ids=[1] * prompt_len,
                       sampling=SamplingParams(), reply_stream="s", deadline=0.0,
                       output_token_ids=[2] * generated)  # fmt: skip
    return Backlog(b"1700000000000-0", task, age_ms)


def test_entry_time_is_the_first_part_of_the_stream_id():
    assert entry_time_ms(b"1700000000123-7") == 1700000000123


def test_a_task_is_claimed_only_once_it_has_waited_long_enough():
    assert GATE.claims(_backlog(age_ms=0), ROOMY) is NOTHING
    assert GATE.claims(_backlog(age_ms=199), ROOMY) is NOTHING
    assert GATE.claims(_backlog(age_ms=200), ROOMY) is NEXT
    assert GATE.claims(_backlog(age_ms=60_000), ROOMY) is NEXT
    assert GATE.claims(None, ROOMY) is NOTHING  # nothing waits: the prefill pool keeps up
    # Zero: any task no prefill worker has taken yet.
    assert LocalPrefillGate(0.0, 1, 16).claims(_backlog(age_ms=0), ROOMY) is NEXT


def test_own_tasks_in_prefill_are_bounded():
    # prefilling: this worker's tasks still without a first token.
    assert GATE.room(prefilling=0, free_slots=10, spare_blocks=5) == Room(2, 5)
    assert GATE.room(prefilling=1, free_slots=10, spare_blocks=5) == Room(1, 5)
    assert GATE.room(prefilling=2, free_slots=10, spare_blocks=5).tasks == 0
    assert GATE.room(prefilling=3, free_slots=10, spare_blocks=5).tasks == 0
    old = _backlog(age_ms=10_000)
    assert GATE.claims(old, GATE.room(prefilling=2, free_slots=10, spare_blocks=100)) is NOTHING
    assert GATE.claims(old, GATE.room(prefilling=1, free_slots=10, spare_blocks=100)) is NEXT


def test_room_needs_a_sequence_slot_and_blocks_for_the_task():
    old = _backlog(age_ms=10_000, prompt_len=40)  # 41 tokens with the one it samples: 3 blocks
    assert GATE.room(prefilling=0, free_slots=0, spare_blocks=100).tasks == 0
    assert GATE.claims(old, GATE.room(prefilling=0, free_slots=0, spare_blocks=100)) is NOTHING
    assert GATE.claims(old, Room(tasks=1, blocks=3)) is NEXT
    assert GATE.claims(old, Room(tasks=1, blocks=2)) is NOTHING
    assert GATE.claims(old, Room(tasks=1, blocks=-4)) is NOTHING  # sequences in hand are short
    # A preempted or migrated task recomputes its generated tokens too.
    assert GATE.claims(_backlog(10_000, prompt_len=40, generated=8), Room(1, 3)) is NOTHING
    # A malformed entry is claimed (that one), so the intake drops it instead of it
    # blocking the gate.
    assert GATE.claims(Backlog(b"1-0", None, 10_000), Room(tasks=1, blocks=0)) is THIS
    assert GATE.claims(Backlog(b"1-0", None, 10), Room(tasks=1, blocks=0)) is NOTHING


SHORT = LocalPrefillGate(after_ms=None, max_prefills=2, block_size=16, uncached_tokens=32)


def test_a_task_mostly_cached_here_is_claimed_that_one_only():
    turn = _backlog(age_ms=0, prompt_len=100)  # 100 tokens to prefill without a cache
    # The remainder beyond what this worker's cache holds decides, whatever the age.
    assert SHORT.claims(turn, ROOMY, cached_tokens=64) is NOTHING  # 36 left
    assert SHORT.claims(turn, ROOMY, cached_tokens=68) is THIS  # 32 left: the bound
    assert SHORT.claims(turn, ROOMY, cached_tokens=96) is THIS
    assert SHORT.claims(_backlog(age_ms=60_000, prompt_len=100), ROOMY, 0) is NOTHING
    # A short prompt is short with nothing cached, too.
    assert SHORT.claims(_backlog(age_ms=0, prompt_len=32), ROOMY) is THIS
    # Tokens generated before a preemption are recomputed: they count as uncached.
    assert SHORT.claims(_backlog(0, prompt_len=96, generated=8), ROOMY, cached_tokens=64) is NOTHING
    # The same bounds as the age gate: its own tasks in prefill, slots, blocks.
    assert SHORT.claims(turn, SHORT.room(2, 10, 100), cached_tokens=96) is NOTHING
    assert SHORT.claims(turn, SHORT.room(0, 0, 100), cached_tokens=96) is NOTHING
    assert SHORT.claims(turn, Room(tasks=1, blocks=6), cached_tokens=96) is NOTHING  # 7 needed
    assert SHORT.claims(None, ROOMY) is NOTHING
    # Both gates: a backed-up pool reads the next task, whichever; else the short one.
    both = LocalPrefillGate(after_ms=200.0, max_prefills=2, block_size=16, uncached_tokens=32)
    assert both.claims(_backlog(age_ms=500, prompt_len=100), ROOMY) is NEXT
    assert both.claims(_backlog(age_ms=5, prompt_len=100), ROOMY, cached_tokens=96) is THIS
    assert both.claims(_backlog(age_ms=5, prompt_len=100), ROOMY, cached_tokens=16) is NOTHING


def test_the_cached_lead_is_what_a_prefill_here_would_share():
    kv = KVCacheManager(32, 4, enable_prefix_caching=True, salt="m")
    turn = list(range(1, 23))  # 5 full blocks and 2 tokens
    seq = Sequence("turn-1", turn, SamplingParams())
    assert kv.allocate_slots("turn-1", len(turn))
    seq.num_computed_tokens = len(turn)
    kv.cache_full_blocks(seq)
    kv.free("turn-1")  # finished: its blocks stay cached, evictable
    lead = CachedLead(kv)

    def backlog(prompt: list[int], entry: bytes, salt: str = "") -> Backlog:
        task = PrefillTask(request_id="r", prompt_token_ids=prompt, reply_stream="s",
                           sampling=SamplingParams(cache_salt=salt), deadline=0.0)  # fmt: skip
        return Backlog(entry, task, 0)

    assert lead.tokens(backlog(turn + [7, 8, 9], b"1-0")) == 20
    assert lead.tokens(backlog(turn[:20], b"2-0")) == 16  # its last token is computed
    assert lead.tokens(backlog(turn + [7], b"3-0", salt="other")) == 0
    assert lead.tokens(backlog([99] + turn, b"4-0")) == 0
    assert lead.tokens(None) == lead.tokens(Backlog(b"5-0", None, 0)) == 0
    kv.allocate_slots("pressure", 32 * 4)  # evicts every cached block
    assert lead.tokens(backlog(turn + [7, 8, 9], b"1-0")) == 0


def test_local_prefill_settings_are_checked_once():
    ok = WorkerConfig(
        redis_url="redis://x", role="decode", local_prefill_after_ms=0.0, max_local_prefills=4
    )
    assert (ok.local_prefill_after_ms, ok.max_local_prefills) == (0.0, 4)
    assert WorkerConfig(redis_url="redis://x", role="decode").local_prefill_after_ms is None
    assert not WorkerConfig(redis_url="redis://x", role="decode").local_prefill
    short = WorkerConfig(
        redis_url="redis://x", role="decode", local_prefill_uncached_tokens=64, max_local_prefills=3
    )
    assert short.local_prefill and short.local_prefill_after_ms is None
    for bad in (
        dict(role="decode", local_prefill_after_ms=-1.0),
        dict(role="decode", local_prefill_after_ms=10.0, max_local_prefills=0),
        dict(role="decode", max_local_prefills=3),  # means nothing when off
        dict(role="prefill", local_prefill_after_ms=10.0),
        dict(role="colocated", local_prefill_after_ms=10.0),
        dict(role="decode", local_prefill_uncached_tokens=-1),
        dict(role="prefill", local_prefill_uncached_tokens=64),
        dict(role="colocated", local_prefill_uncached_tokens=64),
    ):
        with pytest.raises(ValueError):
            WorkerConfig(redis_url="redis://x", **bad)

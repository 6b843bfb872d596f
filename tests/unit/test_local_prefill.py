"""When a decode worker prefills a task itself (core.local_prefill): the age gate, the
bound on its own tasks in prefill, and room, without Redis; its settings."""

from __future__ import annotations

import pytest

from tandem.core.config import WorkerConfig
from tandem.core.local_prefill import Backlog, LocalPrefillGate, Room, entry_time_ms
from tandem.core.protocol import PrefillTask
from tandem.core.sampling_params import SamplingParams

GATE = LocalPrefillGate(after_ms=200.0, max_prefills=2, block_size=16)
ROOMY = Room(tasks=1, blocks=100)


def _backlog(age_ms: int, prompt_len: int = 10, generated: int = 0) -> Backlog:
    task = PrefillTask(request_id="r", prompt_token_ids=[1] * prompt_len,
                       sampling=SamplingParams(), reply_stream="s", deadline=0.0,
                       output_token_ids=[2] * generated)  # fmt: skip
    return Backlog(b"1700000000000-0", task, age_ms)


def test_entry_time_is_the_first_part_of_the_stream_id():
    assert entry_time_ms(b"1700000000123-7") == 1700000000123


def test_a_task_is_claimed_only_once_it_has_waited_long_enough():
    assert GATE.claims(_backlog(age_ms=0), ROOMY) == 0
    assert GATE.claims(_backlog(age_ms=199), ROOMY) == 0
    assert GATE.claims(_backlog(age_ms=200), ROOMY) == 1
    assert GATE.claims(_backlog(age_ms=60_000), ROOMY) == 1
    assert GATE.claims(None, ROOMY) == 0  # nothing waits: the prefill pool keeps up
    # Zero: any task no prefill worker has taken yet.
    assert LocalPrefillGate(0.0, 1, 16).claims(_backlog(age_ms=0), ROOMY) == 1


def test_own_tasks_in_prefill_are_bounded():
    # prefilling: this worker's tasks still without a first token.
    assert GATE.room(prefilling=0, free_slots=10, spare_blocks=5) == Room(2, 5)
    assert GATE.room(prefilling=1, free_slots=10, spare_blocks=5) == Room(1, 5)
    assert GATE.room(prefilling=2, free_slots=10, spare_blocks=5).tasks == 0
    assert GATE.room(prefilling=3, free_slots=10, spare_blocks=5).tasks == 0
    old = _backlog(age_ms=10_000)
    assert GATE.claims(old, GATE.room(prefilling=2, free_slots=10, spare_blocks=100)) == 0
    assert GATE.claims(old, GATE.room(prefilling=1, free_slots=10, spare_blocks=100)) == 1


def test_room_needs_a_sequence_slot_and_blocks_for_the_task():
    old = _backlog(age_ms=10_000, prompt_len=40)  # 41 tokens with the one it samples: 3 blocks
    assert GATE.room(prefilling=0, free_slots=0, spare_blocks=100).tasks == 0
    assert GATE.claims(old, GATE.room(prefilling=0, free_slots=0, spare_blocks=100)) == 0
    assert GATE.claims(old, Room(tasks=1, blocks=3)) == 1
    assert GATE.claims(old, Room(tasks=1, blocks=2)) == 0
    assert GATE.claims(old, Room(tasks=1, blocks=-4)) == 0  # sequences in hand are short
    # A preempted or migrated task recomputes its generated tokens too.
    assert GATE.claims(_backlog(10_000, prompt_len=40, generated=8), Room(1, 3)) == 0
    # A malformed entry is claimed, so the intake drops it instead of it blocking the gate.
    assert GATE.claims(Backlog(b"1-0", None, 10_000), Room(tasks=1, blocks=0)) == 1


def test_local_prefill_settings_are_checked_once():
    ok = WorkerConfig(
        redis_url="redis://x", role="decode", local_prefill_after_ms=0.0, max_local_prefills=4
    )
    assert (ok.local_prefill_after_ms, ok.max_local_prefills) == (0.0, 4)
    assert WorkerConfig(redis_url="redis://x", role="decode").local_prefill_after_ms is None
    for bad in (
        dict(role="decode", local_prefill_after_ms=-1.0),
        dict(role="decode", local_prefill_after_ms=10.0, max_local_prefills=0),
        dict(role="decode", max_local_prefills=3),  # means nothing when off
        dict(role="prefill", local_prefill_after_ms=10.0),
        dict(role="colocated", local_prefill_after_ms=10.0),
    ):
        with pytest.raises(ValueError):
            WorkerConfig(redis_url="redis://x", **bad)

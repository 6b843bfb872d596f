"""Conditional disaggregation: when a decode worker prefills a task itself.

A decode worker started with `local_prefill_after_ms` or `local_prefill_uncached_tokens`
also reads the model's prefill stream, but claims a task only when one of these holds:

- the prefill pool is backed up: the oldest task that no worker has been given yet (the
  first entry after the group's last-delivered id) has waited at least
  `local_prefill_after_ms`, by Redis' clock (a stream id starts with its XADD time in
  ms). An idle prefill worker takes a task within one read, so it always gets it first;
  it then reads the next task, whichever it is (Claim.NEXT);
- what it would compute is short: the task's tokens beyond the prefix this worker holds
  in its prefix cache (the previous turn of a conversation, kept here since it decoded
  it) number at most `local_prefill_uncached_tokens`. Prefilling those few tokens in a
  decode step costs less than a prefill worker's reservation round trip, transfer and
  handoff. It reads exactly that task (Claim.THIS), never one it has not judged; the
  prefill workers leave such a task to it (core/prefix_routing.py), for a bounded time;

and all of these hold:

- fewer than `max_local_prefills` of this worker's own tasks are still prefilling (have
  no first token yet): each one adds a chunk of up to the step's token budget to the
  decode steps it shares, and this bound keeps that interference, hence TPOT, bounded;
- it has room: a free sequence slot (reservations count) and free KV blocks for that
  task's tokens beyond what its sequences in hand still need.

It claims one task at a time and looks again before the next, so it never takes a task
younger than the threshold when a whole batch is waiting.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tandem.core.kv_cache_manager import KVCacheManager, blocks_needed
from tandem.core.protocol import PrefillTask


def entry_time_ms(entry_id: bytes) -> int:
    """The XADD time of a stream entry, in ms: the first part of its id `MS-SEQ`."""
    return int(entry_id.split(b"-", 1)[0])


@dataclass(frozen=True)
class Backlog:
    """The oldest task of the stream that no worker has been given yet."""

    entry_id: bytes
    task: PrefillTask | None  # None: malformed (claiming it gets it dropped)
    age_ms: int  # Redis' time now minus entry_time_ms(entry_id)


@dataclass(frozen=True)
class Room:
    """What a decode worker can take on now, as its main loop measured it."""

    tasks: int  # more local tasks allowed: the max_local_prefills bound and free slots
    blocks: int  # free KV blocks beyond what the sequences in hand still need


class Claim(enum.Enum):
    NOTHING = 0
    NEXT = 1  # read the next task, whichever it is (the pool is backed up)
    THIS = 2  # read the backlog's task and no other (what it lacks here is short)


@dataclass(frozen=True)
class LocalPrefillGate:
    after_ms: float | None  # None: no age gate
    max_prefills: int
    block_size: int
    uncached_tokens: int = 0  # 0: no gate on the uncached length

    def room(self, prefilling: int, free_slots: int, spare_blocks: int) -> Room:
        """`prefilling`: local tasks taken and still without a first token."""
        return Room(max(0, min(self.max_prefills - prefilling, free_slots)), spare_blocks)

    def claims(self, backlog: Backlog | None, room: Room, cached_tokens: int = 0) -> Claim:
        """What to read now (one task at most). `cached_tokens`: how many leading tokens
        of the backlog's task this worker's prefix cache holds."""
        if room.tasks <= 0 or backlog is None:
            return Claim.NOTHING
        aged = self.after_ms is not None and backlog.age_ms >= self.after_ms
        task = backlog.task
        if task is None:  # malformed: claimed, so the intake drops it
            return Claim.THIS if aged or self.uncached_tokens else Claim.NOTHING
        # Its prompt, any tokens generated before a preemption, and the one it samples.
        tokens = len(task.prompt_token_ids) + len(task.output_token_ids)
        if blocks_needed(tokens + 1, self.block_size) > room.blocks:
            return Claim.NOTHING
        if aged:
            return Claim.NEXT
        if self.uncached_tokens and tokens - cached_tokens <= self.uncached_tokens:
            return Claim.THIS
        return Claim.NOTHING


class CachedLead:
    """How many leading tokens of the backlog's task a worker's prefix cache holds now
    (what the uncached-length gate subtracts). Its hashes are computed once per entry.
    Safe on the intake thread without the worker's lock: it only looks hashes up, and
    a block evicted before the task runs makes the prefill longer, never wrong."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self._chain: tuple[bytes, list[bytes]] = (b"", [])  # (entry id, its hashes)

    def tokens(self, backlog: Backlog | None) -> int:
        if backlog is None or backlog.task is None:
            return 0
        entry_id, chain = self._chain
        if entry_id != backlog.entry_id:
            task = backlog.task
            tokens = task.prompt_token_ids + task.output_token_ids
            chain = self.kv.usable_chain(tokens, task.sampling.cache_salt)
            self._chain = (backlog.entry_id, chain)
        return self.kv.num_cached_leading(chain) * self.kv.block_size

"""A worker's side of the model's prefill stream (consumer group "prefill").

Prefill, colocated and decode workers (the last only with local prefill) take tasks the
same way, under the same at-least-once rules:

- new tasks come with XREADGROUP; tasks that a dead worker took and never acknowledged
  are taken over with XAUTOCLAIM once idle for `reclaim_idle_s` (a live worker resets
  its own entries' idle time while it holds them, so nobody takes live work);
- a task delivered more than `max_deliveries` times goes to the dead-letter stream and
  its client gets an error instead of another retry;
- a malformed task, a duplicate of a request the worker holds, or an aborted one (the
  abort marker key) is acknowledged and dropped; an expired one also gets a deadline
  error;
- a handled task is acknowledged and deleted (XACK + XDEL): nothing stays in the stream.

A decode worker, which prefills only some tasks (core.local_prefill), looks at
backlog() before it polls for one task; it may poll for exactly that one (`only`).
A worker that judges each task before reading it (core.prefix_routing) waits for the
next one with wait_for_task(), which takes nothing.

A lost Redis is survived here: poll() and backlog() log it, back off, recreate the stream
and the group (a restarted Redis lost them) and return nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import redis

from tandem.core import hop_trace
from tandem.core.config import WorkerConfig
from tandem.core.local_prefill import Backlog, entry_time_ms
from tandem.core.protocol import PrefillTask, encode
from tandem.core.redis_client import (
    dead_letter,
    delivery_counts,
    ensure_group,
    is_aborted,
    parse_task,
    read_task_if_next,
    read_tasks,
    reclaim_tasks,
)
from tandem.core.redis_keys import PREFILL_GROUP, REPLY_PREFIX, dead_letter_stream, prefill_stream
from tandem.core.replies import error_delta, publish_safely

log = logging.getLogger(__name__)

Entry = tuple[bytes, PrefillTask]
T = TypeVar("T")


def tasks_fitting(free_tokens: int, typical_prompt: float, most: int) -> int:
    """How many tasks to read for `free_tokens` of a step's prefill budget, prompts being
    about `typical_prompt` tokens: at least one (a long prompt is chunked), at most `most`."""
    return min(most, max(1, free_tokens // max(1, round(typical_prompt))))


class TaskIntake:
    def __init__(
        self, client: redis.Redis, model: str, consumer: str, config: WorkerConfig
    ) -> None:
        self.client = client
        self.stream = prefill_stream(model)
        self.dead_stream = dead_letter_stream(model)
        self.consumer = consumer
        self.config = config
        self._last_reclaim = 0.0
        self._last_delivered: bytes | None = None  # the group's, as backlog() last saw it

    def ensure_group(self) -> None:
        ensure_group(self.client, self.stream)

    def poll(
        self,
        count: int,
        block_ms: int | None,
        held: Mapping[str, bytes | None],
        only: bytes | None = None,
        new: int | None = None,
    ) -> list[Entry]:
        """Up to `count` tasks to run, screened (see the module docstring).

        `held` maps every request the worker has to the stream entry it came with, or
        to None once that entry is acknowledged. Every reclaim_idle/2 the held entries
        are kept alive and, when there is room, dead workers' tasks are reclaimed before
        new ones are read (they have waited longest). With count 0 it only keeps alive.
        block_ms: how long to wait for a new task (None: not at all).
        only: read the entry with this id and nothing else (no reclaim, no wait), and
        only if it is the next one the group hands out.
        new: at most this many of the `count` may be tasks never delivered before
        (None: all), the rest only reclaimed ones (a routing worker reads one task
        that it judged, yet takes over a dead peer's many at once).
        """
        return self._surviving(lambda: self._poll(count, block_ms, held, only, new), [])

    @property
    def reclaim_due(self) -> bool:
        """Whether the next poll looks for a dead worker's tasks to take over."""
        return time.monotonic() - self._last_reclaim > self.config.reclaim_idle_s / 2

    def backlog(self) -> Backlog | None:
        """The oldest task that no worker has been given yet (None: there is none)."""
        return self._surviving(self._backlog, None)

    def wait_for_task(self, block_ms: int) -> bool:
        """Wait at most `block_ms` for a task that no worker has been given; True once
        one may be there. A plain XREAD after the last entry the group had handed out
        when backlog() last looked: it takes nothing (a blocked XREADGROUP would take
        the task the moment it arrives, before anyone judged it) and wakes with the
        XADD; a task added since that look returns it at once."""
        last = self._last_delivered
        if last is None:  # no look yet, or the group was gone
            time.sleep(block_ms / 1000)
            return False
        return self._surviving(
            lambda: bool(self.client.xread({self.stream: last}, count=1, block=block_ms)),
            False,
        )

    def _surviving(self, call: Callable[[], T], lost: T) -> T:
        """call(), or `lost` after a Redis outage or a lost stream, which it repairs."""
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("redis unavailable: %s", exc)
            time.sleep(0.2)
        except redis.ResponseError as exc:
            # NOGROUP from a read, "no such key" from XINFO: a restarted Redis lost both.
            if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                raise
            log.warning("the prefill stream or its group is gone (Redis restarted?)")
        with contextlib.suppress(redis.RedisError):
            self.ensure_group()
        return lost

    def _backlog(self) -> Backlog | None:
        groups = self.client.xinfo_groups(self.stream)
        last = next(
            (
                g["last-delivered-id"]
                for g in groups
                if g["name"] in (PREFILL_GROUP, PREFILL_GROUP.encode())
            ),
            None,
        )
        self._last_delivered = last
        if last is None:  # a restarted Redis, whose stream a new task made again
            log.warning("the prefill stream's group is gone (Redis restarted?)")
            self.ensure_group()
            return None
        pipe = self.client.pipeline(transaction=False)
        pipe.xrange(self.stream, min=b"(" + last, count=1)
        pipe.time()
        entries, (seconds, micros) = pipe.execute()
        if not entries:
            return None
        entry_id, fields = entries[0]
        age_ms = seconds * 1000 + micros // 1000 - entry_time_ms(entry_id)
        return Backlog(entry_id, parse_task(fields), max(0, age_ms))

    def _poll(
        self,
        count: int,
        block_ms: int | None,
        held: Mapping[str, bytes | None],
        only: bytes | None,
        new: int | None,
    ) -> list[Entry]:
        entries: list[tuple[bytes, PrefillTask | None]] = []
        if self.reclaim_due:
            self._last_reclaim = time.monotonic()
            self._touch([e for e in held.values() if e is not None])
            if count > 0 and only is None:
                entries += self._reclaim(count, held)
        if only is not None:
            if count > 0:
                entries += read_task_if_next(self.client, self.stream, self.consumer, only)
        elif min(count - len(entries), count if new is None else new) > 0:
            entries += read_tasks(
                self.client,
                self.stream,
                self.consumer,
                min(count - len(entries), count if new is None else new),
                None if entries else block_ms,
            )
        taken: list[Entry] = []
        seen: set[str] = set()
        for entry_id, task in entries:
            if task is None or task.request_id in seen:  # malformed, or twice in one batch
                self.ack(entry_id)
            elif self._screen(entry_id, task, held):
                seen.add(task.request_id)
                taken.append((entry_id, task))
                if hop_trace.ENABLED:
                    hop_trace.mark(task.request_id, "read")
        return taken

    def _screen(self, entry_id: bytes, task: PrefillTask, held: Mapping[str, bytes | None]) -> bool:
        """True when the task is to be run; otherwise it has been dealt with here."""
        rid = task.request_id
        if rid in held:
            if held[rid] != entry_id:
                self.ack(entry_id)  # a duplicate of a request in hand
            return False
        if is_aborted(self.client, rid):
            self.ack(entry_id)
            return False
        if task.deadline and time.time() > task.deadline:
            self.fail(task, "deadline", "request deadline exceeded before prefill")
            self.ack(entry_id)
            return False
        return True

    def _reclaim(
        self, count: int, held: Mapping[str, bytes | None]
    ) -> list[tuple[bytes, PrefillTask | None]]:
        """Take over tasks of dead workers; one delivered too often is dead-lettered."""
        claimed = reclaim_tasks(
            self.client, self.stream, self.consumer, int(self.config.reclaim_idle_s * 1000), count
        )
        mine = set(held.values())
        claimed = [(e, t) for e, t in claimed if e not in mine]
        if not claimed:
            return []
        counts = delivery_counts(self.client, self.stream, [e for e, _ in claimed])
        keep = []
        for entry_id, task in claimed:
            if counts.get(entry_id, 0) <= self.config.max_deliveries or task is None:
                keep.append((entry_id, task))
                continue
            reason = f"task failed {counts[entry_id] - 1} deliveries"
            log.error("dead-lettering %s: %s", task.request_id, reason)
            dead_letter(self.client, self.stream, self.dead_stream, entry_id, encode(task), reason)
            self.fail(task, "internal", f"request could not be processed ({reason})")
        return keep

    def _touch(self, entry_ids: list[bytes]) -> None:
        """Reset the idle time of entries in hand so nobody reclaims live work."""
        if entry_ids:
            self.client.xclaim(self.stream, PREFILL_GROUP, self.consumer, 0, entry_ids, justid=True)

    def ack(self, *entry_ids: bytes) -> None:
        """Acknowledge and delete: a handled task has no reason to stay in the stream."""
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.xack(self.stream, PREFILL_GROUP, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("XACK failed (the task may be redelivered): %s", exc)

    def fail(self, task: PrefillTask, code: str, message: str) -> None:
        """End the client's stream with an error (never written to a key that is no
        gateway's reply stream: a task's fields are not trusted)."""
        if not task.reply_stream.startswith(REPLY_PREFIX):
            log.warning("task %.128r failed with no reply stream: %s", task.request_id, message)
            return
        publish_safely(
            self.client, {task.reply_stream: [error_delta(task.request_id, code, message)]}
        )

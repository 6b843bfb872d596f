"""What the colocated and decode workers share: one continuous batch in one engine, whose
requests may come straight from the model's prefill stream.

A colocated worker takes every request that way; a decode worker with local prefill
takes some that way (core.local_prefill) and the rest as handoffs from prefill workers.
A request from the stream waits in the engine's queue, is prefilled in chunks after each
step's decodes, and its first token names this worker as the owner the gateway watches;
only then is its stream entry acknowledged (XACK + XDEL). Until then the entry stays
pending under this worker and is kept alive, so if the worker dies a peer reclaims it.

Threads: the main loop owns the engine. The intake thread reads tasks (it may block on
Redis) and hands them over through `arrivals`; it sees the main loop's state only
through `_room` and `_held`, which the main loop replaces whole, never mutates. The
outbox thread makes every Redis write (tokens, acknowledgements) in order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from tandem.core.config import WorkerConfig
from tandem.core.protocol import PrefillTask
from tandem.core.replies import Outbox, error_delta, new_deltas, token_delta
from tandem.core.request_checks import check_task
from tandem.core.sequence import Sequence
from tandem.core.task_intake import Entry, TaskIntake
from tandem.core.worker_base import WorkerBase
from tandem.engine.engine import Engine, StepFailed

log = logging.getLogger(__name__)

FULL_WAIT_S = 0.02  # the intake thread's pause while there is nothing to take


@dataclass
class Request:
    task: PrefillTask
    # Its stream entry until acknowledged at the first token; None for a handoff.
    entry_id: bytes | None


class BatchWorker(WorkerBase):
    READ_BLOCK_MS: int | None = None  # how long one intake read waits for a new task

    def __init__(self, config: WorkerConfig, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine
        self.kv = engine.kv
        self.intake = TaskIntake(self.redis, engine.name, self.worker_id, config)
        self.outbox = Outbox(self.redis)
        self.requests: dict[str, Request] = {}
        self.from_stream = 0  # tasks taken from the stream and admitted, since start
        self.arrivals: queue.Queue[Entry] = queue.Queue()
        self.work_arrived = threading.Event()
        self.intake_closed = threading.Event()  # set once draining stopped every read
        self._intake_on = False
        # Main loop -> intake thread: (room, tasks received when room was measured,
        # spare KV blocks), and request id -> pending entry (None once acknowledged, or
        # never from the stream) for every request held.
        self._room = (0, 0, 0)
        self._held: Mapping[str, bytes | None] = {}
        self._received = 0  # tasks the main loop took off `arrivals`
        self._taken = 0  # tasks the intake thread put on `arrivals`
        self._intake_failure: Exception | None = None
        # A task read but not yet admitted holds back the engine's launch ahead, so it
        # joins the next step instead of waiting behind one more decode step.
        engine.arrivals_pending = self._arrivals_waiting

    def _arrivals_waiting(self) -> bool:
        return not self.arrivals.empty()

    # -- main loop side ------------------------------------------------------------------
    def _start_intake(self) -> None:
        self._intake_on = True
        self._spawn(self._intake_loop)

    def _check_intake(self) -> None:
        if self._intake_failure is not None:
            # A worker that can take no task must not stay registered as alive.
            raise RuntimeError("task intake failed") from self._intake_failure

    def _intake_settled(self) -> bool:
        # Once intake is closed every task it read is on `arrivals`, so empty is final.
        return not self._intake_on or (self.intake_closed.is_set() and self.arrivals.empty())

    def _receive(self) -> None:
        while True:
            try:
                entry_id, task = self.arrivals.get_nowait()
            except queue.Empty:
                return
            self._received += 1
            self._admit_task(entry_id, task)

    def _admit_task(self, entry_id: bytes, task: PrefillTask) -> None:
        rid = task.request_id
        held = self.requests.get(rid)
        if held is not None:  # a duplicate, read before the intake thread knew of rid
            if held.entry_id != entry_id:
                self.outbox.call(self.intake.ack, entry_id)
            return
        if self.was_aborted(rid):
            self.outbox.call(self.intake.ack, entry_id)
            return
        try:
            check_task(task, self.engine.limits)
            seq = Sequence.of_task(task)
            self.engine.add(seq)
        except ValueError as exc:
            self.outbox.call(self.intake.fail, task, "invalid_argument", str(exc))
            self.outbox.call(self.intake.ack, entry_id)
            return
        self.requests[rid] = Request(task, entry_id)
        self.from_stream += 1

    def _drop(self, rid: str) -> Request:
        """Forget a request wherever it is: free its blocks, settle its stream entry."""
        req = self.requests.pop(rid)
        self.engine.scheduler.abort(rid)
        if req.entry_id is not None:
            self.outbox.call(self.intake.ack, req.entry_id)
        return req

    def _fail_step(self, failed: StepFailed) -> None:
        """The requests a step failed for end with an error; the rest of the step (its
        tokens: `failed.got`) goes on as usual."""
        deltas = new_deltas()
        for rid in failed.request_ids:
            if rid in self.requests:
                task = self._drop(rid).task
                deltas[task.reply_stream].append(error_delta(rid, "internal", failed.reason))
        self.outbox.publish(deltas)

    def held_reply_streams(self) -> dict[str, str]:
        # list(): one C-level copy, safe while the main loop changes the dict.
        return {rid: req.task.reply_stream for rid, req in list(self.requests.items())}

    def _abort_requests(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            if rid in self.requests:
                self._drop(rid)

    def _expire_deadlines(self) -> None:
        now = time.time()
        deltas = new_deltas()
        for rid in [
            r for r, q in self.requests.items() if q.task.deadline and now > q.task.deadline
        ]:
            task = self._drop(rid).task
            deltas[task.reply_stream].append(
                error_delta(rid, "deadline", "request deadline exceeded")
            )
        self.outbox.publish(deltas)

    def _share_state(self, room: int, spare_blocks: int = 0, also_held: Iterable[str] = ()) -> None:
        """Tell the intake thread how many more tasks fit and which requests are held
        (`also_held`: ones on their way in otherwise, whose tasks are duplicates)."""
        self._room = (room, self._received, spare_blocks)
        self._held = {
            **dict.fromkeys(also_held),
            **{rid: req.entry_id for rid, req in self.requests.items()},
        }

    def _publish_around(self, got: list[Sequence], update: Callable[[], None]) -> None:
        """A step's tokens (_publish_step) and `update`, the routing write that shows
        what the step cached: before the tokens when the step finishes a request (a
        peer judging where a request with its prefix goes next must see its blocks once
        its last token is out), after them otherwise, so a first token does not wait
        on that write."""
        finishing = any(seq.is_finished for seq in got)
        if finishing:
            update()
        self._publish_step(got)
        if not finishing:
            update()

    def _publish_step(self, got: list[Sequence]) -> None:
        """One delta per sequence that got a token; a first token from a stream request
        acknowledges its entry, after the tokens: from then on the gateway watches this
        worker, and a lost worker means UNAVAILABLE or migration, never a reclaim."""
        deltas = new_deltas()
        first = []
        for seq in got:
            req = self.requests[seq.request_id]
            deltas[req.task.reply_stream].append(token_delta(seq, self.worker_id))
            if req.entry_id is not None:
                first.append(req.entry_id)
                req.entry_id = None
            if seq.is_finished:
                del self.requests[seq.request_id]
        self.outbox.publish(deltas)
        if first:
            self.outbox.call(self.intake.ack, *first)

    # -- intake thread -------------------------------------------------------------------
    def _claims(self, free: int, spare_blocks: int) -> tuple[int, bytes | None, int | None]:
        """How many tasks to read now, with `free` more fitting (at least one), the one
        entry to read if only that one, and how many of them may be new rather than
        reclaimed (TaskIntake.poll's `only` and `new`)."""
        raise NotImplementedError

    def _read_block_ms(self) -> int | None:
        """How long the read after _claims may wait for a new task (None: not at all)."""
        return self.READ_BLOCK_MS

    def _after_read(self) -> None:
        """Called on the intake thread after a read that took tasks."""

    def _look_again(self) -> None:
        """Pause after _claims chose to read nothing though there was room."""
        time.sleep(FULL_WAIT_S)

    def _intake_loop(self) -> None:
        try:
            self._take_tasks()
        except Exception as exc:  # Redis outages are handled inside; this is a bug
            log.exception("task intake failed")
            self._intake_failure = exc
            self.work_arrived.set()

    def _take_tasks(self) -> None:
        """Read tasks while there is room and hand them to the main loop; while draining,
        only keep the entries in hand alive."""
        while not self.stopping:
            draining = self.draining
            if draining:
                self.intake_closed.set()
            room, received, spare_blocks = self._room
            free = room - (self._taken - received)
            count, only, new = (
                (0, None, None) if draining or free <= 0 else self._claims(free, spare_blocks)
            )
            entries = self.intake.poll(count, self._read_block_ms(), self._held, only, new)
            for entry in entries:
                self._taken += 1
                self.arrivals.put(entry)
            if entries:
                self.work_arrived.set()
                self._after_read()
            elif count <= 0 or new == 0:
                if draining or free <= 0:
                    time.sleep(FULL_WAIT_S)
                else:
                    self._look_again()

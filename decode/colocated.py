"""Colocated worker: one process that prefills and decodes its own requests.

It takes tasks from the model's prefill stream as a prefill worker does (same consumer
group, same at-least-once rules: core.task_intake) and runs them in its own engine with
the ordinary scheduler: each step decodes every running sequence first, then prefills
waiting prompts in chunks under the token budget. No KV moves between processes. It is
the decode worker's continuous batch with another way in, hence its place in decode/;
what it shares with the prefill worker lives in core/, so decode/ never imports prefill/.

A request's life on this worker, as states:

    QUEUED      a PrefillTask in the model's Redis stream (consumer group "prefill").
    CLAIMED     the intake thread read it (XREADGROUP, or XAUTOCLAIM from a dead worker)
                while this worker had room: free sequence slots, free KV blocks beyond
                what the requests in hand still need, and less than one step's token
                budget of prompts waiting. A busy worker leaves tasks to its peers.
                Malformed, duplicate, aborted and expired tasks end here; a task
                delivered too often is dead-lettered and its client gets an error.
    WAITING     in the engine's queue. Its stream entry stays pending under this
                worker and is kept alive, so if the worker dies a peer reclaims it.
    PREFILLING  chunked under the token budget after the step's decodes (prompt plus
                any tokens generated before a migration).
    RUNNING     the first token went out (TTFT) naming this worker, which makes it the
                owner the gateway watches, and the task is acknowledged (XACK + XDEL):
                from here a lost worker means UNAVAILABLE, or with the gateway's
                --migrate a requeued task, never a reclaim. One token per step; one
                TokenBatch per gateway reply stream per step.
    PREEMPTED   blocks ran out: the youngest sequence is freed and recomputed here
                (prompt + generated tokens) when blocks allow; the client sees no break.
    FINISHED    EOS / stop token / max_tokens: the last delta carries the finish
                reason, blocks are freed.
    ABORTED     an abort notice (pub/sub, or the marker key of a task read late) drops
                it wherever it is and frees its blocks; nothing more is sent.
    EXPIRED     its deadline passed: an error delta ends the stream, blocks are freed.

Threads: the main loop owns the engine and never waits on a socket. The intake thread
reads tasks (it may block on Redis) and hands them over through a queue; the outbox
thread makes every write (tokens, acknowledgements) in order; heartbeat and abort
listener come from WorkerBase. The intake thread sees the main loop's state only
through `_room` and `_held`, which the main loop replaces whole, never mutates.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from core.config import WorkerConfig
from core.protocol import PrefillTask, WorkerInfo
from core.replies import Outbox, error_delta, new_deltas, token_delta
from core.sequence import Sequence
from core.task_intake import Entry, TaskIntake
from core.worker_base import WorkerBase
from engine.engine import Engine, EngineConfig

log = logging.getLogger(__name__)

INTAKE_BATCH = 16  # tasks read from Redis at once, at most
INTAKE_BLOCK_MS = 200  # how long one read waits for a task when there is room
FULL_WAIT_S = 0.02  # the intake thread's pause while the worker has no room
IDLE_WAIT_S = 0.05  # the main loop's wait for work when it has none


@dataclass
class Request:
    task: PrefillTask
    entry_id: bytes | None  # its stream entry, until acknowledged at the first token


class ColocatedWorker(WorkerBase):
    def __init__(self, config: WorkerConfig, engine_config: EngineConfig) -> None:
        super().__init__(config)
        self.engine = Engine(engine_config)  # preempted sequences are recomputed here
        self.kv = self.engine.kv
        self.intake = TaskIntake(self.redis, self.engine.name, self.worker_id, config)
        self.outbox = Outbox(self.redis)
        self.requests: dict[str, Request] = {}
        self.admitted = 0
        self.arrivals: queue.Queue[Entry] = queue.Queue()
        self.work_arrived = threading.Event()
        self.intake_closed = threading.Event()  # set once draining stopped every read
        # Main loop -> intake thread: (room, tasks received when room was measured), and
        # request id -> pending entry (None once acknowledged) for every request held.
        self._room = (0, 0)
        self._held: Mapping[str, bytes | None] = {}
        self._received = 0  # tasks the main loop took off `arrivals`
        self._taken = 0  # tasks the intake thread put on `arrivals`
        self._intake_failure: Exception | None = None

    def snapshot(self) -> WorkerInfo:
        sched = self.engine.scheduler
        return WorkerInfo(
            worker_id=self.worker_id,
            role="colocated",
            model=self.engine.name,
            pid=os.getpid(),
            total_blocks=self.kv.pool.num_blocks,
            free_blocks=self.kv.num_free_blocks,
            used_blocks=self.kv.num_used_blocks,
            running=len(sched.running),
            waiting=len(sched.waiting),
            preemptions=sched.num_preemptions,
            admitted=self.admitted,
            draining=self.draining,
        )

    # -- main loop ---------------------------------------------------------------------
    def run(self) -> None:
        self.intake.ensure_group()
        self.start_background(self.snapshot)
        self.outbox.start()
        self._spawn(self._intake_loop)
        log.info("colocated worker %s ready", self.worker_id)
        try:
            while not self.stopping:
                if self._intake_failure is not None:
                    # A worker that can take no task must not stay registered as alive.
                    raise RuntimeError("task intake failed") from self._intake_failure
                self._apply_aborts()
                self._receive()
                self._expire_deadlines()
                self._share_state()
                if self.engine.scheduler.has_work:
                    self._step()
                elif self._drained():
                    break
                else:
                    self.work_arrived.wait(IDLE_WAIT_S)
                    self.work_arrived.clear()
        finally:
            self.request_stop()
            self.outbox.close()  # the last tokens go out before the registry entry goes
            self.shutdown()

    def _drained(self) -> bool:
        # Once intake is closed every task it read is on `arrivals`, so empty is final.
        return (
            self.draining
            and self.intake_closed.is_set()
            and self.arrivals.empty()
            and not self.requests
        )

    def _receive(self) -> None:
        while True:
            try:
                entry_id, task = self.arrivals.get_nowait()
            except queue.Empty:
                return
            self._received += 1
            self._admit(entry_id, task)

    def _admit(self, entry_id: bytes, task: PrefillTask) -> None:
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
            seq = Sequence(
                rid,
                list(task.prompt_token_ids),
                task.sampling,
                output_token_ids=list(task.output_token_ids),
            )
            self.engine.add(seq)
        except ValueError as exc:
            self.outbox.call(self.intake.fail, task, "invalid_argument", str(exc))
            self.outbox.call(self.intake.ack, entry_id)
            return
        self.requests[rid] = Request(task, entry_id)
        self.admitted += 1

    def _drop(self, rid: str) -> Request:
        """Forget a request wherever it is: free its blocks, settle its stream entry."""
        req = self.requests.pop(rid)
        self.engine.scheduler.abort(rid)
        if req.entry_id is not None:
            self.outbox.call(self.intake.ack, req.entry_id)
        return req

    def _apply_aborts(self) -> None:
        for rid in self.drain_aborts():
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

    def _share_state(self) -> None:
        """Tell the intake thread how many more tasks fit and which ones are held."""
        room = 0 if self.draining else min(INTAKE_BATCH, self.engine.scheduler.room())
        self._room = (room, self._received)
        self._held = {rid: req.entry_id for rid, req in self.requests.items()}

    # -- one step: decodes first, then chunked prefill under the token budget ----------
    def _step(self) -> None:
        _, got = self.engine.step()
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
        if first:  # after the tokens: from now on the gateway watches this worker
            self.outbox.call(self.intake.ack, *first)

    # -- intake thread ------------------------------------------------------------------
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
            room, received = self._room
            count = 0 if draining else room - (self._taken - received)
            entries = self.intake.poll(max(count, 0), INTAKE_BLOCK_MS, self._held)
            for entry in entries:
                self._taken += 1
                self.arrivals.put(entry)
            if entries:
                self.work_arrived.set()
            elif count <= 0:
                time.sleep(FULL_WAIT_S)

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
                With prefix caching and routing on and another worker reading the
                stream, it first looks at the oldest task nobody has taken and leaves
                it, for at most --prefix-route-wait-ms, to a live colocated peer that
                holds a longer cached prefix of it and holds no more requests; it
                then reads without waiting, and with nothing to read waits for the
                next task in a plain XREAD, which takes none (core/prefix_routing.py).
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

Threads: the main loop, the intake thread and the outbox thread, as decode.batch_worker
(what this worker shares with a decode worker that prefills locally) tells; heartbeat
and abort listener come from WorkerBase.
"""

from __future__ import annotations

import logging
import os

from tandem.core.config import WorkerConfig
from tandem.core.prefix_routing import WorkerRouting
from tandem.core.protocol import WorkerInfo
from tandem.core.sequence import Sequence
from tandem.decode.batch_worker import BatchWorker
from tandem.engine.engine import Engine, EngineConfig, StepFailed

log = logging.getLogger(__name__)

INTAKE_BATCH = 16  # tasks read from Redis at once, at most
IDLE_WAIT_S = 0.05  # the main loop's wait for work when it has none


class ColocatedWorker(BatchWorker):
    READ_BLOCK_MS = 200  # how long one read waits for a task when there is room

    def __init__(self, config: WorkerConfig, engine_config: EngineConfig) -> None:
        # Preempted sequences are recomputed here.
        super().__init__(config, Engine(engine_config))
        # KV-aware routing (None: caching or routing off); its publisher also rides
        # the heartbeat (TTL) and goes with the registry entry.
        self.routing = WorkerRouting.of(
            self.redis, self.engine.name, self.worker_id, self.kv, config
        )
        self.hash_publisher = self.routing.publisher if self.routing else None
        self._published_load: int | None = None  # main loop: as last sent to routing
        self._judging = False  # intake thread: its last _claims went through routing

    def snapshot(self) -> WorkerInfo:
        sched = self.engine.scheduler
        return WorkerInfo(
            worker_id=self.worker_id,
            role="colocated",
            model=self.engine.name,
            pid=os.getpid(),
            max_model_len=self.engine.max_model_len,
            **self.kv.figures(),
            running=len(sched.running),
            waiting=len(sched.waiting),
            preemptions=sched.num_preemptions,
            admitted=self.from_stream,
            routed_to_peers=self.routing.router.num_deferred if self.routing else 0,
            draining=self.draining,
        )

    # -- main loop ---------------------------------------------------------------------
    def run(self) -> None:
        self.intake.ensure_group()
        self.start_background(self.snapshot)
        self.outbox.start()
        self._start_intake()
        log.info("colocated worker %s ready", self.worker_id)
        try:
            while not self.stopping:
                self._check_intake()
                self._abort_requests(self.drain_aborts())
                self._receive()
                self._expire_deadlines()
                room = 0 if self.draining else min(INTAKE_BATCH, self.engine.scheduler.room())
                self._share_state(room)
                if self.engine.has_work:
                    # Decodes first, then chunked prefill under the token budget.
                    try:
                        _, got = self.engine.step()
                    except StepFailed as failed:
                        self._fail_step(failed)
                        got = failed.got  # the rest of the step's tokens
                    self._publish_results(got)
                elif self.draining and self._intake_settled() and not self.requests:
                    break
                else:
                    self._publish_routing(self._load())
                    self.work_arrived.wait(IDLE_WAIT_S)
                    self.work_arrived.clear()
        finally:
            self.request_stop()
            self.outbox.close()  # the last tokens go out before the registry entry goes
            self.shutdown()

    def _load(self) -> int:
        """Requests held, and tasks read but not yet received (what routing compares)."""
        return len(self.requests) + self._taken - self._received

    def _after_read(self) -> None:
        # Peers judge by the load published last: one a step old would hide a burst
        # this thread just read, and they would leave the rest of it here too.
        if self._judging:
            _, received, _ = self._room
            self._published_load = None  # the main loop publishes its own view next
            self.outbox.call(self.routing.publish, len(self._held) + self._taken - received)

    def _publish_results(self, got: list[Sequence]) -> None:
        """A step's tokens, and routing's view of this worker (_publish_routing) once
        the step's finished requests are gone, in _publish_around's order."""
        load = self._load() - sum(1 for seq in got if seq.is_finished)
        self._publish_around(got, lambda: self._publish_routing(load))

    def _publish_routing(self, load: int) -> None:
        """The blocks cached since the last call and `load` to Redis: once a request's
        last token is out, a peer judging where the next request with its prefix goes
        sees this worker's blocks and load as they are."""
        if self.routing is None:
            return
        if load != self._published_load or self.routing.publisher.pending:
            self._published_load = load
            self.outbox.call(self.routing.publish, load)

    def _claims(self, free: int, spare_blocks: int) -> tuple[int, bytes | None, int | None]:
        """All `free` tasks (room() already counted the blocks); routing, of which
        one new task at most, and none while the oldest waiting task is left for a
        peer (WorkerRouting.new_tasks). On the intake thread: the router only looks
        hashes up, a stale answer costs a cache hit."""
        self._judging = self.routing is not None and self.routing.active
        if not self._judging:
            return free, None, None
        _, received, _ = self._room
        load = len(self._held) + self._taken - received  # held, and on their way in
        return free, None, self.routing.new_tasks(self.intake, load)

    def _read_block_ms(self) -> int | None:
        # A blocked read would take the next task unjudged: routing reads only what
        # is there, and waits for the next task in _look_again (taking nothing).
        return None if self._judging else self.READ_BLOCK_MS

    def _look_again(self) -> None:
        if self._judging:
            self.routing.pause(self.intake)  # for the next task, or the one left for a peer
        else:
            super()._look_again()

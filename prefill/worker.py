"""Prefill worker: computes prompts' KV and hands requests to decode workers.

A task's life on this worker, as states:

    QUEUED      a PrefillTask in the model's Redis stream (consumer group "prefill").
    CLAIMED     XREADGROUP delivered it here, or XAUTOCLAIM took it over from a worker
                that died holding it. Duplicates (same request id) are acknowledged and
                dropped; aborted (marker key) or expired tasks end here.
    RESERVED    a decode worker, picked from the registry (the one that holds the
                longest prefix of the prompt unless it lacks room or is far busier,
                else most free blocks, fewest running: prefill.decode_choice),
                reserved blocks for the KV to come. No reservation, no
                prefill: nothing is computed that nobody will keep. While every decode
                worker refuses for lack of room, the task waits here (retried every
                20 ms, oldest first; no new tasks are taken meanwhile, so peers get
                them) for up to decode_wait_s, then fails UNAVAILABLE; with no decode
                worker registered at all it fails at once. From here until it is
                settled, the reservation's lease is renewed (prefill.lease_renewal).
    PREFILLING  the sequence is in this worker's engine batch, chunked under the token
                budget (prompt + tokens generated before a preemption, if any).
    SHIPPING    the first token is published to the gateway (TTFT), then the KV blocks
                go into the reserved block ids: every request the step finished at once,
                one call per decode worker (over cuda_ipc, one copy launch for all), on
                the shipping thread (prefill.shipping) while the next step runs.
    HANDED_OFF  the decode worker acknowledged the Handoff; back on the main loop the
                local blocks are freed and the task is XACKed.
    FINISHED    the first token already ends the request (EOS, max_tokens 1): the final
                delta goes out, the reservation is released, the task acknowledged.
    FAILED      no decode worker, or the transfer failed (after one more reservation
                and try): an error delta ends the client's stream; everything is
                released and the task acknowledged.
    ABORTED     an abort notice removes it wherever it is; the reservation is released.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

from tandem.core.config import WorkerConfig
from tandem.core.kv_cache_manager import blocks_needed
from tandem.core.prefix_routing import WorkerRouting
from tandem.core.protocol import Handoff, PrefillTask, ReserveRequest, WorkerInfo
from tandem.core.registry import LEASE_SENDER_SUFFIX, SHIP_SENDER_SUFFIX
from tandem.core.replies import new_deltas, publish_safely, token_delta
from tandem.core.request_checks import check_task
from tandem.core.sequence import Sequence
from tandem.core.task_intake import TaskIntake, tasks_fitting
from tandem.core.worker_base import WorkerBase
from tandem.engine.engine import Engine, EngineConfig, StepFailed
from tandem.kvtransfer.curve import curve_keys
from tandem.kvtransfer.transport import (
    BlockMove,
    KVSender,
    Transfer,
    TransferError,
    TransferState,
    make_sender,
    ship,
    ship_many,
)
from tandem.kvtransfer.zmq_backend import ZmqKVSender
from tandem.prefill.decode_choice import DecodeWorkers, pick_decode_worker
from tandem.prefill.lease_renewal import LeaseRenewer
from tandem.prefill.shipping import Shipper

log = logging.getLogger(__name__)

RESERVE_ATTEMPTS = 3
INTAKE_BATCH = 16  # tasks read from Redis at once, at most
PROMPT_AVERAGING = 0.2  # weight of each new task in the running mean of prompt lengths
RESERVE_RETRY_S = 0.02  # how often tasks waiting for decode room try again
SHIP_WAIT_S = 0.02  # how long the loop waits at once for the shipping thread


@dataclass
class InFlight:
    entry_id: bytes
    task: PrefillTask
    seq: Sequence
    decode_id: str
    decode_address: str
    dst_blocks: list[int]
    dst_cached: int  # leading dst_blocks the decode worker already had: not shipped
    # Its local blocks, copied off the KV manager when it leaves the main loop for the
    # shipping thread (which reads no main-loop state).
    src_blocks: list[int] = field(default_factory=list)

    def blocks_to_ship(self, n: int) -> tuple[list[int], list[int]]:
        """(source, destination) ids of the first `n` blocks the decode worker lacks."""
        return self.src_blocks[self.dst_cached : n], self.dst_blocks[self.dst_cached : n]


class PrefillWorker(WorkerBase):
    def __init__(self, config: WorkerConfig, engine_config: EngineConfig) -> None:
        super().__init__(config)
        self.engine = Engine(engine_config)
        self.kv = self.engine.kv
        self.layout = self.engine.kv_cache.layout
        self.intake = TaskIntake(self.redis, self.engine.name, self.worker_id, config)
        # KV-aware routing (None: caching or routing off); its publisher also rides
        # the heartbeat.
        self.routing = WorkerRouting.of(
            self.redis, self.engine.name, self.worker_id, self.kv, config
        )
        self.hash_publisher = self.routing.publisher if self.routing else None
        # Reservations go out on the main loop's sender, KV and handoffs on the shipper's.
        curve = curve_keys(config.kv_curve_dir)
        self.sender = make_sender(config.kv_transport, self.worker_id, curve)
        self.ship_sender = make_sender(
            config.kv_transport, self.worker_id + SHIP_SENDER_SUFFIX, curve
        )
        self.shipper: Shipper[InFlight] = Shipper(self._ship_batch)
        # Every reservation held (prefilling or shipping) is renewed until it is settled;
        # control messages travel over zmq whatever carries the KV.
        self.leases = LeaseRenewer(
            ZmqKVSender(self.worker_id + LEASE_SENDER_SUFFIX, curve),
            config.reservation_lease_s,
            config.transfer_timeout_s,
        )
        self.inflight: dict[str, InFlight] = {}
        # Request id -> stream entry of each flight on the shipping thread: kept alive
        # like the rest, or a transfer slower than reclaim_idle gets the task reclaimed.
        self.shipping: dict[str, bytes] = {}
        # Tasks no decode worker had room for, oldest first: (entry id, task, first try).
        self.waiting_room: deque[tuple[bytes, PrefillTask, float]] = deque()
        self._retry_at = 0.0
        self.decoders = DecodeWorkers(self.redis, self.engine.name, self.layout)
        self.admitted = 0
        self.kv_bytes_sent = 0  # KV shipped to decode workers since start
        # A running mean of the prompts taken; until one is seen, one task fills a step.
        self._typical_prompt = float(self.engine.scheduler.config.prefill_budget)

    def snapshot(self) -> WorkerInfo:
        sched = self.engine.scheduler
        return WorkerInfo(
            worker_id=self.worker_id,
            role="prefill",
            model=self.engine.name,
            pid=os.getpid(),
            max_model_len=self.engine.max_model_len,
            layout=self.layout,
            **self.kv.figures(),
            routed_to_peers=self.routing.router.num_deferred if self.routing else 0,
            kv_bytes_sent=self.kv_bytes_sent,
            decode_by_prefix=self.decoders.num_by_prefix,
            decode_by_load=self.decoders.num_by_load,
            running=len(sched.running),
            waiting=len(sched.waiting),
            reservations=len(self.inflight) + self.shipper.flights,
            preemptions=sched.num_preemptions,
            admitted=self.admitted,
            draining=self.draining,
        )

    # -- main loop ---------------------------------------------------------------------
    def run(self) -> None:
        self.intake.ensure_group()
        self.start_background(self.snapshot)
        log.info("prefill worker %s ready", self.worker_id)
        try:
            while not self.stopping:
                # Tasks still waiting for decode room stay pending in the stream for a
                # peer to reclaim.
                if self.draining and not self.inflight and not self.shipper.batches:
                    break
                self._settle_shipped(self.shipper.collect())
                self._intake()
                self._apply_aborts()
                self._expire_deadlines()
                if self.engine.has_work:
                    while self.shipper.full:
                        self._settle_shipped(self.shipper.collect(SHIP_WAIT_S))
                    self._step()
                    self._publish_cached_blocks()
                elif self.shipper.batches:
                    self._settle_shipped(self.shipper.collect(SHIP_WAIT_S))
        finally:
            self.shipper.close(2 * self.config.transfer_timeout_s)
            self._settle_shipped(self.shipper.collect())
            self.leases.close()
            self.sender.close()
            self.ship_sender.close()
            self.shutdown()

    def _intake(self) -> None:
        self._retry_waiting_room()
        budget = self.engine.scheduler.config.prefill_budget
        queued = sum(f.seq.num_uncomputed_tokens for f in self.inflight.values())
        # While tasks wait for decode room, take no more: the rest stay in the stream.
        full = self.draining or queued >= budget or self.waiting_room
        # Take about what the next step can prefill, judged by the prompts seen so far:
        # a task taken early waits here, out of reach of idle peers (other prefill
        # workers, a decode worker's local prefill) and holding a decode reservation.
        room = 0 if full else tasks_fitting(budget - queued, self._typical_prompt, INTAKE_BATCH)
        # Busy: just look. Idle: wait briefly for work (no BLOCK means return at once).
        busy = self.engine.has_work or self.waiting_room or self.shipper.batches
        block_ms = None if busy else 50
        routed = self.routing is not None and room > 0 and self.routing.active
        if routed:
            block_ms = None  # see WorkerRouting.room
        # Routed, each task is judged before it is read, so one at a time.
        for _ in range(room if routed else 1):
            new = self._judged(busy) if routed else None
            entries = self.intake.poll(room, block_ms, self._held(), new=new)
            for entry_id, task in entries:
                tokens = len(task.prompt_token_ids) + len(task.output_token_ids)
                self._typical_prompt += PROMPT_AVERAGING * (tokens - self._typical_prompt)
                if not self._take(entry_id, task, time.monotonic()):
                    self.waiting_room.append((entry_id, task, time.monotonic()))
            if not entries or self.waiting_room:
                break
        self._publish_cached_blocks()
        if self.waiting_room and not self.engine.has_work:
            # Nothing to compute until decode has room: sleep to the next retry, not spin.
            time.sleep(max(0.0, min(RESERVE_RETRY_S, self._retry_at - time.monotonic())))

    def _judged(self, busy: bool) -> int:
        """WorkerRouting.new_tasks; idle with nothing to read, wait for the next task
        first (WorkerRouting.pause) and judge it at once, as a colocated peer's intake
        thread does (returning to the main loop first would lose it every time)."""
        new = self.routing.new_tasks(self.intake, self._load())
        if new or busy or self.inflight:
            return new
        self.routing.pause(self.intake)
        return self.routing.new_tasks(self.intake, self._load())

    def _publish_cached_blocks(self) -> None:
        if self.routing is not None:
            self.routing.publish(self._load())

    def _held(self) -> dict[str, bytes | None]:
        """Every request in hand and its stream entry (TaskIntake.poll's `held`)."""
        held = {rid: f.entry_id for rid, f in self.inflight.items()}
        held.update(self.shipping)
        held.update((task.request_id, entry_id) for entry_id, task, _ in self.waiting_room)
        return held

    def _load(self) -> int:
        """Tasks held and not handed off yet (what routing compares)."""
        return len(self.inflight) + len(self.waiting_room)

    def _retry_waiting_room(self) -> None:
        """Tasks that found every decode worker full try again, oldest first, as answers
        finish and free blocks; the first still without room keeps the rest waiting."""
        now = time.monotonic()
        if not self.waiting_room or now < self._retry_at or self.draining:
            return
        self._retry_at = now + RESERVE_RETRY_S
        while self.waiting_room:
            entry_id, task, since = self.waiting_room[0]
            if not self._take(entry_id, task, since):
                return
            self.waiting_room.popleft()

    def _take(self, entry_id: bytes, task: PrefillTask, since: float) -> bool:
        """Admit the task (or end it: aborted, invalid, expired, no decode worker at all,
        or none with room for decode_wait_s since `since`); False: no decode worker has
        room for it yet, try again later."""
        rid = task.request_id
        if self.was_aborted(rid) or self.kv.owns(rid):
            # A copy of a request whose blocks are still ours (shipping, or freed only
            # later) must not share them.
            self.intake.ack(entry_id)
            return True
        if task.deadline and time.time() > task.deadline:
            self.intake.fail(task, "deadline", "request deadline exceeded before prefill")
            self.intake.ack(entry_id)
            return True
        try:
            check_task(task, self.engine.limits)
            seq = Sequence.of_task(task)
            self.engine.add(seq)
        except ValueError as exc:
            self.intake.fail(task, "invalid_argument", str(exc))
            self.intake.ack(entry_id)
            return True
        placed = self._reserve(seq)
        if placed is None:
            self.engine.scheduler.abort(rid)
            # Every decode worker full: wait for room (a burst drains as answers finish)
            # unless there is no decode worker at all, or it has waited long enough.
            if self.decoders.workers() and time.monotonic() - since < self.config.decode_wait_s:
                return False
            self.intake.fail(task, "unavailable", "no decode worker could take the request")
            self.intake.ack(entry_id)
            return True
        self.inflight[rid] = InFlight(entry_id, task, seq, *placed)
        self.leases.hold(rid, placed[1])
        self.admitted += 1
        return True

    def _reserve(
        self, seq: Sequence, sender: KVSender | None = None
    ) -> tuple[str, str, list[int], int] | None:
        """(decode worker id, its address, the block ids reserved there, how many of
        them already hold this prompt's KV), or None when no decode worker has room."""
        sender = sender or self.sender
        candidates = self.decoders.workers()
        # A decode worker that holds some of these blocks keeps them (the reply's
        # cached_blocks); it is chosen for them unless it lacks room or is far busier.
        chain = self.kv.prefix_chain(seq.all_token_ids, seq.sampling.cache_salt)
        shareable = chain[: max(0, (seq.num_tokens - 1) // self.kv.block_size)]
        held = self.decoders.held_prefixes(candidates, shareable)
        blocks = blocks_needed(seq.num_tokens, self.kv.block_size)
        tried: set[str] = set()
        for _ in range(RESERVE_ATTEMPTS):
            choice = pick_decode_worker(candidates, tried, held, blocks)
            if choice is None:
                return None
            worker = choice.worker
            tried.add(worker.worker_id)
            req = ReserveRequest(
                request_id=seq.request_id,
                num_tokens=seq.num_tokens,
                layout=self.layout,
                lease_s=self.config.reservation_lease_s,
                block_hashes=chain,
            )
            try:
                reply = sender.reserve(worker.control_address, req, self.config.transfer_timeout_s)
            except TransferError as exc:
                log.warning("reserve on %s failed: %s", worker.worker_id, exc)
                continue
            if reply.ok:
                self.decoders.placed(choice)
                # Count it locally until the next registry read, so a burst spreads out.
                worker.free_blocks -= len(reply.block_ids)
                worker.running += 1
                cached = min(max(0, reply.cached_blocks), len(reply.block_ids))
                return worker.worker_id, worker.control_address, list(reply.block_ids), cached
            log.info("decode %s refused %s: %s", worker.worker_id, seq.request_id, reply.reason)
        return None

    def _expire_deadlines(self) -> None:
        now = time.time()
        for rid, flight in list(self.inflight.items()):
            if flight.task.deadline and now > flight.task.deadline:
                self._drop(rid)
                self.intake.fail(
                    flight.task, "deadline", "request deadline exceeded during prefill"
                )

    def _drop(self, rid: str) -> None:
        """Forget an in-flight request: free local blocks, release its reservation."""
        flight = self.inflight.pop(rid)
        self.engine.scheduler.abort(rid)
        self.kv.free(rid)
        self.leases.drop(rid)
        self.sender.release(flight.decode_address, rid)
        self.intake.ack(flight.entry_id)

    def held_reply_streams(self) -> dict[str, str]:
        # list(): one C-level copy, safe while the main loop changes the dict.
        return {rid: f.task.reply_stream for rid, f in list(self.inflight.items())}

    def _apply_aborts(self) -> None:
        for rid in self.drain_aborts():
            if rid in self.inflight:
                self._drop(rid)

    # -- one prefill step ---------------------------------------------------------------
    def _step(self) -> None:
        try:
            _, got = self.engine.step()
        except StepFailed as failed:
            for rid in failed.request_ids:
                if rid in self.inflight:
                    task = self.inflight[rid].task
                    self._drop(rid)
                    self.intake.fail(task, "internal", failed.reason)
            got = failed.got  # the rest of the step went on
        if not got:
            return
        deltas = new_deltas()
        leaving = []
        for seq in got:
            flight = self.inflight.pop(seq.request_id)
            deltas[flight.task.reply_stream].append(token_delta(seq, flight.decode_id))
            if seq.is_finished:  # the first token ended it: nothing to hand off
                self.leases.drop(seq.request_id)
                self.sender.release(flight.decode_address, seq.request_id)
                self.kv.free(seq.request_id)
                self.intake.ack(flight.entry_id)
            else:
                self.engine.scheduler.detach(seq)  # decode generates the rest
                flight.src_blocks = list(self.kv.block_table(seq.request_id))
                self.shipping[seq.request_id] = flight.entry_id
                leaving.append(flight)
        # The blocks this step cached and the load without the tasks leaving, before
        # any token: once a client has its answer, a peer judging its next request
        # must see this worker as it is (the call after the step would be late).
        self._publish_cached_blocks()
        publish_safely(self.redis, deltas)  # first tokens out before any KV moves
        if leaving:
            self.shipper.submit(leaving)

    def _settle_shipped(self, outcomes: list[tuple[InFlight, str]]) -> None:
        """Main loop: free what the shipping thread is done with, settle its tasks."""
        for flight, failure in outcomes:
            self.shipping.pop(flight.seq.request_id, None)
            self.leases.drop(flight.seq.request_id)
            self.kv.free(flight.seq.request_id)
            if failure:
                self.intake.fail(
                    flight.task, "unavailable", f"KV handoff to decode failed: {failure}"
                )
            else:
                blocks = blocks_needed(flight.seq.num_tokens - 1, self.kv.block_size)
                shipped = blocks - flight.dst_cached
                self.kv_bytes_sent += shipped * self.layout.bytes_per_block
            self.intake.ack(flight.entry_id)

    # -- shipping thread ----------------------------------------------------------------
    def _ship_batch(self, flights: list[InFlight]) -> list[tuple[InFlight, str]]:
        shipped = self._ship_together(flights)
        return [(f, self._hand_off(f, shipped[f.seq.request_id])) for f in flights]

    def _ship_together(self, flights: list[InFlight]) -> dict[str, Transfer]:
        """The KV of every request this step finished, one call per decode worker (over
        cuda_ipc one copy launch for all of them); request id -> its Transfer."""
        by_peer: dict[str, list[BlockMove]] = {}
        shipped: dict[str, Transfer] = {}
        for flight in flights:
            rid = flight.seq.request_id
            if self.leases.lost(rid):
                # Its blocks may be another request's by now: reserve again (_hand_off).
                lost = Transfer(rid, flight.decode_address)
                lost.fail("the reservation was lost (lease expired)")
                shipped[rid] = lost
                continue
            n = blocks_needed(flight.seq.num_tokens - 1, self.kv.block_size)
            by_peer.setdefault(flight.decode_address, []).append(
                BlockMove(rid, *flight.blocks_to_ship(n))
            )
        for address, moves in by_peer.items():
            for transfer in ship_many(
                self.ship_sender,
                address,
                moves,
                self.engine.kv_cache.layers,
                self.config.transfer_timeout_s,
            ):
                shipped[transfer.request_id] = transfer
        return shipped

    def _hand_off(self, flight: InFlight, shipped: Transfer) -> str:
        """Hand off the request whose KV went out as `shipped`; if that failed or the
        reservation was lost (lease expired, decode restarted), reserve again once and
        retry (ship and hand off). Returns why it failed in the end, or ""."""
        seq, rid = flight.seq, flight.seq.request_id
        computed = seq.num_tokens - 1  # the token just sampled has no KV yet
        n = blocks_needed(computed, self.kv.block_size)
        reason = ""
        for attempt in range(2):
            if attempt:
                if self.was_aborted(rid):  # the main loop drains abort notices
                    return ""  # the client left while we were shipping; nothing to retry
                placed = self._reserve(seq, self.ship_sender)
                if placed is None:
                    break
                flight.decode_id, flight.decode_address, flight.dst_blocks, flight.dst_cached = (
                    placed
                )
                self.leases.hold(rid, flight.decode_address)
            reason = self._ship_and_hand_off(flight, computed, n, None if attempt else shipped)
            if not reason:
                return ""
            log.warning("handoff of %s to %s failed: %s", rid, flight.decode_id, reason)
            self.ship_sender.release(flight.decode_address, rid)
        return reason or "no decode worker could take it again"

    def _ship_and_hand_off(
        self, flight: InFlight, computed: int, n: int, shipped: Transfer | None
    ) -> str:
        """Empty string on success, else why it failed. Ships first unless `shipped`."""
        seq, rid = flight.seq, flight.seq.request_id
        transfer = shipped or ship(
            self.ship_sender,
            flight.decode_address,
            rid,
            self.engine.kv_cache.layers,
            *flight.blocks_to_ship(n),
            self.config.transfer_timeout_s,
        )
        if transfer.state is not TransferState.DONE:
            return transfer.reason or "transfer failed"
        try:
            ack = self.ship_sender.handoff(
                flight.decode_address,
                Handoff(
                    task=flight.task,
                    output_token_ids=list(seq.output_token_ids),
                    num_computed_tokens=computed,
                ),
                self.config.transfer_timeout_s,
            )
        except TransferError as exc:
            return str(exc)
        return "" if ack.ok else ack.reason

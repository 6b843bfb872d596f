"""Prefill worker: computes prompts' KV and hands requests to decode workers.

A task's life on this worker, as states:

    QUEUED      a PrefillTask in the model's Redis stream (consumer group "prefill").
    CLAIMED     XREADGROUP delivered it here, or XAUTOCLAIM took it over from a worker
                that died holding it. Duplicates (same request id) are acknowledged and
                dropped; aborted (marker key) or expired tasks end here.
    RESERVED    a decode worker, picked from the registry (most free blocks, fewest
                running), reserved blocks for the KV to come. No reservation, no
                prefill: nothing is computed that nobody will keep.
    PREFILLING  the sequence is in this worker's engine batch, chunked under the token
                budget (prompt + tokens generated before a preemption, if any).
    SHIPPING    the first token is published to the gateway (TTFT), then the KV blocks
                are packed and sent into the reserved block ids.
    HANDED_OFF  the decode worker acknowledged the Handoff: local blocks are freed and
                the task is XACKed.
    FINISHED    the first token already ends the request (EOS, max_tokens 1): the final
                delta goes out, the reservation is released, the task acknowledged.
    FAILED      no decode worker, or the transfer failed: an error delta ends the
                client's stream; everything is released and the task acknowledged.
    ABORTED     an abort notice removes it wherever it is; the reservation is released.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass

import redis

from core.config import WorkerConfig
from core.kv_cache_manager import blocks_needed
from core.protocol import Handoff, PrefillTask, ReserveRequest, TokenDelta, WorkerInfo, encode
from core.redis_client import (
    dead_letter,
    delivery_counts,
    ensure_group,
    is_aborted,
    publish_deltas,
    read_tasks,
    reclaim_tasks,
)
from core.redis_keys import PREFILL_GROUP, dead_letter_stream, prefill_stream
from core.registry import list_workers, pick_decode_worker
from core.sequence import Sequence
from core.worker_base import WorkerBase
from engine.engine import Engine, EngineConfig
from kvtransfer import TransferError, TransferState, make_sender, ship
from kvtransfer.pack import layout_of

log = logging.getLogger(__name__)

RESERVE_ATTEMPTS = 3


@dataclass
class InFlight:
    entry_id: bytes
    task: PrefillTask
    seq: Sequence
    decode_id: str
    decode_address: str
    dst_blocks: list[int]


class PrefillWorker(WorkerBase):
    def __init__(self, config: WorkerConfig, engine_config: EngineConfig) -> None:
        super().__init__(config)
        self.engine = Engine(engine_config)
        self.kv = self.engine.kv
        self.layout = layout_of(self.engine.runner.kv_caches, self.engine.name,
                                self.kv.block_size)
        self.stream = prefill_stream(self.engine.name)
        self.sender = make_sender(config.kv_transport, self.worker_id)
        self.inflight: dict[str, InFlight] = {}
        self._last_reclaim = 0.0
        self._decoders: list[WorkerInfo] = []
        self._decoders_at = 0.0
        self.admitted = 0

    def snapshot(self) -> WorkerInfo:
        sched = self.engine.scheduler
        return WorkerInfo(
            worker_id=self.worker_id, role="prefill", model=self.engine.name, pid=os.getpid(),
            layout=self.layout, total_blocks=self.kv.pool.num_blocks,
            free_blocks=self.kv.num_free_blocks, used_blocks=self.kv.num_used_blocks,
            running=len(sched.running), waiting=len(sched.waiting),
            reservations=len(self.inflight), preemptions=sched.num_preemptions,
            admitted=self.admitted, draining=self.draining)

    # -- main loop ---------------------------------------------------------------------
    def run(self) -> None:
        ensure_group(self.redis, self.stream)
        self.start_background(self.snapshot)
        log.info("prefill worker %s ready", self.worker_id)
        try:
            while not self.stopping:
                if self.draining and not self.inflight:
                    break
                try:
                    if not self.draining:
                        self._intake()
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    log.warning("redis unavailable: %s", exc)
                    time.sleep(0.2)
                    self._recreate_group()
                except redis.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    self._recreate_group()  # Redis restarted without its data
                self._apply_aborts()
                self._expire_deadlines()
                if self.engine.scheduler.has_work:
                    self._step()
        finally:
            self.sender.close()
            self.shutdown()

    def _recreate_group(self) -> None:
        with contextlib.suppress(redis.RedisError):
            ensure_group(self.redis, self.stream)

    def _intake(self) -> None:
        budget = self.engine.scheduler.config.max_num_batched_tokens
        queued = sum(f.seq.num_uncomputed_tokens for f in self.inflight.values())
        if queued >= budget:
            return
        # Busy: just look. Idle: wait briefly for work (no BLOCK means return at once).
        block_ms = None if self.engine.scheduler.has_work else 50
        entries = read_tasks(self.redis, self.stream, self.worker_id, 16, block_ms)
        now = time.monotonic()
        if now - self._last_reclaim > self.config.reclaim_idle_s / 2:
            self._last_reclaim = now
            self._touch_inflight()
            entries += self._reclaim()
        for entry_id, task in entries:
            self._take(entry_id, task)

    def _reclaim(self) -> list[tuple[bytes, PrefillTask | None]]:
        """Take over tasks of dead workers; a task delivered too often goes to the
        dead-letter stream and its client gets an error instead of another retry."""
        claimed = reclaim_tasks(self.redis, self.stream, self.worker_id,
                                int(self.config.reclaim_idle_s * 1000), 16)
        mine = {f.entry_id for f in self.inflight.values()}
        claimed = [(e, t) for e, t in claimed if e not in mine]
        if not claimed:
            return []
        counts = delivery_counts(self.redis, self.stream, [e for e, _ in claimed])
        keep = []
        for entry_id, task in claimed:
            if counts.get(entry_id, 0) <= self.config.max_deliveries or task is None:
                keep.append((entry_id, task))
                continue
            reason = f"task failed {counts[entry_id] - 1} deliveries"
            log.error("dead-lettering %s: %s", task.request_id, reason)
            dead_letter(self.redis, self.stream, dead_letter_stream(self.engine.name),
                        entry_id, encode(task), reason)
            self._fail(task, "internal", f"request could not be processed ({reason})")
        return keep

    def _touch_inflight(self) -> None:
        """Reset our in-flight entries' idle time so nobody reclaims live work."""
        ids = [f.entry_id for f in self.inflight.values()]
        if ids:
            self.redis.xclaim(self.stream, PREFILL_GROUP, self.worker_id, 0, ids, justid=True)

    def _ack(self, entry_id: bytes) -> None:
        """Acknowledge and delete: a handled task has no reason to stay in the stream."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xack(self.stream, PREFILL_GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("XACK failed (the task may be redelivered): %s", exc)

    def _fail(self, task: PrefillTask, code: str, message: str) -> None:
        self._publish({task.reply_stream: [TokenDelta(
            request_id=task.request_id, finish_reason="abort", error=message,
            error_code=code)]})

    def _publish(self, deltas: dict[str, list[TokenDelta]]) -> None:
        """Publish, surviving a Redis outage: the gateway then sees a gap or its deadline
        and ends the request explicitly; the worker itself must keep running."""
        try:
            publish_deltas(self.redis, deltas)
        except redis.RedisError as exc:
            log.error("could not publish to the gateway: %s", exc)

    def _take(self, entry_id: bytes, task: PrefillTask | None) -> None:
        if task is None:
            self._ack(entry_id)
            return
        rid = task.request_id
        current = self.inflight.get(rid)
        if current is not None:
            if current.entry_id != entry_id:
                self._ack(entry_id)  # a duplicate of work in progress
            return
        if self.was_aborted(rid) or is_aborted(self.redis, rid):
            self._ack(entry_id)
            return
        if task.deadline and time.time() > task.deadline:
            self._fail(task, "deadline", "request deadline exceeded before prefill")
            self._ack(entry_id)
            return
        try:
            seq = Sequence(rid, list(task.prompt_token_ids), task.sampling,
                           output_token_ids=list(task.output_token_ids))
            self.engine.add(seq)
        except ValueError as exc:
            self._fail(task, "invalid_argument", str(exc))
            self._ack(entry_id)
            return
        placed = self._reserve(seq)
        if placed is None:
            self.engine.scheduler.abort(rid)
            self._fail(task, "unavailable", "no decode worker could take the request")
            self._ack(entry_id)
            return
        decode_id, address, blocks = placed
        self.inflight[rid] = InFlight(entry_id, task, seq, decode_id, address, blocks)
        self.admitted += 1

    def _decode_workers(self) -> list[WorkerInfo]:
        """Compatible decode workers, read from the registry at most every 0.5 s (a burst
        of tasks must not SCAN the registry once per task)."""
        now = time.monotonic()
        if now - self._decoders_at > 0.5:
            try:
                workers = list_workers(self.redis, "decode", self.engine.name)
            except redis.RedisError as exc:
                log.warning("registry unreadable, using the last view: %s", exc)
                return self._decoders
            self._decoders = [w for w in workers
                              if w.layout is not None and w.layout.mismatch(self.layout) is None]
            self._decoders_at = now
        return self._decoders

    def _reserve(self, seq: Sequence) -> tuple[str, str, list[int]] | None:
        candidates = self._decode_workers()
        tried: set[str] = set()
        for _ in range(RESERVE_ATTEMPTS):
            worker = pick_decode_worker(candidates, tried)
            if worker is None:
                return None
            tried.add(worker.worker_id)
            req = ReserveRequest(request_id=seq.request_id, num_tokens=seq.num_tokens,
                                 layout=self.layout, lease_s=self.config.reservation_lease_s)
            try:
                reply = self.sender.reserve(worker.control_address, req,
                                            self.config.transfer_timeout_s)
            except TransferError as exc:
                log.warning("reserve on %s failed: %s", worker.worker_id, exc)
                continue
            if reply.ok:
                # Count it locally until the next registry read, so a burst spreads out.
                worker.free_blocks -= len(reply.block_ids)
                worker.running += 1
                return worker.worker_id, worker.control_address, list(reply.block_ids)
            log.info("decode %s refused %s: %s", worker.worker_id, seq.request_id, reply.reason)
        return None

    def _expire_deadlines(self) -> None:
        now = time.time()
        for rid, flight in list(self.inflight.items()):
            if flight.task.deadline and now > flight.task.deadline:
                self._drop(rid)
                self._fail(flight.task, "deadline", "request deadline exceeded during prefill")

    def _drop(self, rid: str) -> None:
        """Forget an in-flight request: free local blocks, release its reservation."""
        flight = self.inflight.pop(rid)
        self.engine.scheduler.abort(rid)
        self.kv.free(rid)
        self.sender.release(flight.decode_address, rid)
        self._ack(flight.entry_id)

    def _apply_aborts(self) -> None:
        for rid in self.drain_aborts():
            if rid in self.inflight:
                self._drop(rid)

    # -- one prefill step ---------------------------------------------------------------
    def _step(self) -> None:
        _, got = self.engine.step()
        if not got:
            return
        deltas: dict[str, list[TokenDelta]] = defaultdict(list)
        continuing = []
        for seq in got:
            flight = self.inflight[seq.request_id]
            deltas[flight.task.reply_stream].append(TokenDelta(
                request_id=seq.request_id, token_ids=[seq.output_token_ids[-1]],
                offset=len(seq.output_token_ids) - 1,
                finish_reason=seq.finish_reason.value if seq.is_finished else None,
                logprobs=seq.output_logprobs[-1:] or None, worker_id=flight.decode_id))
            if not seq.is_finished:
                continuing.append(seq)
                self.engine.scheduler.detach(seq)  # decode generates the rest
        self._publish(deltas)  # first tokens out before any KV moves
        for seq in got:
            flight = self.inflight.pop(seq.request_id)
            if seq in continuing:
                self._hand_off(flight)
            else:
                self.sender.release(flight.decode_address, seq.request_id)
            self.kv.free(seq.request_id)
            self._ack(flight.entry_id)

    def _hand_off(self, flight: InFlight) -> None:
        """Ship KV and hand off; if the reservation was lost (lease expired, decode
        restarted), reserve again once and retry before failing the request."""
        seq, rid = flight.seq, flight.seq.request_id
        computed = seq.num_tokens - 1  # the token just sampled has no KV yet
        n = blocks_needed(computed, self.kv.block_size)
        reason = ""
        for attempt in range(2):
            if attempt:
                self.drain_aborts()
                if self.was_aborted(rid):
                    return  # the client left while we were shipping; nothing to retry
                placed = self._reserve(seq)
                if placed is None:
                    break
                flight.decode_id, flight.decode_address, flight.dst_blocks = placed
            reason = self._ship_and_hand_off(flight, computed, n)
            if not reason:
                return
            log.warning("handoff of %s to %s failed: %s", rid, flight.decode_id, reason)
            self.sender.release(flight.decode_address, rid)
        self._fail(flight.task, "unavailable", f"KV handoff to decode failed: {reason}")

    def _ship_and_hand_off(self, flight: InFlight, computed: int, n: int) -> str:
        """Empty string on success, else why it failed."""
        seq, rid = flight.seq, flight.seq.request_id
        transfer = ship(self.sender, flight.decode_address, rid, self.engine.runner.kv_caches,
                        self.kv.block_table(rid)[:n], flight.dst_blocks[:n],
                        self.config.transfer_timeout_s)
        if transfer.state is not TransferState.DONE:
            return transfer.reason or "transfer failed"
        try:
            ack = self.sender.handoff(flight.decode_address, Handoff(
                task=flight.task, output_token_ids=list(seq.output_token_ids),
                num_computed_tokens=computed), self.config.transfer_timeout_s)
        except TransferError as exc:
            return str(exc)
        return "" if ack.ok else ack.reason

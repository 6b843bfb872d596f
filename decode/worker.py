"""Decode worker: generates the tokens of requests prefilled elsewhere, and with local
prefill also prefills some itself.

A handed-off request's life on this worker, as states:

    RESERVED   a prefill worker sent ReserveRequest; blocks for the prompt's KV are
               allocated under the request id with a lease, and their ids sent back
               (or a refusal: out of blocks, too many sequences, draining, layout).
    FILLED     KVTransfer arrived: the packed blocks are scattered into the reserved
               block ids and acknowledged.
    RUNNING    Handoff arrived (prompt, sampling, the first token sampled by prefill):
               the sequence joins the continuous batch, one token per step. Each step
               publishes one TokenBatch per gateway reply stream.

With --local-prefill-after-ms or --local-prefill-uncached-tokens (conditional
disaggregation, off by default), a request may also come straight from the model's
prefill stream, as on a colocated worker:

    QUEUED     a PrefillTask in the stream that no prefill worker has taken yet.
    CLAIMED    the intake thread read it (XREADGROUP; XAUTOCLAIM of a dead worker's
               task) because the oldest untaken task had waited --local-prefill-after-ms,
               or read exactly that task because at most --local-prefill-uncached-tokens
               of it are missing from this worker's prefix cache (prefill workers leave
               such a task to it: it publishes its block hashes as they do); and fewer
               than --max-local-prefills of this worker's own tasks were prefilling, and
               it had a sequence slot and KV blocks for the task (core.local_prefill).
               Malformed, duplicate, aborted and expired tasks end here, as on a prefill
               worker.
    WAITING    in the engine's queue. Its stream entry stays pending under this worker
               and is kept alive, so if the worker dies a peer reclaims it.
    PREFILLING chunked under the token budget after the step's decodes.
    RUNNING    the first token went out (TTFT) naming this worker as the owner the
               gateway watches, then the entry is acknowledged (XACK + XDEL): from here
               it is like a handed-off request (a lost worker means UNAVAILABLE, or a
               migration with the gateway's --migrate, never a reclaim).

Either way:

    FINISHED   EOS / stop token / max_tokens: the last delta carries the finish reason,
               blocks are freed.
    ABORTED    an abort notice (client cancel, stop string) frees the blocks at the next
               step (a local task's entry is acknowledged); nothing more is sent.
    PREEMPTED  blocks ran out: the youngest sequence is freed and its PrefillTask, with
               the tokens generated so far, goes back on the prefill stream; the prefill
               pool recomputes it and the client sees no break. A local task preempted
               while prefilling goes back the same way, its old entry acknowledged.
    EXPIRED    its deadline passed: an error delta ends the stream, blocks are freed. A
               reservation not handed off within its lease is released (the prefill
               worker that made it renews the lease while it prefills and ships, so
               only a dead or frozen one lets it run out).

Two threads touch the engine's bookkeeping, serialized by one lock: the control thread
answers prefill workers (reserve, fill, handoff, release) at once, so their round trips
never wait for a decode step, and the main loop schedules, runs and publishes steps. The
forward pass runs without the lock; it only reads blocks of running sequences, which the
control thread never writes. Redis writes (tokens, acknowledgements, requeued tasks) go
out in order on the outbox thread (core.replies), so a step never waits on a socket.
With local prefill an intake thread reads tasks as decode.batch_worker tells.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import redis

from tandem.core.config import WorkerConfig
from tandem.core.local_prefill import CachedLead, Claim, LocalPrefillGate, Room
from tandem.core.prefix_routing import HashPublisher
from tandem.core.protocol import (
    ControlMessage,
    Handoff,
    KVTransfer,
    LeasesRenewed,
    PrefillTask,
    Release,
    RenewLeases,
    ReserveReply,
    ReserveRequest,
    TransferAck,
    WorkerInfo,
)
from tandem.core.redis_client import add_task, publish_deltas
from tandem.core.registry import list_workers, worker_of_sender
from tandem.core.replies import error_delta
from tandem.core.request_checks import check_handoff, check_renewal, check_reserve
from tandem.core.sequence import Sequence, SequenceStatus
from tandem.decode.batch_worker import BatchWorker, Request
from tandem.engine.engine import Engine, EngineConfig, StepFailed
from tandem.kvtransfer.curve import curve_keys
from tandem.kvtransfer.transport import make_receiver
from tandem.kvtransfer.wire import refusal

log = logging.getLogger(__name__)

PEER_RECHECK_S = 0.5


@dataclass
class Reservation:
    request_id: str
    expires_at: float  # monotonic
    num_tokens: int  # the tokens whose KV it holds blocks for
    filled: bool = False
    cached: int = 0  # leading blocks that already held its KV (prefix cache): not sent
    owner: str = ""  # the prefill worker that made it: only it may renew the lease


class DecodeWorker(BatchWorker):
    def __init__(self, config: WorkerConfig, engine_config: EngineConfig) -> None:
        super().__init__(config, Engine(engine_config, requeue_preempted=False))
        self.layout = self.engine.kv_cache.layout
        host = config.bind_host
        self.receiver = make_receiver(
            config.kv_transport, f"tcp://{host}:0", curve_keys(config.kv_curve_dir)
        )
        self.receiver.attach_kv_caches(self.engine.kv_cache.layers)
        self.receiver.admits_peer = self._registered_prefill
        self._prefill_ids: set[str] = set()  # registered prefill workers, as last read
        self._prefill_ids_at = float("-inf")
        self.reservations: dict[str, Reservation] = {}
        self.admitted = 0  # handoffs
        self.lock = threading.Lock()
        self.gate: LocalPrefillGate | None = None
        if config.local_prefill:
            self.gate = LocalPrefillGate(
                config.local_prefill_after_ms,
                config.max_local_prefills,
                self.kv.block_size,
                config.local_prefill_uncached_tokens,
            )
        if self.kv.enable_prefix_caching:
            # Prefill workers reserve on the decode worker holding a prompt's leading
            # blocks (a conversation's previous turn: prefill/decode_choice.py), and with
            # local_prefill_uncached_tokens leave it the tasks whose remainder here is
            # short (core/prefix_routing.py; its load is the local prefills it would refuse).
            self.hash_publisher = HashPublisher(
                self.redis, self.engine.name, self.worker_id, self.kv, config.registry_ttl_s
            )
        self._local_load: int | None = None  # as last given to the publisher
        self._cached_lead = CachedLead(self.kv)  # the intake thread's

    # -- registry ----------------------------------------------------------------------
    def snapshot(self) -> WorkerInfo:
        address = self.receiver.address
        if self.config.advertise_host:
            address = address.replace(self.config.bind_host, self.config.advertise_host, 1)
        sched = self.engine.scheduler
        return WorkerInfo(
            worker_id=self.worker_id,
            role="decode",
            model=self.engine.name,
            pid=os.getpid(),
            max_model_len=self.engine.max_model_len,
            control_address=address,
            layout=self.layout,
            **self.kv.figures(),
            running=len(sched.running),
            waiting=len(self.reservations) + len(sched.waiting),
            reservations=len(self.reservations),
            preemptions=sched.num_preemptions,
            admitted=self.admitted,
            local_prefills=self.from_stream,
            local_prefill_uncached_tokens=self.config.local_prefill_uncached_tokens,
            max_local_prefills=self.config.max_local_prefills if self.gate else 0,
            draining=self.draining,
        )

    def _registered_prefill(self, peer: bytes) -> bool:
        """On the receiver's I/O thread: whether a sender asking for a cuda_ipc export
        or an nccl group is a prefill worker of this model in the registry (read again
        on a miss, at most every PEER_RECHECK_S)."""
        worker_id = worker_of_sender(peer.decode(errors="replace"))
        now = time.monotonic()
        if worker_id not in self._prefill_ids and now - self._prefill_ids_at > PEER_RECHECK_S:
            self._prefill_ids_at = now
            try:
                workers = list_workers(self.redis, "prefill", self.engine.name)
            except redis.RedisError as exc:
                log.warning("registry unreadable; refusing %r: %s", worker_id, exc)
                return False
            self._prefill_ids = {w.worker_id for w in workers}
        return worker_id in self._prefill_ids

    # -- main loop ---------------------------------------------------------------------
    def run(self) -> None:
        self.receiver.start()
        self.intake.ensure_group()
        self.start_background(self.snapshot)
        self.outbox.start()
        self._spawn(self._control_loop)
        if self.gate is not None:
            self._start_intake()
        log.info("decode worker %s ready at %s", self.worker_id, self.receiver.address)
        try:
            while not self.stopping:
                self._check_intake()
                with self.lock:
                    self._apply_aborts()
                    self._expire_reservations()
                    self._receive()
                    self._expire_deadlines()
                    self._share_local_room()
                    busy = self.engine.has_work
                    if (
                        self.draining
                        and not busy
                        and not self.reservations
                        and self._intake_settled()
                    ):
                        break
                if busy:
                    self._step()
                else:
                    self.work_arrived.wait(0.05)
                    self.work_arrived.clear()
        finally:
            self.request_stop()
            self.receiver.close()
            self.outbox.close()  # the last tokens go out before the registry entry goes
            self.shutdown()

    def shutdown(self) -> None:
        # Closed here too, not only by run(): a receiver whose zmq context reaches the
        # garbage collector open hangs it (the context's sockets are gone from its
        # weak set by then, so terminating it waits for them forever).
        self.receiver.close()
        super().shutdown()

    def _control_loop(self) -> None:
        while not self.stopping:
            items = self.receiver.poll(0.05)
            if not items:
                continue
            with self.lock:
                self._apply_aborts()  # so a reservation arriving after its abort is refused
                for item in items:
                    self._handle(item.peer, item.msg, item.payload)

    def _handle(self, peer: bytes, msg, payload) -> None:
        """Answer one control message. Whatever a message holds, the loop lives: a field
        out of bounds is refused by the checks, and a handler that raises anyway answers
        with a refusal instead of ending the control thread."""
        try:
            reply = self._answer(peer, msg, payload)
        except Exception:
            log.exception("control message %s failed", type(msg).__name__)
            reply = refusal(msg, "the decode worker failed on this message (logged there)")
        if reply is not None:
            self.receiver.reply(peer, reply)

    def _answer(self, peer: bytes, msg, payload) -> ControlMessage | None:
        if isinstance(msg, ReserveRequest):
            return self._reserve(msg, worker_of_sender(peer.decode(errors="replace")))
        if isinstance(msg, RenewLeases):
            return self._renew(msg, worker_of_sender(peer.decode(errors="replace")))
        if isinstance(msg, KVTransfer):
            return self._fill(msg, payload)
        if isinstance(msg, Handoff):
            return self._admit(msg)
        if isinstance(msg, Release):
            self._release(msg.request_id)
        else:
            log.warning("unexpected control message %s", type(msg).__name__)
        return None

    def _reserve(self, req: ReserveRequest, owner: str) -> ReserveReply:
        rid = req.request_id

        def refuse(reason: str) -> ReserveReply:
            return ReserveReply(request_id=rid, ok=False, reason=reason)

        try:
            check_reserve(req, self.engine.limits)
        except ValueError as exc:
            return refuse(str(exc))
        if self.draining:
            return refuse("draining")
        if self.was_aborted(rid):
            return refuse("request was aborted")
        if (why := req.layout.mismatch(self.layout)) is not None:
            return refuse(why)
        if rid in self.requests:
            return refuse("request already running here")
        sched = self.engine.scheduler
        busy = len(sched.running) + len(sched.waiting) + len(self.reservations)
        if rid not in self.reservations and busy >= sched.config.max_num_seqs:
            return refuse("too many sequences")
        held = self.reservations.get(rid)
        reserved = self.kv.reserve(rid, req.num_tokens, req.block_hashes)
        if reserved is None:
            return refuse("out of KV blocks")
        block_ids, cached = reserved
        cached = held.cached if held is not None else cached
        self.reservations[rid] = Reservation(
            rid, time.monotonic() + req.lease_s, req.num_tokens, cached=cached, owner=owner
        )
        return ReserveReply(request_id=rid, ok=True, block_ids=block_ids, cached_blocks=cached)

    def _renew(self, msg: RenewLeases, owner: str) -> LeasesRenewed:
        """A prefill worker still prefilling or shipping into its reservations keeps
        them: each one it made gets the lease from now (never a shorter one). The rest
        are reported lost, so it reserves again instead of writing freed blocks."""
        try:
            check_renewal(msg)
        except ValueError as exc:
            return LeasesRenewed(renewal_id=msg.renewal_id, ok=False, reason=str(exc))
        until = time.monotonic() + msg.lease_s
        lost = []
        for rid in msg.request_ids:
            res = self.reservations.get(rid)
            if res is None or res.owner != owner:
                lost.append(rid)
            else:
                res.expires_at = max(res.expires_at, until)
        reason = f"{len(lost)} reservation(s) not held here (expired?)" if lost else ""
        return LeasesRenewed(renewal_id=msg.renewal_id, ok=not lost, lost=lost, reason=reason)

    def _fill(self, msg: KVTransfer, packed) -> TransferAck:
        rid = msg.request_id
        res = self.reservations.get(rid)
        if res is None:
            return TransferAck(request_id=rid, ok=False, reason="no reservation (expired?)")
        owned = self.kv.block_table(rid)[res.cached :]  # the cached ones are not sent
        if msg.in_place and not self.receiver.in_place:
            return TransferAck(request_id=rid, ok=False, reason="this transport carries KV")
        if msg.block_ids != owned[: len(msg.block_ids)] or (packed is None) != msg.in_place:
            return TransferAck(request_id=rid, ok=False, reason="blocks do not match reservation")
        if packed is not None:
            try:
                self.engine.kv_cache.unpack(msg.block_ids, packed)
            except (ValueError, RuntimeError) as exc:
                return TransferAck(request_id=rid, ok=False, reason=f"bad KV payload: {exc}")
        res.filled = True
        # The handoff follows right behind the KV; give it a fresh lease to arrive in.
        res.expires_at = time.monotonic() + self.config.reservation_lease_s
        return TransferAck(request_id=rid, ok=True)

    def _admit(self, msg: Handoff) -> TransferAck:
        task = msg.task
        rid = task.request_id
        res = self.reservations.pop(rid, None)
        if res is None or not res.filled or self.was_aborted(rid):
            if res is not None:
                self.kv.free(rid)
            return TransferAck(request_id=rid, ok=False, reason="KV not received or aborted")
        try:
            check_handoff(msg, self.engine.limits)
            if msg.num_computed_tokens > res.num_tokens:
                raise ValueError(
                    f"num_computed_tokens {msg.num_computed_tokens} exceeds the "
                    f"{res.num_tokens} tokens reserved"
                )
        except ValueError as exc:
            self.kv.free(rid)
            return TransferAck(request_id=rid, ok=False, reason=str(exc))
        seq = Sequence.of_task(task, msg.output_token_ids, msg.num_computed_tokens)
        try:
            if not self.kv.holds_prefix_of(seq, res.cached):
                raise ValueError("the cached blocks reserved are not this prompt's")
            self.engine.scheduler.add_running(seq)
        except (ValueError, MemoryError) as exc:
            self.kv.free(rid)
            return TransferAck(request_id=rid, ok=False, reason=str(exc))
        self.requests[rid] = Request(task, None)
        self.admitted += 1
        self.work_arrived.set()
        return TransferAck(request_id=rid, ok=True)

    def _release(self, request_id: str) -> None:
        if self.reservations.pop(request_id, None) is not None:
            self.kv.free(request_id)

    def _apply_aborts(self) -> None:
        aborted = self.drain_aborts()
        for rid in aborted:
            self._release(rid)
        self._abort_requests(aborted)

    def _expire_reservations(self) -> None:
        now = time.monotonic()
        for rid in [r for r, res in self.reservations.items() if res.expires_at < now]:
            log.warning("reservation for %s expired unfilled; released", rid)
            self._release(rid)

    # -- local prefill ------------------------------------------------------------------
    def _share_local_room(self) -> None:
        if self.gate is None:
            return
        sched = self.engine.scheduler
        prefilling = sum(1 for req in self.requests.values() if req.entry_id is not None)
        slots = (
            sched.config.max_num_seqs
            - len(sched.running)
            - len(sched.waiting)
            - len(self.reservations)
        )
        room = self.gate.room(prefilling, slots, sched.spare_blocks())
        tasks = 0 if self.draining else room.tasks
        # A task for a request reserved here is a duplicate of the one coming in.
        self._share_state(tasks, room.blocks, self.reservations)
        load = self.gate.max_prefills - tasks
        if self.hash_publisher is not None and load != self._local_load:
            self._local_load = load
            self.outbox.call(self.hash_publisher.set_load, load)

    def _claims(self, free: int, spare_blocks: int) -> tuple[int, bytes | None, int | None]:
        """On the intake thread: one task at most, while the pool is backed up or when
        the backlog's task is mostly cached here (then that task only)."""
        assert self.gate is not None
        backlog = self.intake.backlog()
        cached = self._cached_lead.tokens(backlog) if self.gate.uncached_tokens else 0
        claim = self.gate.claims(backlog, Room(free, spare_blocks), cached)
        if claim is Claim.THIS:
            assert backlog is not None
            return 1, backlog.entry_id, None
        return int(claim is Claim.NEXT), None, None

    # -- one decode step ----------------------------------------------------------------
    def _step(self) -> None:
        try:
            out, got = self.engine.step(self.lock)
        except StepFailed as failed:
            with self.lock:
                self._fail_step(failed)
            out, got = failed.out, failed.got  # what the rest of the step did
        with self.lock:
            # Published first: a requeued request's next token must not overtake these.
            self._publish_around(got, self._flush_hashes)
            for seq in out.preempted:
                self._send_back(seq)

    def _flush_hashes(self) -> None:
        """The blocks cached since the last flush, to the router that sends a
        conversation's next turn to the decode worker holding the previous one."""
        if self.hash_publisher is not None and self.hash_publisher.pending:
            self.outbox.call(self.hash_publisher.flush)

    def _send_back(self, seq: Sequence) -> None:
        """Preempted: the prefill pool recomputes prompt + generated tokens."""
        assert seq.status is SequenceStatus.FINISHED
        req = self.requests.pop(seq.request_id)
        task = req.task
        again = PrefillTask(
            request_id=task.request_id,
            prompt_token_ids=task.prompt_token_ids,
            sampling=task.sampling,
            reply_stream=task.reply_stream,
            deadline=task.deadline,
            output_token_ids=list(seq.output_token_ids),
        )
        self.outbox.call(self._requeue, again)
        if req.entry_id is not None:  # a local task, still prefilling: the copy replaces it
            self.outbox.call(self.intake.ack, req.entry_id)

    def _requeue(self, task: PrefillTask) -> None:
        """On the outbox thread."""
        try:
            add_task(self.redis, self.intake.stream, task)
        except redis.RedisError as exc:
            publish_deltas(
                self.redis,
                {
                    task.reply_stream: [
                        error_delta(
                            task.request_id,
                            "unavailable",
                            f"preempted and could not be requeued: {exc}",
                        )
                    ]
                },
            )

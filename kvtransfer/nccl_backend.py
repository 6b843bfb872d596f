"""GPU-direct KV transfer: torch.distributed point-to-point over one two-rank group per pair.

How control and bytes move
--------------------------
Control messages (ReserveRequest/Reply, Handoff, Release, TransferAck) travel as in the
zmq backend, over the same DEALER/ROUTER sockets. Only the packed KV bytes take another
road: NCCL from GPU to GPU with no host staging (gloo between CPU caches, same code).

1. The first transfer from a prefill worker (rank 0) to a decode worker (rank 1) makes
   their group: the sender hosts a TCPStore on its interface facing the receiver and
   sends KVGroupInvite (store address, backend, timeout) over ZMQ; the receiver answers
   KVGroupReply at once and joins on a thread of its own. Both build ProcessGroupNCCL or
   ProcessGroupGloo on a PrefixStore of that store and pass one warm-up byte, so the
   communicator exists before a transfer relies on it.
2. Each transfer: the sender queues the send of the packed tensor's bytes on the group's
   thread and posts the KVTransfer header over ZMQ. The receiver's I/O thread validates
   the header and hands it to that sender's group thread, which allocates the buffer on
   the decode device, receives into it, waits until the bytes have landed and queues
   Inbound(payload=buffer). The worker scatters it and replies TransferAck, which the
   sender awaits over ZMQ (giving up early if its send fails).

Why it is built this way
------------------------
- No global init_process_group: a pair's group comes from a store only those two
  processes know, so prefill and decode workers come and go independently.
- Point-to-point ops of a group match in the order they are posted, so all of a group's
  ops run on one thread of its own. A peer that dies mid-transfer blocks only that thread:
  never the ZMQ I/O thread, the worker, or other senders' transfers.
- Bytes, not typed tensors: any KV dtype (float8 too) moves bit-exactly on both backends.
- Any failure (timeout, peer gone, a header refused before its bytes were received)
  leaves the two ranks out of step, so both sides drop the group (NCCL: abort it, which
  also ends a kernel still waiting on a dead peer) and the next transfer invites afresh.
  An idle receiver group whose sender's store stops answering is dropped as well, so
  groups of dead prefill workers do not pile up.
- Internal sockets bind one interface, never all: the TCPStore gets a listening socket
  bound to it (its own listener would bind every interface), gloo a device on it, and
  NCCL is pointed at it through NCCL_SOCKET_IFNAME unless the operator set that.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import cast

import torch
import torch.distributed as dist

from tandem.core.protocol import KVGroupInvite, KVGroupReply, KVTransfer, TransferAck, encode
from tandem.kvtransfer.base import Inbound, TransferError
from tandem.kvtransfer.curve import CurveKeys
from tandem.kvtransfer.nccl_group import (
    MAX_TIMEOUT_S,
    SEND_GRACE_S,
    WILDCARD_HOSTS,
    PairGroup,
    address_host,
    backend_for,
    close_groups,
    gpu_uuid,
    host_group,
    remaining,
    source_address,
    store_answers,
)
from tandem.kvtransfer.pack import dtype_from_name, dtype_name
from tandem.kvtransfer.wire import (
    RejectedFrame,
    inbound_from,
    kv_header,
    kv_payload_nbytes,
    parse_header,
    refusal,
)
from tandem.kvtransfer.zmq_backend import NOT_ADMITTED, ZmqKVReceiver, ZmqKVSender

log = logging.getLogger(__name__)


class NcclKVSender(ZmqKVSender):
    """Rank 0 of one group per receiver address; control messages as ZmqKVSender."""

    def __init__(self, identity: str, curve: CurveKeys | None = None):
        super().__init__(identity, curve)
        self._groups: dict[str, PairGroup] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._groups_lock = threading.Lock()

    def send_kv(
        self,
        address: str,
        request_id: str,
        block_ids: Sequence[int],
        packed: torch.Tensor,
        timeout_s: float,
    ) -> TransferAck:
        deadline = time.monotonic() + timeout_s
        header = encode(kv_header(request_id, block_ids, packed))
        want = (TransferAck, request_id)
        # One transfer at a time per receiver: a group carries one ordered stream of bytes.
        with self._lock_for(address):
            if packed.numel() == 0:
                # No blocks, no bytes: the header says it all, and needs no group.
                return cast(TransferAck, self._request(address, [header], want, timeout_s))
            group = self._group(address, packed.device, timeout_s, deadline)
            sent = group.submit(lambda: group.send(packed, deadline))

            def abort_if_send_failed() -> None:
                if sent.done() and sent.exception() is not None:
                    raise TransferError(f"KV bytes to {address} failed: {sent.exception()}")

            try:
                ack = self._request(
                    address, [header], want, remaining(deadline), abort_if_send_failed
                )
            except TransferError:
                self._drop(address, group)
                raise
            try:
                sent.result(timeout=min(remaining(deadline), SEND_GRACE_S))
            except Exception as exc:
                # Answered without being received (the receiver refused the header or lost
                # the group): the posted send would meet the next transfer's receive.
                log.warning("KV group with %s dropped after %s: %s", address, request_id, exc)
                self._drop(address, group)
        return cast(TransferAck, ack)  # _request returns the type it was asked for

    def close(self) -> None:
        with self._groups_lock:
            groups, self._groups = list(self._groups.values()), {}
        close_groups(groups)
        super().close()

    def _lock_for(self, address: str) -> threading.Lock:
        with self._groups_lock:
            if self._closed:
                raise TransferError("KV sender is closed")
            return self._locks.setdefault(address, threading.Lock())

    def _drop(self, address: str, group: PairGroup) -> None:
        with self._groups_lock:
            if self._groups.get(address) is group:
                del self._groups[address]
        group.close()

    def _group(
        self, address: str, device: torch.device, timeout_s: float, deadline: float
    ) -> PairGroup:
        """The open group with `address` for tensors on `device`, inviting it if needed."""
        with self._groups_lock:
            group = self._groups.get(address)
        if group is not None and not group.closed and group.device == device:
            return group
        if group is not None:
            self._drop(address, group)
        try:
            group, host, port = host_group(address, device, min(timeout_s, MAX_TIMEOUT_S))
        except (OSError, RuntimeError) as exc:
            raise TransferError(f"cannot host a KV group store for {address}: {exc}") from None
        try:
            invite = KVGroupInvite(
                group_id=group.id,
                store_host=host,
                store_port=port,
                backend=backend_for(device),
                timeout_s=group.timeout.total_seconds(),
                gpu_uuid=gpu_uuid(device),
            )
            want = (KVGroupReply, group.id)
            reply = self._request(address, [encode(invite)], want, remaining(deadline))
            if not reply.ok:
                raise TransferError(f"{address} refused a KV group: {reply.reason}")
            try:
                group.submit(lambda: group.open(deadline)).result(remaining(deadline))
            except TimeoutError:
                raise TransferError(f"KV group with {address} not up in time") from None
        except BaseException:
            group.close()
            raise
        log.info("KV group %s with %s up (%s)", group.name, address, invite.backend)
        with self._groups_lock:
            self._groups[address] = group
        return group


class NcclKVReceiver(ZmqKVReceiver):
    """Rank 1 of one group per sender; control messages as ZmqKVReceiver."""

    def __init__(self, bind_address: str = "tcp://127.0.0.1:0", **options):
        super().__init__(bind_address, **options)  # max_*_bytes, curve
        self._device = torch.device("cpu")
        self._gpu_uuid = ""
        # (dtype, *KVLayout.cache_shape(num_blocks)) of the worker's cache
        self._cache: tuple | None = None
        host = address_host(self.address)
        self._host = None if host in WILDCARD_HOSTS else host  # None: the one facing a sender
        self._groups: dict[bytes, PairGroup] = {}
        self._groups_lock = threading.Lock()

    def attach_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        super().attach_kv_caches(kv_caches)
        first = kv_caches[0]
        self._device = first.device
        self._gpu_uuid = gpu_uuid(first.device)
        self._cache = (dtype_name(first.dtype), len(kv_caches), *first.shape)

    def close(self) -> None:
        super().close()
        with self._groups_lock:
            groups, self._groups = list(self._groups.values()), {}
        close_groups(groups)

    # -- I/O thread -------------------------------------------------------------------------
    def _accept(self, peer: bytes, frames: Sequence[memoryview]) -> Inbound | None:
        msg = parse_header(frames, self._max_header_bytes)
        if isinstance(msg, KVGroupInvite):
            if len(frames) != 1:
                raise RejectedFrame("KVGroupInvite carries extra frames", refusal(msg))
            self._join(peer, msg)
            return None
        if isinstance(msg, KVTransfer) and not msg.in_place and len(frames) == 1:
            self._receive(peer, msg)
            return None
        # Everything else as zmq does, KV bytes in a frame included.
        return inbound_from(peer, msg, frames, self._max_payload_bytes)

    def _join(self, peer: bytes, invite: KVGroupInvite) -> None:
        reason = NOT_ADMITTED if self.refuses_peer(peer) else self._refuse(invite)
        if reason:
            self.reply(peer, KVGroupReply(group_id=invite.group_id, ok=False, reason=reason))
            return
        self._drop(peer)  # a sender invites again only after dropping its side
        timeout_s = min(invite.timeout_s, MAX_TIMEOUT_S)
        prefix = f"tandem-kv/{invite.group_id}"
        host, port = invite.store_host, invite.store_port
        group = PairGroup(
            invite.group_id,
            1,
            self._device,
            self._host or source_address(host),  # a numeric host: no DNS wait here
            timeout_s,
            lambda: dist.PrefixStore(prefix, dist.TCPStore(host, port, None, False, group.timeout)),
            idle_check=lambda: store_answers(host, port),
            on_closed=lambda closed: self._forget(peer, closed),
        )
        with self._groups_lock:
            self._groups[peer] = group
        self.reply(peer, KVGroupReply(group_id=invite.group_id, ok=True))
        deadline = time.monotonic() + timeout_s

        def join() -> None:
            try:
                group.open(deadline)
            except Exception as exc:
                log.warning("KV group %s with %r not joined: %s", group.name, peer, exc)
                raise

        group.submit(join)

    def _refuse(self, invite: KVGroupInvite) -> str:
        """Why `invite` cannot be taken, or ""."""
        mine = backend_for(self._device)
        if invite.backend != mine:
            return f"receiver's KV cache is on {self._device}: needs {mine}, not {invite.backend}"
        if invite.gpu_uuid and invite.gpu_uuid == self._gpu_uuid:
            return "sender and receiver share one GPU, which NCCL cannot pair (use cuda_ipc)"
        if invite.timeout_s <= 0 or not 0 < invite.store_port < 65536 or not invite.group_id:
            return "malformed KVGroupInvite"
        try:
            socket.getaddrinfo(invite.store_host, invite.store_port, flags=socket.AI_NUMERICHOST)
        except (OSError, UnicodeError):
            return f"store host {invite.store_host!r} is not a numeric address"
        return ""

    def _receive(self, peer: bytes, header: KVTransfer) -> None:
        try:
            nbytes = kv_payload_nbytes(header, self._max_payload_bytes)
            self._check_fits(header)
        except ValueError as exc:
            self._drop(peer)  # the sender's bytes are posted and will never be received
            raise RejectedFrame(str(exc), refusal(header)) from None
        dtype = dtype_from_name(header.dtype)
        if nbytes == 0:
            payload = torch.empty(header.shape, dtype=dtype, device=self._device)
            self._inbox.put(Inbound(peer=peer, msg=header, payload=payload))
            return
        with self._groups_lock:
            group = self._groups.get(peer)
        if group is None or group.closed:
            reason = "no KV group with this sender (closed after a failure?)"
            raise RejectedFrame(reason, refusal(header, reason))
        timeout_s = group.timeout.total_seconds()
        # The deadline starts when the receive is posted, behind the group's earlier ones.
        received = group.submit(lambda: group.receive(nbytes, time.monotonic() + timeout_s))
        received.add_done_callback(lambda done: self._received(peer, header, dtype, done))

    def _check_fits(self, header: KVTransfer) -> None:
        if self._cache is None:
            return
        dtype, layers, planes, num_blocks, *block = self._cache
        shape = header.shape
        fits = shape[:2] == [layers, planes] and shape[2] <= num_blocks and shape[3:] == block
        if header.dtype != dtype or not fits:
            raise ValueError(f"KV {header.dtype} {shape} does not fit this worker's cache")

    # -- group threads ----------------------------------------------------------------------
    def _received(self, peer: bytes, header: KVTransfer, dtype: torch.dtype, done: Future) -> None:
        exc = done.exception()
        if exc is not None:
            log.warning("KV bytes of %s from %r lost: %s", header.request_id, peer, exc)
            reason = f"KV bytes not received: {exc}"
            self.reply(peer, TransferAck(request_id=header.request_id, ok=False, reason=reason))
            return
        payload = done.result().view(dtype).view(header.shape)
        self._inbox.put(Inbound(peer=peer, msg=header, payload=payload))

    # -- any thread -------------------------------------------------------------------------
    def _drop(self, peer: bytes) -> None:
        with self._groups_lock:
            group = self._groups.pop(peer, None)
        if group is not None:
            group.close()

    def _forget(self, peer: bytes, group: PairGroup) -> None:
        with self._groups_lock:
            if self._groups.get(peer) is group:
                del self._groups[peer]

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

import contextlib
import fcntl
import logging
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import timedelta
from typing import TypeVar, cast

import torch
import torch.distributed as dist

from core.protocol import KVGroupInvite, KVGroupReply, KVTransfer, TransferAck, encode
from kvtransfer.base import Inbound, TransferError
from kvtransfer.pack import dtype_from_name, dtype_name
from kvtransfer.wire import (
    RejectedFrame,
    inbound_from,
    kv_header,
    kv_payload_nbytes,
    parse_header,
    refusal,
)
from kvtransfer.zmq_backend import ZmqKVReceiver, ZmqKVSender

log = logging.getLogger(__name__)

T = TypeVar("T")

_TAG = 0  # one tag for every op: a group's ops are ordered anyway
_MAX_TIMEOUT_S = 300.0  # caps what an invite may ask of a receiver
# NCCL's watchdog may take the whole process down when an op outlives the group's
# timeout; our deadlines (at most _MAX_TIMEOUT_S) abort the group long before that.
_NCCL_WATCHDOG_S = 4 * _MAX_TIMEOUT_S
_PROBE_EVERY_S = 5.0  # an idle receiver group checks that its sender's store answers
_PROBE_TIMEOUT_S = 1.0
# The receiver acks only after its receive completed, so the send is done too, bar the
# moment it takes to notice; a send still pending after this was never received.
_SEND_GRACE_S = 1.0
_CLOSE_WAIT_S = 2.0  # close() waits this long for groups to tear down
_WILDCARD_HOSTS = ("0.0.0.0", "::", "*", "")
_SIOCGIFADDR = 0x8915


def _backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else ""


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _address_host(address: str) -> str:
    """The host of a tcp:// address; loopback for ipc:// (peers on one machine)."""
    if not address.startswith("tcp://"):
        return "127.0.0.1"
    return address[len("tcp://") :].rsplit(":", 1)[0].strip("[]")


def _source_address(peer_host: str) -> str:
    """The local address the kernel routes to `peer_host` from: the interface facing it."""
    family, _, _, _, sockaddr = socket.getaddrinfo(peer_host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(sockaddr)  # a UDP connect sends nothing; it only picks the route
        return probe.getsockname()[0]


def _serve_store(host: str, timeout: timedelta) -> dist.TCPStore:
    """A TCPStore master listening on `host` only, on a free port."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        listener.bind((host, 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        fd = listener.detach()  # the store owns the socket from here on
        return dist.TCPStore(
            host, port, None, True, timeout, wait_for_workers=False, master_listen_fd=fd
        )
    finally:
        listener.close()  # a no-op once detached


def _store_answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def _interface_of(ip: str) -> str | None:
    """The name of the network interface that owns IPv4 address `ip` (Linux)."""
    try:
        wanted = socket.inet_aton(ip)
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode())
            try:
                answer = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on it
            if answer[20:24] == wanted:
                return name
    return None


def _point_nccl_at(host: str) -> None:
    """Make NCCL's sockets use the interface of `host`, unless the operator chose one.

    NCCL reads the variable once per process, at its first communicator; left unset it
    takes the first non-loopback interface, whatever the service was told to bind.
    """
    if "NCCL_SOCKET_IFNAME" in os.environ:
        return
    name = _interface_of(host)
    if name is not None:
        os.environ["NCCL_SOCKET_IFNAME"] = f"={name}"
        log.info("NCCL sockets use interface %s (%s)", name, host)


def _new_group(
    store: dist.Store, rank: int, device: torch.device, host: str, timeout: timedelta
) -> dist.Backend:
    if device.type == "cuda":
        _point_nccl_at(host)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timedelta(seconds=_NCCL_WATCHDOG_S)
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout  # bounds the rendezvous; each op passes its own
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    options._threads = 1  # gloo's threads run collectives; point-to-point needs none
    return dist.ProcessGroupGloo(store, rank, 2, options)


def _without_traceback(exc: BaseException) -> TransferError:
    # A traceback keeps the failed op's frames, and with them the group's sockets, alive.
    if isinstance(exc, TransferError):
        return exc.with_traceback(None)
    return TransferError(f"{type(exc).__name__}: {exc}")


class _Group:
    """One side of a pair's two-rank process group, and the thread that runs its ops.

    Every torch.distributed call of the group runs on that thread, in submission order.
    A failed op closes the group: the two ranks are out of step from then on.
    """

    def __init__(
        self,
        group_id: str,
        rank: int,
        device: torch.device,
        host: str,
        timeout_s: float,
        store: Callable[[], dist.Store],
        idle_check: Callable[[], bool] | None = None,
        on_closed: Callable[[_Group], None] | None = None,
    ):
        self.id = group_id
        self.name = group_id[:8]  # for logs
        self.rank = rank
        self.device = device
        self.timeout = timedelta(seconds=timeout_s)  # the rendezvous; rank 1's receives
        self._host = host  # the interface gloo and NCCL bind
        # Called on the group thread: connecting to a store may block.
        self._make_store: Callable[[], dist.Store] | None = store
        self._idle_check = idle_check  # False: the peer is gone, close
        self._on_closed = on_closed
        self._pg: dist.Backend | None = None
        self._stream: torch.cuda.Stream | None = None
        self._jobs: list[tuple[Callable[[], object], Future]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"kv-group-{self.name}", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, op: Callable[[], T]) -> Future[T]:
        """Run `op` on the group's thread after everything submitted before it."""
        future: Future[T] = Future()
        with self._cond:
            if self._closed:
                future.set_exception(TransferError(f"KV group {self.name} is closed"))
            else:
                self._jobs.append((op, future))
                self._cond.notify()
        return future

    def close(self) -> None:
        """Stop taking ops; the group's thread tears it down. Never blocks."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    # -- on the group thread --------------------------------------------------------------
    def open(self, deadline: float) -> None:
        """Rendezvous with the peer and pass the warm-up byte."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            self._stream = torch.cuda.Stream(self.device)
        if self._make_store is None:
            raise TransferError(f"KV group {self.name} is closed")
        store = self._make_store()
        self._pg = _new_group(store, self.rank, self.device, self._host, self.timeout)
        self._exchange(torch.zeros(1, dtype=torch.uint8, device=self.device), deadline)

    def send(self, packed: torch.Tensor, deadline: float) -> None:
        # On this thread's current stream, the device's default one: NCCL orders the send
        # after the pack the prefill worker queued there.
        self._exchange(packed.contiguous().reshape(-1).view(torch.uint8), deadline)

    def receive(self, nbytes: int, deadline: float) -> torch.Tensor:
        if self._stream is None:
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._exchange(buffer, deadline)
            return buffer
        # A stream of our own, so the receive does not queue behind decode steps.
        with torch.cuda.stream(self._stream):
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._exchange(buffer, deadline)
        self._stream.synchronize()
        # The worker scatters the payload on the default stream (its control thread sets
        # none); this keeps the allocator from handing the memory to the next receive
        # while that scatter is still queued.
        buffer.record_stream(torch.cuda.default_stream(self.device))
        return buffer

    def _exchange(self, data: torch.Tensor, deadline: float) -> None:
        """Send (rank 0) or receive (rank 1) `data`, done on the device by `deadline`."""
        if self._pg is None:
            raise TransferError(f"KV group {self.name} is not open")
        if time.monotonic() >= deadline:
            raise TransferError("deadline passed before the KV bytes were posted")
        pg = self._pg
        work = pg.send([data], 1, _TAG) if self.rank == 0 else pg.recv([data], 0, _TAG)
        if self.device.type != "cuda":
            # gloo waits on the host, and fails at once when the peer's connection drops.
            work.wait(timedelta(seconds=max(_remaining(deadline), 1e-3)))
            return
        # NCCL's own timed wait would leave the op to the watchdog, which can take the
        # process down; polling keeps the decision (abort the group) ours.
        pause = 5e-5
        while not work.is_completed():
            if self._closed:
                raise TransferError(f"KV group {self.name} closed during a transfer")
            if time.monotonic() >= deadline:
                raise TransferError(f"KV bytes did not move within the deadline ({self.name})")
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)
        work.wait()  # raises the error the op ended with, if any

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self._jobs and not self._closed:
                        self._cond.wait(_PROBE_EVERY_S if self._idle_check else None)
                    if self._closed:
                        return
                    job = self._jobs.pop(0) if self._jobs else None
                if job is None:
                    if self._idle_check is not None and not self._idle_check():
                        log.info("KV group %s: the peer's store is gone; closed", self.name)
                        return
                    continue
                op, future = job
                try:
                    future.set_result(op())
                except BaseException as exc:
                    future.set_exception(_without_traceback(exc))
                    return
        finally:
            self._teardown()

    def _teardown(self) -> None:
        with self._cond:
            self._closed = True
            left, self._jobs = self._jobs, []
        for _, future in left:
            future.set_exception(TransferError(f"KV group {self.name} is closed"))
        # Forgotten before the abort, which can take long after NCCL saw the peer fail:
        # it then holds up only this thread.
        if self._on_closed is not None:
            self._on_closed(self)
        if self._pg is not None:
            with contextlib.suppress(Exception):
                # NCCL: frees the communicator and any kernel still waiting on the peer.
                # gloo has nothing to abort: dropping it closes its connections, which
                # fails the peer's pending op at once.
                self._pg.abort()
        self._pg = None
        self._make_store = None  # the last reference to the sender's store: it stops here


def _hosted_group(address: str, device: torch.device, timeout_s: float) -> tuple[_Group, str, int]:
    """A rank-0 group over a new store on the interface facing `address`; host and port.

    Only the group holds the store, so the store stops listening when the group goes.
    """
    group_id = uuid.uuid4().hex
    host = _source_address(_address_host(address))
    master = _serve_store(host, timedelta(seconds=timeout_s))
    scoped = dist.PrefixStore(f"tandem-kv/{group_id}", master)
    return _Group(group_id, 0, device, host, timeout_s, lambda: scoped), host, master.port


class NcclKVSender(ZmqKVSender):
    """Rank 0 of one group per receiver address; control messages as ZmqKVSender."""

    def __init__(self, identity: str):
        super().__init__(identity)
        self._groups: dict[str, _Group] = {}
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
                    address, [header], want, _remaining(deadline), abort_if_send_failed
                )
            except TransferError:
                self._drop(address, group)
                raise
            try:
                sent.result(timeout=min(_remaining(deadline), _SEND_GRACE_S))
            except Exception as exc:
                # Answered without being received (the receiver refused the header or lost
                # the group): the posted send would meet the next transfer's receive.
                log.warning("KV group with %s dropped after %s: %s", address, request_id, exc)
                self._drop(address, group)
        return cast(TransferAck, ack)  # _request returns the type it was asked for

    def close(self) -> None:
        with self._groups_lock:
            groups, self._groups = list(self._groups.values()), {}
        _close_all(groups)
        super().close()

    def _lock_for(self, address: str) -> threading.Lock:
        with self._groups_lock:
            if self._closed:
                raise TransferError("KV sender is closed")
            return self._locks.setdefault(address, threading.Lock())

    def _drop(self, address: str, group: _Group) -> None:
        with self._groups_lock:
            if self._groups.get(address) is group:
                del self._groups[address]
        group.close()

    def _group(
        self, address: str, device: torch.device, timeout_s: float, deadline: float
    ) -> _Group:
        """The open group with `address` for tensors on `device`, inviting it if needed."""
        with self._groups_lock:
            group = self._groups.get(address)
        if group is not None and not group.closed and group.device == device:
            return group
        if group is not None:
            self._drop(address, group)
        try:
            group, host, port = _hosted_group(address, device, min(timeout_s, _MAX_TIMEOUT_S))
        except (OSError, RuntimeError) as exc:
            raise TransferError(f"cannot host a KV group store for {address}: {exc}") from None
        try:
            invite = KVGroupInvite(
                group_id=group.id,
                store_host=host,
                store_port=port,
                backend=_backend_for(device),
                timeout_s=group.timeout.total_seconds(),
                gpu_uuid=_gpu_uuid(device),
            )
            want = (KVGroupReply, group.id)
            reply = self._request(address, [encode(invite)], want, _remaining(deadline))
            if not reply.ok:
                raise TransferError(f"{address} refused a KV group: {reply.reason}")
            try:
                group.submit(lambda: group.open(deadline)).result(_remaining(deadline))
            except TimeoutError:
                raise TransferError(f"KV group with {address} not up in time") from None
        except BaseException:
            group.close()
            raise
        log.info("KV group %s with %s up (%s)", group.name, address, invite.backend)
        with self._groups_lock:
            self._groups[address] = group
        return group


def _close_all(groups: Sequence[_Group]) -> None:
    for group in groups:
        group.close()
    deadline = time.monotonic() + _CLOSE_WAIT_S
    for group in groups:
        group.join(_remaining(deadline))


class NcclKVReceiver(ZmqKVReceiver):
    """Rank 1 of one group per sender; control messages as ZmqKVReceiver."""

    def __init__(self, bind_address: str = "tcp://127.0.0.1:0", **limits: int):
        super().__init__(bind_address, **limits)  # max_header_bytes, max_payload_bytes
        self._device = torch.device("cpu")
        self._gpu_uuid = ""
        # (dtype, layers, num_blocks, block_size, kv_heads, head_dim) of the worker's cache
        self._cache: tuple | None = None
        host = _address_host(self.address)
        self._host = None if host in _WILDCARD_HOSTS else host  # None: the one facing a sender
        self._groups: dict[bytes, _Group] = {}
        self._groups_lock = threading.Lock()

    def attach_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        first = kv_caches[0]
        self._device = first.device
        self._gpu_uuid = _gpu_uuid(first.device)
        self._cache = (dtype_name(first.dtype), len(kv_caches), *first.shape[1:])

    def close(self) -> None:
        super().close()
        with self._groups_lock:
            groups, self._groups = list(self._groups.values()), {}
        _close_all(groups)

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
        reason = self._refuse(invite)
        if reason:
            self.reply(peer, KVGroupReply(group_id=invite.group_id, ok=False, reason=reason))
            return
        self._drop(peer)  # a sender invites again only after dropping its side
        timeout_s = min(invite.timeout_s, _MAX_TIMEOUT_S)
        prefix = f"tandem-kv/{invite.group_id}"
        host, port = invite.store_host, invite.store_port
        group = _Group(
            invite.group_id,
            1,
            self._device,
            self._host or _source_address(host),  # a numeric host: no DNS wait here
            timeout_s,
            lambda: dist.PrefixStore(prefix, dist.TCPStore(host, port, None, False, group.timeout)),
            idle_check=lambda: _store_answers(host, port),
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
        mine = _backend_for(self._device)
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
        dtype, layers, num_blocks, *block = self._cache
        shape = header.shape
        fits = shape[0] == layers and shape[2] <= num_blocks and shape[3:] == block
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

    def _forget(self, peer: bytes, group: _Group) -> None:
        with self._groups_lock:
            if self._groups.get(peer) is group:
                del self._groups[peer]

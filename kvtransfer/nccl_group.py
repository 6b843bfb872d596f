"""One two-rank torch.distributed group between a prefill worker (rank 0) and a decode
worker (rank 1), and the socket plumbing around it: the sender's TCPStore bound to one
interface, gloo or NCCL pointed at that interface, one thread that runs every op of the
group in order, abort on failure. kvtransfer/nccl_backend.py builds the transport on it.
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
from typing import TypeVar

import torch
import torch.distributed as dist

from tandem.kvtransfer.base import TransferError

log = logging.getLogger(__name__)

T = TypeVar("T")

_TAG = 0  # one tag for every op: a group's ops are ordered anyway
MAX_TIMEOUT_S = 300.0  # caps what an invite may ask of a receiver
# NCCL's watchdog may take the whole process down when an op outlives the group's
# timeout; our deadlines (at most MAX_TIMEOUT_S) abort the group long before that.
_NCCL_WATCHDOG_S = 4 * MAX_TIMEOUT_S
_PROBE_EVERY_S = 5.0  # an idle receiver group checks that its sender's store answers
_PROBE_TIMEOUT_S = 1.0
# The receiver acks only after its receive completed, so the send is done too, bar the
# moment it takes to notice; a send still pending after this was never received.
SEND_GRACE_S = 1.0
CLOSE_WAIT_S = 2.0  # close() waits this long for groups to tear down
WILDCARD_HOSTS = ("0.0.0.0", "::", "*", "")
_SIOCGIFADDR = 0x8915


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else ""


def remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def address_host(address: str) -> str:
    """The host of a tcp:// address; loopback for ipc:// (peers on one machine)."""
    if not address.startswith("tcp://"):
        return "127.0.0.1"
    return address[len("tcp://") :].rsplit(":", 1)[0].strip("[]")


def source_address(peer_host: str) -> str:
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


def store_answers(host: str, port: int) -> bool:
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


class PairGroup:
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
        on_closed: Callable[[PairGroup], None] | None = None,
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
            work.wait(timedelta(seconds=max(remaining(deadline), 1e-3)))
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


def host_group(address: str, device: torch.device, timeout_s: float) -> tuple[PairGroup, str, int]:
    """A rank-0 group over a new store on the interface facing `address`; host and port.

    Only the group holds the store, so the store stops listening when the group goes.
    """
    group_id = uuid.uuid4().hex
    host = source_address(address_host(address))
    master = _serve_store(host, timedelta(seconds=timeout_s))
    scoped = dist.PrefixStore(f"tandem-kv/{group_id}", master)
    return PairGroup(group_id, 0, device, host, timeout_s, lambda: scoped), host, master.port


def close_groups(groups: Sequence[PairGroup]) -> None:
    for group in groups:
        group.close()
    deadline = time.monotonic() + CLOSE_WAIT_S
    for group in groups:
        group.join(remaining(deadline))

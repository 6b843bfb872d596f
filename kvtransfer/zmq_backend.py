"""Host-staged KV transfer over ZeroMQ: tcp:// between hosts, ipc:// on one host.

Decode binds one ROUTER socket; each prefill worker connects one DEALER per decode
worker. A KV transfer is a two-frame message (msgspec header, raw packed blocks) sent
and received without copying the payload. zmq sockets are not thread-safe, so each one
has a single owner: the receiver's I/O thread, or the sender's per-peer lock.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import zmq

if TYPE_CHECKING:
    import torch

from tandem.core.protocol import MAX_CONTROL_FRAME_BYTES, ControlMessage, encode
from tandem.kvtransfer.base import Inbound, KVReceiver, TransferError
from tandem.kvtransfer.curve import CurveKeys
from tandem.kvtransfer.wire import (
    MAX_KV_PAYLOAD_BYTES,
    RECEIVABLE,
    AbandonedReplies,
    FramedKVSender,
    RejectedFrame,
    Reply,
    ReplyKey,
    await_reply,
    drain,
    parse_inbound,
    refusal,
)

log = logging.getLogger(__name__)

_TCP_ADDRESS = re.compile(r"^tcp://(?P<host>\[[^\]]*\]|[^:/]+)(?::(?P<port>\d+|\*))?$")
_RECV_BATCH = 64  # messages taken per wake-up, so replies are flushed between batches
_JOIN_TIMEOUT_S = 5.0
_CHECK_EVERY_S = 0.01  # how often a request waiting for its reply runs its abort_if check
# Messages waiting for the worker's control loop; past this, new ones get a refusal
# instead of memory (a peer flooding the socket cannot grow the process without bound).
MAX_INBOX = 4096
NOT_ADMITTED = "this sender is not a registered prefill worker of the receiver's model"


def _bind(sock: zmq.Socket, address: str) -> str:
    """Bind `sock` and return the address peers can connect to (ephemeral port resolved)."""
    match = _TCP_ADDRESS.match(address)
    if match and match["port"] in (None, "0", "*"):
        sock.bind_to_random_port(f"tcp://{match['host']}")
    else:
        sock.bind(address)
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


class ZmqKVReceiver(KVReceiver):
    # Message types parse_inbound lets through; subclasses answering more extend it.
    accepts: tuple[type, ...] = RECEIVABLE

    def __init__(
        self,
        bind_address: str = "tcp://127.0.0.1:0",
        *,
        max_header_bytes: int = MAX_CONTROL_FRAME_BYTES,
        max_payload_bytes: int = MAX_KV_PAYLOAD_BYTES,
        curve: CurveKeys | None = None,
    ):
        self._max_header_bytes = max_header_bytes
        self._max_payload_bytes = max_payload_bytes
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._auth = curve.serve(self._ctx, self._router) if curve is not None else None
        self._router.setsockopt(zmq.LINGER, 0)
        # A prefill worker that reconnects (restart, or after a timeout) keeps its
        # identity; handover routes replies to the new connection instead of refusing it.
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # Report unroutable replies instead of dropping them silently.
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # libzmq disconnects a peer whose frame exceeds this before buffering it all.
        self._router.setsockopt(zmq.MAXMSGSIZE, max(max_header_bytes, max_payload_bytes))
        self._address = _bind(self._router, bind_address)
        wake_endpoint = f"inproc://tandem-kv-wake-{id(self)}"
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(wake_endpoint)
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        self._wake_tx.connect(wake_endpoint)
        self._wake_lock = threading.Lock()  # reply() may be called from several threads
        self._inbox: queue.Queue[Inbound] = queue.Queue(MAX_INBOX)
        self._outbox: queue.Queue[tuple[bytes, bytes]] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.rejected = 0

    @property
    def address(self) -> str:
        return self._address

    def refuses_peer(self, peer: bytes) -> bool:
        return self.admits_peer is not None and not self.admits_peer(peer)

    def attach_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        """No legitimate transfer is larger than the whole cache: payloads are capped at
        its size, and so is libzmq's message size, so a larger frame costs no memory."""
        cache_bytes = sum(cache.numel() * cache.element_size() for cache in kv_caches)
        self._max_payload_bytes = min(self._max_payload_bytes, cache_bytes)
        self._router.setsockopt(
            zmq.MAXMSGSIZE, max(self._max_header_bytes, self._max_payload_bytes)
        )

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="kv-receiver-io", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(_JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                # Terminating the context would hang on the socket the thread still owns.
                log.error("KV receiver I/O thread did not stop; leaving its context open")
                return
        else:
            self._router.close(linger=0)
            self._wake_rx.close(linger=0)
        with self._wake_lock:
            self._wake_tx.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def poll(self, timeout_s: float) -> list[Inbound]:
        if self._thread is None:
            raise RuntimeError("start() the KV receiver before polling it")
        return drain(self._inbox, timeout_s)

    def reply(self, peer: bytes, msg: ControlMessage) -> None:
        if self._closed:
            log.debug("KV receiver closed; dropping %s", type(msg).__name__)
            return
        self._outbox.put((peer, encode(msg)))
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_tx.closed:
                return
            # Again means wake-ups are already queued; the I/O thread drains the whole outbox.
            with contextlib.suppress(zmq.Again):
                self._wake_tx.send(b"", zmq.NOBLOCK)

    # -- I/O thread: the only user of the ROUTER and wake_rx sockets ---------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                ready = dict(poller.poll())
                if self._wake_rx in ready:
                    self._drain_wake()
                if self._router in ready:
                    self._receive_batch()
                # After receiving too: refusals of rejected frames are queued there.
                self._flush_outbox()
        except zmq.ZMQError:
            log.exception("KV receiver I/O thread stopped on a socket error")
        finally:
            self._router.close(linger=0)
            self._wake_rx.close(linger=0)

    def _drain_wake(self) -> None:
        while True:
            try:
                self._wake_rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _flush_outbox(self) -> None:
        while True:
            try:
                peer, data = self._outbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._router.send_multipart([peer, data], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                # Peer gone or its queue full: the sender times out and handles it.
                log.warning("KV receiver dropped a reply to %r: %s", peer, exc)

    def _receive_batch(self) -> None:
        for _ in range(_RECV_BATCH):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._handle(frames)
            except Exception:
                # A bug in handling one message must not take down the whole receiver.
                self.rejected += 1
                log.exception("KV receiver failed to handle a message")

    def _handle(self, frames: list[zmq.Frame]) -> None:
        peer = frames[0].bytes
        try:
            inbound = self._accept(peer, [frame.buffer for frame in frames[1:]])
        except RejectedFrame as exc:
            self.rejected += 1
            log.warning("KV receiver rejected a message from %r: %s", peer, exc)
            if exc.refusal is not None:
                self._outbox.put((peer, encode(exc.refusal)))
            return
        if inbound is not None:
            self._route(inbound)

    def _accept(self, peer: bytes, frames: Sequence[memoryview]) -> Inbound | None:
        """What the worker gets for `frames`, or None when the backend handled them itself.

        Runs on the I/O thread; RejectedFrame drops the message and sends its refusal.
        """
        return parse_inbound(
            peer, frames, self._max_header_bytes, self._max_payload_bytes, self.accepts
        )

    def _route(self, inbound: Inbound) -> None:
        """Hand a valid message to the worker. On the I/O thread: a subclass may answer
        transport-level messages here itself (queue replies on _outbox) instead."""
        try:
            self._inbox.put_nowait(inbound)
        except queue.Full:
            self.rejected += 1
            busy = refusal(inbound.msg, f"receiver busy: {MAX_INBOX} messages waiting")
            if busy is not None:
                self._outbox.put((inbound.peer, encode(busy)))


class _Peer:
    """One destination: its DEALER socket, the lock that serialises calls on it, and
    the replies still owed to calls that timed out."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.socket: zmq.Socket | None = None
        self.abandoned = AbandonedReplies()


class ZmqKVSender(FramedKVSender):
    def __init__(self, identity: str, curve: CurveKeys | None = None):
        self._identity = identity.encode()
        self._curve = curve
        self._ctx = zmq.Context()
        self._peers: dict[str, _Peer] = {}
        self._peers_lock = threading.Lock()
        self._closed = False

    def _post(self, address: str, frames: list) -> None:
        peer = self._peer(address)
        with peer.lock:
            sock = self._socket(peer, address)
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                raise TransferError(f"cannot send to {address}: {exc}") from exc

    def close(self) -> None:
        with self._peers_lock:
            if self._closed:
                return
            self._closed = True
            peers = list(self._peers.values())
        for peer in peers:
            with peer.lock:
                if peer.socket is not None:
                    peer.socket.close(linger=0)
                    peer.socket = None
        self._ctx.term()

    def _peer(self, address: str) -> _Peer:
        with self._peers_lock:
            if self._closed:
                raise TransferError("KV sender is closed")
            return self._peers.setdefault(address, _Peer())

    def _socket(self, peer: _Peer, address: str) -> zmq.Socket:
        if peer.socket is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, self._identity)
            if self._curve is not None:
                self._curve.connect_as_client(sock)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.connect(address)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                raise TransferError(f"cannot connect to {address}: {exc}") from exc
            peer.socket = sock
        return peer.socket

    def _request(
        self,
        address: str,
        frames: list,
        want: ReplyKey,
        timeout_s: float,
        abort_if: Callable[[], None] | None = None,
    ) -> Reply:
        """See FramedKVSender._request. `abort_if`, when given, runs every few ms while
        the reply is awaited and raises TransferError to stop waiting (the nccl backend
        gives up as soon as the bytes it sends beside the header fail)."""
        peer = self._peer(address)
        with peer.lock:
            sock = self._socket(peer, address)
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:
                raise TransferError(f"cannot send to {address}: {exc}") from exc

            def receive(wait_s: float) -> list[bytes] | None:
                deadline = time.monotonic() + wait_s
                while True:
                    remaining = max(0.0, deadline - time.monotonic())
                    slice_s = remaining if abort_if is None else min(remaining, _CHECK_EVERY_S)
                    if sock.poll(max(1, round(slice_s * 1000)), zmq.POLLIN):
                        return sock.recv_multipart(zmq.NOBLOCK)
                    if abort_if is None or remaining <= slice_s:
                        return None
                    try:
                        abort_if()
                    except TransferError:
                        peer.abandoned.abandon(want)  # its reply may still turn up later
                        raise

            try:
                return await_reply(receive, peer.abandoned, want, address, timeout_s)
            except TransferError:
                # Closing with linger 0 discards whatever is still queued (a large payload
                # to a peer that stopped reading); the next call reconnects under the same
                # identity, and late replies to this call are dropped as abandoned.
                sock.close(linger=0)
                peer.socket = None
                raise

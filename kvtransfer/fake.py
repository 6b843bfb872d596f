"""In-memory KV transport for worker tests: no sockets, same frames, same rules.

A FakeKVReceiver registers itself under its address in a registry dict; a FakeKVSender
looks the address up there and hands it the exact frames the zmq backend would put on
the wire, so validation, refusals and reply matching are the real ones (kvtransfer.wire).
Payload bytes are copied on the way, as a wire would, so the receiver never aliases
the sender's cache.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Sequence

from tandem.core.protocol import MAX_CONTROL_FRAME_BYTES, ControlMessage, encode
from tandem.kvtransfer.base import Inbound, KVReceiver, TransferError
from tandem.kvtransfer.pack import BufferLike
from tandem.kvtransfer.wire import (
    MAX_KV_PAYLOAD_BYTES,
    AbandonedReplies,
    FramedKVSender,
    RejectedFrame,
    Reply,
    ReplyKey,
    await_reply,
    drain,
    parse_inbound,
)

log = logging.getLogger(__name__)

FakeRegistry = dict[str, "FakeKVReceiver"]

# Shared by receivers and senders built without an explicit registry (make_receiver /
# make_sender), the in-process counterpart of the network.
DEFAULT_REGISTRY: FakeRegistry = {}
_unique_ids = itertools.count()
_registry_lock = threading.Lock()


class FakeKVReceiver(KVReceiver):
    def __init__(
        self,
        bind_address: str = "",
        *,
        registry: FakeRegistry | None = None,
        max_header_bytes: int = MAX_CONTROL_FRAME_BYTES,
        max_payload_bytes: int = MAX_KV_PAYLOAD_BYTES,
    ):
        self._registry = DEFAULT_REGISTRY if registry is None else registry
        # ":0" mirrors an ephemeral tcp port: the caller wants any free address.
        if not bind_address or bind_address.endswith(":0"):
            bind_address = f"fake://kv-{next(_unique_ids)}"
        with _registry_lock:
            if bind_address in self._registry:
                raise ValueError(f"address {bind_address} already in use")
            self._registry[bind_address] = self
        self._address = bind_address
        self._max_header_bytes = max_header_bytes
        self._max_payload_bytes = max_payload_bytes
        self._inbox: queue.Queue[Inbound] = queue.Queue()
        # Where replies to each sender identity go; the latest connection wins, as with
        # zmq ROUTER handover.
        self._reply_queues: dict[bytes, queue.Queue[list[bytes]]] = {}
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self.rejected = 0

    @property
    def address(self) -> str:
        return self._address

    def start(self) -> None:
        self._started = True

    def close(self) -> None:
        self._closed = True
        with _registry_lock:
            if self._registry.get(self._address) is self:
                del self._registry[self._address]

    def poll(self, timeout_s: float) -> list[Inbound]:
        if not self._started:
            raise RuntimeError("start() the KV receiver before polling it")
        return drain(self._inbox, timeout_s)

    def reply(self, peer: bytes, msg: ControlMessage) -> None:
        with self._lock:
            replies = None if self._closed else self._reply_queues.get(peer)
        if replies is None:
            log.warning("fake KV receiver dropped a reply to unknown peer %r", peer)
            return
        replies.put([encode(msg)])

    def deliver(
        self, peer: bytes, frames: Sequence[BufferLike], replies: queue.Queue[list[bytes]]
    ) -> None:
        """Accept `[header, (payload)]` from `peer`, whose replies go to `replies`.

        Public so tests can inject malformed frames, as a raw socket would.
        """
        if self._closed:
            raise TransferError(f"KV receiver at {self._address} is closed")
        with self._lock:
            self._reply_queues[peer] = replies
        try:
            inbound = parse_inbound(peer, frames, self._max_header_bytes, self._max_payload_bytes)
        except RejectedFrame as exc:
            self.rejected += 1
            log.warning("fake KV receiver rejected a message from %r: %s", peer, exc)
            if exc.refusal is not None:
                replies.put([encode(exc.refusal)])
            return
        self._inbox.put(inbound)


class _FakePeer:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.replies: queue.Queue[list[bytes]] = queue.Queue()
        self.abandoned = AbandonedReplies()


class FakeKVSender(FramedKVSender):
    def __init__(self, identity: str, *, registry: FakeRegistry | None = None):
        self._identity = identity.encode()
        self._registry = DEFAULT_REGISTRY if registry is None else registry
        self._peers: dict[str, _FakePeer] = {}
        self._peers_lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._peers_lock:
            self._closed = True

    def _request(self, address: str, frames: list, want: ReplyKey, timeout_s: float) -> Reply:
        peer = self._peer(address)
        with peer.lock:
            self._deliver(address, frames, peer)

            def receive(wait_s: float) -> list[bytes] | None:
                try:
                    if wait_s > 0:
                        return peer.replies.get(timeout=wait_s)
                    return peer.replies.get_nowait()
                except queue.Empty:
                    return None

            return await_reply(receive, peer.abandoned, want, address, timeout_s)

    def _post(self, address: str, frames: list) -> None:
        peer = self._peer(address)
        with peer.lock:
            self._deliver(address, frames, peer)

    def _peer(self, address: str) -> _FakePeer:
        with self._peers_lock:
            if self._closed:
                raise TransferError("KV sender is closed")
            return self._peers.setdefault(address, _FakePeer())

    def _deliver(self, address: str, frames: list, peer: _FakePeer) -> None:
        receiver = self._registry.get(address)
        if receiver is None:
            raise TransferError(f"no KV receiver at {address}")
        # A private writable copy of every frame, as if it crossed a wire.
        copied = [bytearray(memoryview(frame).cast("B")) for frame in frames]
        receiver.deliver(self._identity, copied, peer.replies)

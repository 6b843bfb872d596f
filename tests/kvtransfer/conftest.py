"""Fixtures that run the same behaviour tests over every CPU transport."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import zmq

from tandem.core.protocol import ReserveReply, TransferAck
from tandem.kvtransfer import cuda_ipc_backend
from tandem.kvtransfer.cuda_ipc_backend import CudaIpcKVSender
from tandem.kvtransfer.transport import (
    FakeKVReceiver,
    FakeKVSender,
    KVReceiver,
    KVSender,
    ZmqKVReceiver,
    ZmqKVSender,
)
from tandem.kvtransfer.wire import parse_reply
from tests.kvtransfer.cuda_ipc_fakes import FakeIpc

TRANSPORTS = ["zmq-tcp", "zmq-ipc", "fake"]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 3, 12, 4, 2, 8


def make_caches(dtype: torch.dtype, fill: float | None = None, seed: int = 0) -> list[torch.Tensor]:
    shape = (2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    if fill is not None:
        return [torch.full(shape, fill, dtype=dtype) for _ in range(NUM_LAYERS)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(NUM_LAYERS)]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so NaN sentinels compare equal and -0.0 != 0.0."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.contiguous().view(ints[tensor.element_size()])


class RawPeer:
    """Puts arbitrary frames in front of a receiver, as a hostile or buggy peer would."""

    def __init__(self, send: Callable[[list[bytes]], None], recv: Callable[[float], list | None]):
        self.send = send
        self._recv = recv

    def recv_reply(self, timeout_s: float = 2.0) -> ReserveReply | TransferAck | None:
        frames = self._recv(timeout_s)
        return None if frames is None else parse_reply(frames[0])


class Transport:
    """Builds receivers, senders and raw peers of one backend, and closes them after."""

    def __init__(self, name: str, tmp_path: Path):
        self.name = name
        self._tmp_path = tmp_path
        self._registry: dict = {}
        self._closers: list[Callable[[], None]] = []
        self._ctx = zmq.Context()

    @property
    def is_zmq(self) -> bool:
        return self.name.startswith("zmq")

    def bind_address(self) -> str:
        if self.name == "zmq-ipc":
            return f"ipc://{self._tmp_path}/kv-{len(self._closers)}.sock"
        return "tcp://127.0.0.1:0"

    def unreachable_address(self) -> str:
        if self.name == "zmq-tcp":
            return "tcp://127.0.0.1:1"  # privileged port nobody listens on in a test box
        if self.name == "zmq-ipc":
            return f"ipc://{self._tmp_path}/nobody.sock"
        return "fake://nobody"

    def receiver(self, **limits: int) -> KVReceiver:
        if self.is_zmq:
            receiver: KVReceiver = ZmqKVReceiver(self.bind_address(), **limits)
        else:
            receiver = FakeKVReceiver(registry=self._registry, **limits)
        self._closers.append(receiver.close)
        return receiver

    def sender(self, identity: str = "prefill-0") -> KVSender:
        if self.is_zmq:
            sender: KVSender = ZmqKVSender(identity)
        else:
            sender = FakeKVSender(identity, registry=self._registry)
        self._closers.append(sender.close)
        return sender

    def raw_peer(self, receiver: KVReceiver) -> RawPeer:
        if not self.is_zmq:
            assert isinstance(receiver, FakeKVReceiver)
            replies: queue.Queue[list[bytes]] = queue.Queue()

            def get(timeout_s: float) -> list | None:
                try:
                    return replies.get(timeout=timeout_s)
                except queue.Empty:
                    return None

            return RawPeer(lambda frames: receiver.deliver(b"raw", frames, replies), get)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, b"raw")
        sock.connect(receiver.address)
        self._closers.append(sock.close)

        def recv(timeout_s: float) -> list | None:
            return sock.recv_multipart() if sock.poll(int(timeout_s * 1000)) else None

        return RawPeer(lambda frames: sock.send_multipart(frames), recv)

    def close(self) -> None:
        for close in reversed(self._closers):
            close()
        self._ctx.term()


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Transport]:
    built = Transport(request.param, tmp_path)
    yield built
    built.close()


def wait_until(condition: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    """Poll `condition` briefly; for effects of fire-and-forget messages."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def fake_ipc(monkeypatch: pytest.MonkeyPatch) -> FakeIpc:
    """cuda_ipc's export and mapping stood in (see cuda_ipc_fakes)."""
    fake = FakeIpc()
    monkeypatch.setattr(cuda_ipc_backend, "share_cache", fake.share)
    monkeypatch.setattr(cuda_ipc_backend, "open_export", fake.open)
    return fake


@pytest.fixture
def ipc_address(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/decode.sock"


@pytest.fixture
def ipc_sender() -> Iterator[CudaIpcKVSender]:
    built = CudaIpcKVSender("prefill-0")
    yield built
    built.close()

"""The nccl backend with real processes: gloo between CPU caches here, NCCL between
cuda:1 (receiver, this process) and cuda:0 (sender, a child) with `pytest -m gpu`."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from tandem.core.protocol import ReserveRequest
from tandem.kvtransfer.nccl_backend import NcclKVReceiver, NcclKVSender
from tandem.kvtransfer.transport import TransferError, TransferState, ZmqKVReceiver, layout_of, ship
from tests.kvtransfer.conftest import BLOCK_SIZE, NUM_LAYERS, bits, make_caches, wait_until
from tests.kvtransfer.decode_stub import DecodeStub

ROOT = Path(__file__).resolve().parents[2]
FREE_BLOCKS = [10, 3, 7, 1, 8, 5, 0, 11, 2, 9, 4, 6]  # reserved in this order
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT_TIMEOUT_S = 3.0


@pytest.fixture(
    params=[
        pytest.param(("cpu", "cpu"), id="gloo"),
        pytest.param(("cuda:1", "cuda:0"), id="nccl", marks=pytest.mark.gpu2),
    ]
)
def devices(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(receiver's device in this process, sender's device in the child)."""
    if request.param[0].startswith("cuda") and torch.cuda.device_count() < 2:
        pytest.fail(
            f"the NCCL test needs 2 CUDA GPUs (one per process), found {torch.cuda.device_count()}"
        )
    return request.param


class Peer:
    """A child process running tests/kvtransfer/nccl_peer.py; its JSON lines in order."""

    def __init__(self, *args: str, device: str = "cpu"):
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "NCCL_PEER_DEVICE": device}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.kvtransfer.nccl_peer", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))
        self._lines.put(None)

    def next(self, timeout_s: float = 60.0) -> dict:
        line = self._lines.get(timeout=timeout_s)
        assert line is not None, f"peer exited early with {self.proc.wait(5)}"
        return line

    def finish(self) -> dict:
        """Close its stdin (a receiver then reports and exits); its last line."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        line = self.next()
        assert self.proc.wait(30) == 0
        return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture
def spawn() -> Iterator:
    peers: list[Peer] = []

    def start(*args: str, device: str = "cpu") -> Peer:
        peers.append(Peer(*args, device=device))
        return peers[-1]

    yield start
    for peer in peers:
        peer.kill()


def sender_args(identity: str, seed: int, to: list[dict], **extra: object) -> tuple[str, ...]:
    return ("send", identity, json.dumps({"seed": seed, "to": to, **extra}))


class Hosted:
    """A receiver in this process, its decode stub and caches (NaN until filled)."""

    def __init__(self, dtype: str, device: str = "cpu", **limits: int):
        self.dtype = DTYPES[dtype]
        self.caches = [c.to(device) for c in make_caches(self.dtype, fill=float("nan"))]
        self.receiver = NcclKVReceiver(**limits)
        self.receiver.attach_kv_caches(self.caches)
        layout = layout_of(self.caches, "tiny", BLOCK_SIZE)
        self.stub = DecodeStub(self.receiver, self.caches, layout, FREE_BLOCKS)
        self.stub.__enter__()
        self.target = {"address": self.receiver.address, "dtype": dtype}

    def assert_holds(self, result: dict, seed: int) -> None:
        """The blocks `result` (a sender's report) shipped arrived bit-exactly."""
        assert result["ok"], result
        src = make_caches(self.dtype, seed=seed)
        for layer in range(NUM_LAYERS):
            got = self.caches[layer][:, result["dst"]].cpu()
            assert torch.equal(bits(got), bits(src[layer][:, result["src"]])), result

    def groups(self) -> set[bytes]:
        return set(self.receiver._groups)

    def close(self) -> None:
        self.stub.__exit__(None, None, None)
        self.receiver.close()


@pytest.fixture
def host() -> Iterator:
    hosted: list[Hosted] = []

    def make(dtype: str = "float32", device: str = "cpu", **limits: int) -> Hosted:
        hosted.append(Hosted(dtype, device, **limits))
        return hosted[-1]

    yield make
    for item in hosted:
        item.close()


def test_round_trips_are_bit_exact_and_reuse_one_group(host, spawn, devices):
    receive_on, send_on = devices
    hosts = [host(dtype, receive_on) for dtype in DTYPES]
    sender = spawn(
        *sender_args("prefill-a", 1, [h.target for h in hosts], rounds=3), device=send_on
    )
    for h in hosts:
        results = [sender.next() for _ in range(3)]
        for result in results:
            h.assert_holds(result, seed=1)
        assert len({r["group"] for r in results}) == 1, "every transfer reuses the first group"
        assert h.receiver.rejected == 0
    assert sender.proc.wait(30) == 0


def test_two_senders_to_one_receiver(host, spawn):
    hosted = host()
    senders = {
        seed: spawn(*sender_args(f"prefill-{seed}", seed, [hosted.target], rounds=2))
        for seed in (2, 3)
    }
    for seed, sender in senders.items():
        for _ in range(2):
            hosted.assert_holds(sender.next(), seed)
    assert hosted.groups() == {b"prefill-2", b"prefill-3"}


def test_sender_killed_mid_transfer_leaves_the_receiver_serving(host, spawn, devices):
    receive_on, send_on = devices
    hosted = host("float32", receive_on)
    doomed = spawn(
        *sender_args("prefill-a", 4, [hosted.target], rounds=2, die_at=1, timeout_s=5.0),
        device=send_on,
    )
    hosted.assert_holds(doomed.next(), seed=4)
    assert doomed.proc.wait(30) == -9  # SIGKILLed after its second header went out

    # gloo sees the connection drop at once; NCCL waits out the 5 s and aborts the group.
    assert wait_until(lambda: b"prefill-a" not in hosted.groups(), timeout_s=15.0)
    assert hosted.receiver.running
    assert hosted.stub.filled == {"prefill-a-float32-0"}

    fresh = spawn(*sender_args("prefill-b", 5, [hosted.target], rounds=2), device=send_on)
    for _ in range(2):
        hosted.assert_holds(fresh.next(), seed=5)
    assert hosted.groups() == {b"prefill-b"}


def test_receiver_gone_fails_the_sender_within_its_timeout(spawn):
    spec = {"dtype": "float32", "free_blocks": FREE_BLOCKS, "die_at": 1}
    receiver = spawn("receive", json.dumps(spec))
    address = receiver.next()["address"]
    sender = NcclKVSender("prefill-0")
    src = make_caches(torch.float32, seed=6)
    layout = layout_of(src, "tiny", BLOCK_SIZE)
    try:

        def reserve(request_id: str) -> list[int]:
            req = ReserveRequest(
                request_id=request_id, num_tokens=2 * BLOCK_SIZE, layout=layout, lease_s=30
            )
            return sender.reserve(address, req, SHORT_TIMEOUT_S).block_ids

        first = ship(sender, address, "r0", src, [1, 5], reserve("r0"), SHORT_TIMEOUT_S)
        assert first.state is TransferState.DONE, first.reason

        # The receiver SIGKILLs itself once this header arrived, before the bytes.
        dst = reserve("r1")
        started = time.monotonic()
        lost = ship(sender, address, "r1", src, [1, 5], dst, SHORT_TIMEOUT_S)
        assert lost.state is TransferState.FAILED and lost.reason
        assert time.monotonic() - started < SHORT_TIMEOUT_S + 5
        assert receiver.proc.wait(30) == -9

        started = time.monotonic()
        again = ship(sender, address, "r2", src, [1, 5], dst, SHORT_TIMEOUT_S)
        assert again.state is TransferState.FAILED and "KVGroupReply" in again.reason
        assert time.monotonic() - started < SHORT_TIMEOUT_S + 5
    finally:
        sender.close()


# -- one process: behaviour that needs no second one --------------------------------------
def _reserve(sender: NcclKVSender, hosted: Hosted, request_id: str, blocks: int) -> list[int]:
    layout = layout_of(hosted.caches, "tiny", BLOCK_SIZE)
    req = ReserveRequest(
        request_id=request_id, num_tokens=blocks * BLOCK_SIZE, layout=layout, lease_s=30
    )
    return sender.reserve(hosted.receiver.address, req, SHORT_TIMEOUT_S).block_ids


def test_a_header_refused_before_its_bytes_costs_the_group_only(host):
    # One block of this layout packs to 1536 bytes: one fits the cap, two do not.
    hosted = host(max_payload_bytes=2000)
    sender = NcclKVSender("prefill-0")
    src = make_caches(torch.float32, seed=7)
    address = hosted.receiver.address
    try:
        ok = ship(sender, address, "r0", src, [4], _reserve(sender, hosted, "r0", 1), 5.0)
        assert ok.state is TransferState.DONE, ok.reason
        first_group = sender._groups[address]

        refused = ship(sender, address, "r1", src, [1, 2], _reserve(sender, hosted, "r1", 2), 5.0)
        assert refused.state is TransferState.FAILED
        assert address not in sender._groups and first_group.closed

        dst = _reserve(sender, hosted, "r2", 1)
        again = ship(sender, address, "r2", src, [9], dst, 5.0)
        assert again.state is TransferState.DONE, again.reason
        assert sender._groups[address] is not first_group
        hosted.assert_holds({"ok": True, "src": [9], "dst": dst}, seed=7)
    finally:
        sender.close()


def test_an_empty_transfer_moves_no_bytes_and_makes_no_group(host):
    hosted = host()
    sender = NcclKVSender("prefill-0")
    try:
        assert _reserve(sender, hosted, "r0", 0) == []
        src = make_caches(torch.float32)
        transfer = ship(sender, hosted.receiver.address, "r0", src, [], [], SHORT_TIMEOUT_S)
        assert transfer.state is TransferState.DONE, transfer.reason
        assert sender._groups == {} and hosted.groups() == set()
    finally:
        sender.close()


def test_a_zmq_receiver_refuses_the_group_at_once():
    receiver = ZmqKVReceiver()
    receiver.start()
    sender = NcclKVSender("prefill-0")
    try:
        src = make_caches(torch.float32)
        started = time.monotonic()
        with pytest.raises(TransferError, match="does not accept KVGroupInvite"):
            sender.send_blocks(receiver.address, "r0", src, [0], [0], SHORT_TIMEOUT_S)
        assert time.monotonic() - started < 1.0
    finally:
        sender.close()
        receiver.close()


def test_sockets_listen_on_loopback_only_and_close_releases_them(host):
    hosted = host()
    sender = NcclKVSender("prefill-0")
    src = make_caches(torch.float32, seed=8)
    dst = _reserve(sender, hosted, "r0", 2)
    transfer = ship(sender, hosted.receiver.address, "r0", src, [3, 1], dst, SHORT_TIMEOUT_S)
    assert transfer.state is TransferState.DONE, transfer.reason

    def listening() -> list[str]:
        return [
            c.laddr.ip
            for c in psutil.Process().net_connections("inet")
            if c.status == psutil.CONN_LISTEN
        ]

    # The receiver's zmq socket, the sender's store, a gloo device on each side.
    assert len(listening()) >= 4
    assert set(listening()) == {"127.0.0.1"}
    sender.close()
    hosted.close()
    assert wait_until(lambda: listening() == [], timeout_s=5.0), listening()


@pytest.mark.gpu
def test_one_gpu_on_both_sides_is_refused_with_the_reason(host):
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU")
    hosted = host("float32", "cuda:0")
    sender = NcclKVSender("prefill-0")
    try:
        src = [c.to("cuda:0") for c in make_caches(torch.float32)]
        with pytest.raises(TransferError, match="share one GPU"):
            sender.send_blocks(hosted.receiver.address, "r0", src, [0], [1], SHORT_TIMEOUT_S)
    finally:
        sender.close()


def test_an_invite_from_a_sender_the_receiver_does_not_admit_is_refused(host):
    hosted = host()
    hosted.receiver.admits_peer = lambda peer: peer == b"prefill-0"
    stranger, known = NcclKVSender("stranger"), NcclKVSender("prefill-0")
    src = make_caches(torch.float32, seed=5)
    address = hosted.receiver.address
    try:
        with pytest.raises(TransferError, match="not a registered prefill worker"):
            stranger.send_blocks(address, "r0", src, [0], [0], SHORT_TIMEOUT_S)
        assert hosted.groups() == set()
        dst = _reserve(known, hosted, "r1", 1)
        transfer = ship(known, address, "r1", src, [2], dst, SHORT_TIMEOUT_S)
        assert transfer.state is TransferState.DONE, transfer.reason
    finally:
        stranger.close()
        known.close()

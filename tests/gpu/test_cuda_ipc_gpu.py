"""The cuda_ipc transport on real GPUs (`pytest -m gpu`): a receiver process exports its
cache, this process maps it and writes random blocks, the receiver checks them bit for
bit; a receiver restarted on the same address is mapped afresh; and the whole service
gives the same greedy tokens over cuda_ipc as over zmq; 16 threads sending at once share
kernel launches and still land every byte."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import torch

from tandem.core.protocol import ReserveRequest
from tandem.kernels import kv_block_transfer as kernel
from tandem.kvtransfer.cuda_ipc_backend import CudaIpcKVReceiver, CudaIpcKVSender
from tandem.kvtransfer.transport import TransferState, layout_of, ship
from tests.kvtransfer.decode_stub import DecodeStub
from tests.service.conftest import generate, start_service, stop_service

# Llama-3.1-8B's block shape over fewer layers, so the host-side check stays quick.
LAYERS, BLOCK, HEADS, DIM = 8, 16, 8, 128
SRC_BLOCKS, DST_BLOCKS = 256, 300
DTYPE = torch.bfloat16


@pytest.fixture
def seed() -> int:
    """Fresh per run; TANDEM_TEST_SEED reproduces one (it is in every failure message)."""
    fixed = os.environ.get("TANDEM_TEST_SEED")
    return int(fixed) if fixed else random.SystemRandom().randrange(2**31)


def _source(seed: int) -> torch.Tensor:
    """The sender's cache, reproducible on the host so the receiver can check it."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(LAYERS, 2, SRC_BLOCKS, BLOCK, HEADS, DIM, generator=gen).to(DTYPE)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _layout():
    return layout_of(
        list(torch.empty(LAYERS, 2, 1, BLOCK, HEADS, DIM, dtype=DTYPE).unbind(0)),
        "llama-blocks",
        BLOCK,
    )


def _receiver_main(address: str, device: str, seed: int, conn: Connection) -> None:
    """Decode stand-in: a poisoned cache, exported; given (src_ids, dst_ids) it checks the
    written blocks bit for bit against the sender's source, and the rest for the poison."""
    torch.cuda.set_device(device)
    cache = torch.full(
        (LAYERS, 2, DST_BLOCKS, BLOCK, HEADS, DIM), float("nan"), dtype=DTYPE, device=device
    )
    receiver = CudaIpcKVReceiver(address)
    receiver.attach_kv_caches(list(cache.unbind(0)))
    free = torch.randperm(DST_BLOCKS).tolist()
    with DecodeStub(receiver, list(cache.unbind(0)), _layout(), free):
        conn.send(receiver.export_id)
        while (cmd := conn.recv()) != "stop":
            src_ids, dst_ids = cmd
            host = cache.cpu()
            want = _source(seed)[:, :, src_ids]
            ok = torch.equal(_bits(host[:, :, dst_ids]), _bits(want))
            rest = [b for b in range(DST_BLOCKS) if b not in set(dst_ids)]
            conn.send(ok and bool(host[:, :, rest].isnan().all()))
    receiver.close()


class Receiver:
    def __init__(self, address: str, device: str, seed: int):
        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_receiver_main, args=(address, device, seed, child))
        self.proc.start()
        assert self.conn.poll(120), "receiver did not start"
        self.export_id = self.conn.recv()

    def check(self, src_ids: list[int], dst_ids: list[int]) -> bool:
        self.conn.send((src_ids, dst_ids))
        assert self.conn.poll(120)
        return self.conn.recv()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.conn.send("stop")
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


def _reserve(sender: CudaIpcKVSender, address: str, rid: str, blocks: int) -> list[int]:
    req = ReserveRequest(request_id=rid, num_tokens=blocks * BLOCK, layout=_layout(), lease_s=30)
    reply = sender.reserve(address, req, 30.0)
    assert reply.ok, reply.reason
    return reply.block_ids


def _send(
    sender: CudaIpcKVSender, address: str, rid: str, src: torch.Tensor, src_ids: list[int]
) -> list[int]:
    dst_ids = _reserve(sender, address, rid, len(src_ids))
    transfer = ship(sender, address, rid, list(src.unbind(0)), src_ids, dst_ids, 30.0)
    assert transfer.state is TransferState.DONE, transfer.reason
    return dst_ids


@pytest.mark.parametrize(
    "receiver_device",
    [
        pytest.param("cuda:0", marks=pytest.mark.gpu),
        # Only gpu2, not gpu: a one-GPU run (-m gpu) must not collect it.
        pytest.param("cuda:1", marks=pytest.mark.gpu2),
    ],
)
def test_blocks_written_across_processes_are_bit_exact(tmp_path: Path, seed, receiver_device):
    if torch.cuda.device_count() <= torch.device(receiver_device).index:
        pytest.fail(
            f"{receiver_device} needs {torch.device(receiver_device).index + 1} GPUs, "
            f"found {torch.cuda.device_count()}"
        )
    address = f"ipc://{tmp_path}/decode.sock"
    src = _source(seed).to("cuda:0")
    sender = CudaIpcKVSender("prefill-0")
    receiver = Receiver(address, receiver_device, seed)
    try:
        src_ids = torch.randperm(SRC_BLOCKS)[:128].tolist()
        dst_ids = _send(sender, address, "a", src, src_ids)
        more = torch.randperm(SRC_BLOCKS)[:7].tolist()
        dst_more = _send(sender, address, "b", src, more)  # through the cached mapping
        assert receiver.check(src_ids + more, dst_ids + dst_more), f"seed={seed}"
    finally:
        receiver.stop()
        sender.close()


@pytest.mark.gpu
def test_receiver_restarted_on_the_same_address_is_mapped_afresh(tmp_path: Path, seed):
    address = f"ipc://{tmp_path}/decode.sock"
    src = _source(seed).to("cuda:0")
    sender = CudaIpcKVSender("prefill-0")
    first = Receiver(address, "cuda:0", seed)
    try:
        ids = torch.randperm(SRC_BLOCKS)[:16].tolist()
        assert first.check(ids, _send(sender, address, "a", src, ids)), f"seed={seed}"
    finally:
        first.stop()
    second = Receiver(address, "cuda:0", seed)
    try:
        assert second.export_id != first.export_id
        ids = torch.randperm(SRC_BLOCKS)[:16].tolist()
        assert second.check(ids, _send(sender, address, "b", src, ids)), f"seed={seed}"
    finally:
        second.stop()
        sender.close()


THREADS, PER_THREAD = 16, 16  # 256 source blocks, each sent once


@pytest.mark.gpu
@pytest.mark.parametrize("held", [False, True], ids=["free-running", "first-launch-held"])
def test_concurrent_transfers_from_their_own_streams_are_bit_exact(
    tmp_path: Path, seed, monkeypatch: pytest.MonkeyPatch, held: bool
):
    """16 threads at once, one shared sender (the bench's round). Each thread writes its
    source blocks on its own stream behind a ~20 ms GPU sleep and ships at once: bytes
    land only if the copy waits for the caller's stream. Held: the first launch waits
    until the other jobs are queued, so the second launch carries all of theirs."""
    address = f"ipc://{tmp_path}/decode.sock"
    truth = _source(seed).to("cuda:0")
    src = torch.full_like(truth, float("nan"))
    sender = CudaIpcKVSender("prefill-0")
    receiver = Receiver(address, "cuda:0", seed)
    try:
        # Mapping and kernel compilation happen once, not in 16 threads at once.
        src[:, :, :1] = truth[:, :, :1]
        warm_dst = _send(sender, address, "warm", src, [0])
        perm = torch.randperm(SRC_BLOCKS).tolist()
        src_ids = [perm[i * PER_THREAD : (i + 1) * PER_THREAD] for i in range(THREADS)]
        dst_ids = [_reserve(sender, address, f"r{i}", PER_THREAD) for i in range(THREADS)]
        copier = sender._mappings[address].copier
        if held:
            real = kernel.kv_block_transfer
            first: list[int] = []

            def hold_first(s: torch.Tensor, d: torch.Tensor, ids: torch.Tensor) -> None:
                if not first:
                    first.append(ids.shape[1] // PER_THREAD)
                    deadline = time.monotonic() + 30
                    while len(copier._queue) + first[0] < THREADS:
                        assert time.monotonic() < deadline, "the other jobs never queued"
                        time.sleep(0.001)
                real(s, d, ids)

            monkeypatch.setattr(kernel, "kv_block_transfer", hold_first)
        before = sender.copy_stats.snapshot()
        start = threading.Barrier(THREADS)
        views = list(src.unbind(0))  # the same views every time, as the worker passes

        def one(i: int) -> TransferState:
            stream = torch.cuda.Stream()
            start.wait()
            with torch.cuda.stream(stream):
                torch.cuda._sleep(40_000_000)  # ~20 ms: long after the launch, if unordered
                src[:, :, src_ids[i]] = truth[:, :, src_ids[i]]
                t = ship(sender, address, f"r{i}", views, src_ids[i], dst_ids[i], 30.0)
            return t.state

        with ThreadPoolExecutor(THREADS) as pool:
            states = list(pool.map(one, range(THREADS)))
        assert states == [TransferState.DONE] * THREADS
        launches = sender.copy_stats.snapshot().launches - before.launches
        assert 1 <= launches <= THREADS
        if held:
            assert launches == 2
        every_src = [0] + [b for ids in src_ids for b in ids]
        every_dst = warm_dst + [b for ids in dst_ids for b in ids]
        assert receiver.check(every_src, every_dst), f"seed={seed} launches={launches}"
    finally:
        receiver.stop()
        sender.close()


# Token-id prompts for a dummy-weight model: the GPU machine carries no checkpoint.
PROMPTS = [[(17 * i + 3 * j) % 1000 + 10 for j in range(n)] for i, n in enumerate((40, 7, 130))]


def _greedy_tokens(transport: str) -> list[list[int]]:
    svc = start_service(
        "--model",
        "qwen3-0.6b",
        "--load-format",
        "dummy",
        "--device",
        "cuda",
        "--kv-transport",
        transport,
        "--num-blocks",
        "512",
        "--max-num-seqs",
        "8",
        "--max-model-len",
        "1024",
    )
    try:
        stub = svc.stub()
        # One request at a time: batch composition then cannot change the numerics.
        return [
            generate(stub, ids=p, max_tokens=24, temperature=0.0, ignore_eos=True)[0]
            for p in PROMPTS
        ]
    finally:
        stop_service(svc)


@pytest.mark.gpu
def test_service_greedy_output_over_cuda_ipc_equals_zmq():
    over_zmq = _greedy_tokens("zmq")
    over_ipc = _greedy_tokens("cuda_ipc")
    assert all(len(tokens) == 24 for tokens in over_ipc)
    assert over_ipc == over_zmq

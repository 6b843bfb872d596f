"""The processes `tandem bench transfer` starts beside itself: the decode-like receiver,
and the two ranks that measure the NCCL point-to-point ceiling.

Both are started with the spawn method (CUDA cannot be used in a forked child) and
inherit the environment unchanged, so CUDA_VISIBLE_DEVICES and NCCL settings such as
NCCL_NVLS_ENABLE=0 reach them.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from tandem.core.protocol import KVTransfer, Release, ReserveReply, ReserveRequest, TransferAck

_START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class CacheShape:
    """Llama-3.1-8B's KV cache: 128 KiB per token in bf16."""

    layers: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16

    def dims(self, num_blocks: int) -> tuple[int, ...]:
        return (self.layers, 2, num_blocks, self.block_size, self.kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """One block id across every layer and K/V: what a transfer moves per block."""
        per_token = 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize
        return per_token * self.block_size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _serve(backend: str, device_name: str, num_blocks: int, conn: Connection) -> None:
    """Decode-like receiver: its own cache, attached before start (cuda_ipc exports it),
    blocks from a free list, payloads (if the backend carries any) scattered and
    synchronised before the ack, so an ack means the bytes are in this cache."""
    from tandem.kvtransfer.transport import make_receiver, unpack_blocks

    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    shape = CacheShape()
    cache = torch.zeros(shape.dims(num_blocks), dtype=shape.dtype, device=device)
    views = list(cache.unbind(0))
    receiver = make_receiver(backend, "tcp://127.0.0.1:0")
    receiver.attach_kv_caches(views)
    receiver.start()
    conn.send(receiver.address)
    free = list(range(num_blocks))
    held: dict[str, list[int]] = {}
    try:
        while not conn.poll(0):
            for item in receiver.poll(0.05):
                msg = item.msg
                if isinstance(msg, ReserveRequest):
                    rid, need = msg.request_id, -(-msg.num_tokens // shape.block_size)
                    if rid not in held and need <= len(free):
                        held[rid], free = free[:need], free[need:]
                    ok = rid in held
                    receiver.reply(
                        item.peer,
                        ReserveReply(
                            request_id=rid,
                            ok=ok,
                            block_ids=held.get(rid, []),
                            reason="" if ok else f"{need} blocks wanted, {len(free)} free",
                        ),
                    )
                elif isinstance(msg, KVTransfer):
                    ok = msg.block_ids == held.get(msg.request_id)
                    if ok and item.payload is not None:
                        unpack_blocks(views, msg.block_ids, item.payload)
                        _sync(device)
                    receiver.reply(item.peer, TransferAck(request_id=msg.request_id, ok=ok))
                elif isinstance(msg, Release):
                    free += held.pop(msg.request_id, [])
    finally:
        receiver.close()


class Receiver:
    """A `_serve` process; `address` is where its receiver listens."""

    def __init__(self, backend: str, device: str, num_blocks: int):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve,
            args=(backend, device, num_blocks, child),
            name=f"transfer-receiver-{backend}",
            daemon=True,
        )
        self._proc.start()
        if not self._conn.poll(_START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"the {backend} receiver on {device} did not start")
        self.address: str = self._conn.recv()

    def stop(self) -> None:
        if self._proc.is_alive():
            self._conn.send("stop")
            self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


def _nccl_rank(
    rank: int, device_name: str, port: int, nbytes: int, iters: int, conn: Connection
) -> None:
    import torch.distributed as dist

    device = torch.device(device_name)
    torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, device_id=device
    )
    try:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)

        def step() -> None:
            if rank == 0:
                dist.send(buf, 1)
            else:
                dist.recv(buf, 0)

        for _ in range(3):
            step()
        torch.cuda.synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        if rank == 1:  # the receiving side has the bytes when its last recv completes
            conn.send(nbytes * iters / elapsed)
    finally:
        dist.destroy_process_group()


def nccl_p2p_bytes_per_s(
    sender: str, receiver: str, nbytes: int = 1 << 30, iters: int = 10
) -> float:
    """NCCL send/recv bandwidth from `sender` to `receiver` (two ranks, two processes)."""
    from tandem.local_redis import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    result, child = ctx.Pipe()
    procs = [
        ctx.Process(target=_nccl_rank, args=(rank, dev, port, nbytes, iters, child))
        for rank, dev in enumerate((sender, receiver))
    ]
    for proc in procs:
        proc.start()
    try:
        if not result.poll(_START_TIMEOUT_S):
            raise RuntimeError(f"NCCL send/recv between {sender} and {receiver} gave no result")
        return float(result.recv())
    finally:
        for proc in procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()

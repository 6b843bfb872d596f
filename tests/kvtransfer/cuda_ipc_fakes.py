"""The cuda_ipc transport without a GPU: the two CUDA calls (export a storage, map it)
stood in by an in-process fake, so the copy kernel runs under Triton's interpreter
straight into a decode stand-in's cache. Fixtures over these live in conftest.py."""

from __future__ import annotations

import time

import torch

from tandem.core.protocol import (
    CudaIpcExport,
    Handoff,
    PrefillTask,
    ReserveReply,
    ReserveRequest,
    TransferAck,
)
from tandem.core.sampling_params import SamplingParams
from tandem.kvtransfer.cuda_ipc_backend import CudaIpcKVReceiver, CudaIpcKVSender
from tandem.kvtransfer.pack import dtype_name
from tandem.kvtransfer.transport import layout_of
from tests.kvtransfer.decode_stub import DecodeStub

LAYERS, BLOCK, HEADS, DIM = 3, 4, 2, 8
SRC_BLOCKS, DST_BLOCKS = 10, 12


def kv_cache(blocks: int, dtype: torch.dtype, fill: float | None = None, **shape) -> torch.Tensor:
    dims = dict(layers=LAYERS, block=BLOCK, heads=HEADS, dim=DIM) | shape
    size = (dims["layers"], 2, blocks, dims["block"], dims["heads"], dims["dim"])
    if fill is None:
        return torch.randn(size).to(dtype)
    return torch.full(size, fill, dtype=dtype)


def fake_export(cache: torch.Tensor, export_id: str = "e1", **override) -> CudaIpcExport:
    fields = dict(
        export_id=export_id,
        device_uuid="cpu",
        handle=export_id.encode(),
        storage_bytes=cache.untyped_storage().nbytes(),
        storage_offset_bytes=0,
        ref_counter=b"",
        ref_counter_offset=0,
        dtype=dtype_name(cache.dtype),
        shape=list(cache.shape),
        stride=list(cache.stride()),
        offset=cache.storage_offset(),
    )
    return CudaIpcExport(**(fields | override))


class FakeIpc:
    """Stands in for `_share_cuda_` / `_new_shared_cuda`: the "mapping" of an export is
    the exported tensor itself, as the receiver and sender share this process."""

    def __init__(self) -> None:
        self.exported: dict[bytes, torch.Tensor] = {}
        self.opened: list[str] = []

    def share(self, cache: torch.Tensor, export_id: str) -> CudaIpcExport:
        self.exported[export_id.encode()] = cache
        return fake_export(cache, export_id)

    def open(self, export: CudaIpcExport, device: torch.device) -> torch.Tensor:
        self.opened.append(export.export_id)
        return self.exported[export.handle]


class Decode:
    """A cuda_ipc receiver with its own poisoned cache, answering like a decode worker."""

    def __init__(
        self,
        address: str,
        dtype: torch.dtype,
        free: list[int] | None = None,
        blocks: int = DST_BLOCKS,
        **shape,
    ):
        self.cache = kv_cache(blocks, dtype, float("nan"), **shape)
        self.receiver = CudaIpcKVReceiver(address)
        self.receiver.attach_kv_caches(list(self.cache.unbind(0)))
        layout = layout_of(list(kv_cache(1, dtype).unbind(0)), "tiny", BLOCK)
        free = list(range(blocks - 1, -1, -1)) if free is None else free
        self.stub = DecodeStub(self.receiver, list(self.cache.unbind(0)), layout, free)
        self.stub.__enter__()

    def close(self) -> None:
        self.stub.__exit__(None, None, None)
        self.receiver.close()


def reserve(
    sender: CudaIpcKVSender, address: str, rid: str, n: int, dtype: torch.dtype = torch.float32
) -> ReserveReply:
    layout = layout_of(list(kv_cache(1, dtype).unbind(0)), "tiny", BLOCK)
    req = ReserveRequest(request_id=rid, num_tokens=n * BLOCK, layout=layout, lease_s=5)
    reply = sender.reserve(address, req, 5.0)
    assert reply.ok, reply.reason
    return reply


def untouched(cache: torch.Tensor, written: list[int]) -> bool:
    rest = [b for b in range(cache.shape[2]) if b not in written]
    return bool(cache[:, :, rest].isnan().all())


def handoff(sender: CudaIpcKVSender, address: str, rid: str, timeout_s: float = 5.0) -> TransferAck:
    task = PrefillTask(
        request_id=rid,
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(max_tokens=4),
        reply_stream="r",
        deadline=time.time() + 60,
    )
    return sender.handoff(
        address, Handoff(task=task, output_token_ids=[5], num_computed_tokens=3), timeout_s
    )

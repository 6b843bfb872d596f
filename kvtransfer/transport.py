"""Moving paged KV blocks from prefill workers to decode workers.

Workers depend on KVSender / KVReceiver only and pick a backend by name, so tests run
the same worker code over the in-memory fake and production runs it over zmq.
"""

from __future__ import annotations

from tandem.core.config import KV_TRANSPORTS
from tandem.kvtransfer.base import (
    BlockMove,
    Inbound,
    KVReceiver,
    KVSender,
    Transfer,
    TransferError,
    TransferState,
    ship,
    ship_many,
)
from tandem.kvtransfer.curve import CurveKeys
from tandem.kvtransfer.fake import FakeKVReceiver, FakeKVSender
from tandem.kvtransfer.pack import (
    LayoutMismatch,
    check_layout,
    dtype_from_name,
    dtype_name,
    layout_of,
    pack_blocks,
    tensor_from_frame,
    tensor_to_frame,
    unpack_blocks,
)
from tandem.kvtransfer.zmq_backend import ZmqKVReceiver, ZmqKVSender

BACKENDS = KV_TRANSPORTS


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown KV transport {backend!r}; use one of {BACKENDS}")


def make_receiver(backend: str, bind_address: str, curve: CurveKeys | None = None) -> KVReceiver:
    """A decode-side receiver bound to `bind_address` (not started yet); with `curve`,
    only CURVE clients holding the prefill key get through (kvtransfer.curve)."""
    _check_backend(backend)
    if backend == "zmq":
        return ZmqKVReceiver(bind_address, curve=curve)
    if backend == "cuda_ipc":
        from tandem.kvtransfer.cuda_ipc_backend import CudaIpcKVReceiver

        return CudaIpcKVReceiver(bind_address, curve=curve)
    if backend == "nccl":
        from tandem.kvtransfer.nccl_backend import NcclKVReceiver

        return NcclKVReceiver(bind_address, curve=curve)
    if curve is not None:
        raise ValueError("the fake transport has no sockets to authenticate")
    return FakeKVReceiver(bind_address)


def make_sender(backend: str, identity: str, curve: CurveKeys | None = None) -> KVSender:
    """A prefill-side sender; `identity` (the worker id) names it to receivers."""
    _check_backend(backend)
    if backend == "zmq":
        return ZmqKVSender(identity, curve)
    if backend == "cuda_ipc":
        from tandem.kvtransfer.cuda_ipc_backend import CudaIpcKVSender

        return CudaIpcKVSender(identity, curve)
    if backend == "nccl":
        from tandem.kvtransfer.nccl_backend import NcclKVSender

        return NcclKVSender(identity, curve)
    if curve is not None:
        raise ValueError("the fake transport has no sockets to authenticate")
    return FakeKVSender(identity)


__all__ = [
    "BACKENDS",
    "BlockMove",
    "FakeKVReceiver",
    "FakeKVSender",
    "Inbound",
    "KVReceiver",
    "KVSender",
    "LayoutMismatch",
    "Transfer",
    "TransferError",
    "TransferState",
    "ZmqKVReceiver",
    "ZmqKVSender",
    "check_layout",
    "dtype_from_name",
    "dtype_name",
    "layout_of",
    "make_receiver",
    "make_sender",
    "pack_blocks",
    "ship",
    "ship_many",
    "tensor_from_frame",
    "tensor_to_frame",
    "unpack_blocks",
]

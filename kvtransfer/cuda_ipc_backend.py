"""KV transfer over CUDA IPC: prefill writes decode's reserved blocks directly, GPU to GPU.

How it works
- Decode (CudaIpcKVReceiver): attach_kv_caches() finds the one `[layers, 2, blocks,
  block_size, kv_heads, head_dim]` tensor behind the engine's per-layer views and
  exports its storage once as a CUDA IPC handle (torch's `UntypedStorage._share_cuda_`)
  under a random export id, the receiver's incarnation. Control messages travel over
  the zmq backend; on its I/O thread the receiver answers ExportRequest itself, stamps
  its export id on every granted ReserveReply and refuses in_place KVTransfers that
  name another export. The worker only ever sees payload-less in_place transfers.
- Prefill (CudaIpcKVSender): reserve() remembers the export each reservation's block
  ids belong to. send_blocks() maps that export on first use (cached per receiver
  address, replaced when the receiver's incarnation changes), checks its layout against
  the local cache and the block ids against both caches, and hands the copy to the
  mapping's BlockCopier (cuda_ipc_copy): transfers running at once into one cache share
  a kernel launch over every layer's blocks, ordered after the callers' streams (where
  the prefill forward wrote the KV). send_blocks returns once the launch carrying its
  blocks has finished, after posting the in_place header one way; a refusal surfaces at
  the Handoff that follows it on the same connection. The wait comes first so decode
  never reads half-written blocks.

Why the export id: block ids mean something only in the cache that granted them. A
decode worker restarted on the same address has a new cache, and writing an old
reservation's ids into it would overwrite live requests' KV. So a sender writes only
through a mapping of the very export its reservation names, and otherwise fails the
transfer before writing anything.

The export is mapped on the sender's own GPU (`_new_shared_cuda` opens it there with
lazy peer access), so one kernel on the sender's device reaches the receiver's memory
on the same GPU or on a peer GPU of the same node (NVLink / PCIe P2P); both GPUs must
be visible to the prefill process. Messages are msgspec structs; nothing is pickled.

Limits: CUDA's contract leaves writes undefined once the exporting process has died, so
a decode worker dying during a copy is not made safe here (every later transfer fails
and drops the mapping); the window is the copy itself, microseconds to milliseconds.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import msgspec
import torch

from core.protocol import (
    MAX_CONTROL_FRAME_BYTES,
    ControlMessage,
    CudaIpcExport,
    ExportReply,
    ExportRequest,
    Handoff,
    KVTransfer,
    ReserveReply,
    ReserveRequest,
    TransferAck,
    encode,
)
from kvtransfer.base import Inbound, TransferError
from kvtransfer.cuda_ipc_copy import BlockCopier, CopyStats
from kvtransfer.pack import check_block_ids, dtype_from_name, dtype_name
from kvtransfer.wire import MAX_KV_PAYLOAD_BYTES, RECEIVABLE
from kvtransfer.zmq_backend import ZmqKVReceiver, ZmqKVSender

log = logging.getLogger(__name__)

# Reservations granted but neither sent nor released are forgotten oldest first past
# this (the prefill worker sends no Release after a successful handoff).
_MAX_RESERVATIONS = 65536


def stacked_cache(kv_caches: Sequence[torch.Tensor]) -> torch.Tensor:
    """The one contiguous `[layers, 2, blocks, block_size, kv_heads, head_dim]` tensor
    whose per-layer views are `kv_caches`; ValueError unless they are consecutive views
    of one storage (the engine allocates its cache that way: one handle, one launch)."""
    if not kv_caches:
        raise ValueError("no KV cache layers")
    first = kv_caches[0]
    if first.dim() != 5 or first.shape[0] != 2:
        raise ValueError(f"KV cache layer is {tuple(first.shape)}; expected [2, blocks, ...]")
    base = first.untyped_storage().data_ptr()
    for layer, view in enumerate(kv_caches):
        if (
            view.shape != first.shape
            or view.dtype != first.dtype
            or view.device != first.device
            or not view.is_contiguous()
            or view.untyped_storage().data_ptr() != base
            or view.storage_offset() != first.storage_offset() + layer * first.numel()
        ):
            raise ValueError(
                f"KV cache layer {layer} is not the next slice of one [layers, 2, ...] tensor"
            )
    return first.as_strided(
        (len(kv_caches), *first.shape), (first.numel(), *first.stride()), first.storage_offset()
    )


@functools.lru_cache(maxsize=64)
def _device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _visible_index(device_uuid: str) -> int | None:
    """This process's index of the GPU named `device_uuid`, None if it is not visible."""
    for index in range(torch.cuda.device_count()):
        if _device_uuid(index) == device_uuid:
            return index
    return None


def share_cache(cache: torch.Tensor, export_id: str) -> CudaIpcExport:
    """Export `cache` (a stacked_cache) as a CUDA IPC handle. Call once per cache: each
    `_share_cuda_` wraps the storage in another torch IPC ref-counting context."""
    if cache.device.type != "cuda":
        raise ValueError(
            f"the cuda_ipc transport shares a CUDA KV cache; this one is on {cache.device} "
            "(use --kv-transport zmq without a GPU)"
        )
    # Peers may write as soon as they hold the handle: the cache's own initialisation
    # (zero fill) must not land after their copies.
    torch.cuda.synchronize(cache.device)
    handle, storage_bytes, storage_offset_bytes, ref_counter, ref_counter_offset = (
        cache.untyped_storage()._share_cuda_()[1:6]
    )
    return CudaIpcExport(
        export_id=export_id,
        device_uuid=_device_uuid(cache.device.index),
        handle=handle,
        storage_bytes=storage_bytes,
        storage_offset_bytes=storage_offset_bytes,
        ref_counter=ref_counter,
        ref_counter_offset=ref_counter_offset,
        dtype=dtype_name(cache.dtype),
        shape=list(cache.shape),
        stride=list(cache.stride()),
        offset=cache.storage_offset(),
    )


def open_export(export: CudaIpcExport, device: torch.device) -> torch.Tensor:
    """Map `export` on `device` (the sender's GPU) as a tensor; TransferError if it cannot."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise TransferError(
            f"the cuda_ipc transport moves KV between GPUs; this sender's cache is on {device} "
            "(use --kv-transport zmq without a GPU)"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    home = _visible_index(export.device_uuid)
    if home is None:
        raise TransferError(
            f"the receiver's GPU {export.device_uuid} is not visible to this process: "
            "cuda_ipc needs both GPUs (same node) in CUDA_VISIBLE_DEVICES"
        )
    if home != index and not torch.cuda.can_device_access_peer(index, home):
        raise TransferError(f"GPU {index} cannot access GPU {home} (no peer-to-peer path)")
    try:
        storage = torch.UntypedStorage._new_shared_cuda(
            index,
            export.handle,
            export.storage_bytes,
            export.storage_offset_bytes,
            export.ref_counter,
            export.ref_counter_offset,
            b"",  # no IPC event: share_cache synchronised before exporting
            False,
        )
    except RuntimeError as exc:
        raise TransferError(f"cannot map the exported KV cache: {exc}") from exc
    dtype = dtype_from_name(export.dtype)
    view = torch.empty(0, dtype=dtype, device=torch.device("cuda", index))
    return view.set_(storage, export.offset, export.shape, export.stride)


def export_mismatch(export: CudaIpcExport, local: torch.Tensor) -> str | None:
    """Why `export` cannot receive blocks of the stacked cache `local`, or None.

    Everything but the number of blocks must match, and the view must be contiguous and
    inside its storage: Tensor.set_ does not bounds-check, so a wrong export would
    otherwise let the copy write past the receiver's cache.
    """
    try:
        dtype = dtype_from_name(export.dtype)
    except ValueError as exc:
        return str(exc)
    shape = list(export.shape)
    if dtype != local.dtype:
        return f"receiver's KV cache is {export.dtype}, ours is {dtype_name(local.dtype)}"
    if len(shape) != 6 or shape[1] != 2 or shape[2] < 1 or any(d < 1 for d in shape):
        return f"receiver's KV cache shape {shape} is not [layers, 2, blocks, bs, heads, dim]"
    for i, name in ((0, "layers"), (3, "block_size"), (4, "kv_heads"), (5, "head_dim")):
        if shape[i] != local.shape[i]:
            return f"KV layout differs in {name}: {shape[i]} (receiver) != {local.shape[i]}"
    contiguous = [1] * 6
    for i in range(4, -1, -1):
        contiguous[i] = contiguous[i + 1] * shape[i + 1]
    if list(export.stride) != contiguous:
        return f"receiver's KV cache strides {export.stride} are not contiguous"
    end_bytes = (export.offset + contiguous[0] * shape[0]) * dtype.itemsize
    if export.offset < 0 or end_bytes > export.storage_bytes:
        return f"receiver's KV cache view ends at byte {end_bytes}, past its storage"
    return None


class CudaIpcKVReceiver(ZmqKVReceiver):
    in_place = True
    accepts = (*RECEIVABLE, ExportRequest)

    def __init__(
        self,
        bind_address: str = "tcp://127.0.0.1:0",
        *,
        max_header_bytes: int = MAX_CONTROL_FRAME_BYTES,
        max_payload_bytes: int = MAX_KV_PAYLOAD_BYTES,
    ):
        super().__init__(
            bind_address, max_header_bytes=max_header_bytes, max_payload_bytes=max_payload_bytes
        )
        self._cache: torch.Tensor | None = None  # held for life: peers map its memory
        self._export: CudaIpcExport | None = None

    @property
    def export_id(self) -> str:
        return self._export.export_id if self._export is not None else ""

    def attach_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        if self._export is not None:
            raise RuntimeError("the KV cache is already attached and exported")
        cache = stacked_cache(kv_caches)
        self._export = share_cache(cache, uuid.uuid4().hex)
        self._cache = cache
        log.info(
            "exported the KV cache %s (%.2f GiB) as %s",
            tuple(cache.shape),
            cache.numel() * cache.element_size() / 2**30,
            self._export.export_id,
        )

    def reply(self, peer: bytes, msg: ControlMessage) -> None:
        if isinstance(msg, ReserveReply) and msg.ok:
            msg = msgspec.structs.replace(msg, export_id=self.export_id)
        super().reply(peer, msg)

    def _route(self, inbound: Inbound) -> None:
        msg = inbound.msg
        if isinstance(msg, ExportRequest):
            if self._export is None:
                reply = ExportReply(request_id=msg.request_id, ok=False, reason="no KV cache yet")
            else:
                reply = ExportReply(request_id=msg.request_id, ok=True, export=self._export)
            self._outbox.put((inbound.peer, encode(reply)))
        elif (
            isinstance(msg, KVTransfer)
            and msg.in_place
            and (self._export is None or msg.export_id != self._export.export_id)
        ):
            self.rejected += 1
            refusal = TransferAck(
                request_id=msg.request_id,
                ok=False,
                reason="KV written through another cache export than this receiver's",
            )
            self._outbox.put((inbound.peer, encode(refusal)))
        else:
            super()._route(inbound)


@dataclass
class _Mapping:
    export_id: str
    cache: torch.Tensor  # the receiver's stacked cache, mapped on the sender's device
    copier: BlockCopier  # every copy into `cache`: concurrent ones share launches


class CudaIpcKVSender(ZmqKVSender):
    def __init__(self, identity: str):
        super().__init__(identity)
        self._state_lock = threading.Lock()
        # (address, request_id) -> export id of the cache that granted the reservation.
        self._reserved: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._mappings: dict[str, _Mapping] = {}
        self._map_locks: dict[str, threading.Lock] = {}
        # The last caches seen and their stacked tensor: the worker passes the same
        # views every time, and checking 32 of them costs more than the ack round trip.
        self._source: tuple[tuple[torch.Tensor, ...], torch.Tensor] | None = None
        self.copy_stats = CopyStats()

    def reserve(self, address: str, req: ReserveRequest, timeout_s: float) -> ReserveReply:
        reply = super().reserve(address, req, timeout_s)
        if reply.ok:
            key = (address, req.request_id)
            with self._state_lock:
                self._reserved[key] = reply.export_id
                self._reserved.move_to_end(key)
                while len(self._reserved) > _MAX_RESERVATIONS:
                    self._reserved.popitem(last=False)
        return reply

    def release(self, address: str, request_id: str) -> None:
        with self._state_lock:
            self._reserved.pop((address, request_id), None)
        super().release(address, request_id)

    def handoff(self, address: str, msg: Handoff, timeout_s: float) -> TransferAck:
        # The first reply after a one-way KV header: a receiver that stopped answering
        # may be gone, and its cache with it, so the next transfer maps afresh.
        try:
            return super().handoff(address, msg, timeout_s)
        except TransferError:
            with self._state_lock:
                self._mappings.pop(address, None)
            raise

    def close(self) -> None:
        with self._state_lock:
            self._reserved.clear()
            self._mappings.clear()
        super().close()

    def send_blocks(
        self,
        address: str,
        request_id: str,
        kv_caches: Sequence[torch.Tensor],
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        timeout_s: float,
        staging: torch.Tensor | None = None,
    ) -> TransferAck:
        """Copy the blocks into the receiver's cache, then send the in_place header.
        `staging` is unused: nothing goes through host memory."""
        deadline = time.monotonic() + timeout_s
        if len(src_block_ids) != len(dst_block_ids):
            raise ValueError(f"{len(src_block_ids)} source blocks for {len(dst_block_ids)}")
        src = self._stacked(kv_caches)
        src_ids = check_block_ids(src_block_ids, src.shape[2])
        with self._state_lock:
            export_id = self._reserved.pop((address, request_id), None)
        if export_id is None:
            raise TransferError(f"{request_id} was not reserved at {address} through this sender")
        if not export_id:
            raise TransferError(
                f"the receiver at {address} exports no KV cache (not a cuda_ipc receiver)"
            )
        mapping = self._mapped(address, export_id, src, deadline)
        try:
            dst_ids = check_block_ids(dst_block_ids, mapping.cache.shape[2])
        except ValueError as exc:
            raise TransferError(f"reserved blocks from {address} are invalid: {exc}") from None
        header = KVTransfer(
            request_id=request_id,
            block_ids=list(dst_block_ids),
            dtype=dtype_name(src.dtype),
            shape=[src.shape[0], 2, len(dst_block_ids), *src.shape[3:]],
            in_place=True,
            export_id=export_id,
        )

        # Once the bytes are in the receiver's memory the header goes one way: no round
        # trip per transfer. It travels on the same connection as the Handoff that
        # follows, so it arrives first; if the receiver refuses it, the Handoff is refused
        # too ("KV not received"), and that is where it surfaces. The receiver's ack for
        # the header is dropped when it arrives.
        def post_header() -> None:
            peer = self._peer(address)
            with peer.lock:
                peer.abandoned.abandon((TransferAck, request_id))
            try:
                self._post(address, [encode(header)])
            except TransferError:
                self._forget(address, export_id)  # the receiver may be gone: map afresh
                raise

        if src_ids.size:
            mapping.copier.copy(src, src_ids, dst_ids, then=post_header)
        else:
            post_header()
        return TransferAck(request_id=request_id, ok=True)

    def _stacked(self, kv_caches: Sequence[torch.Tensor]) -> torch.Tensor:
        seen = self._source
        if (
            seen is not None
            and len(seen[0]) == len(kv_caches)
            and all(a is b for a, b in zip(seen[0], kv_caches, strict=True))
        ):
            return seen[1]
        src = stacked_cache(kv_caches)
        self._source = (tuple(kv_caches), src)
        return src

    def _mapped(self, address: str, export_id: str, src: torch.Tensor, deadline: float) -> _Mapping:
        """The receiver's cache as exported under `export_id`, mapped on src's device,
        with its copier. One export request per address at a time; concurrent callers
        reuse its result."""
        with self._state_lock:
            lock = self._map_locks.setdefault(address, threading.Lock())
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TransferError(f"timed out waiting for the KV cache mapping of {address}")
        try:
            return self._map_locked(address, export_id, src, deadline)
        finally:
            lock.release()

    def _map_locked(
        self, address: str, export_id: str, src: torch.Tensor, deadline: float
    ) -> _Mapping:
        with self._state_lock:
            mapping = self._mappings.get(address)
        if (
            mapping is not None
            and mapping.export_id == export_id
            and mapping.cache.device == src.device
        ):
            return mapping
        export = self._fetch_export(address, deadline)
        if export.export_id != export_id:
            raise TransferError(
                f"the receiver at {address} restarted after granting the reservation "
                f"(its cache is export {export.export_id}, the blocks were reserved in "
                f"{export_id}); nothing was written"
            )
        why = export_mismatch(export, src)
        if why is not None:
            raise TransferError(f"cannot write the KV cache of {address}: {why}")
        cache = open_export(export, src.device)
        mapping = _Mapping(export_id, cache, BlockCopier(cache, self.copy_stats))
        with self._state_lock:
            self._mappings[address] = mapping
        log.info("mapped the KV cache of %s (export %s) on %s", address, export_id, src.device)
        return mapping

    def _fetch_export(self, address: str, deadline: float) -> CudaIpcExport:
        token = uuid.uuid4().hex
        remaining = max(0.0, deadline - time.monotonic())
        request = [encode(ExportRequest(request_id=token))]
        reply = cast(ExportReply, self._request(address, request, (ExportReply, token), remaining))
        if not reply.ok or reply.export is None:
            raise TransferError(f"the receiver at {address} exports no KV cache: {reply.reason}")
        return reply.export

    def _forget(self, address: str, export_id: str) -> None:
        with self._state_lock:
            mapping = self._mappings.get(address)
            if mapping is not None and mapping.export_id == export_id:
                del self._mappings[address]

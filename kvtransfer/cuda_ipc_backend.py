"""KV transfer over CUDA IPC: prefill writes decode's reserved blocks directly, GPU to GPU.

How it works
- Decode (CudaIpcKVReceiver): attach_kv_caches() finds the one `KVLayout.cache_shape(
  blocks)` tensor behind the engine's per-layer views and
  exports its storage once as a CUDA IPC handle (torch's `UntypedStorage._share_cuda_`)
  under a random export id, the receiver's incarnation. Control messages travel over
  the zmq backend; on its I/O thread the receiver answers ExportRequest itself, stamps
  its export id on every granted ReserveReply and refuses in_place KVTransfers that
  name another export. The worker only ever sees payload-less in_place transfers.
- Prefill (CudaIpcKVSender): reserve() remembers the export each reservation's block
  ids belong to. send_blocks_many() (send_blocks is the one-request case) maps that
  export on first use (cached per receiver address, replaced when the receiver's
  incarnation changes; the helpers are in cuda_ipc_export), checks its layout against
  the local cache and the block ids against both caches, and hands one copy of every
  request's blocks to the mapping's BlockCopier (cuda_ipc_copy): transfers running at
  once into one cache share a kernel launch over every layer's blocks, ordered after
  the callers' streams (where the prefill forward wrote the KV). The call returns once
  the launch carrying its blocks has finished and the in_place headers have been posted
  one way; a refusal surfaces at the Handoff that follows on the same connection. The
  wait comes first so decode never reads half-written blocks.

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

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import msgspec
import numpy as np
import torch

from tandem.core.protocol import (
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
from tandem.kvtransfer.base import BlockMove, Inbound, TransferError
from tandem.kvtransfer.cuda_ipc_copy import BlockCopier, CopyStats
from tandem.kvtransfer.cuda_ipc_export import (
    export_mismatch,
    open_export,
    share_cache,
    stacked_cache,
)
from tandem.kvtransfer.curve import CurveKeys
from tandem.kvtransfer.pack import check_block_ids, dtype_name
from tandem.kvtransfer.wire import MAX_KV_PAYLOAD_BYTES, RECEIVABLE
from tandem.kvtransfer.zmq_backend import NOT_ADMITTED, ZmqKVReceiver, ZmqKVSender

log = logging.getLogger(__name__)

# Reservations granted but neither sent nor released are forgotten oldest first past
# this (the prefill worker sends no Release after a successful handoff).
_MAX_RESERVATIONS = 65536


class CudaIpcKVReceiver(ZmqKVReceiver):
    in_place = True
    accepts = (*RECEIVABLE, ExportRequest)

    def __init__(
        self,
        bind_address: str = "tcp://127.0.0.1:0",
        *,
        max_header_bytes: int = MAX_CONTROL_FRAME_BYTES,
        max_payload_bytes: int = MAX_KV_PAYLOAD_BYTES,
        curve: CurveKeys | None = None,
    ):
        super().__init__(
            bind_address,
            max_header_bytes=max_header_bytes,
            max_payload_bytes=max_payload_bytes,
            curve=curve,
        )
        self._cache: torch.Tensor | None = None  # held for life: peers map its memory
        self._export: CudaIpcExport | None = None

    @property
    def export_id(self) -> str:
        return self._export.export_id if self._export is not None else ""

    def attach_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        if self._export is not None:
            raise RuntimeError("the KV cache is already attached and exported")
        super().attach_kv_caches(kv_caches)
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
            if self.refuses_peer(inbound.peer):
                reply = ExportReply(request_id=msg.request_id, ok=False, reason=NOT_ADMITTED)
            elif self._export is None:
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
    def __init__(self, identity: str, curve: CurveKeys | None = None):
        super().__init__(identity, curve)
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
        move = BlockMove(request_id, src_block_ids, dst_block_ids)
        result = self.send_blocks_many(address, [move], kv_caches, timeout_s)[0]
        if isinstance(result, TransferError):
            raise result
        return result

    def send_blocks_many(
        self,
        address: str,
        moves: Sequence[BlockMove],
        kv_caches: Sequence[torch.Tensor],
        timeout_s: float,
    ) -> list[TransferAck | TransferError]:
        """Every move's blocks in one copy launch, then their in_place headers, one way.

        A move fails alone for what is its own (no reservation here, invalid reserved
        blocks); a failed mapping, copy or header post fails every move still going.
        """
        deadline = time.monotonic() + timeout_s
        src = self._stacked(kv_caches)
        results: list[TransferAck | TransferError | None] = [None] * len(moves)
        going: list[tuple[int, np.ndarray]] = []  # (move index, source ids)
        export_id = ""
        for i, move in enumerate(moves):
            if len(move.src_block_ids) != len(move.dst_block_ids):
                raise ValueError(
                    f"{move.request_id}: {len(move.src_block_ids)} source blocks "
                    f"for {len(move.dst_block_ids)}"
                )
            src_ids = check_block_ids(move.src_block_ids, src.shape[2])
            with self._state_lock:
                reserved = self._reserved.pop((address, move.request_id), None)
            if reserved is None:
                results[i] = TransferError(
                    f"{move.request_id} was not reserved at {address} through this sender"
                )
            elif not reserved:
                results[i] = TransferError(
                    f"the receiver at {address} exports no KV cache (not a cuda_ipc receiver)"
                )
            elif export_id and reserved != export_id:
                results[i] = TransferError(
                    f"{move.request_id} was reserved in an earlier incarnation of {address}"
                )
            else:
                export_id = reserved
                going.append((i, src_ids))
        if going:
            self._copy_and_post(address, export_id, src, moves, going, results, deadline)
        return [r if r is not None else TransferError("not sent") for r in results]

    def _copy_and_post(
        self,
        address: str,
        export_id: str,
        src: torch.Tensor,
        moves: Sequence[BlockMove],
        going: list[tuple[int, np.ndarray]],
        results: list[TransferAck | TransferError | None],
        deadline: float,
    ) -> None:
        try:
            mapping = self._mapped(address, export_id, src, deadline)
        except TransferError as exc:
            for i, _ in going:
                results[i] = exc
            return
        ready: list[tuple[int, np.ndarray, np.ndarray]] = []
        for i, src_ids in going:
            try:
                dst_ids = check_block_ids(moves[i].dst_block_ids, mapping.cache.shape[2])
            except ValueError as exc:
                results[i] = TransferError(f"reserved blocks from {address} are invalid: {exc}")
                continue
            ready.append((i, src_ids, dst_ids))
        if not ready:
            return
        headers = [encode(KVTransfer(
            request_id=moves[i].request_id,
            block_ids=list(moves[i].dst_block_ids),
            dtype=dtype_name(src.dtype),
            shape=[src.shape[0], 2, len(moves[i].dst_block_ids), *src.shape[3:]],
            in_place=True,
            export_id=export_id,
        )) for i, _, _ in ready]  # fmt: skip

        # Once the bytes are in the receiver's memory the headers go one way: no round
        # trip per transfer. They travel on the same connection as the Handoffs that
        # follow, so they arrive first; if the receiver refuses one, its Handoff is
        # refused too ("KV not received"), and that is where it surfaces. The receiver's
        # acks for the headers are dropped when they arrive.
        def post_headers() -> None:
            peer = self._peer(address)
            with peer.lock:
                for i, _, _ in ready:
                    peer.abandoned.abandon((TransferAck, moves[i].request_id))
            try:
                for header in headers:
                    self._post(address, [header])
            except TransferError:
                self._forget(address, export_id)  # the receiver may be gone: map afresh
                raise

        src_ids = np.concatenate([s for _, s, _ in ready])
        dst_ids = np.concatenate([d for _, _, d in ready])
        try:
            if len(np.unique(dst_ids)) != len(dst_ids):
                raise TransferError(f"reservations at {address} share blocks")
            if src_ids.size:
                mapping.copier.copy(src, src_ids, dst_ids, then=post_headers)
            else:
                post_headers()
        except TransferError as exc:
            for i, _, _ in ready:
                results[i] = exc
            return
        for i, _, _ in ready:
            results[i] = TransferAck(request_id=moves[i].request_id, ok=True)

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

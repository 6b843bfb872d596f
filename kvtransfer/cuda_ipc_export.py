"""CUDA IPC exports of a KV cache: the decode side shares its one stacked cache tensor,
the prefill side maps it on its own GPU after checking that its layout matches.

Messages are msgspec structs (core.protocol.CudaIpcExport); nothing is pickled.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from tandem.core.kv_layout import KV_PLANES
from tandem.core.protocol import CudaIpcExport
from tandem.kvtransfer.base import TransferError
from tandem.kvtransfer.pack import dtype_from_name, dtype_name


def stacked_cache(kv_caches: Sequence[torch.Tensor]) -> torch.Tensor:
    """The one contiguous `KVLayout.cache_shape(blocks)` tensor
    whose per-layer views are `kv_caches`; ValueError unless they are consecutive views
    of one storage (the engine allocates its cache that way: one handle, one launch)."""
    if not kv_caches:
        raise ValueError("no KV cache layers")
    first = kv_caches[0]
    if first.dim() != 5 or first.shape[0] not in KV_PLANES:
        raise ValueError(f"KV cache layer is {tuple(first.shape)}; expected [planes, blocks, ...]")
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
                f"KV cache layer {layer} is not the next slice of one [layers, planes, ...] tensor"
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
    if len(shape) != 6 or shape[1] not in KV_PLANES or any(d < 1 for d in shape):
        return f"receiver's KV cache shape {shape} is not [layers, planes, blocks, bs, heads, dim]"
    # Everything but the number of blocks (dim 2) must match.
    for i, name in enumerate(("layers", "planes", "", "block_size", "kv_heads", "head_dim")):
        if name and shape[i] != local.shape[i]:
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

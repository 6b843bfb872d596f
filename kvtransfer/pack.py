"""Gather / scatter paged KV blocks, KV layout checks and raw tensor frames.

A worker's KV cache is one tensor per layer, `KVLayout.layer_shape(num_blocks)`. A
transfer moves a request's blocks of every layer as one contiguous tensor,
`KVLayout.cache_shape(n)`, so one frame (or one copy) carries it. Nothing here depends
on the layout's kind or dtype: a latent (MLA) or FP8 cache packs the same way.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

from tandem.core.kv_layout import KV_PLANES, KVLayout

# The KV dtypes a transfer may carry. An explicit list (not getattr(torch, name)) so a
# header cannot name an arbitrary torch attribute.
_DTYPES_BY_NAME: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "float8_e4m3fn",
        "float8_e5m2",
        "int8",
        "uint8",
    )
    if hasattr(torch, name)
}
_BYTE_COPIED = frozenset(
    _DTYPES_BY_NAME[name] for name in ("float8_e4m3fn", "float8_e5m2") if name in _DTYPES_BY_NAME
)
_NAMES_BY_DTYPE: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES_BY_NAME.items()}

# What a raw frame arrives as: a zmq frame's memoryview, or bytes from tests and fakes.
BufferLike = Union[bytes, bytearray, memoryview]


class LayoutMismatch(ValueError):
    """Two workers' KV caches cannot exchange blocks."""


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"`, the spelling KVLayout and KVTransfer use."""
    try:
        return _NAMES_BY_DTYPE[dtype]
    except KeyError:
        raise ValueError(f"unsupported KV dtype {dtype}") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES_BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unsupported KV dtype name {name!r}") from None


def layout_of(
    kv_caches: Sequence[torch.Tensor], model: str, block_size: int, kind: str = "kv"
) -> KVLayout:
    """The KVLayout of `kv_caches` (per-layer views); ValueError if they are
    inconsistent. Workers publish KVCache.layout; this describes caches built by hand
    (tests, benchmarks) the same way."""
    if not kv_caches:
        raise ValueError("no KV cache layers")
    first = kv_caches[0]
    _check_cache_shape(first)
    for layer, cache in enumerate(kv_caches):
        if cache.shape != first.shape or cache.dtype != first.dtype:
            raise ValueError(
                f"layer {layer} cache is {tuple(cache.shape)} {cache.dtype}, "
                f"layer 0 is {tuple(first.shape)} {first.dtype}"
            )
    if first.shape[2] != block_size:
        raise ValueError(f"caches hold blocks of {first.shape[2]} tokens, not {block_size}")
    layout = KVLayout(
        model=model,
        dtype=dtype_name(first.dtype),
        block_size=block_size,
        num_layers=len(kv_caches),
        num_kv_heads=first.shape[3],
        head_dim=first.shape[4],
        kind=kind,
    )
    if layout.layer_shape(first.shape[1]) != tuple(first.shape):
        raise ValueError(f"a {kind} cache layer cannot be {tuple(first.shape)}")
    return layout


def check_layout(mine: KVLayout, theirs: KVLayout) -> None:
    reason = mine.mismatch(theirs)
    if reason is not None:
        raise LayoutMismatch(reason)


def packed_shape(kv_caches: Sequence[torch.Tensor], num_blocks: int) -> tuple[int, ...]:
    """`[layers, planes, num_blocks, block_size, heads, dim]` for these caches."""
    planes, _, block_size, heads, dim = kv_caches[0].shape
    return (len(kv_caches), planes, num_blocks, block_size, heads, dim)


def pack_blocks(
    kv_caches: Sequence[torch.Tensor],
    block_ids: Sequence[int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy `block_ids` of every layer, in that order, into one contiguous tensor.

    `out` lets a worker reuse one staging buffer (e.g. pinned host memory) across
    transfers; it must already have the packed shape and the caches' dtype.
    """
    if not kv_caches:
        raise ValueError("no KV cache layers")
    first = kv_caches[0]
    _check_cache_shape(first)
    check_block_ids(block_ids, first.shape[1])
    shape = packed_shape(kv_caches, len(block_ids))
    if out is None:
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
    elif tuple(out.shape) != shape or out.dtype != first.dtype or not out.is_contiguous():
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype}; need contiguous {shape} {first.dtype}"
        )
    index = torch.tensor(list(block_ids), dtype=torch.long, device=first.device)
    target = _copyable(out)
    for layer, cache in enumerate(kv_caches):
        if out.device == cache.device:
            torch.index_select(_copyable(cache), 1, index, out=target[layer])
        else:
            # Staging to another device (GPU cache -> pinned host buffer): gather on the
            # cache's device first, since index_select cannot write across devices.
            target[layer].copy_(_copyable(cache).index_select(1, index), non_blocking=True)
    if out.device.type == "cpu" and first.device.type != "cpu":
        # non_blocking copies into host memory must finish before the bytes are read.
        torch.cuda.current_stream(first.device).synchronize()
    return out


def unpack_blocks(
    kv_caches: Sequence[torch.Tensor],
    block_ids: Sequence[int],
    packed: torch.Tensor,
) -> None:
    """Scatter `packed` (from pack_blocks) into `block_ids` of every layer, in place."""
    if not kv_caches:
        raise ValueError("no KV cache layers")
    first = kv_caches[0]
    _check_cache_shape(first)
    check_block_ids(block_ids, first.shape[1])
    shape = packed_shape(kv_caches, len(block_ids))
    if tuple(packed.shape) != shape:
        raise ValueError(f"packed KV is {tuple(packed.shape)}, caches need {shape}")
    if packed.dtype != first.dtype:
        raise ValueError(f"packed KV is {packed.dtype}, caches are {first.dtype}")
    if not block_ids:
        return
    index = torch.tensor(list(block_ids), dtype=torch.long, device=first.device)
    # One host-to-device copy for all layers rather than one per layer.
    source = _copyable(packed.to(first.device, non_blocking=True))
    for layer, cache in enumerate(kv_caches):
        _copyable(cache).index_copy_(1, index, source[layer])


def _copyable(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or its bytes when torch has no gather / scatter for its dtype (FP8):
    moving blocks only moves bytes, so an FP8 cache packs like any other."""
    if tensor.dtype in _BYTE_COPIED:
        return tensor.view(torch.uint8)
    return tensor


def tensor_to_frame(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is already contiguous.

    Viewed as uint8 because numpy has no bfloat16 / float8; the memoryview keeps the
    tensor's storage alive for as long as the frame is referenced.
    """
    if tensor.device.type != "cpu":
        raise ValueError(f"raw frames come from host memory, got a {tensor.device} tensor")
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_from_frame(buffer: BufferLike, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """A tensor over `buffer`'s bytes, zero-copy when the buffer is writable and aligned.

    ValueError when the dtype is unknown, the shape is invalid or the byte count is not
    exactly prod(shape) * itemsize, so a lying header cannot read past the frame.
    """
    torch_dtype = dtype_from_name(dtype)
    dims = list(shape)
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in dims):
        raise ValueError(f"invalid tensor shape {dims}")
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    expected = math.prod(dims) * itemsize
    view = memoryview(buffer).cast("B")
    if view.nbytes != expected:
        raise ValueError(f"frame holds {view.nbytes} bytes; {dtype} {dims} needs {expected} bytes")
    if expected == 0:
        return torch.empty(dims, dtype=torch_dtype)
    if view.readonly:
        # torch.frombuffer on read-only memory would hand out a writable alias of it.
        raw = torch.from_numpy(np.frombuffer(view, dtype=np.uint8).copy())
    else:
        raw = torch.frombuffer(view, dtype=torch.uint8)
    if raw.data_ptr() % itemsize:
        # Small zmq frames can sit at odd offsets of a receive buffer; typed views of
        # misaligned memory are undefined behaviour on some CPUs.
        raw = raw.clone()
    return raw.view(torch_dtype).reshape(dims)


def _check_cache_shape(cache: torch.Tensor) -> None:
    if cache.dim() != 5 or cache.shape[0] not in KV_PLANES:
        raise ValueError(
            f"KV cache layer is {tuple(cache.shape)}; "
            "expected [planes, num_blocks, block_size, heads, dim] (KVLayout.layer_shape)"
        )


def check_block_ids(block_ids: Sequence[int], num_blocks: int) -> np.ndarray:
    """`block_ids` as an int64 array; ValueError unless they are distinct integers in
    [0, num_blocks).

    Checked on the host: an out-of-range index on a GPU is a device-side assert that
    poisons the whole CUDA context (or, in the cuda_ipc copy kernel, a write past the
    peer's cache), and duplicate destinations make the copy racy.
    """
    ids = np.asarray(block_ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iub"):
        # Rare (floats, objects, nesting, ints past 64 bits): checked one by one, so the
        # error names the first offender.
        ids = np.array(_each_as_int(block_ids, num_blocks), dtype=np.int64)
    if ids.size == 0:
        return np.empty(0, dtype=np.int64)
    outside = (ids < 0) | (ids >= num_blocks)
    if outside.any():
        raise ValueError(f"block id {ids[outside][0]} out of range [0, {num_blocks})")
    ordered = np.sort(ids)
    if (ordered[1:] == ordered[:-1]).any():
        raise ValueError("block ids repeat")
    return ids.astype(np.int64, copy=False)


def _each_as_int(block_ids: Sequence[int], num_blocks: int) -> list[int]:
    ints = []
    for block_id in block_ids:
        try:
            value = operator.index(block_id)
        except TypeError:
            raise ValueError(f"block id {block_id!r} is not an integer") from None
        if not 0 <= value < num_blocks:
            raise ValueError(f"block id {value} out of range [0, {num_blocks})")
        ints.append(value)
    return ints

"""Gather / scatter whole KV blocks of every layer in one launch (KV transfer packing).

Packed layout: [layers, 2, n, block_size, kv_heads, head_dim], contiguous. A cache block
(cache[kv, block_id]) is one contiguous run of block_size * kv_heads * head_dim elements,
so both directions are plain chunked memcpys. Layers are separate allocations; their
base addresses travel in a small int64 table so a single launch covers all of them
(grid: layers x {K,V} x blocks x chunks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

_CHUNK = 4096  # elements per program: 8 KiB of bf16, enough for full-width 16 B accesses

_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
    torch.int8: tl.int8,
    torch.uint8: tl.uint8,
}
# Table of layer base addresses keyed by the addresses themselves: the table depends on
# nothing else, so a hit is always valid. Bounded; a worker uses one or two cache sets.
_ptr_tables: dict[tuple, torch.Tensor] = {}


@triton.jit
def _block_copy_kernel(
    layer_ptrs,
    packed_ptr,
    block_ids_ptr,
    num_blocks_moved,
    plane_stride,  # elements between cache[0] and cache[1]
    block_stride,  # elements between consecutive blocks of a cache plane
    block_numel,
    DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    PACK: tl.constexpr,
):
    pid = tl.program_id(0)  # (layer * 2 + kv) * n + i
    chunk = tl.program_id(1)
    i = pid % num_blocks_moved
    layer_kv = pid // num_blocks_moved
    layer = layer_kv // 2
    kv = layer_kv % 2
    # Addresses from an integer table carry no alignment facts; without these hints
    # every cache access would be a 2-byte load/store instead of 16-byte vectors. The
    # wrapper checks the facts: 16-byte aligned bases, strides multiples of 16 elements.
    base = tl.multiple_of(tl.load(layer_ptrs + layer).to(tl.pointer_type(DTYPE)), 16)
    block = tl.load(block_ids_ptr + i).to(tl.int64)
    start = tl.multiple_of(kv.to(tl.int64) * plane_stride + block * block_stride, 16)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_numel
    cache_ptrs = base + start + offs
    packed_ptrs = packed_ptr + pid.to(tl.int64) * block_numel + offs
    if PACK:
        tl.store(packed_ptrs, tl.load(cache_ptrs, mask=mask), mask=mask)
    else:
        tl.store(cache_ptrs, tl.load(packed_ptrs, mask=mask), mask=mask)


def _layer_table(caches: Sequence[torch.Tensor]) -> torch.Tensor:
    first = caches[0]
    for layer, cache in enumerate(caches):
        if cache.shape != first.shape or cache.dtype != first.dtype or cache.device != first.device:
            raise ValueError(f"layer {layer} cache differs from layer 0 in shape/dtype/device")
        if not cache.is_contiguous():
            raise ValueError(f"layer {layer} cache is not contiguous")
        if cache.data_ptr() % 16:
            raise ValueError(f"layer {layer} cache is not 16-byte aligned")
    if first.dim() != 5 or first.shape[0] != 2:
        raise ValueError(f"cache {tuple(first.shape)} is not [2, blocks, bs, kv_heads, head_dim]")
    if first.dtype not in _DTYPES:
        raise ValueError(f"unsupported cache dtype {first.dtype}")
    if first.stride(1) % 16:  # the kernel's alignment hint (plane stride is a multiple)
        raise ValueError(f"cache blocks of {first.stride(1)} elements; need a multiple of 16")
    key = (first.device, tuple(c.data_ptr() for c in caches))
    table = _ptr_tables.get(key)
    if table is None:
        if len(_ptr_tables) >= 8:
            _ptr_tables.clear()
        table = torch.tensor(key[1], dtype=torch.int64).to(first.device)
        _ptr_tables[key] = table
    return table


def _launch(
    caches: Sequence[torch.Tensor], block_ids: torch.Tensor, packed: torch.Tensor, pack: bool
) -> None:
    first = caches[0]
    n = block_ids.numel()
    block_numel = first[0, 0].numel()
    if n == 0 or block_numel == 0:
        return
    grid = (len(caches) * 2 * n, triton.cdiv(block_numel, _CHUNK))
    _block_copy_kernel[grid](
        _layer_table(caches),
        packed,
        block_ids,
        n,
        first.stride(0),
        first.stride(1),
        block_numel,
        DTYPE=_DTYPES[first.dtype],
        CHUNK=_CHUNK,
        PACK=pack,
        num_warps=4,
    )


def pack_blocks(
    caches: Sequence[torch.Tensor], block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Gather `block_ids` (int tensor on the caches' device) of every layer into a new (or
    `out`) contiguous [L, 2, n, block_size, kv_heads, head_dim] tensor on that device.

    Block ids are not range-checked on the device (that would need a sync); the caller
    (kvtransfer.pack) validates them on the host.
    """
    if not caches:
        raise ValueError("no KV cache layers")
    first = caches[0]
    shape = (len(caches), 2, block_ids.numel(), *first.shape[2:])
    if out is None:
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
    elif tuple(out.shape) != shape or out.dtype != first.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {shape} {first.dtype}")
    if out.device != first.device or block_ids.device != first.device:
        raise ValueError("caches, block_ids and out must share a device")
    _launch(caches, block_ids, out, pack=True)
    return out


def unpack_blocks(
    caches: Sequence[torch.Tensor], block_ids: torch.Tensor, packed: torch.Tensor
) -> None:
    """Scatter `packed` (from pack_blocks) into `block_ids` of every layer, in place.
    Block ids must be unique (duplicates race) and in range; the caller checks on the host."""
    if not caches:
        raise ValueError("no KV cache layers")
    first = caches[0]
    shape = (len(caches), 2, block_ids.numel(), *first.shape[2:])
    if tuple(packed.shape) != shape or packed.dtype != first.dtype:
        raise ValueError(
            f"packed is {tuple(packed.shape)} {packed.dtype}; need {shape} {first.dtype}"
        )
    if packed.device != first.device or block_ids.device != first.device:
        raise ValueError("caches, block_ids and packed must share a device")
    _launch(caches, block_ids, packed.contiguous(), pack=False)


def pack_blocks_ref(caches: Sequence[torch.Tensor], block_ids: torch.Tensor) -> torch.Tensor:
    index = block_ids.long()
    return torch.stack([cache.index_select(1, index) for cache in caches])


def unpack_blocks_ref(
    caches: Sequence[torch.Tensor], block_ids: torch.Tensor, packed: torch.Tensor
) -> None:
    index = block_ids.long()
    for layer, cache in enumerate(caches):
        cache.index_copy_(1, index, packed[layer])

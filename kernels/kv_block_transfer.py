"""Copy KV blocks of every layer from one paged cache into another, in one launch.

Both caches are `KVLayout.cache_shape(num_blocks)`, `[layers, planes, num_blocks,
block_size, heads, dim]` (planes: K and V, or one latent plane); their num_blocks may
differ. Block `src_ids[i]` of every (layer, plane) of `src` lands in block `dst_ids[i]`
of the same plane of `dst`. A block is one contiguous run of block_size * heads * dim
elements, so the copy is a gather/scatter of contiguous runs: program (p, c) copies
chunk c of plane-block p = (layer * planes + plane) * n + i.

This is the cuda_ipc transport's data path: `dst` is another process's cache mapped
through CUDA IPC, on this GPU or a peer one over NVLink, and a whole request (every
layer) moves in a single launch with no staging. It is bandwidth-bound, so what matters
is that every access is a full 16-byte vector (the alignment hints below, checked by the
wrapper) and that there are enough programs in flight: a 2048-token Llama-3.1-8B
request is 8192 plane-blocks of 32 KiB, split into 16 KiB chunks, 16384 programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.core.kv_layout import KV_PLANES
from tandem.kernels._utils import next_pow2

_CHUNK_BYTES = 16384  # per program: 4 vectors of 16 B per thread at 8 warps
_VECTOR_BYTES = 16


@triton.jit
def _kv_block_transfer_kernel(
    src_ptr,
    dst_ptr,
    ids_ptr,  # [2, n] int32: source block ids, then destination block ids
    n,
    src_layer_stride,
    src_kv_stride,
    src_block_stride,
    dst_layer_stride,
    dst_kv_stride,
    dst_block_stride,
    block_numel,
    CHUNK: tl.constexpr,
    VEC: tl.constexpr,  # elements per 16-byte vector that every block start is aligned to
    EVEN: tl.constexpr,  # block_numel is a multiple of CHUNK: no mask
    PLANES: tl.constexpr,  # 2: K and V; 1: a latent cache
):
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    i = pid % n
    layer_kv = pid // n
    layer = (layer_kv // PLANES).to(tl.int64)
    kv = (layer_kv % PLANES).to(tl.int64)
    src_block = tl.load(ids_ptr + i).to(tl.int64)
    dst_block = tl.load(ids_ptr + n + i).to(tl.int64)
    # Offsets built from loaded ids carry no alignment facts; without these hints every
    # access would be scalar. The wrapper guarantees them (base and strides aligned).
    src_start = tl.multiple_of(
        layer * src_layer_stride + kv * src_kv_stride + src_block * src_block_stride, VEC
    )
    dst_start = tl.multiple_of(
        layer * dst_layer_stride + kv * dst_kv_stride + dst_block * dst_block_stride, VEC
    )
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    if EVEN:
        tl.store(dst_ptr + dst_start + offs, tl.load(src_ptr + src_start + offs))
    else:
        mask = offs < block_numel
        values = tl.load(src_ptr + src_start + offs, mask=mask)
        tl.store(dst_ptr + dst_start + offs, values, mask=mask)


def _check_cache(name: str, cache: torch.Tensor) -> None:
    if cache.dim() != 6 or cache.shape[1] not in KV_PLANES:
        raise ValueError(
            f"{name} is {tuple(cache.shape)}; need KVLayout.cache_shape: [layers, planes, "
            "blocks, block_size, heads, dim]"
        )
    _, _, _, block_size, heads, dim = cache.shape
    if cache.stride()[3:] != (heads * dim, dim, 1):
        raise ValueError(f"{name} blocks are not contiguous (strides {cache.stride()})")


def _vector_elements(itemsize: int, tensors: tuple[torch.Tensor, ...]) -> int:
    """The widest vector (in elements, at most 16 bytes) that every block start of every
    tensor is aligned to: base addresses and the layer / K-V / block strides."""
    vec = max(1, _VECTOR_BYTES // itemsize)
    while vec > 1:
        aligned = all(
            t.data_ptr() % (vec * itemsize) == 0 and all(s % vec == 0 for s in t.stride()[:3])
            for t in tensors
        )
        if aligned:
            break
        vec //= 2
    return vec


def kv_block_transfer(src: torch.Tensor, dst: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Copy `src[:, :, block_ids[0]]` into `dst[:, :, block_ids[1]]` on the current stream.

    `block_ids` is one contiguous `[2, n]` int32 tensor on the caches' device (source
    row, destination row), so a caller moves both lists to the device in one copy. Ids
    are not range-checked on the device (that would need a sync), and repeated
    destination ids race: the caller validates both on the host.
    """
    _check_cache("src", src)
    _check_cache("dst", dst)
    if src.shape[:2] != dst.shape[:2] or src.shape[3:] != dst.shape[3:]:
        raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} differ beyond blocks")
    if src.dtype != dst.dtype:
        raise ValueError(f"src is {src.dtype}, dst is {dst.dtype}")
    if src.device != dst.device or block_ids.device != src.device:
        raise ValueError("src, dst and block_ids must be on one device (map dst onto src's)")
    if (
        block_ids.dim() != 2
        or block_ids.shape[0] != 2
        or block_ids.dtype != torch.int32
        or not block_ids.is_contiguous()
    ):
        raise ValueError(f"block_ids must be contiguous [2, n] int32, got {tuple(block_ids.shape)}")
    n = block_ids.shape[1]
    layers = src.shape[0]
    block_numel = src[0, 0, 0].numel()
    if n == 0 or block_numel == 0 or layers == 0:
        return
    itemsize = src.element_size()
    chunk = min(next_pow2(block_numel), max(1, _CHUNK_BYTES // itemsize))
    # One warp moves 32 full vectors per access; more warps than the chunk fills would idle.
    num_warps = max(1, min(8, chunk * itemsize // (32 * _VECTOR_BYTES)))
    planes = src.shape[1]
    grid = (layers * planes * n, triton.cdiv(block_numel, chunk))
    _kv_block_transfer_kernel[grid](
        src,
        dst,
        block_ids,
        n,
        src.stride(0),
        src.stride(1),
        src.stride(2),
        dst.stride(0),
        dst.stride(1),
        dst.stride(2),
        block_numel,
        CHUNK=chunk,
        VEC=_vector_elements(itemsize, (src, dst)),
        EVEN=block_numel % chunk == 0,
        PLANES=planes,
        num_warps=num_warps,
    )


def kv_block_transfer_ref(src: torch.Tensor, dst: torch.Tensor, block_ids: torch.Tensor) -> None:
    dst.index_copy_(2, block_ids[1].long(), src.index_select(2, block_ids[0].long()))

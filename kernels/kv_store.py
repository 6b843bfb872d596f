"""Scatter a step's new K/V into the paged cache (`store_kv`).

Cache layout per layer: [2, num_blocks, block_size, num_kv_heads, head_dim], slot =
block_id * block_size + offset. One program per token writes all of its heads for K and
V, so each program moves two contiguous-ish [kv_heads, head_dim] rows. Padding tokens
(slot < 0, e.g. CUDA-graph batch padding) are skipped, never written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels._utils import last_dim_contiguous, next_pow2


@triton.jit
def _store_kv_kernel(
    cache_ptr,
    key_ptr,
    value_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_c01,  # cache[1] - cache[0] offset (K -> V plane)
    stride_cb,
    stride_cs,
    stride_ch,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < num_kv_heads)[:, None]
    src_k = key_ptr + token.to(tl.int64) * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    src_v = value_ptr + token.to(tl.int64) * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    dst = (
        cache_ptr
        + block * stride_cb
        + offset * stride_cs
        + heads[:, None] * stride_ch
        + dims[None, :]
    )
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    # Explicit cast: new K/V may arrive in a wider dtype than the cache (fp32 -> bf16).
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_c01, v.to(cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write key/value [tokens, kv_heads, head_dim] into `cache` at `slot_mapping` (in place).

    Slots < 0 are skipped. Slots must be unique among non-negative entries (the engine's
    block manager guarantees it); duplicates would race.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if (
        cache.dim() != 5
        or cache.shape[0] != 2
        or tuple(cache.shape[3:]) != (num_kv_heads, head_dim)
    ):
        raise ValueError(f"cache {tuple(cache.shape)} does not match key {tuple(key.shape)}")
    if value.shape != key.shape or slot_mapping.shape != (num_tokens,):
        raise ValueError("key, value and slot_mapping disagree on the token count")
    if cache.stride(-1) != 1:
        raise ValueError("cache head_dim must be contiguous")
    if num_tokens == 0:
        return
    key, value = last_dim_contiguous(key), last_dim_contiguous(value)
    _store_kv_kernel[(num_tokens,)](
        cache,
        key,
        value,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        cache.stride(0),
        cache.stride(1),
        cache.stride(2),
        cache.stride(3),
        num_kv_heads,
        BLOCK_SIZE=cache.shape[2],
        HEAD_DIM=head_dim,
        BLOCK_H=next_pow2(num_kv_heads),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )


def store_kv_ref(
    cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Pure-torch store_kv: the same scatter, skipping negative slots."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    flat = cache.view(2, -1, cache.shape[-2], cache.shape[-1])
    flat[0].index_copy_(0, slots, key[keep].to(cache.dtype))
    flat[1].index_copy_(0, slots, value[keep].to(cache.dtype))

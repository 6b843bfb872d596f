"""Rotary embedding fused with the KV store: one launch per layer instead of two.

Per token (one program each): load the cos/sin row of its position once, rotate every q
head in place, rotate every k head and write it straight into the paged cache slot
together with v. Rotated k never goes back to the QKV buffer: attention reads keys from
the cache only. Same math as kernels/rotary.py (float32, one rounding) and the same
cache layout and padding rule (slot < 0: nothing written) as store_kv_ref below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels._utils import next_pow2
from tandem.kernels.rotary import apply_rotary_ref


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    slot_ptr,
    table_ptr,
    cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_table,
    stride_c01,
    stride_cb,
    stride_cs,
    stride_ch,
    num_heads,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF)
    cos = tl.load(table_ptr + pos * stride_table + dims)[None, :]
    sin = tl.load(table_ptr + pos * stride_table + HALF + dims)[None, :]

    heads = tl.arange(0, BLOCK_HQ)
    mask = (heads < num_heads)[:, None]
    pq = q_ptr + token * stride_qt + heads[:, None] * stride_qh + dims[None, :]
    q1 = tl.load(pq, mask=mask).to(tl.float32)
    q2 = tl.load(pq + HALF, mask=mask).to(tl.float32)
    tl.store(pq, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(pq + HALF, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty), mask=mask)

    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    kv_heads = tl.arange(0, BLOCK_HK)
    kv_mask = (kv_heads < num_kv_heads)[:, None]
    pk = k_ptr + token * stride_kt + kv_heads[:, None] * stride_kh + dims[None, :]
    k1 = tl.load(pk, mask=kv_mask).to(tl.float32)
    k2 = tl.load(pk + HALF, mask=kv_mask).to(tl.float32)
    # Round to k's dtype first, as the unfused path does, then to the cache's.
    k1r = (k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty).to(cache_ptr.dtype.element_ty)
    k2r = (k2 * cos + k1 * sin).to(k_ptr.dtype.element_ty).to(cache_ptr.dtype.element_ty)
    dst = (
        cache_ptr
        + (slot // BLOCK_SIZE) * stride_cb
        + (slot % BLOCK_SIZE) * stride_cs
        + kv_heads[:, None] * stride_ch
        + dims[None, :]
    )
    tl.store(dst, k1r, mask=kv_mask)
    tl.store(dst + HALF, k2r, mask=kv_mask)
    pv = v_ptr + token * stride_vt + kv_heads[:, None] * stride_vh + dims[None, :]
    v1 = tl.load(pv, mask=kv_mask)
    v2 = tl.load(pv + HALF, mask=kv_mask)
    tl.store(dst + stride_c01, v1.to(cache_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dst + stride_c01 + HALF, v2.to(cache_ptr.dtype.element_ty), mask=kv_mask)


def check_rotary_store_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """ValueError unless q [T, H, D], k and v [T, KVH, D], one position and slot per
    token, a float32 [max_pos, D] table and a [2, blocks, block_size, KVH, D] cache, all
    with a contiguous last dim (the kernels that rotate and store read them so)."""
    num_tokens, _, head_dim = q.shape
    if cache.dim() != 5 or cache.shape[0] != 2 or cache.shape[4] != head_dim:
        raise ValueError("cache must be [2, blocks, block_size, kv_heads, head_dim]")
    kv_shape = (num_tokens, cache.shape[3], head_dim)
    if tuple(k.shape) != kv_shape or tuple(v.shape) != kv_shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be {kv_shape}")
    if positions.shape != (num_tokens,) or slot_mapping.shape != (num_tokens,):
        raise ValueError("positions and slot_mapping need one entry per token")
    if cos_sin_cache.shape[1] != head_dim or cos_sin_cache.dtype != torch.float32:
        raise ValueError("cos_sin_cache must be float32 [max_pos, head_dim]")
    if any(t.stride(-1) != 1 for t in (q, k, v, cos_sin_cache, cache)):
        raise ValueError("q, k, v, cos_sin_cache and cache need a contiguous last dim")


def rotary_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Rotate q [T, H, D] in place; write rotated k and v [T, KVH, D] into `cache`
    [2, blocks, block_size, KVH, D] at `slot_mapping` (slots < 0 skipped). Returns q.

    k is only read. q/k/v may be strided views of a fused QKV output (contiguous
    head_dim). Positions must be < cos_sin_cache.shape[0] (not checked on device).
    """
    check_rotary_store_args(q, k, v, positions, cos_sin_cache, cache, slot_mapping)
    num_tokens, num_heads, head_dim = q.shape
    kv_shape = (num_tokens, cache.shape[3], head_dim)
    if num_tokens == 0:
        return q
    _rotary_store_kv_kernel[(num_tokens,)](
        q,
        k,
        v,
        positions,
        slot_mapping,
        cos_sin_cache,
        cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos_sin_cache.stride(0),
        cache.stride(0),
        cache.stride(1),
        cache.stride(2),
        cache.stride(3),
        num_heads,
        kv_shape[1],
        BLOCK_SIZE=cache.shape[2],
        HALF=head_dim // 2,
        BLOCK_HQ=next_pow2(num_heads),
        BLOCK_HK=next_pow2(kv_shape[1]),
        num_warps=4 if num_heads * head_dim >= 2048 else 2,
    )
    return q


def rotary_store_kv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Pure torch: returns the rotated q as a NEW tensor; writes `cache` in place."""
    q_rot, k_rot = apply_rotary_ref(q, k, positions, cos_sin_cache)
    store_kv_ref(cache, k_rot, v, slot_mapping)
    return q_rot


def store_kv_ref(
    cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Pure-torch store_kv: the same scatter, skipping negative slots."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    flat = cache.view(2, -1, cache.shape[-2], cache.shape[-1])
    flat[0].index_copy_(0, slots, key[keep].to(cache.dtype))
    flat[1].index_copy_(0, slots, value[keep].to(cache.dtype))

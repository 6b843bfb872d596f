"""Decode attention with the rotary embedding and the KV store folded in: one launch per
layer (plus the split-KV reduce) instead of a rotary/store kernel and then attention.

At batch 1 a decode layer's non-matmul kernels are latency-bound, each a few
microseconds plus a launch gap; the rotary/store kernel was one of six per layer.
Here every program (sequence, head block, split) rotates its own q heads (rotation is
per head, so no program needs another's), and the split holding the newest position
(context_len - 1, the token being decoded) also rotates that token's k, adds the token
to its softmax straight from registers, and stores k and v in the cache for later
steps. The cache tiles it reads stop before that slot, so no program reads a slot that
this launch writes. Numerics follow rotary_store_kv + paged_decode_attention: rotated q
and k rounded to their dtype, then to the cache's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels._utils import check_out, check_paged_attention_args, dot_config
from tandem.kernels.decode_attention import (
    _LOG2E,
    SplitPlan,
    attend_cached,
    decode_block_n,
    paged_decode_attention_ref,
    store_split,
)
from tandem.kernels.rotary_store_kv import check_rotary_store_args, rotary_store_kv_ref


# fmt: off
@triton.jit
def _rotary_decode_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, table_ptr, cache_ptr, block_tables_ptr,
    context_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    scale_log2,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_table,
    stride_c01, stride_cb, stride_cs, stride_ch, stride_bt, stride_ob, stride_oh,
    num_heads, num_splits,
    GROUP: tl.constexpr, HEADS_PER_PROG: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # fmt: on
    seq = tl.program_id(0).to(tl.int64)
    head0 = tl.program_id(1) * HEADS_PER_PROG
    split = tl.program_id(2)
    kv_head = head0 // GROUP
    ctx = tl.load(context_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)
    newest = ctx - 1  # the token being decoded: from registers, not from the cache
    HALF: tl.constexpr = HEAD_DIM // 2
    cdt = cache_ptr.dtype.element_ty

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    g_mask = g < HEADS_PER_PROG
    # x * cos + rotate_half(x) * sin, per dim: the partner of dim i is dim i +- HALF.
    partner = (d + HALF) % HEAD_DIM
    sign = tl.where(d < HALF, -1.0, 1.0)
    pos_table = table_ptr + tl.load(pos_ptr + seq).to(tl.int64) * stride_table
    cos = tl.load(pos_table + d % HALF)
    sin = tl.load(pos_table + HALF + d % HALF) * sign
    q_rows = q_ptr + seq * stride_qb + (head0 + g)[:, None] * stride_qh
    q_x = tl.load(q_rows + d[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
    q_p = tl.load(q_rows + partner[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
    q = (q_x * cos[None, :] + q_p * sin[None, :]).to(q_ptr.dtype.element_ty).to(cdt)

    kv_base = cache_ptr + kv_head.to(tl.int64) * stride_ch
    acc, m_i, l_i = attend_cached(
        q, block_tables_ptr + seq * stride_bt, kv_base, start, tl.minimum(end, newest),
        scale_log2, stride_c01, stride_cb, stride_cs,
        BLOCK_G, HEAD_DIM, BLOCK_SIZE, BLOCK_N, PREC, UPCAST,
    )  # fmt: skip
    if (newest >= start) & (newest < end):
        k_row = k_ptr + seq * stride_kb + kv_head * stride_kh
        k_new = tl.load(k_row + d).to(tl.float32) * cos + tl.load(k_row + partner).to(
            tl.float32) * sin
        k_new = k_new.to(k_ptr.dtype.element_ty).to(cdt)
        v_new = tl.load(v_ptr + seq * stride_vb + kv_head * stride_vh + d).to(cdt)
        qk_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale_log2
        m_new = tl.maximum(m_i, qk_new)
        alpha = tl.exp2(m_i - m_new)
        p_new = tl.exp2(qk_new - m_new)
        l_i = l_i * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        if (slot >= 0) & (head0 % GROUP == 0):  # one program per kv head stores it
            dst = (cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
                   + kv_head.to(tl.int64) * stride_ch + d)
            tl.store(dst, k_new)
            tl.store(dst + stride_c01, v_new)

    store_split(
        acc, m_i, l_i, seq, head0, split, out_ptr, part_acc_ptr, part_ml_ptr,
        stride_ob, stride_oh, num_heads, num_splits, HEADS_PER_PROG, BLOCK_G, HEAD_DIM, DIRECT,
    )  # fmt: skip


def rotary_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    slot_mapping: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode token per sequence: q [B, H, D], k and v [B, KVH, D] not yet rotated
    or stored (strided views of a QKV output are fine). Rotates q and k by `positions`,
    writes k and v into `cache` [2, blocks, block_size, KVH, D] at `slot_mapping` (< 0:
    not written), attends over the context_lens[b] tokens whose last is this one, and
    returns out [B, H, D]. q, k and v are only read."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = check_paged_attention_args(q, cache, block_tables)
    check_rotary_store_args(q, k, v, positions, cos_sin_cache, cache, slot_mapping)
    out = check_out(out, q)
    if batch == 0:
        return out
    plan = SplitPlan.for_launch(q, out, num_kv_heads, block_tables.shape[1] * block_size,
                                num_splits)
    prec, upcast = dot_config(cache.dtype)
    # fmt: off
    _rotary_decode_kernel[(batch, plan.head_blocks, plan.splits)](
        q, k, v, positions, slot_mapping, cos_sin_cache, cache, block_tables, context_lens,
        out, plan.part_acc, plan.part_ml,
        scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0),
        cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        num_heads, plan.splits,
        GROUP=plan.group, HEADS_PER_PROG=plan.hpp, BLOCK_G=16, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=decode_block_n(head_dim, cache.element_size()),
        DIRECT=plan.direct, PREC=prec, UPCAST=upcast, num_warps=4, num_stages=2,
    )
    # fmt: on
    plan.merge(out)
    return out


def rotary_decode_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    slot_mapping: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Pure torch: rotate and store (rotary_store_kv_ref), then attend."""
    q_rot = rotary_store_kv_ref(q, k, v, positions, cos_sin_cache, cache, slot_mapping)
    return paged_decode_attention_ref(q_rot, cache, block_tables, context_lens, scale)

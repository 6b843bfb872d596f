"""Paged decode attention (one query token per sequence), split-KV / flash-decoding.

Grid: (sequence, head block, split). A head block is up to 16 query heads that share
one KV head (GQA), so every K/V tile is loaded once for the whole group and the
q.K^T / P.V products are real [16 x D] tensor-core dots. A split covers a slice of the
context; with num_splits > 1 each program writes an unnormalized partial (acc, max,
sum) to a float32 scratch buffer and a second kernel merges the splits. num_splits == 1
normalizes and writes the output directly (no scratch, one launch).

Tiles are BLOCK_N tokens regardless of the cache block size: each row looks up its own
block id, so small blocks (16) don't shrink the tiles. Softmax runs in base 2 (exp2)
with scale * log2(e) folded into the logits; all softmax state is float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem.kernels._utils import (
    check_out,
    check_paged_attention_args,
    dot,
    dot_config,
    last_dim_contiguous,
    next_pow2,
    num_sms,
)

MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost outweighs the parallelism
MAX_SPLITS = 64
_LOG2E = 1.4426950408889634


# fmt: off
@triton.jit
def _decode_split_kernel(
    q_ptr, cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    scale_log2,
    stride_qb, stride_qh, stride_c01, stride_cb, stride_cs, stride_ch, stride_bt, stride_ob,
    stride_oh,
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
    # Splits are whole tiles so only the context's last tile needs a mask.
    split_len = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    g_mask = g < HEADS_PER_PROG
    q_ptrs = q_ptr + seq * stride_qb + (head0 + g)[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None], other=0.0).to(cache_ptr.dtype.element_ty)

    acc, m_i, l_i = attend_cached(
        q, block_tables_ptr + seq * stride_bt, cache_ptr + kv_head.to(tl.int64) * stride_ch,
        start, end, scale_log2, stride_c01, stride_cb, stride_cs,
        BLOCK_G, HEAD_DIM, BLOCK_SIZE, BLOCK_N, PREC, UPCAST,
    )  # fmt: skip
    store_split(
        acc, m_i, l_i, seq, head0, split, out_ptr, part_acc_ptr, part_ml_ptr,
        stride_ob, stride_oh, num_heads, num_splits, HEADS_PER_PROG, BLOCK_G, HEAD_DIM, DIRECT,
    )  # fmt: skip


# Online softmax of q [BLOCK_G, HEAD_DIM] over one kv head's cached keys start..end
# (its block table row `table`, its cache base `kv_base`), BLOCK_N keys a tile: (acc, m,
# l), unnormalised, for one split or a whole context. Shared by the decode kernels.
# fmt: off
@triton.jit
def attend_cached(
    q, table, kv_base, start, end, scale_log2, stride_c01, stride_cb, stride_cs,
    BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # fmt: on
    d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        block = tl.load(table + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        k_ptrs = kv_base + (block * stride_cb + (n % BLOCK_SIZE) * stride_cs)[:, None] + d[None, :]
        k = tl.load(k_ptrs, mask=n_mask[:, None], other=0.0)
        qk = dot(q, tl.trans(k), PREC, UPCAST) * scale_log2
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        # Every tile holds >= 1 unmasked token, so m_new is finite and alpha well defined.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(k_ptrs + stride_c01, mask=n_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    return acc, m_i, l_i


# A split's result: normalised straight into `out` when it is the only split, else its
# partials (acc, m, l) for the merge pass. Shared by the decode kernels.
# fmt: off
@triton.jit
def store_split(
    acc, m_i, l_i, seq, head0, split, out_ptr, part_acc_ptr, part_ml_ptr,
    stride_ob, stride_oh, num_heads, num_splits,
    HEADS_PER_PROG: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIRECT: tl.constexpr,
):
    # fmt: on
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    g_mask = g < HEADS_PER_PROG
    heads = head0 + g
    if DIRECT:
        # An empty context (batch padding) yields zeros, not NaN.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        row = (seq * num_heads + heads) * num_splits + split
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=g_mask[:, None])
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)


# fmt: off
@triton.jit
def _decode_reduce_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, stride_ob, stride_oh, num_heads, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # fmt: on
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    s_mask = s < num_splits
    row = (seq * num_heads + head) * num_splits + s
    m = tl.load(part_ml_ptr + row * 2, mask=s_mask, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + row * 2 + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all splits empty
    w = tl.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
    l_tot = tl.sum(l_s * w, 0)
    acc = tl.load(
        part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None], other=0.0
    )
    out = tl.sum(acc * w[:, None], 0) / tl.where(l_tot > 0, l_tot, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def heads_per_program(group: int) -> int:
    """Largest divisor of the GQA group that is <= 16: one tensor-core tile of heads."""
    return max(h for h in range(1, min(group, 16) + 1) if group % h == 0)


def decode_block_n(head_dim: int, itemsize: int) -> int:
    """KV tokens per tile: the largest that compiles for sm_90 without register spills
    (tests/kernels/sm90_compile.py prints the usage); fp32 dots run on FMA units."""
    block_n = 64 if head_dim <= 128 else 32
    return block_n // 2 if itemsize >= 4 else block_n


def decode_num_splits(
    batch: int,
    head_blocks: int,
    max_context: int,
    device: torch.device,
    min_tokens_per_split: int = MIN_TOKENS_PER_SPLIT,
) -> int:
    """Splits so that (batch x head blocks x splits) covers ~2 waves of the GPU's SMs,
    without slicing contexts thinner than `min_tokens_per_split`. Depends only on shapes
    (never on device values), so it is stable under CUDA-graph capture."""
    wanted = math.ceil(2 * num_sms(device) / max(1, batch * head_blocks))
    useful = math.ceil(max_context / min_tokens_per_split)
    return max(1, min(wanted, useful, MAX_SPLITS))


@dataclass(frozen=True)
class SplitPlan:
    """How a decode launch over q [B, H, D] is cut: heads per program (one GQA tile),
    head blocks, KV splits, and the float32 partials the splits write (placeholders when
    one split normalizes straight into `out`). Shared by every split-KV decode kernel."""

    group: int
    hpp: int
    head_blocks: int
    splits: int
    part_acc: torch.Tensor
    part_ml: torch.Tensor

    @property
    def direct(self) -> bool:
        return self.splits == 1

    @classmethod
    def for_launch(cls, q: torch.Tensor, out: torch.Tensor, num_kv_heads: int,
                   max_context: int, num_splits: int | None) -> SplitPlan:
        batch, num_heads, head_dim = q.shape
        group = num_heads // num_kv_heads
        hpp = heads_per_program(group)
        head_blocks = num_heads // hpp
        if num_splits is None:
            num_splits = decode_num_splits(batch, head_blocks, max_context, q.device)
        if num_splits == 1:
            return cls(group, hpp, head_blocks, 1, out, out)  # unused placeholders
        part_acc = torch.empty(
            (batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_ml = torch.empty(
            (batch, num_heads, num_splits, 2), dtype=torch.float32, device=q.device
        )
        return cls(group, hpp, head_blocks, num_splits, part_acc, part_ml)

    def merge(self, out: torch.Tensor) -> None:
        """The second pass: merge the splits' partials into `out` (nothing when direct)."""
        if not self.direct:
            merge_splits(self.part_acc, self.part_ml, out)


def merge_splits(
    part_acc: torch.Tensor, part_ml: torch.Tensor, out: torch.Tensor, block_s: int = 0
) -> None:
    """Merge float32 partials part_acc [rows, H, splits, D] and part_ml [rows, H, splits,
    2] (max and sum of each split's online softmax) into out [rows, H, D]. block_s: the
    splits one program loads (0: the next power of two; one fixed value is one compiled
    variant for any split count up to it)."""
    rows, num_heads, splits, head_dim = part_acc.shape
    _decode_reduce_kernel[(rows, num_heads)](
        part_acc, part_ml, out, out.stride(0), out.stride(1), num_heads,
        splits, HEAD_DIM=head_dim, BLOCK_S=block_s or next_pow2(splits), num_warps=4,
    )  # fmt: skip


def paged_decode_attention(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, H, D] (one token per sequence, already in the cache) -> out [B, H, D] in q.dtype.

    block_tables [B, max_blocks] int32, context_lens [B] int32 (0 gives zeros).
    num_splits None picks decode_num_splits() from B, heads and max_blocks * block_size.
    `out` (like q, head_dim contiguous) lets a CUDA graph keep a static output buffer.
    """
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = check_paged_attention_args(q, cache, block_tables)
    q = last_dim_contiguous(q)
    out = check_out(out, q)
    if batch == 0:
        return out
    plan = SplitPlan.for_launch(q, out, num_kv_heads, block_tables.shape[1] * block_size,
                                num_splits)
    prec, upcast = dot_config(cache.dtype)
    # fmt: off
    _decode_split_kernel[(batch, plan.head_blocks, plan.splits)](
        q, cache, block_tables, context_lens, out, plan.part_acc, plan.part_ml,
        scale * _LOG2E,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), cache.stride(2),
        cache.stride(3), block_tables.stride(0), out.stride(0), out.stride(1),
        num_heads, plan.splits,
        GROUP=plan.group, HEADS_PER_PROG=plan.hpp, BLOCK_G=16, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=decode_block_n(head_dim, cache.element_size()),
        DIRECT=plan.direct, PREC=prec, UPCAST=upcast, num_warps=4, num_stages=2,
    )
    # fmt: on
    plan.merge(out)
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Pure-torch decode attention in float32 (num_splits is accepted and ignored)."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = cache.shape[2], cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    for b in range(batch):
        ctx = int(context_lens[b])
        if ctx == 0:
            continue
        blocks = block_tables[b, : (ctx + block_size - 1) // block_size].long()
        k = cache[0, blocks].flatten(0, 1)[:ctx].float()  # [ctx, kvh, d]
        v = cache[1, blocks].flatten(0, 1)[:ctx].float()
        k = k.repeat_interleave(group, dim=1)  # [ctx, h, d]
        v = v.repeat_interleave(group, dim=1)
        logits = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", logits.softmax(-1), v).to(q.dtype)
    return out

"""Paged prefill attention: variable-length causal chunks over the paged KV cache.

Serves first prefills, chunked prefill and recompute alike: sequence s has q_len new
query tokens at the end of a context of ctx tokens (new K/V already stored), so query
j sits at position ctx - q_len + j and sees keys 0..that position.

Grid: (query block, query head, sequence x split), flash-attention tiling. Keys before
the block's first query position need no causal mask, so the KV loop runs in two
phases: unmasked full tiles, then the few diagonal tiles with the mask. Query blocks run
latest-first because they have the most keys (less tail imbalance). Each KV row looks
up its block id, so BLOCK_N is independent of the cache block size.

A short chunk after a long cached prefix (what prefix caching leaves to compute) has
few query blocks, and each walks the whole context: 100 tokens of a 32-head model were
32 programs on an H100's 132 SMs. Such a launch splits the unmasked tiles among a few
programs per query block, as flash-decoding does (prefill_plan); each writes an
unnormalised partial and decode_attention's merge pass combines them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels._utils import (
    DEFAULT_NUM_SMS,
    check_out,
    check_paged_attention_args,
    dot,
    dot_config,
    last_dim_contiguous,
    next_pow2,
    num_sms,
)
from tandem.kernels.decode_attention import merge_splits

_LOG2E = 1.4426950408889634
MIN_SPLIT_TOKENS = 512  # a split's KV share: below this its fixed cost outweighs it
MAX_PREFILL_SPLITS = 8  # also the merge pass's one compiled width


# fmt: off
@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, kv_base, table, n0, q_pos, kv_end, scale_log2,
    stride_c01, stride_cb, stride_cs,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # fmt: on
    n = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    if MASKED:
        n_ok = n < kv_end
        block = tl.load(table + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    else:
        block = tl.load(table + n // BLOCK_SIZE).to(tl.int64)
    k_ptrs = kv_base + (block * stride_cb + (n % BLOCK_SIZE) * stride_cs)[:, None] + d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
        v = tl.load(k_ptrs + stride_c01, mask=n_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(k_ptrs + stride_c01)
    qk = dot(q, tl.trans(k), PREC, UPCAST) * scale_log2
    if MASKED:
        visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PREC, UPCAST)
    return acc, m_new, l_i


# fmt: off
@triton.jit(do_not_specialize=["num_q_blocks", "first_seq", "num_splits", "first_row"])
def _prefill_kernel(
    q_ptr, cache_ptr, block_tables_ptr, query_start_loc_ptr, context_lens_ptr, out_ptr,
    part_acc_ptr, part_ml_ptr, scale_log2,
    stride_qt, stride_qh, stride_c01, stride_cb, stride_cs, stride_ch, stride_bt, stride_ot,
    stride_oh,
    num_q_blocks, first_seq, num_heads, num_splits, first_row,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    DIRECT: tl.constexpr,
):
    # fmt: on
    q_block = num_q_blocks - 1 - tl.program_id(0)
    head = tl.program_id(1)
    seq = first_seq + (tl.program_id(2) // num_splits).to(tl.int64)
    split = tl.program_id(2) % num_splits
    # Token counts and positions stay int32 (loop bounds); pointer math widens to int64.
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_block * BLOCK_M >= q_len:
        return  # grid is sized by the longest chunk; shorter ones have fewer blocks
    ctx = tl.load(context_lens_ptr + seq)
    first_pos = ctx - q_len + q_block * BLOCK_M  # absolute position of the block's row 0

    m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < q_len
    d = tl.arange(0, HEAD_DIM)
    rows = (q_start + m).to(tl.int64)
    q_ptrs = q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None], other=0.0).to(cache_ptr.dtype.element_ty)
    q_pos = first_pos + tl.arange(0, BLOCK_M)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    kv_base = cache_ptr + (head // GROUP).to(tl.int64) * stride_ch
    kv_end = tl.minimum(ctx, first_pos + BLOCK_M)
    # Tiles wholly at or before first_pos are visible to every row: no mask at all. A
    # split takes its share of them, whole tiles; the last split the diagonal ones too.
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    share = tl.cdiv(full_end // BLOCK_N, num_splits) * BLOCK_N
    for n0 in range(split * share, tl.minimum((split + 1) * share, full_end), BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, kv_base, table, n0, q_pos, kv_end, scale_log2,
            stride_c01, stride_cb, stride_cs, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, PREC, UPCAST,
        )  # fmt: skip
    # Diagonal tiles; the first one holds key full_end <= first_pos, so no row is all -inf.
    if split == num_splits - 1:
        for n0 in range(full_end, kv_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, kv_base, table, n0, q_pos, kv_end, scale_log2,
                stride_c01, stride_cb, stride_cs, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, PREC,
                UPCAST,
            )  # fmt: skip
    if DIRECT:
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])
    else:  # decode_attention's partials layout, rows counted from first_row
        part = ((rows - first_row) * num_heads + head) * num_splits + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=m_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=m_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=m_ok)


def prefill_tiles(max_query_len: int, head_dim: int, itemsize: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): big query tiles for long chunks, small ones so a
    short chunk (or a decode token in a mixed batch) doesn't compute 128 padded rows.
    Sizes are the largest that compile for sm_90 without register spills
    (tests/kernels/sm90_compile.py prints the usage)."""
    block_m = max(16, min(128, next_pow2(max_query_len)))
    if itemsize >= 4:  # IEEE fp32 dots run on the FMA units and hold tiles in registers
        return min(block_m, 32), 32 if head_dim <= 64 else 16, 4
    if head_dim > 128:
        return min(block_m, 64), 32, 4
    return block_m, 64, 8 if block_m >= 128 else 4


def prefill_splits(programs: int, max_context: int, sms: int = DEFAULT_NUM_SMS) -> int:
    """KV splits per query block: for a grid of `programs` (query blocks x heads x
    sequences) under half the device's `sms`, enough for ~2 waves, none thinner than
    MIN_SPLIT_TOKENS of a context of up to `max_context`, at most MAX_PREFILL_SPLITS.
    Shapes only (no device values). Measured on an H100, Llama-3.1-8B heads: 100
    tokens after 2,000, 58 -> 34 us; 500 tokens (128 programs) split in 2 got slower,
    69 -> 144 us, the merge pass outweighing the parallelism."""
    if 2 * programs > sms:
        return 1
    useful = max_context // MIN_SPLIT_TOKENS
    return max(1, min(triton.cdiv(2 * sms, programs), useful, MAX_PREFILL_SPLITS))


def paged_prefill_attention(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
    first_seq: int = 0,
    num_splits: int | None = None,
    num_rows: int | None = None,
) -> torch.Tensor:
    """q [T, H, D] (flat chunks of all sequences) -> out [T, H, D] in q.dtype, causal.

    query_start_loc [S+1] int32, context_lens [S] int32 (new tokens included, each
    >= its query length), block_tables [S, max_blocks] int32. max_query_len is a host
    int >= every chunk's length (sizes the grid without a device sync). `out`: optional
    preallocated output like q. `first_seq`: attend only for sequences from this one on
    (their rows of `out`; the others' are left as they are), the sequences before it
    being one token each (a mixed step's decode rows). An offset, not sliced tensors: a
    slice's unaligned pointer would compile another kernel variant. num_splits: KV
    splits per query block (None: prefill_splits decides). num_rows: the rows the
    sequences fill (default T); rows past them (a CUDA-graph bucket's padding) are
    never written.
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = check_paged_attention_args(q, cache, block_tables)
    q = last_dim_contiguous(q)
    out = check_out(out, q)
    num_seqs = context_lens.shape[0] - first_seq
    if num_tokens == 0 or num_seqs <= 0 or max_query_len <= 0:
        return out
    block_m, block_n, num_warps = prefill_tiles(max_query_len, head_dim, cache.element_size())
    num_q_blocks = triton.cdiv(max_query_len, block_m)
    if num_splits is None:
        programs = num_q_blocks * num_heads * num_seqs
        num_splits = prefill_splits(programs, block_tables.shape[1] * block_size, num_sms(q.device))
    rows = (num_tokens if num_rows is None else num_rows) - first_seq  # of first_seq..
    if num_splits > 1:
        part_acc = torch.empty(
            (rows, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_ml = torch.empty((rows, num_heads, num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    prec, upcast = dot_config(cache.dtype)
    # fmt: off
    _prefill_kernel[(num_q_blocks, num_heads, num_seqs * num_splits)](
        q, cache, block_tables, query_start_loc, context_lens, out, part_acc, part_ml,
        scale * _LOG2E,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), cache.stride(2),
        cache.stride(3), block_tables.stride(0), out.stride(0), out.stride(1),
        num_q_blocks, first_seq, num_heads, num_splits, first_seq,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, PREC=prec, UPCAST=upcast, DIRECT=num_splits == 1,
        num_warps=num_warps, num_stages=3,
    )
    # fmt: on
    if num_splits > 1:
        merge_splits(part_acc, part_ml, out[first_seq : first_seq + rows], block_s=MAX_PREFILL_SPLITS)
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
) -> torch.Tensor:
    """Pure-torch paged prefill attention in float32 (max_query_len is not needed)."""
    block_size, num_kv_heads = cache.shape[2], cache.shape[3]
    group = q.shape[1] // num_kv_heads
    out = torch.zeros_like(q)
    for s in range(context_lens.shape[0]):
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        ctx, q_len = int(context_lens[s]), end - start
        if q_len == 0:
            continue
        blocks = block_tables[s, : (ctx + block_size - 1) // block_size].long()
        k = cache[0, blocks].flatten(0, 1)[:ctx].float().repeat_interleave(group, dim=1)
        v = cache[1, blocks].flatten(0, 1)[:ctx].float().repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,nhd->hqn", q[start:end].float(), k) * scale
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        visible = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
        logits = logits.masked_fill(~visible, float("-inf"))
        out[start:end] = torch.einsum("hqn,nhd->qhd", logits.softmax(-1), v).to(q.dtype)
    return out

"""One-row linear layer (y = x @ W^T + b for a single token): the batch-1 decode matmul.

At batch 1 a linear layer is a weight stream: every byte of W is read once and used
for one multiply-add. cuBLAS picks tensor-core GEMM tiles for it, which leave SMs idle
on some shapes (6144 x 4096: 96 tiles on 132 SMs) or add a split-K reduce kernel. Here
each program owns BLOCK_N output rows and streams them in BLOCK_K-wide slices with
16-byte loads marked evict-first (the weights are read once per step and would only
push the KV cache and activations out of L2), multiplying on the FMA units with float32
accumulation and one reduction at the end. Measured on an H100 (bench/NOTES.md), over
24 distinct weights so L2 does not help: Llama-3.1-8B's qkv 17.9 us vs cuBLAS 20.6, o_proj
12.7 vs 15.7, gate_up 75.4 vs 81.8, down 39.8 vs 44.9 (~3 TB/s instead of ~2.6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tandem.kernels._utils import next_pow2

# Tuned on the H100 over Llama-3.1-8B's four shapes (BLOCK_N 2..16, BLOCK_K 256..2048,
# 4/8 warps, 1/2 stages); the best was the same for all four.
_BLOCK_N = 2
_BLOCK_K = 2048
_NUM_WARPS = 8


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    N,
    K,
    stride_w,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c = k0 + cols
        if EVEN_K:
            x = tl.load(x_ptr + c)
            w = tl.load(
                w_rows + c[None, :],
                mask=row_mask[:, None],
                other=0.0,
                eviction_policy="evict_first",
            )
        else:
            col_mask = c < K
            x = tl.load(x_ptr + c, mask=col_mask, other=0.0)
            w = tl.load(
                w_rows + c[None, :],
                mask=row_mask[:, None] & col_mask[None, :],
                other=0.0,
                eviction_policy="evict_first",
            )
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ weight[N, K]^T (+ bias [N]) -> [1, N] in x's dtype (float32 accumulate).
    x and each weight row must be contiguous."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"gemv takes one row, got x {tuple(x.shape)}")
    n, k = weight.shape
    if x.shape[1] != k or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(
            f"x {tuple(x.shape)} does not match weight {tuple(weight.shape)} "
            "or is not contiguous along K"
        )
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias {tuple(bias.shape)} must be ({n},)")
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_k = min(_BLOCK_K, next_pow2(k))
    _gemv_kernel[(triton.cdiv(n, _BLOCK_N),)](
        x, weight, bias if bias is not None else y, y, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, BLOCK_N=_BLOCK_N, BLOCK_K=block_k,
        num_warps=_NUM_WARPS if block_k >= 1024 else 4, num_stages=2,
    )  # fmt: skip
    return y


def gemv_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return F.linear(x, weight, bias)

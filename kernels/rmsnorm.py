"""RMSNorm and fused residual-add + RMSNorm.

Numerics follow engine/layers.RMSNorm (the Hugging Face recipe): normalize in float32,
round to the input dtype, then multiply by the weight (one more rounding in that
dtype). One program per row; rows up to 64K wide fit one tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels._utils import next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    new_res_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_new_res,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # Round the sum to the activation dtype first: the next layer sees that rounded
        # residual, and the norm must be taken of exactly what it sees.
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_res_ptr + row * stride_new_res + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    normed = (x32 * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[..., N] as [rows, N] with a dense last dim; a view whenever possible."""
    rows = t.reshape(-1, n)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _out_rows(out: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty((x.numel() // x.shape[-1], x.shape[-1]), dtype=x.dtype, device=x.device)
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out is {tuple(out.shape)} {out.dtype}; need {tuple(x.shape)} {x.dtype}")
    return out.view(-1, x.shape[-1])  # must be a view: the kernel writes through it


def _launch(x, residual, weight, eps, out, residual_out) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match rows of {n}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    rows = _rows(x, n)
    res_rows = _rows(residual, n) if residual is not None else rows
    out_rows = _out_rows(out, x)
    new_res = _out_rows(residual_out, x) if residual is not None else out_rows
    block = next_pow2(n)
    if rows.shape[0] > 0:
        # Each program reads its whole row before writing it, so out / residual_out may
        # alias x / residual (in-place use).
        _rms_norm_kernel[(rows.shape[0],)](
            rows,
            res_rows,
            weight,
            out_rows,
            new_res,
            rows.stride(0),
            res_rows.stride(0),
            out_rows.stride(0),
            new_res.stride(0),
            n,
            float(eps),
            BLOCK=block,
            ADD_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block // 512)),
        )
    # Hand back the caller's own tensors when given (callers check `is`), else views.
    out = out if out is not None else out_rows.view(x.shape)
    if residual is None:
        return out, out
    return out, residual_out if residual_out is not None else new_res.view(x.shape)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm over the last dim of x ([..., N]) into `out` or a new tensor, in x.dtype."""
    return _launch(x, None, weight, eps, out, None)[0]


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual) in x.dtype, written to `out` / `residual_out`
    when given (they may be x / residual themselves), else to new tensors."""
    return _launch(x, residual, weight, eps, out, residual_out)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    new_res = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(new_res, weight, eps), new_res

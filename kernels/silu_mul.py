"""SwiGLU activation: silu(x[:, :I]) * x[:, I:] for a fused gate|up projection output.

Rounding matches torch's `F.silu(gate) * up` in the input dtype (silu rounded, then the
product rounded) so kernel and engine agree to the last bit in bf16, not just closely.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2I] -> [..., I] in x.dtype, into `out` (must not overlap x) or a new tensor."""
    if x.shape[-1] % 2:
        raise ValueError(f"last dim {x.shape[-1]} is not even")
    inter = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    shape = (*x.shape[:-1], inter)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif out.shape != shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out is {tuple(out.shape)} {out.dtype}; need {shape} {x.dtype}")
    out_rows = out.view(-1, inter)
    block = min(2048, triton.next_power_of_2(inter))
    if rows.shape[0] > 0 and inter > 0:
        grid = (rows.shape[0], triton.cdiv(inter, block))
        _silu_mul_kernel[grid](
            rows,
            out_rows,
            rows.stride(0),
            out_rows.stride(0),
            inter,
            BLOCK=block,
            num_warps=max(1, min(8, block // 256)),
        )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up

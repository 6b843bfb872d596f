"""Small helpers shared by the kernel wrappers."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# What the split-KV heuristics assume on CPU / under the interpreter: an H100 SXM, so
# that the CPU tests exercise the same split counts as the GPU it is tuned for.
DEFAULT_NUM_SMS = 132


def interpret_mode() -> bool:
    """True when Triton runs kernels through its numpy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=16)
def _num_sms_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; cached because the query costs microseconds."""
    if device.type == "cuda":
        return _num_sms_cuda(device.index if device.index is not None else 0)
    return DEFAULT_NUM_SMS


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels index rows by stride but assume the last dim is dense; copy if it is not."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_out(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A caller's output buffer (shape/dtype/device of `like`, dense last dim), or a new one."""
    if out is None:
        return torch.empty_like(like)
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype}; need {tuple(like.shape)} {like.dtype}"
        )
    if out.stride(-1) != 1:
        raise ValueError("out needs a contiguous last dim")
    return out


def dot_config(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, upcast) for `dot` on operands of `dtype`.

    float32 dots must be IEEE: the tf32 default loses ~1e-3, beyond the fp32 contract.
    The interpreter cannot multiply bfloat16 (it stores it as uint16 and matmuls the bit
    patterns: triton-lang/triton#11584, "not supported"), so there operands are widened
    to float32 after their bf16 rounding, which is what the tensor cores compute anyway.
    """
    upcast = dtype == torch.bfloat16 and interpret_mode()
    return ("ieee" if dtype == torch.float32 or upcast else "tf32"), upcast


@triton.jit
def dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with float32 accumulation; see dot_config for PREC / UPCAST."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


def check_paged_attention_args(
    q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor
) -> tuple[int, int]:
    """Shared argument checks of the paged attention kernels; (block_size, kv_heads)."""
    _, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, cache_dim = cache.shape
    if cache_dim != head_dim or num_heads % num_kv_heads or head_dim != next_pow2(head_dim):
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(cache.shape)}")
    if cache.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("cache head_dim and block_tables rows must be contiguous")
    return block_size, num_kv_heads

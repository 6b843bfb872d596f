"""Shared builders and assertions for the kernel tests (no triton import here)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bfloat16 runs in the interpreter too: the attention kernels widen bf16 dot operands
# there (kernels._utils.dot_config), every other op handles bf16 natively.
DTYPES = [torch.float32, torch.bfloat16]
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, seed: int, what: str = "") -> None:
    """Tolerance by the expected dtype; a NaN (poisoned output never written) fails."""
    tol = TOLERANCES.get(expected.dtype, TOLERANCES[torch.float32])
    torch.testing.assert_close(
        actual.float().cpu(),
        expected.float().cpu(),
        **tol,
        msg=lambda m: f"{what} (seed={seed}; TANDEM_TEST_SEED={seed} reruns it)\n{m}",
    )


def poisoned(shape, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


@dataclass
class PagedBatch:
    cache: torch.Tensor  # [2, num_blocks, block_size, kv_heads, head_dim]
    block_tables: torch.Tensor  # [seqs, max_blocks] int32, padded with 0
    context_lens: torch.Tensor  # [seqs] int32
    query_start_loc: torch.Tensor  # [seqs + 1] int32
    query_lens: list[int]
    ctx_lens: list[int]
    tables: list[list[int]]


def make_paged_batch(
    ctx_lens: list[int],
    query_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    spare_blocks: int = 5,
) -> PagedBatch:
    """Random cache with each sequence's blocks drawn from a random permutation (so block
    ids are unordered and non-contiguous), plus spare blocks nobody owns."""
    needed = [-(-c // block_size) for c in ctx_lens]
    total = sum(needed) + spare_blocks
    perm = torch.randperm(total).tolist()
    tables, at = [], 0
    for n in needed:
        tables.append(perm[at : at + n])
        at += n
    width = max(needed, default=0) + 1  # one padding column of zeros, as the engine pads
    padded = [t + [0] * (width - len(t)) for t in tables]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    # Drawn on the device: GPU-sized caches would take seconds (and GBs) on the host.
    cache = torch.randn(2, total, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    return PagedBatch(
        cache=cache,
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        query_lens=list(query_lens),
        ctx_lens=list(ctx_lens),
        tables=tables,
    )

"""gemv (the batch-1 linear layer) against F.linear."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels.gemv import gemv, gemv_ref
from tests.kernels.helpers import DTYPES, assert_close


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n,k,bias",
    [(7, 100, False), (64, 256, True), (33, 4096, False), (5, 2048 + 3, True)],
)
def test_gemv_matches_linear(device, seed, dtype, n, k, bias):
    x = torch.randn(1, k).to(dtype).to(device)
    w = torch.randn(n, k).to(dtype).to(device) / k**0.5
    b = torch.randn(n).to(dtype).to(device) if bias else None
    got = gemv(x, w, b)
    assert got.shape == (1, n) and got.dtype == dtype
    assert_close(
        got,
        gemv_ref(x.float(), w.float(), None if b is None else b.float()).to(dtype),
        seed,
        f"gemv {n}x{k}",
    )


def test_gemv_reads_strided_weight_rows(device, seed):
    """A weight that is a row slice of a bigger matrix (row stride > K)."""
    big = torch.randn(12, 300, device=device)
    w = big[:, :256]
    x = torch.randn(1, 256, device=device)
    assert_close(gemv(x, w), gemv_ref(x, w), seed, "strided rows")


def test_gemv_rejects_what_it_cannot_do(device):
    w = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError):
        gemv(torch.randn(2, 8, device=device), w)  # two rows
    with pytest.raises(ValueError):
        gemv(torch.randn(1, 16, device=device)[:, ::2], w)  # strided x
    with pytest.raises(ValueError):
        gemv(torch.randn(1, 8, device=device), w, torch.randn(3, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096), (1152, 896)]
)
def test_gemv_real_shapes(device, seed, n, k):
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5
    want = gemv_ref(x.float(), w.float())
    assert_close(gemv(x, w), want.to(torch.bfloat16), seed, f"gemv {n}x{k}")

"""rms_norm / fused_add_rms_norm against their torch references."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels.rmsnorm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)
from tests.kernels.helpers import DTYPES, assert_close, poisoned


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 96), (3, 256), (5, 4, 64)])
def test_rms_norm(device, seed, dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype).to(device)
    weight = torch.randn(shape[-1]).to(dtype).to(device)
    out = poisoned(shape, dtype, device)
    assert rms_norm(x, weight, 1e-6, out=out) is out
    assert_close(out, rms_norm_ref(x, weight, 1e-6), seed, "rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_place", [False, True])
def test_fused_add_rms_norm(device, seed, dtype, in_place):
    x = torch.randn(9, 160).to(dtype).to(device)
    residual = (torch.randn(9, 160) * 4).to(dtype).to(device)
    weight = torch.randn(160).to(dtype).to(device)
    want_out, want_res = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    if in_place:  # out over x, residual_out over residual, as a decoder loop would use it
        out, res = fused_add_rms_norm(x, residual, weight, 1e-5, out=x, residual_out=residual)
        assert out is x and res is residual
    else:
        out, res = poisoned(x.shape, dtype, device), poisoned(x.shape, dtype, device)
        fused_add_rms_norm(x, residual, weight, 1e-5, out=out, residual_out=res)
    assert_close(res, want_res, seed, "new residual")
    assert_close(out, want_out, seed, "normed")


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4096, 8192])
def test_rms_norm_real_shapes(device, seed, hidden):
    x = torch.randn(2048, hidden, device=device, dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, device=device, dtype=torch.bfloat16)
    assert_close(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5), seed, "rms_norm")
    out, res = fused_add_rms_norm(x, residual, weight, 1e-5)
    want_out, want_res = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert torch.equal(res, want_res), f"seed={seed}"
    assert_close(out, want_out, seed, "fused")

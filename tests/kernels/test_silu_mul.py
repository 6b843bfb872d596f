"""silu_and_mul against its torch reference."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels.silu_mul import silu_and_mul, silu_and_mul_ref
from tests.kernels.helpers import DTYPES, assert_close, poisoned


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2 * 96), (3, 2 * 3000), (2, 3, 2 * 64)])
def test_silu_and_mul(device, seed, dtype, shape):
    x = (torch.randn(shape) * 4).to(dtype).to(device)
    out = poisoned((*shape[:-1], shape[-1] // 2), dtype, device)
    assert silu_and_mul(x, out=out) is out
    assert_close(out, silu_and_mul_ref(x), seed, "silu_and_mul")


@pytest.mark.gpu
def test_silu_and_mul_real_shapes(device, seed):
    x = torch.randn(4096, 2 * 14336, device=device, dtype=torch.bfloat16)
    assert_close(silu_and_mul(x), silu_and_mul_ref(x), seed, "silu_and_mul")

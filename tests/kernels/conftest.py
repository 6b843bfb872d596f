"""Kernel tests run on CUDA when present, else on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before `triton` is imported (triton.jit reads it when the
kernel modules are imported), and pytest imports this conftest before the test modules.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from tests.kernels.helpers import DEVICE  # noqa: E402


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test (TANDEM_TEST_SEED reproduces one), seeded into torch and
    recorded in the report; tests put it in their assertion messages."""
    fixed = os.environ.get("TANDEM_TEST_SEED")
    value = int(fixed) if fixed else int(torch.randint(0, 2**31 - 1, (1,), generator=_entropy()))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value} (rerun with TANDEM_TEST_SEED={value})")
    return value


def _entropy() -> torch.Generator:
    gen = torch.Generator()
    gen.seed()  # non-deterministic: other tests' manual_seed must not pin ours
    return gen

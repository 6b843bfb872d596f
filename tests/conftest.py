"""Test-wide setup. Triton reads TRITON_INTERPRET when kernel modules are imported, so
it is set here, before any test module can import kernels: without a GPU the kernels run
in Triton's interpreter on CPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Shared by the kernel test modules: imported BEFORE ``rcm_kernels`` (Triton reads TRITON_INTERPRET lazily,
but the kernel modules must not be imported before it is set).

On a machine without CUDA the Triton kernels run in the interpreter; ``cpu_only`` marks the interpreter
tests and ``gpu`` the device tests."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
cpu_only = pytest.mark.skipif(not INTERPRET, reason="CPU interpreter tests need TRITON_INTERPRET=1 "
                                                   "(set automatically when there is no CUDA)")
gpu = pytest.mark.gpu

"""Shared by the kernel test modules: imported BEFORE ``rcm_kernels`` (Triton reads TRITON_INTERPRET lazily,
but the kernel modules must not be imported before it is set).

On a machine without CUDA the Triton kernels run in the interpreter; ``cpu_only`` marks the interpreter
tests and ``gpu`` the device tests. The GPU tests' shared bf16 bounds, cases and NaN poisoning are here too."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
cpu_only = pytest.mark.skipif(not INTERPRET, reason="CPU interpreter tests need TRITON_INTERPRET=1 "
                                                   "(set automatically when there is no CUDA)")
gpu = pytest.mark.gpu

BF16_O = 1e-2      # METHOD.md: bf16 operands land between 1e-3 and 1e-2
BF16_T = 1.5e-2    # dO has a cancellation (acc_t/l - r/l O): a little more room

GPU_CASES = [      # (B, H, Nq, Nk, Dqk, Dv, layout)
    (1, 4, 1000, 1000, 128, 128, "bhnd"),
    (2, 3, 777, 333, 64, 64, "bnhd"),      # cross, odd
    (1, 2, 1531, 512, 128, 64, "bnhd"),    # cross, Dqk != Dv
    (1, 2, 300, 2047, 64, 128, "bhnd"),
]


def poison():
    """Fill and free a large block so the next allocations start out as NaN."""
    if torch.cuda.is_available():
        x = torch.empty(256 * 1024 * 1024 // 2, dtype=torch.bfloat16, device="cuda").fill_(float("nan"))
        del x

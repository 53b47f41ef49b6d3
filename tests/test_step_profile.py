"""bench/step_profile.py: kernel time is counted once (2026-12-05's profiles counted the Triton tangent kernel
twice, once as its own entry and once as the device time of the autograd.Function that launched it)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from step_profile import is_kernel_time, profile_call  # noqa: E402

DT = torch.autograd.DeviceType


def test_only_device_side_entries_count_as_kernel_time():
    assert is_kernel_time("_fwd_kernel", DT.CUDA)
    assert is_kernel_time("nvjet_sm90_tst_256x152", DT.CUDA)
    assert not is_kernel_time("_AttentionWithTangent", DT.CPU)        # an autograd.Function: repeats its kernel
    assert not is_kernel_time("aten::mm", DT.CPU)
    assert not is_kernel_time("Command Buffer Full", DT.CUDA)        # the profiler's own record


def test_cpu_profile_classes_add_up_to_the_total():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    prof = profile_call(lambda: (a @ b).relu().float().sum(), torch.device("cpu"))
    assert prof["total_s"] > 0
    assert abs(sum(v["s"] for v in prof["classes"].values()) - prof["total_s"]) < 1e-9
    assert "matmul" in prof["classes"]

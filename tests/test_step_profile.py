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


def test_the_projects_triton_kernels_have_classes_of_their_own():
    """The H100 profile of 2026-12-05 put the RoPE kernel (7 % of a step) into "other"."""
    from step_profile import classify
    assert classify("_rope_kernel", "cuda") == "rope (triton)"
    assert classify("_rope_split_kernel", "cuda") == "rope (triton)"
    assert classify("_norm_affine_bwd", "cuda") == "norm + modulation (triton)"
    assert classify("_gated_residual_jvp", "cuda") == "gated residual (triton)"
    assert classify("_fwd_kernel", "cuda") == "attn fwd+tangent (triton)"
    assert classify("vectorized_layer_norm_kernel", "cuda") == "norm"

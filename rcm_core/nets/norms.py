"""RMSNorm on its fused kernel under autocast, for networks with float32 master weights.

The student and fake score keep float32 master weights and run under bf16 autocast. Wan2.1's
query/key norms (``torch.nn.RMSNorm``) then see a bf16 input (the q/k projections' autocast output)
and a float32 weight. PyTorch's fused RMSNorm needs input and weight of one dtype; otherwise it warns
"Mismatch dtype between input and weight ... Cannot dispatch to fused implementation" and runs the
composite (an upcast copy of the input, pow, mean, rsqrt, two multiplies and a downcast: seven
passes over a (tokens x dim) tensor, twice per attention layer, again in the recompute and under
the tangent). The frozen bf16 teacher has bf16 norm weights and is not affected.

    from rcm_core.nets.norms import install_matched_norms
    install_matched_norms(student_net)      # the trainer does this for its trainable copies

A patched ``RMSNorm`` casts its weight (a vector of ``dim`` numbers) to the input's dtype when the
input is bf16/fp16 and the weight is not, so the fused kernel runs; it computes in float32 inside and
rounds once, as the composite does, and the weight's gradient reaches the float32 master through the
cast. The difference from the composite is the weight's rounding to bf16 (relative 2^-9), below the
bf16 output's own rounding. Inputs in float32/float64 take the module's stock path unchanged.
Forward-mode AD (dual tensors, ``torch.func.jvp``) goes through ``aten::_fused_rms_norm``'s own rule.

As :mod:`rcm_core.teachers.real.time_embedding` does, the model's code is not touched: the patched
module gets an instance attribute ``forward`` (a picklable object that ``copy.deepcopy`` rebinds to the
copy); its state dict and weights' dtypes are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["install_matched_norms", "uses_matched_norms"]

_LOW = (torch.bfloat16, torch.float16)


class _MatchedRMSNorm:
    """The instance-level ``forward`` of a patched ``torch.nn.RMSNorm`` (holds the module, not a bound
    method, so a deep copy of the network rebinds it)."""

    def __init__(self, module: nn.RMSNorm):
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        w = m.weight
        if w is not None and x.dtype in _LOW and w.dtype != x.dtype:
            w = w.to(x.dtype)
        return F.rms_norm(x, m.normalized_shape, w, m.eps)


def _targets(net: nn.Module) -> list[nn.RMSNorm]:
    """The ``torch.nn.RMSNorm`` modules of ``net`` with a weight, not patched by another rule (the FP32 time
    embedding's norms keep theirs)."""
    return [m for m in net.modules() if isinstance(m, nn.RMSNorm) and m.weight is not None
            and ("forward" not in m.__dict__ or isinstance(m.__dict__["forward"], _MatchedRMSNorm))]


def install_matched_norms(net: nn.Module) -> int:
    """Patch ``net``'s ``torch.nn.RMSNorm`` modules so that a bf16/fp16 input meets a weight of its dtype
    (the fused kernel); returns how many modules are patched. Idempotent; a network without RMSNorm is
    left as it is (0)."""
    mods = _targets(net)
    for m in mods:
        if not isinstance(m.__dict__.get("forward"), _MatchedRMSNorm):
            m.forward = _MatchedRMSNorm(m)
    return len(mods)


def uses_matched_norms(net: nn.Module) -> bool:
    """True when every weighted ``torch.nn.RMSNorm`` of ``net`` is patched (and there is at least one)."""
    mods = _targets(net)
    return bool(mods) and all(isinstance(m.__dict__.get("forward"), _MatchedRMSNorm) for m in mods)

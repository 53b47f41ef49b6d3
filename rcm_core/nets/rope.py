"""Wan2.1's rotary position embedding as an op with its own rules (issue 22: the fused RoPE of the cast census).

diffusers' ``WanAttnProcessor.apply_rotary_emb`` rotates each (even, odd) pair of a query/key head by a
per-token angle: ``y_even = x_even cos - x_odd sin``, ``y_odd = x_even sin + x_odd cos``, in float32 (the
angles are float32), cast back to x's dtype. Written with PyTorch ops it reads bf16 q/k and writes about six
full-size float32 intermediates per call, twice per block (q and k), again for every tangent and every
recomputation: the census's RoPE rows (45.3 GB each in one sCM step on an H200).

:func:`wan_rope` computes the same rotation:

* on CUDA tensors (the default; ``RCM_ROPE_KERNEL=0`` turns it off), in one Triton pass (``rcm_kernels.rope``;
  ``RCM_ROPE_SPLIT=1``: its split-lane variant), through :class:`_WanRope`, whose rules are rotations too: the
  rotation is linear in x and the angles are constants, so the forward-mode rule rotates the tangent by the same
  angles and the backward rotates the gradient by minus them (R^T = R^-1);
* elsewhere (the CPU, float64 tests), under ``torch.compile`` (inductor fuses the formula itself), for
  tensors the kernel cannot take, and with ``RCM_ROPE_KERNEL=0``, with diffusers' formula (:func:`rotate_pairs`),
  differentiated by autograd.

Both paths compute in float32 (or the inputs' wider dtype) and round once to x's dtype. On by default since its
first GPU run (H100, 2026-12-05, bench/gpu_issue22j.sh): its bf16 GPU test passed, and with the block ops
(:mod:`rcm_core.nets.block_ops`) the training steps ran 12-14 % faster (BENCHMARKS.md).
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch

__all__ = ["wan_rope", "rotate_pairs", "check_rope_request"]


def _switch() -> str:
    """``RCM_ROPE_KERNEL``: ``1`` (the default) the kernel on CUDA, ``0`` the formula."""
    return os.environ.get("RCM_ROPE_KERNEL", "1")


def _split_switch() -> str:
    """``RCM_ROPE_SPLIT``: ``1`` the split-lane kernel (not yet measured on a GPU), ``0`` (the default) the
    stride-2 one."""
    return os.environ.get("RCM_ROPE_SPLIT", "0")


def check_rope_request() -> None:
    """At start (the trainer's, with the attention checks): ``RCM_ROPE_KERNEL`` is ``1`` (default: the kernel on
    CUDA) or ``0`` (the formula); any other value raises ``ValueError`` naming it."""
    value = _switch()
    if value not in ("0", "1"):
        raise ValueError(f"RCM_ROPE_KERNEL={value!r}: expected 1 (the Triton RoPE on CUDA, the default) or 0 "
                         "(diffusers' formula); unset it for the default")
    split = _split_switch()
    if split not in ("0", "1"):
        raise ValueError(f"RCM_ROPE_SPLIT={split!r}: expected 1 (the split-lane RoPE kernel, not yet measured) or 0 "
                         "(the stride-2 kernel, the default)")


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' formula: x's (even, odd) pairs rotated by the angles of ``cos``/``sin`` (broadcast over x with
    one entry per pair), out in x's dtype."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _tables(cos: torch.Tensor, sin: torch.Tensor, x: torch.Tensor):
    """cos/sin broadcast as (1, N, 1, D/2) over x (B, N, H, D) -> (N, D/2) tables for the kernel, else None."""
    n, half = x.shape[1], x.shape[-1] // 2
    if cos.dim() != 4 or cos.shape[0] != 1 or cos.shape[2] != 1 or tuple(cos.shape[1::2]) != (n, half) \
            or sin.shape != cos.shape:
        return None
    return cos[0, :, 0], sin[0, :, 0]


_T = torch._C._functorch.TransformType


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, allowed=()) -> torch.Tensor:
    """x rotated by the (N, D/2) tables (``inverse``: by minus the angles): the kernel on storage-backed tensors
    and under the one torch.func transform in ``allowed`` (the one whose rule runs, so nothing differentiates the
    kernel's output), the differentiable formula otherwise (nested transforms), as the attention op decides."""
    from .attention import _plain
    plain = _plain(x, cos, sin, allowed=allowed)
    if plain is not None:
        from rcm_kernels import rope
        px, pcos, psin = plain
        px = px.contiguous()
        if rope.applies(px, pcos):
            return rope.rotate(px, pcos, psin, inverse=inverse, split=_split_switch() == "1")
    return rotate_pairs(x, cos[None, :, None], (-sin if inverse else sin)[None, :, None])


class _WanRope(torch.autograd.Function):
    """y = R(theta) x on (B, N, H, D) with (N, D/2) angle tables; rules: dy = R dx, gx = R^T gy."""

    @staticmethod
    def forward(x, cos, sin):      # its derivatives come from the rules below, under either transform
        return _rotate(x, cos, sin, inverse=False, allowed=(_T.Jvp, _T.Grad))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, cos, sin = inputs
        ctx.save_for_backward(cos, sin)
        ctx.save_for_forward(cos, sin)

    @staticmethod
    def backward(ctx, gy):
        cos, sin = ctx.saved_tensors
        return _rotate(gy, cos, sin, inverse=True, allowed=(_T.Grad,)), None, None

    @staticmethod
    def jvp(ctx, dx, _dcos, _dsin):
        cos, sin = ctx.saved_tensors
        return _rotate(dx, cos, sin, inverse=False, allowed=(_T.Jvp,))


def _kernel_wanted(x: torch.Tensor, kernel: Optional[bool]) -> bool:
    if kernel is not None:
        return kernel
    if not x.is_cuda or torch.compiler.is_compiling() or _switch() != "1":
        return False
    return _kernel_importable()


@functools.lru_cache(maxsize=None)
def kernel_importable(module: str, what: str, fallback: str) -> bool:
    """Whether ``rcm_kernels.<module>`` imports (Triton present); a CUDA machine where it does not is told once
    (``what``: the kernel's name, ``fallback``: what runs instead). Shared with :mod:`rcm_core.nets.block_ops`."""
    try:
        importlib.import_module(f"rcm_kernels.{module}")
    except ImportError as e:
        from .attention import _log_once
        _log_once(f"{what} unavailable on this CUDA machine ({e}); {fallback}")
        return False
    return True


def _kernel_importable() -> bool:
    return kernel_importable("rope", "rope: the Triton RoPE kernel is", "RoPE runs as diffusers' formula")


def wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor,
             kernel: Optional[bool] = None) -> torch.Tensor:
    """Wan's RoPE of x (B, N, H, D) with diffusers' rotary tables ``freqs_cos``/``freqs_sin`` (1, N, 1, D), each
    angle repeated for the pair (``WanRotaryPosEmbed``). ``kernel``: None = the Triton op on CUDA
    unless ``RCM_ROPE_KERNEL=0`` (see the module doc), True = the op wherever Triton runs (CPU tests under
    ``TRITON_INTERPRET=1``), False = the formula."""
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    tables = _tables(cos, sin, x) if _kernel_wanted(x, kernel) else None
    if tables is None or (x.dtype == torch.float64 and kernel is None):   # float64 reference runs: the formula
        return rotate_pairs(x, cos, sin)
    return _WanRope.apply(x, *tables)

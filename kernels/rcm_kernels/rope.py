"""Wan's rotary position embedding as one Triton pass (issue 22's cast census: the PyTorch formula reads bf16 q/k,
writes float32 products and differences, then casts back, about six full-size float32 tensors per call).

    y[2j]   = x[2j] cos_j - x[2j+1] sin_j
    y[2j+1] = x[2j] sin_j + x[2j+1] cos_j          (sin_j negated: the inverse rotation, the backward's)

``x``: (B, N, H, D), contiguous, any float dtype (computed in float32, written in x's dtype, as the formula's
``type_as`` does); ``cos``/``sin``: (N, D/2) float32 (one angle per token and pair). Runs on CUDA, and on CPU
tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash_jvp import _raw

__all__ = ["rotate", "applies"]


@triton.jit
def _rope_kernel(X, C, S, Y, R, H, N, HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_R: tl.constexpr,
                 INVERSE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, HALF_P2)
    ok = (rows[:, None] < R) & (j[None, :] < HALF)
    token = (rows // H) % N
    even = rows[:, None].to(tl.int64) * (2 * HALF) + 2 * j[None, :]
    x1 = tl.load(X + even, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(X + even + 1, mask=ok, other=0.0).to(tl.float32)
    angle = token[:, None].to(tl.int64) * HALF + j[None, :]
    c = tl.load(C + angle, mask=ok, other=0.0)
    s = tl.load(S + angle, mask=ok, other=0.0)
    if INVERSE:
        s = -s
    tl.store(Y + even, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=ok)
    tl.store(Y + even + 1, (x1 * s + x2 * c).to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _rope_split_kernel(X, C, S, Y, R, H, N, HALF: tl.constexpr, BLOCK_R: tl.constexpr, INVERSE: tl.constexpr):
    # the same rotation from contiguous (BLOCK_R, D) tiles (vectorised loads and stores), split into even/odd
    # lanes in registers; HALF a power of two
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = (rows < R)[:, None]
    offs = rows[:, None].to(tl.int64) * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
    x1, x2 = tl.split(tl.reshape(tl.load(X + offs, mask=ok, other=0.0).to(tl.float32), (BLOCK_R, HALF, 2)))
    angle = ((rows // H) % N)[:, None].to(tl.int64) * HALF + tl.arange(0, HALF)[None, :]
    c = tl.load(C + angle, mask=ok, other=0.0)
    s = tl.load(S + angle, mask=ok, other=0.0)
    if INVERSE:
        s = -s
    y = tl.reshape(tl.join(x1 * c - x2 * s, x1 * s + x2 * c), (BLOCK_R, 2 * HALF))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)


def applies(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether :func:`rotate` takes these tensors: x (B, N, H, D) contiguous with an even D, cos (N, D/2)."""
    return (x.dim() == 4 and x.is_contiguous() and x.shape[-1] % 2 == 0 and x.is_floating_point()
            and cos.shape == (x.shape[1], x.shape[-1] // 2))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False,
           split: bool = False) -> torch.Tensor:
    """The rotation of ``x``'s (even, odd) pairs by the angles whose cos/sin are given (``inverse``: by minus
    them), in one pass; float32 arithmetic, out in x's dtype. ``split``: the kernel that loads whole rows and
    splits them in registers (D/2 a power of two; the op asks for it with ``RCM_ROPE_SPLIT=1``). Not yet run on a
    GPU, so not the default; the stride-2 kernel ran at about 0.2 TB/s on an H100 (BENCHMARKS.md)."""
    if not applies(x, cos):
        raise ValueError(f"rope.rotate: x must be a contiguous (B, N, H, D) tensor with even D and cos (N, D/2); "
                         f"got x {tuple(x.shape)} (contiguous {x.is_contiguous()}), cos {tuple(cos.shape)}")
    B, N, H, D = x.shape
    cos = cos.to(torch.float32).contiguous()
    sin = sin.to(torch.float32).contiguous()
    y = torch.empty_like(x)
    rows = B * N * H
    half = D // 2
    block_r = max(1, min(64, 4096 // triton.next_power_of_2(half)))
    grid = (triton.cdiv(rows, block_r),)
    rx, rcos, rsin, ry = _raw(x, cos, sin, y)     # inside torch.func: the storage under the wrappers
    with torch._C._DisableFuncTorch():            # the interpreter's own host copies: plain tensors too
        if split and half == triton.next_power_of_2(half):
            _rope_split_kernel[grid](rx, rcos, rsin, ry, rows, H, N, HALF=half, BLOCK_R=block_r, INVERSE=inverse)
        else:
            _rope_kernel[grid](rx, rcos, rsin, ry, rows, H, N, HALF=half, HALF_P2=triton.next_power_of_2(half),
                               BLOCK_R=block_r, INVERSE=inverse)
    return y

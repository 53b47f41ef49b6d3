"""The element-wise ops around each attention and FFN of diffusers' Wan block, one Triton pass each (issue 22: the
profile's element-wise and cast classes, 20-27 % and 7 % of an H200 step's kernel time).

diffusers computes them in float32 on a bf16 residual stream, one PyTorch kernel per operation:

    norm_hidden = (norm1(x.float()) * (1 + scale) + shift).type_as(x)     # x.float, layer_norm, mul, add, cast
    x = (x.float() + attn_out * gate).type_as(x)                          # x.float, mul, add, cast

about 160 bytes of memory traffic per residual-stream element and block for the five of them, against 24 for
one pass each. The kernels here compute the same float32 arithmetic and round once to the output dtype:

* :func:`norm_affine` ``y = LN(x) * a + b`` (LayerNorm without its own affine, then per-sample ``a``/``b``, each
  broadcast over tokens: ``a = 1 + scale`` and ``b = shift`` for the modulated norms, the LayerNorm's weight and
  bias for the cross-attention norm), its tangent :func:`norm_affine_tangent` and gradient
  :func:`norm_affine_backward`;
* :func:`gated_residual` ``out = x + y * g``, its tangent and gradient.

Shapes: x, y (B, L, D) contiguous; a, b, g (B, D) float32 rows (a sample's modulation, the same for all its
tokens), any strides. Per-row statistics (mean, 1/std) are float32 (R,) with R = B * L. Runs on CUDA, and on
CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .flash_jvp import _raw

__all__ = ["norm_affine", "norm_affine_tangent", "norm_affine_backward", "gated_residual",
           "gated_residual_tangent", "gated_residual_backward"]


@triton.jit
def _row_stats(x, ok, D, eps):
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    return mean, rstd


@triton.jit
def _norm_affine_fwd(X, A, Bv, Y, MEAN, RSTD, L, D, s_ab, s_ad, s_bb, s_bd, eps,
                     HAS_A: tl.constexpr, HAS_B: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0)
    batch = r // L
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(X + r.to(tl.int64) * D + cols, mask=ok, other=0.0).to(tl.float32)
    mean, rstd = _row_stats(x, ok, D, eps)
    y = (x - mean) * rstd
    if HAS_A:
        y = y * tl.load(A + batch * s_ab + cols * s_ad, mask=ok, other=0.0)
    if HAS_B:
        y = y + tl.load(Bv + batch * s_bb + cols * s_bd, mask=ok, other=0.0)
    tl.store(Y + r.to(tl.int64) * D + cols, y.to(Y.dtype.element_ty), mask=ok)
    tl.store(MEAN + r, mean)
    tl.store(RSTD + r, rstd)


@triton.jit
def _norm_affine_jvp(X, DX, MEAN, RSTD, A, DA, DB, DY, L, D, s_ab, s_ad, s_dab, s_dad, s_dbb, s_dbd,
                     HAS_DX: tl.constexpr, HAS_A: tl.constexpr, HAS_DA: tl.constexpr, HAS_DB: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    r = tl.program_id(0)
    batch = r // L
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    row = r.to(tl.int64) * D + cols
    mean = tl.load(MEAN + r)
    rstd = tl.load(RSTD + r)
    xhat = tl.where(ok, (tl.load(X + row, mask=ok, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
    dy = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_DX:
        dx = tl.load(DX + row, mask=ok, other=0.0).to(tl.float32)
        dxhat = rstd * (dx - tl.sum(dx, axis=0) / D - xhat * (tl.sum(xhat * dx, axis=0) / D))
        if HAS_A:
            dxhat = dxhat * tl.load(A + batch * s_ab + cols * s_ad, mask=ok, other=0.0)
        dy += dxhat
    if HAS_DA:
        dy += xhat * tl.load(DA + batch * s_dab + cols * s_dad, mask=ok, other=0.0)
    if HAS_DB:
        dy += tl.load(DB + batch * s_dbb + cols * s_dbd, mask=ok, other=0.0)
    tl.store(DY + row, dy.to(DY.dtype.element_ty), mask=ok)


@triton.jit
def _norm_affine_bwd(X, GY, MEAN, RSTD, A, GX, PA, PB, L, D, s_ab, s_ad, ROWS,
                     HAS_A: tl.constexpr, BLOCK_D: tl.constexpr):
    # program (chunk, batch): rows [chunk * ROWS, (chunk + 1) * ROWS) of one sample; writes gx for them and the
    # chunk's partial sums of gy * xhat (for a) and gy (for b) to PA/PB[batch, chunk]
    chunk = tl.program_id(0)
    batch = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    if HAS_A:
        a = tl.load(A + batch * s_ab + cols * s_ad, mask=ok, other=0.0)
    acc_a = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, ROWS):
        tok = chunk * ROWS + i
        if tok < L:
            r = batch * L + tok
            row = r.to(tl.int64) * D + cols
            mean = tl.load(MEAN + r)
            rstd = tl.load(RSTD + r)
            xhat = tl.where(ok, (tl.load(X + row, mask=ok, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
            gy = tl.load(GY + row, mask=ok, other=0.0).to(tl.float32)
            acc_a += gy * xhat
            acc_b += gy
            if HAS_A:
                gy = gy * a
            gx = rstd * (gy - tl.sum(gy, axis=0) / D - xhat * (tl.sum(xhat * gy, axis=0) / D))
            tl.store(GX + row, gx.to(GX.dtype.element_ty), mask=ok)
    part = (batch * tl.num_programs(0) + chunk).to(tl.int64) * D + cols
    tl.store(PA + part, acc_a, mask=ok)
    tl.store(PB + part, acc_b, mask=ok)


@triton.jit
def _gated_residual_fwd(X, Y, G, OUT, L, D, s_gb, s_gd, BLOCK_C: tl.constexpr):
    # program (row, column block): no per-element index division
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < D
    i = r.to(tl.int64) * D + cols
    g = tl.load(G + (r // L) * s_gb + cols * s_gd, mask=ok, other=0.0)
    x = tl.load(X + i, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(Y + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + i, (x + y * g).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _gated_residual_jvp(DX, Y, DY, G, DG, DOUT, L, D, s_gb, s_gd, s_dgb, s_dgd,
                        HAS_DX: tl.constexpr, HAS_DY: tl.constexpr, HAS_DG: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < D
    i = r.to(tl.int64) * D + cols
    batch = r // L
    d = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_DX:
        d += tl.load(DX + i, mask=ok, other=0.0).to(tl.float32)
    if HAS_DY:
        d += tl.load(DY + i, mask=ok, other=0.0).to(tl.float32) * tl.load(G + batch * s_gb + cols * s_gd, mask=ok,
                                                                           other=0.0)
    if HAS_DG:
        d += tl.load(Y + i, mask=ok, other=0.0).to(tl.float32) * tl.load(DG + batch * s_dgb + cols * s_dgd, mask=ok,
                                                                          other=0.0)
    tl.store(DOUT + i, d.to(DOUT.dtype.element_ty), mask=ok)


@triton.jit
def _gated_residual_bwd(GOUT, Y, G, GY, PG, L, D, s_gb, s_gd, ROWS, BLOCK_D: tl.constexpr):
    # program (chunk, batch): gy = gout * g for its rows, and the chunk's partial sum of gout * y (for g)
    chunk = tl.program_id(0)
    batch = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    g = tl.load(G + batch * s_gb + cols * s_gd, mask=ok, other=0.0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, ROWS):
        tok = chunk * ROWS + i
        if tok < L:
            row = (batch * L + tok).to(tl.int64) * D + cols
            go = tl.load(GOUT + row, mask=ok, other=0.0).to(tl.float32)
            acc += go * tl.load(Y + row, mask=ok, other=0.0).to(tl.float32)
            tl.store(GY + row, (go * g).to(GY.dtype.element_ty), mask=ok)
    tl.store(PG + (batch * tl.num_programs(0) + chunk).to(tl.int64) * D + cols, acc, mask=ok)


# ---- host side --------------------------------------------------------------------------------------------

def _strides(v: Optional[torch.Tensor]) -> tuple[int, int]:
    """A per-sample (B, D) row tensor's (batch, column) strides; (0, 0) for an absent one."""
    return (0, 0) if v is None else (v.stride(0), v.stride(1))


def _pointers(*xs: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """The storage-backed tensors for the kernels (:func:`_raw`), an absent operand (None, its HAS_ flag off)
    given the first present one as a placeholder pointer."""
    raw = _raw(*xs)
    fill = next(t for t in raw if t is not None)
    return [fill if t is None else t for t in raw]


def _block_d(D: int) -> int:
    return triton.next_power_of_2(D)


def _warps(D: int) -> int:
    return 4 if D <= 2048 else 8 if D <= 4096 else 16


def _chunks(L: int, device: torch.device) -> tuple[int, int]:
    """Rows per program and chunk count for the backward reductions: enough programs to fill the GPU."""
    target = 4 * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2)
    rows = max(1, triton.cdiv(L, target))
    return rows, triton.cdiv(L, rows)


def norm_affine(x: torch.Tensor, a: Optional[torch.Tensor], b: Optional[torch.Tensor], eps: float,
                out_dtype: Optional[torch.dtype] = None):
    """``(LN(x) * a + b)`` computed in float32, rounded to ``out_dtype`` (default x's); returns (y, mean, rstd)."""
    B, L, D = x.shape
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    mean = torch.empty(B * L, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    ptrs = _pointers(x, a, b, y, mean, rstd)
    with torch._C._DisableFuncTorch():
        _norm_affine_fwd[(B * L,)](*ptrs, L, D, *_strides(a), *_strides(b), eps, HAS_A=a is not None,
                                   HAS_B=b is not None, BLOCK_D=_block_d(D), num_warps=_warps(D))
    return y, mean, rstd


def norm_affine_tangent(x, dx, mean, rstd, a, da, db, out_dtype: torch.dtype) -> torch.Tensor:
    """The tangent of :func:`norm_affine`: ``dLN(x)[dx] * a + LN(x) * da + db`` (any of dx/da/db None = zero)."""
    B, L, D = x.shape
    dy = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    ptrs = _pointers(x, dx, mean, rstd, a, da, db, dy)
    with torch._C._DisableFuncTorch():
        _norm_affine_jvp[(B * L,)](*ptrs, L, D, *_strides(a), *_strides(da), *_strides(db), HAS_DX=dx is not None,
                                   HAS_A=a is not None, HAS_DA=da is not None, HAS_DB=db is not None,
                                   BLOCK_D=_block_d(D), num_warps=_warps(D))
    return dy


def norm_affine_backward(x, gy, mean, rstd, a, grad_dtype: torch.dtype):
    """The gradient of :func:`norm_affine`: (gx in ``grad_dtype``, ga (B, D) float32, gb (B, D) float32)."""
    B, L, D = x.shape
    rows, chunks = _chunks(L, x.device)
    gx = torch.empty(x.shape, dtype=grad_dtype, device=x.device)
    pa = torch.empty(B, chunks, D, dtype=torch.float32, device=x.device)
    pb = torch.empty_like(pa)
    ptrs = _pointers(x, gy.contiguous(), mean, rstd, a, gx, pa, pb)
    with torch._C._DisableFuncTorch():
        _norm_affine_bwd[(chunks, B)](*ptrs, L, D, *_strides(a), rows,
                                      HAS_A=a is not None, BLOCK_D=_block_d(D), num_warps=_warps(D))
    return gx, pa.sum(1), pb.sum(1)


_BLOCK_C = 512       # columns per program of the residual kernels (Wan's widths 1536, 3072, 5120: whole blocks)


def gated_residual(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``x + y * g`` in float32, rounded to x's dtype; y (B, L, D) any float dtype, g (B, D) float32 rows."""
    B, L, D = x.shape
    out = torch.empty_like(x)
    ptrs = _pointers(x, y.contiguous(), g, out)
    with torch._C._DisableFuncTorch():
        _gated_residual_fwd[(B * L, triton.cdiv(D, _BLOCK_C))](*ptrs, L, D, *_strides(g), BLOCK_C=_BLOCK_C)
    return out


def gated_residual_tangent(dx, y, dy, g, dg, out_dtype: torch.dtype) -> torch.Tensor:
    """The tangent of :func:`gated_residual`: ``dx + dy * g + y * dg`` (any of dx/dy/dg None = zero)."""
    B, L, D = y.shape
    dout = torch.empty(y.shape, dtype=out_dtype, device=y.device)
    ptrs = _pointers(dx, y.contiguous(), None if dy is None else dy.contiguous(), g, dg, dout)
    with torch._C._DisableFuncTorch():
        _gated_residual_jvp[(B * L, triton.cdiv(D, _BLOCK_C))](
            *ptrs, L, D, *_strides(g), *_strides(dg), HAS_DX=dx is not None, HAS_DY=dy is not None,
            HAS_DG=dg is not None, BLOCK_C=_BLOCK_C)
    return dout


def gated_residual_backward(gout, y, g):
    """The gradient of :func:`gated_residual` for y and g: (gy in y's dtype, gg (B, D) float32); x's is gout."""
    B, L, D = y.shape
    rows, chunks = _chunks(L, y.device)
    gy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    pg = torch.empty(B, chunks, D, dtype=torch.float32, device=y.device)
    ptrs = _pointers(gout.contiguous(), y.contiguous(), g, gy, pg)
    with torch._C._DisableFuncTorch():
        _gated_residual_bwd[(chunks, B)](*ptrs, L, D, *_strides(g), rows,
                                         BLOCK_D=_block_d(D), num_warps=_warps(D))
    return gy, pg.sum(1)

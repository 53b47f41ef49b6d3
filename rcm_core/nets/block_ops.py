"""Wan's modulated LayerNorms and gated residuals as ops with their own rules (issue 22: element-wise work and
dtype casts, 27-34 % of an H200 training step's kernel time after attention and matmuls).

diffusers' ``WanTransformerBlock.forward`` keeps a bf16 residual stream and does its norms, modulation and
gated residuals in float32, one PyTorch kernel per operation, each writing a full-size float32 tensor
(``x.float()``, ``layer_norm``, ``* (1 + scale)``, ``+ shift``, ``.type_as(x)``), again for every tangent and
every checkpoint recomputation. Two ops replace the five expressions of the block:

* :func:`norm_affine` ``(LN(x) * a + b).type_as(x)``: ``a = 1 + scale``, ``b = shift`` (norm1, norm3), or the
  cross-attention LayerNorm's weight and bias (norm2);
* :func:`gated_residual` ``(x.float() + y * g).type_as(x)``: the attention and FFN residuals.

Each is one Triton pass (``rcm_kernels.norm_mod``) forward, one for its tangent, one for its gradient,
through an autograd.Function with ``jvp`` and ``backward`` rules (the attention op's design: the rules run the
kernels on the storage under a single ``torch.func`` transform). The formula (diffusers' own expression,
differentiated by autograd) runs instead on the CPU, for float64, for per-token modulation (Wan2.2 TI2V),
inside nested transforms, under ``torch.compile`` (inductor fuses it itself), and with ``RCM_NORM_KERNEL=0``.

The kernels are the default on CUDA since their first GPU run (H100, 2026-12-05, bench/gpu_issue22j.sh): the bf16
GPU test passed, each op ran 2.0-5.8x faster than diffusers' expressions (bench/bench_block_ops.py) and, with the
RoPE kernel, every training step 12-14 % faster (BENCHMARKS.md). :func:`install_fused_block_ops` (called where
the teacher is loaded) gives each Wan block a ``forward`` that calls them; where they do not run it calls
diffusers' forward. A width no GPU run has checked (14B: 5120) is tried once on a two-token problem before its
first block (:func:`_width_runs`); a kernel Triton cannot build there sends that width to diffusers' forward,
said once. The network is still diffusers' (same modules, same parameters, same state dict); the patched forward is
diffusers' ``WanTransformerBlock.forward`` with those two expressions routed through the ops, and
tests/test_block_ops.py checks it against the stock forward (outputs, tangents and gradients).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import _plain

__all__ = ["norm_affine", "gated_residual", "install_fused_block_ops", "uses_fused_block_ops",
           "check_norm_request"]

_T = torch._C._functorch.TransformType
_ALLOWED = (_T.Jvp, _T.Grad)


def _switch() -> str:
    """``RCM_NORM_KERNEL``: ``1`` (the default) the Triton block ops on CUDA, ``0`` diffusers' forward."""
    return os.environ.get("RCM_NORM_KERNEL", "1")


def check_norm_request() -> None:
    """At start (the trainer's): ``RCM_NORM_KERNEL`` is ``0`` or ``1``; another value raises naming it."""
    value = _switch()
    if value not in ("0", "1"):
        raise ValueError(f"RCM_NORM_KERNEL={value!r}: expected 1 (the Triton LayerNorm/modulation/residual ops on "
                         "CUDA, the default) or 0 (diffusers' block forward); unset it for the default")


# ---- the formulas (diffusers' expressions) -------------------------------------------------------------------

def _norm_affine_formula(x, a, b, eps):
    y = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    if a is not None:
        y = y * a
    if b is not None:
        y = y + b
    return y.type_as(x)


def _gated_residual_formula(x, y, g):
    return (x.float() + y * g).type_as(x)


# ---- the ops --------------------------------------------------------------------------------------------------

def _kernels():
    import rcm_kernels.norm_mod as k
    return k


def _storage(*xs, allowed, rule: str):
    """The storage-backed tensors under a single ``allowed`` torch.func transform (the attention op's
    :func:`~rcm_core.nets.attention._plain`). The entry routes nested transforms to the formula, so a rule that
    meets one is a bug."""
    plain = _plain(*xs, allowed=allowed)
    if plain is None:
        raise RuntimeError(f"block_ops: {rule} rule reached under nested torch.func transforms")
    return plain


class _NormAffine(torch.autograd.Function):
    """y = LN(x) * a + b on (B, L, D) with per-sample (B, D) float32 a, b (None: 1 and 0)."""

    @staticmethod
    def forward(x, a, b, eps):
        px, pa, pb = _storage(x, a, b, allowed=_ALLOWED, rule="forward")
        return _kernels().norm_affine(px, pa, pb, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, a, b, _ = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.has_a, ctx.has_b = a is not None, b is not None
        ctx.save_for_backward(x, mean, rstd, a)
        ctx.save_for_forward(x, mean, rstd, a)

    @staticmethod
    def backward(ctx, gy, _gmean, _grstd):
        x, mean, rstd, a = ctx.saved_tensors
        px, pgy, pm, ps, pa = _storage(x, gy, mean, rstd, a, allowed=(_T.Grad,), rule="backward")
        gx, ga, gb = _kernels().norm_affine_backward(px, pgy, pm, ps, pa, x.dtype)
        return gx, ga if ctx.has_a else None, gb if ctx.has_b else None, None

    @staticmethod
    def jvp(ctx, dx, da, db, _deps):
        x, mean, rstd, a = ctx.saved_tensors
        px, pdx, pm, ps, pa, pda, pdb = _storage(x, dx, mean, rstd, a, da, db, allowed=(_T.Jvp,), rule="jvp")
        return _kernels().norm_affine_tangent(px, pdx, pm, ps, pa, pda, pdb, x.dtype), None, None


class _GatedResidual(torch.autograd.Function):
    """out = x + y * g on (B, L, D) with per-sample (B, D) float32 g, in float32, out in x's dtype."""

    @staticmethod
    def forward(x, y, g):
        px, py, pg = _storage(x, y, g, allowed=_ALLOWED, rule="forward")
        return _kernels().gated_residual(px, py, pg)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, g = inputs
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(y, g)
        ctx.save_for_forward(y, g)

    @staticmethod
    def backward(ctx, gout):
        y, g = ctx.saved_tensors
        pgo, py, pg = _storage(gout, y, g, allowed=(_T.Grad,), rule="backward")
        gy, gg = _kernels().gated_residual_backward(pgo, py, pg)
        return gout.to(ctx.x_dtype), gy, gg

    @staticmethod
    def jvp(ctx, dx, dy, dg):
        y, g = ctx.saved_tensors
        pdx, py, pdy, pg, pdg = _storage(dx, y, dy, g, dg, allowed=(_T.Jvp,), rule="jvp")
        return _kernels().gated_residual_tangent(pdx, py, pdy, pg, pdg, ctx.x_dtype)


def _per_sample(v: Optional[torch.Tensor], B: int, D: int) -> Optional[torch.Tensor]:
    """A modulation broadcast over tokens ((B, 1, D), (1, 1, D), (D,) ...) as float32 (B, D) rows (a view where
    possible, so autograd sums its gradient back); None for per-token or other shapes."""
    lead = tuple(v.shape[:-1])
    if v.dim() == 0 or v.shape[-1] != D or lead not in ((), (1,), (1, 1), (B, 1)):
        return None
    return v.float().reshape(-1, D).expand(B, D)


def _kernel_route(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether this call takes the Triton op: a CUDA (or interpreted, ``kernel=True``) 3-d float32/bf16/fp16
    x, not compiling, storage-backed or under a single Jvp/Grad transform."""
    if x.dim() != 3 or x.dtype == torch.float64 or torch.compiler.is_compiling():
        return False
    return _plain(x, *others, allowed=_ALLOWED) is not None


def norm_affine(x: torch.Tensor, a: Optional[torch.Tensor], b: Optional[torch.Tensor], eps: float,
                kernel: Optional[bool] = None) -> torch.Tensor:
    """``(LN(x.float()) * a + b).type_as(x)`` for x (B, L, D); a, b broadcast over tokens (or None).
    ``kernel``: None = the Triton op on CUDA unless ``RCM_NORM_KERNEL=0``, True = the op wherever Triton runs (CPU
    tests under ``TRITON_INTERPRET=1``), False = the formula."""
    if x.dim() == 3 and _use_kernel(x, kernel):
        B, _, D = x.shape
        ra = None if a is None else _per_sample(a, B, D)
        rb = None if b is None else _per_sample(b, B, D)
        if (a is None or ra is not None) and (b is None or rb is not None) and _kernel_route(x, *(
                v for v in (ra, rb) if v is not None)):
            return _NormAffine.apply(x.contiguous(), ra, rb, eps)[0]
    return _norm_affine_formula(x, a, b, eps)


def gated_residual(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, kernel: Optional[bool] = None
                   ) -> torch.Tensor:
    """``(x.float() + y * g).type_as(x)`` for x, y (B, L, D), g broadcast over tokens; ``kernel`` as
    :func:`norm_affine`."""
    if x.dim() == 3 and y.shape == x.shape and _use_kernel(x, kernel):
        B, _, D = x.shape
        rg = _per_sample(g, B, D)
        if rg is not None and _kernel_route(x, y, rg):
            return _GatedResidual.apply(x.contiguous(), y, rg)
    return _gated_residual_formula(x, y, g)


def _use_kernel(x: torch.Tensor, kernel: Optional[bool]) -> bool:
    if kernel is not None:
        return kernel
    return (x.is_cuda and _switch() == "1" and _kernel_importable()
            and _width_runs(x.shape[-1], x.dtype, x.device))


@functools.lru_cache(maxsize=None)
def _width_runs(D: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the six kernels compile and run at width ``D`` in ``dtype`` on ``device``: tried once per width on a
    two-token problem, outside autograd and torch.func. The kernels are the default at widths no GPU run has
    checked (Wan2.1-14B's 5120, Wan2.2-5B's 3072); where Triton cannot build one (registers, shared memory of a
    card), the blocks of that width run diffusers' forward and this is said once, instead of failing a step."""
    k = _kernels()
    try:
        with torch.no_grad(), torch._C._DisableFuncTorch():
            x, y = (torch.randn(1, 2, D, device=device).to(dtype) for _ in range(2))
            a, b, g = (torch.randn(1, D, device=device) for _ in range(3))
            out, mean, rstd = k.norm_affine(x, a, b, 1e-6)
            k.norm_affine_tangent(x, y, mean, rstd, a, g, b, dtype)
            k.norm_affine_backward(x, out, mean, rstd, a, dtype)
            k.gated_residual(x, y, g)
            k.gated_residual_tangent(x, y, y, g, a, dtype)
            k.gated_residual_backward(x, y, g)
    except Exception as e:  # noqa: BLE001 - any failure to build or launch: the formula is always there
        from .attention import _log_once
        _log_once(f"block_ops: the Triton LayerNorm/residual kernels failed at width {D} in {dtype} on {device} "
                  f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); blocks of this width "
                  "run diffusers' forward (RCM_NORM_KERNEL=0 silences this)")
        return False
    return True


def _kernel_importable() -> bool:
    from .rope import kernel_importable
    return kernel_importable("norm_mod", "block_ops: the Triton LayerNorm/residual kernels are",
                             "the blocks run diffusers' forward")


# ---- the Wan block forward that calls them --------------------------------------------------------------------

class FusedWanBlockForward:
    """The instance-level ``forward`` of a diffusers ``WanTransformerBlock``: its stock forward with the norms,
    modulation and gated residuals through :func:`norm_affine` / :func:`gated_residual`. Holds the module (a deep
    copy of the block copies this object bound to the copy). Where the kernels do not run (the CPU, the switch
    off, under compile) and for per-token modulation (Wan2.2 TI2V's 4-d ``temb``) it calls the stock forward.
    ``kernel`` as :func:`norm_affine` (tests pass True)."""

    def __init__(self, block: nn.Module, kernel: Optional[bool] = None):
        self.block = block
        self.kernel = kernel

    def __call__(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        m = self.block
        if temb.ndim == 4 or not _use_kernel(hidden_states, self.kernel) or torch.compiler.is_compiling():
            return type(m).forward(m, hidden_states, encoder_hidden_states, temb, rotary_emb)
        shift, scale, gate, c_shift, c_scale, c_gate = (m.scale_shift_table + temb.float()).chunk(6, dim=1)
        x, k = hidden_states, True          # decided above for the whole block
        h = norm_affine(x, 1 + scale, shift, m.norm1.eps, kernel=k)
        x = gated_residual(x, m.attn1(h, None, None, rotary_emb), gate, kernel=k)
        if isinstance(m.norm2, nn.LayerNorm):
            h = norm_affine(x, m.norm2.weight, m.norm2.bias, m.norm2.eps, kernel=k)
        else:
            h = m.norm2(x.float()).type_as(x)
        x = x + m.attn2(h, encoder_hidden_states, None, None)
        h = norm_affine(x, 1 + c_scale, c_shift, m.norm3.eps, kernel=k)
        return gated_residual(x, m.ffn(h), c_gate, kernel=k)   # bf16 * fp32 promotes exactly: diffusers' .float()


def _wan_blocks(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if type(m).__name__.endswith("WanTransformerBlock")]   # FSDP: FSDPWan...


def install_fused_block_ops(net: nn.Module, kernel: Optional[bool] = None) -> int:
    """Give each diffusers Wan block of ``net`` the :class:`FusedWanBlockForward`; returns how many. With
    ``kernel=None`` unless ``RCM_NORM_KERNEL=0`` (then nothing is touched: diffusers' forward runs unchanged). A
    network without Wan blocks (Cosmos, the embedded DiT) is left as is (0). Idempotent."""
    if kernel is None and _switch() != "1":
        return 0
    blocks = _wan_blocks(net)
    for m in blocks:
        if not isinstance(m.__dict__.get("forward"), FusedWanBlockForward):
            m.forward = FusedWanBlockForward(m, kernel)
    return len(blocks)


def uses_fused_block_ops(net: nn.Module) -> bool:
    blocks = _wan_blocks(net)
    return bool(blocks) and all(isinstance(m.__dict__.get("forward"), FusedWanBlockForward) for m in blocks)

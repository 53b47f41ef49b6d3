"""FP8 (E4M3) linear layers for frozen networks: the teacher's no-grad target passes (issue 22's option) and
the student at serving time (issue 23). Written in a session without a GPU: the maths is tested on the CPU
(``torch._scaled_mm`` runs there too); speed and the quality cost on an H200 are not measured yet.

    from rcm_core.nets.fp8 import check_fp8_device, quantize_fp8
    check_fp8_device(device)                   # a clear error below compute capability 8.9 or on the CPU
    n = quantize_fp8(net, calibration=calib)   # the blocks' nn.Linear -> Fp8Linear, in place

Scheme (as torchao's float8 "rowwise" recipe and LightX2V's FP8 students):

* weights: E4M3 with one float32 scale per output row, ``s_w = amax(|W_row|) / 448``;
* activations: E4M3 with one scale per token row, either dynamic (``amax`` of each row at run time, the
  default) or static: one calibrated scale per layer, ``s_x = amax over calibration batches / 448``,
  measured on the network's own activations (:func:`calibrate`) and stored with the weights;
* ``y = (x8 s_x) (W8 s_w)^T + b`` by ``torch._scaled_mm`` (FP8 tensor cores on sm89+/sm90), out in bf16.

Only the transformer blocks' linears are quantised (attention q/k/v/out, cross-attention, FFN); the patch,
text and time embeddings, the modulation tables and the output head keep their dtype (where FP8's error
would reach every token or the time conditioning). Layers whose dims are not multiples of 16 (the FP8 GEMM's
alignment) are left as they are. Frozen only: no gradients and no forward-mode tangents go through an
``Fp8Linear`` (it raises instead).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, Optional

import torch
from torch import nn
from torch.autograd import forward_ad as fwAD

__all__ = ["Fp8Linear", "check_fp8_device", "quantize_fp8", "calibrate", "activation_scales", "fp8_layers", "E4M3_MAX"]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)          # 448
_TINY = 1e-12


def check_fp8_device(device: torch.device | str) -> None:
    """Raise ``ValueError`` naming the device unless it has FP8 tensor cores (CUDA compute capability >= 8.9).
    ``RCM_FP8_EMULATE=1`` lets the CPU through (``torch._scaled_mm`` emulates it there, slowly): for tests."""
    import os
    device = torch.device(device)
    if device.type == "cpu" and os.environ.get("RCM_FP8_EMULATE") == "1":
        return
    if device.type != "cuda":
        raise ValueError(f"FP8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9 or newer: L4, L40S, "
                         f"H100, H200, B200); this run is on the {device.type}. Turn FP8 off (fp8=False / no --fp8)")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise ValueError(f"FP8 needs compute capability 8.9 or newer; {torch.cuda.get_device_name(device)} has "
                         f"{cap[0]}.{cap[1]}. Turn FP8 off (fp8=False / no --fp8) or run on an H100/H200/L40S")


def _quantize_rows(x: torch.Tensor, scale: Optional[torch.Tensor] = None):
    """(x8, scale): ``x`` (M, K) in E4M3 with one float32 scale per row (``scale`` (M, 1) or a scalar given, else
    amax/448 of each row)."""
    x = x.float()
    if scale is None:
        scale = x.abs().amax(dim=1, keepdim=True).clamp_min(_TINY) / E4M3_MAX
    else:
        scale = scale.float().reshape(-1, 1).expand(x.shape[0], 1).contiguous()
    x8 = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return x8, scale


class Fp8Linear(nn.Module):
    """A frozen ``nn.Linear`` in E4M3: row-scaled weights, per-token activation scales (dynamic or calibrated)."""

    def __init__(self, linear: nn.Linear, act_scale: Optional[float] = None, out_dtype=torch.bfloat16):
        super().__init__()
        w8, sw = _quantize_rows(linear.weight.detach())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("weight_scale", sw.reshape(1, -1).contiguous())      # (1, N) as _scaled_mm takes it
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(out_dtype))
        self.register_buffer("act_scale", None if act_scale is None else torch.tensor(float(act_scale)))
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("Fp8Linear is for frozen no-grad passes; this input requires grad")
        if fwAD.unpack_dual(x).tangent is not None:
            raise RuntimeError("Fp8Linear has no forward-mode rule; it is for frozen no-grad passes")
        shape = x.shape
        x8, sx = _quantize_rows(x.reshape(-1, self.in_features), self.act_scale)
        y = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=sx, scale_b=self.weight_scale,
                             bias=self.bias, out_dtype=self.out_dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        act = "dynamic" if self.act_scale is None else f"static {float(self.act_scale):.4g}"
        return f"in={self.in_features}, out={self.out_features}, weights E4M3 per row, activations {act}"


def _block_linears(net: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(qualified name, parent, attribute, linear) for every FP8-eligible nn.Linear inside the transformer
    blocks (dims multiples of 16)."""
    from .base import transformer_blocks
    blocks = {id(b) for b in transformer_blocks(net)}
    out, inside = [], set()
    for qual, mod in net.named_modules():
        if id(mod) in blocks:
            inside.add(qual)
        if not any(qual == b or qual.startswith(b + ".") for b in inside):
            continue
        for name, child in mod.named_children():
            if isinstance(child, nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                out.append((f"{qual}.{name}", mod, name, child))
    return out


@contextmanager
def activation_scales(net: nn.Module) -> Iterator[Dict[str, float]]:
    """Record FP8 static scales while ``net`` runs inside the block: yields a dict that holds, on exit,
    {layer: amax of its input over every call / 448} for the layers :func:`rcm_core.nets.fp8.quantize_fp8`
    replaces (empty when ``net`` has no transformer blocks). No extra passes: wrap the sampling already done."""
    try:
        layers = _block_linears(net)
    except ValueError:                          # no transformer blocks (e.g. a module:factory teacher's net)
        layers = []
    amax: Dict[str, torch.Tensor] = {}

    def hook(_mod, args, _out, key):
        a = args[0].detach().abs().amax().float()
        amax[key] = torch.maximum(amax[key], a) if key in amax else a

    handles = [lin.register_forward_hook(lambda m, a, o, key=q: hook(m, a, o, key)) for q, _, _, lin in layers]
    out: Dict[str, float] = {}
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
        out.update({k: max(float(v), _TINY) / E4M3_MAX for k, v in amax.items()})


@torch.no_grad()
def calibrate(net: nn.Module, batches: Iterable, run) -> dict[str, float]:
    """Static activation scales: ``run(net, batch)`` for each calibration batch (e.g. the teacher's own CFG
    forwards on cached prompts and noise levels); returns {layer name: amax/448} over all batches, the form
    stored with a quantised model."""
    with activation_scales(net) as scales:
        for batch in batches:
            run(net, batch)
    return scales


def quantize_fp8(net: nn.Module, calibration: Optional[dict[str, float]] = None,
                 out_dtype=torch.bfloat16) -> int:
    """Replace the blocks' eligible ``nn.Linear`` layers of ``net`` by :class:`Fp8Linear` in place (static
    activation scales from :func:`calibrate` where given, else dynamic); returns how many were replaced.
    A calibration that lacks a layer is refused before any layer is replaced."""
    targets = _block_linears(net)
    if calibration is not None:
        missing = [q for q, *_ in targets if q not in calibration]
        if missing:
            raise ValueError(f"quantize_fp8: no calibrated activation scale for {len(missing)} of {len(targets)} "
                             f"layers (e.g. {missing[:3]}); calibrate this architecture, or pass calibration=None "
                             "for dynamic scales")
    for qual, parent, name, lin in targets:
        scale = None if calibration is None else calibration[qual]
        setattr(parent, name, Fp8Linear(lin, scale, out_dtype).to(lin.weight.device))
    return len(targets)


def fp8_layers(net: nn.Module) -> list[str]:
    """Names of the :class:`Fp8Linear` modules of ``net`` (empty: not quantised)."""
    return [n for n, m in net.named_modules() if isinstance(m, Fp8Linear)]


def fp8_linear_reference(x: torch.Tensor, layer: Fp8Linear) -> torch.Tensor:
    """The same product without ``_scaled_mm``: dequantise both operands and multiply in float32 (tests)."""
    x8, sx = _quantize_rows(x.reshape(-1, layer.in_features), layer.act_scale)
    w = layer.weight_fp8.float() * layer.weight_scale.reshape(-1, 1)
    y = (x8.float() * sx) @ w.t()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.reshape(*x.shape[:-1], layer.out_features)


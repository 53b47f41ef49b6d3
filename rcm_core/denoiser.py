"""Wrap any teacher/student network as a TrigFlow denoiser (section 1).

A network is declared by its parameterisation and its call signature:

* ``"rf"``   - rectified flow: sees x_s = (1 - s) x0 + s eps at ``timestep_scale * s``
               and predicts the velocity v = eps - x0 (Wan2.1, Cosmos-Predict2).
* ``"x0"``   - sees x_t at ``timestep_scale * t`` and predicts x0.
* ``"F"``    - sees x_t at ``timestep_scale * t`` and predicts the TrigFlow F.
* ``"eps"``  - sees x_t at ``timestep_scale * t`` and predicts eps.

``call(net, x, timestep, cond)`` adapts the network's own signature (default:
``net(x, timestep, cond)``). The conversions run in float64; the network is
called in its own dtype, and its output converted back to float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .trigflow import expand_like, noisy_sample, rf_preconditioning

PARAMETERIZATIONS = ("rf", "x0", "F", "eps")


def default_call(net, x, timestep, cond):
    return net(x, timestep, cond)


def diffusers_call(net, x, timestep, cond):
    """Call signature of diffusers transformers (WanTransformer3DModel, ...)."""
    return net(hidden_states=x, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]


@dataclass(frozen=True)
class Parameterization:
    kind: str = "rf"
    timestep_scale: float = 1000.0

    def __post_init__(self):
        if self.kind not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterisation {self.kind!r}; known: {PARAMETERIZATIONS}")


class TrigFlowDenoiser(nn.Module):
    """F(x_t, t, cond) and f(x_t, t, cond) of a wrapped network, in TrigFlow time."""

    def __init__(self, net: nn.Module, param: Parameterization | str = "rf",
                 call: Optional[Callable] = None, dtype: Optional[torch.dtype] = None):
        """``dtype``: the dtype the network is called in; None: that of most of its weights."""
        super().__init__()
        self.net = net
        self.param = Parameterization(param) if isinstance(param, str) else param
        self.call = call or default_call
        self._dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        """The network's compute dtype: the one given, else that of most of its floating-point weights
        (diffusers keeps a few in fp32), else of its buffers, else float32."""
        if self._dtype is not None:
            return self._dtype
        for tensors in (self.net.parameters(), self.net.buffers()):
            count: dict = {}
            for p in tensors:
                if p.is_floating_point():
                    count[p.dtype] = count.get(p.dtype, 0) + p.numel()
            if count:
                return max(count, key=count.get)
        return torch.float32

    def _net(self, x, timestep, cond):
        dt = self.dtype
        out = self.call(self.net, x.to(dt), timestep.to(torch.float32 if dt != torch.float64 else dt), cond.to(dt))
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"network {type(self.net).__name__} returned {got}, expected {tuple(x.shape)} "
                             f"(declared parameterisation {self.param.kind!r})")
        return out.to(torch.float64)

    def x0_and_F(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor):
        """Clean estimate f and TrigFlow output F, both float64."""
        if t.dim() != 1 or t.shape[0] != x_t.shape[0]:
            raise ValueError(f"t must have shape (batch,) = ({x_t.shape[0]},), got {tuple(t.shape)}")
        x = x_t.to(torch.float64)
        t = t.to(torch.float64)
        tb = expand_like(t, x)
        cos, sin = torch.cos(tb), torch.sin(tb)
        kind, scale = self.param.kind, self.param.timestep_scale
        if kind == "rf":
            c_in, c_noise, c_skip, c_out = rf_preconditioning(t, scale)
            v = self._net(expand_like(c_in, x) * x, c_noise, cond)
            x0 = expand_like(c_skip, x) * x + expand_like(c_out, x) * v
            F = (cos - sin) * x0 + cos * v            # = cos eps_hat - sin x0_hat
            return x0, F
        out = self._net(x, scale * t, cond)
        if kind == "x0":
            return out, (cos * x - out) / sin
        if kind == "F":
            return cos * x - sin * out, out
        x0 = (x - sin * out) / cos                     # eps
        return x0, cos * out - sin * x0

    def forward(self, x_t, t, cond):
        """TrigFlow output F (float64)."""
        return self.x0_and_F(x_t, t, cond)[1]

    def x0(self, x_t, t, cond):
        return self.x0_and_F(x_t, t, cond)[0]


def guided(denoiser: TrigFlowDenoiser, x_t, t, cond, uncond, w: float, *, want: str = "F"):
    """Classifier-free guidance: out_uncond + w (out_cond - out_uncond) in one batched call.

    ``uncond`` may have batch 1 (the negative-prompt embedding); it is broadcast.
    ``want`` is "F", "x0" or "both". The map from F to x0 is affine, so guiding F
    and guiding x0 agree.
    """
    b = x_t.shape[0]
    if uncond.shape[0] == 1 and b > 1:
        uncond = uncond.expand(b, *uncond.shape[1:])
    if w == 1.0:
        x0, F = denoiser.x0_and_F(x_t, t, cond)
    else:
        x0s, Fs = denoiser.x0_and_F(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond]))
        x0 = x0s[b:] + w * (x0s[:b] - x0s[b:])
        F = Fs[b:] + w * (Fs[:b] - Fs[b:])
    return {"F": F, "x0": x0, "both": (x0, F)}[want]


@torch.no_grad()
def check_parameterization(denoiser: TrigFlowDenoiser, x0: torch.Tensor, cond: torch.Tensor,
                           t_values=(0.6, 0.9, 1.2), seed: int = 0) -> dict:
    """Detect a teacher whose declared parameterisation does not match its output.

    Denoises data at a few noise levels under every parameterisation and raises
    if the declared one is not the best or is worse than the trivial estimate
    x0_hat = cos(t) x_t. Returns the per-parameterisation denoising MSE.
    """
    g = torch.Generator(device=x0.device).manual_seed(seed)
    errs = {k: 0.0 for k in PARAMETERIZATIONS}
    trivial = 0.0
    x0 = x0.to(torch.float64)
    for tv in t_values:
        eps = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        t = torch.full((x0.shape[0],), tv, dtype=torch.float64, device=x0.device)
        x_t = noisy_sample(x0, eps, t)
        trivial += float(((torch.cos(expand_like(t, x0)) * x_t - x0) ** 2).mean())
        for kind in PARAMETERIZATIONS:
            d = TrigFlowDenoiser(denoiser.net, Parameterization(kind, denoiser.param.timestep_scale), denoiser.call)
            errs[kind] += float(((d.x0(x_t, t, cond) - x0) ** 2).mean())
    declared = denoiser.param.kind
    best = min(errs, key=errs.get)
    if best != declared or not errs[declared] < trivial:
        raise ValueError(
            f"teacher {type(denoiser.net).__name__}: declared parameterisation {declared!r} does not match "
            f"its output (denoising MSE per parameterisation: "
            + ", ".join(f"{k}={v / len(t_values):.4g}" for k, v in errs.items())
            + f"; trivial cos(t) x_t: {trivial / len(t_values):.4g}). Declare {best!r}?")
    return {k: v / len(t_values) for k, v in errs.items()}

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

import math

from ..method.trigflow import expand_like, noisy_sample, rf_preconditioning, rf_time_from_t

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

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The network's timestep at TrigFlow time ``t`` (float64): ``c_noise`` for "rf", else ``scale * t``."""
        t = t.to(torch.float64)
        if self.param.kind == "rf":
            return rf_preconditioning(t, self.param.timestep_scale)[1]
        return self.param.timestep_scale * t

    def _net(self, x, timestep, cond):
        dt = self.dtype
        # a network that routes on the timestep (TimestepExperts) gets it in float64, so the switch is decided
        # on the exact value; each expert is then called with it in its own dtype
        ts_dt = torch.float64 if dt == torch.float64 or getattr(self.net, "exact_timestep", False) else torch.float32
        out = self.call(self.net, x.to(dt), timestep.to(ts_dt), cond.to(dt))
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


def guidance_weights(denoiser: TrigFlowDenoiser, t: torch.Tensor, w: float):
    """The CFG weight per sample: ``w``, or, for experts with their own weights (Wan2.2 A14B: the pipeline's
    ``guidance_scale`` for ``transformer`` and ``guidance_scale_2`` for ``transformer_2``) when ``w`` is the
    first expert's (the teacher's default), each sample's expert's weight. Any other ``w`` (e.g.
    ``DistillConfig.guidance``) applies to every expert. Returns a float or a float64 tensor (B,)."""
    gs = getattr(denoiser.net, "expert_guidance", None)
    if not gs or float(w) != float(gs[0]) or all(float(g) == float(gs[0]) for g in gs):
        return w
    route = denoiser.net.route(denoiser.timestep(t))
    return torch.tensor([float(g) for g in gs], dtype=torch.float64, device=t.device)[route]


def guided(denoiser: TrigFlowDenoiser, x_t, t, cond, uncond, w: float, *, want: str = "F"):
    """Classifier-free guidance: out_uncond + w (out_cond - out_uncond) in one batched call.

    ``uncond`` may have batch 1 (the negative-prompt embedding); it is broadcast.
    ``want`` is "F", "x0" or "both". The map from F to x0 is affine, so guiding F
    and guiding x0 agree. Experts with their own CFG weights: :func:`guidance_weights`.
    """
    b = x_t.shape[0]
    if uncond.shape[0] == 1 and b > 1:
        uncond = uncond.expand(b, *uncond.shape[1:])
    w = guidance_weights(denoiser, t, w)
    if not isinstance(w, torch.Tensor) and w == 1.0:
        x0, F = denoiser.x0_and_F(x_t, t, cond)
    else:
        x0s, Fs = denoiser.x0_and_F(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond]))
        wb = expand_like(w, x0s[:b]) if isinstance(w, torch.Tensor) else w
        x0 = x0s[b:] + wb * (x0s[:b] - x0s[b:])
        F = Fs[b:] + wb * (Fs[:b] - Fs[b:])
    return {"F": F, "x0": x0, "both": (x0, F)}[want]


# ---- mixture of experts switched on the timestep (Wan2.2 A14B) -------------------------------------

BOUNDARY_RTOL = 1e-12


def expert_boundary_t(boundary_ratio: float) -> float:
    """TrigFlow time of a Wan2.2 expert switch: WanPipeline uses ``transformer`` (high noise) at scheduler
    timesteps ``>= boundary_ratio * num_train_timesteps``, i.e. at RF time ``s >= boundary_ratio``; with
    ``s = sin t / (cos t + sin t)`` that is ``t >= atan2(r, 1 - r)`` (``sigma = tan t >= r / (1 - r)``;
    0.875 -> arctan 7 = 1.4289)."""
    r = float(boundary_ratio)
    if not 0.0 < r < 1.0:
        raise ValueError(f"boundary_ratio must lie in (0, 1), got {boundary_ratio!r}")
    return math.atan2(r, 1.0 - r)


def high_noise_expert_at(t: torch.Tensor, boundary_ratio: float) -> torch.Tensor:
    """True where TrigFlow time ``t`` is in the high-noise expert's range (``t >= expert_boundary_t``): the
    decision WanPipeline takes at the scheduler timestep ``1000 s(t)``. Decided on the RF time in float64 with a
    relative tolerance of 1e-12, so a scheduler timestep exactly on the boundary (high noise in diffusers) stays
    there after the round trip timestep -> t -> timestep."""
    s = rf_time_from_t(t.to(torch.float64))
    return s >= float(boundary_ratio) * (1 - BOUNDARY_RTOL)


class TimestepExperts(nn.Module):
    """Networks switched on the timestep, as WanPipeline switches Wan2.2 A14B's ``transformer`` (high noise:
    timestep ``>= boundary_timestep``) and ``transformer_2`` (below). One module, so a teacher, a student and
    a fake score made of two experts are copied, trained, averaged (EMA) and saved as one network; the
    state dict holds ``transformer.*`` and ``transformer_2.*``, the pipeline's component names.

    ``forward(hidden_states, timestep, encoder_hidden_states, **kw)`` has the experts' signature; each
    sample goes to its expert (a batch may mix both), the timestep is compared in float64
    (:class:`TrigFlowDenoiser` passes it so) and handed to the expert in float32 unless the model computes
    in float64. ``expert_guidance``: the CFG weight of each expert (:func:`guidance_weights`).
    """

    exact_timestep = True

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module, boundary_timestep: float,
                 expert_guidance: Optional[tuple] = None):
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary_timestep = float(boundary_timestep)
        self.expert_guidance = tuple(float(g) for g in expert_guidance) if expert_guidance else None

    @property
    def experts(self):
        return (self.transformer, self.transformer_2)

    @property
    def config(self):
        """The experts' (shared) architecture config (patch size, heads...)."""
        return self.transformer.config

    @property
    def blocks(self):
        """Both experts' transformer blocks, for activation checkpointing / FSDP (``rcm_core.parallel``):
        assigning ``blocks[i]`` replaces the block in its expert."""
        return _ExpertBlocks(self)

    def route(self, timestep: torch.Tensor) -> torch.Tensor:
        """Expert index per sample: 0 (``transformer``) where ``timestep >= boundary_timestep``, else 1."""
        ts = timestep.detach().to(torch.float64)
        if ts.dim() > 1:
            ts = ts[:, 0]
        return (ts < self.boundary_timestep * (1 - BOUNDARY_RTOL)).long()

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict: bool = False, **kw):
        x, c = hidden_states, encoder_hidden_states
        dt = x.dtype
        ts_call = timestep.to(torch.float64 if dt == torch.float64 else torch.float32)
        route = self.route(timestep)

        def run(k, idx=None):
            sel = (lambda v: v) if idx is None else (lambda v: v.index_select(0, idx))
            return self.experts[k](hidden_states=sel(x), timestep=sel(ts_call), encoder_hidden_states=sel(c),
                                   return_dict=False, **kw)[0]

        first = int(route[0])
        if bool((route == first).all()):
            out = run(first)
        else:
            idx = [torch.nonzero(route == k).flatten() for k in (0, 1)]
            outs = torch.cat([run(0, idx[0]), run(1, idx[1])])
            inv = torch.empty_like(route)
            inv[torch.cat(idx)] = torch.arange(route.shape[0], device=route.device)
            out = outs.index_select(0, inv)
        return (out,)


class _ExpertBlocks(nn.ModuleList):
    """A write-through view of both experts' ``blocks`` (not registered: the parameters stay the experts')."""

    def __init__(self, owner: TimestepExperts):
        super().__init__()
        object.__setattr__(self, "_owner_ref", owner)
        for e in owner.experts:
            for b in e.blocks:
                super().append(b)

    def _where(self, i: int):
        n0 = len(self._owner_ref.transformer.blocks)
        i = i + len(self) if i < 0 else i
        return (self._owner_ref.transformer, i) if i < n0 else (self._owner_ref.transformer_2, i - n0)

    def __setitem__(self, i, module):
        expert, j = self._where(i)
        expert.blocks[j] = module
        super().__setitem__(i, module)


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

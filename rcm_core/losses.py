"""Time distributions and losses of rCM (rcm-algorithm.md sections 2-5).

Each formula is one function named as in the note. Shapes: per-sample times
are (B,); tensors are (B, ...). Reductions: sCM sums over non-batch dims (g is
normalised to unit norm); DMD and the critic average over non-batch dims.
"""
from __future__ import annotations

import math

import torch

from .trigflow import expand_like


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


# ---- time distributions ---------------------------------------------------------

def sample_t_lognormal(n: int, P_mean: float, P_std: float, *, generator=None, device="cpu") -> torch.Tensor:
    """p_G (and Cosmos' p_D): sigma = exp(N(P_mean, P_std^2)), t = arctan(sigma)."""
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
    return torch.atan(torch.exp(P_mean + P_std * z))


def sample_t_shifted_rf(n: int, shift: float, *, generator=None, device="cpu", eps: float = 1e-4) -> torch.Tensor:
    """p_D for Wan: u ~ U(0,1), s = shift u / (1 + (shift - 1) u), t = arctan(s / (1 - s))."""
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64).clamp(eps, 1 - eps)
    s = shift * u / (1 + (shift - 1) * u)
    return torch.atan2(s, 1 - s)


def tangent_warmup_ratio(step: int, warmup_steps: int) -> float:
    """r = min(1, step / H); H = 0 means r = 1 from the start."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


# ---- sCM -------------------------------------------------------------------------

def scm_target(F_minus, F_teacher, J, x_t, t, r: float, *, warmup_scales_jvp: bool = True):
    """g = -cos t sqrt(1 - r^2 sin^2 t) (F^- - F_T) - r cos t sin t x_t - r' J.

    ``J = cos t sin t dF/dt`` along the teacher's PF-ODE. With
    ``warmup_scales_jvp`` (sCM's tangent warm-up) r' = r, else r' = 1 as the
    note writes it; the two agree once r = 1. At r = 1, g = cos t * df/dt.
    """
    tb = expand_like(t, x_t)
    cos, sin = torch.cos(tb), torch.sin(tb)
    rj = r if warmup_scales_jvp else 1.0
    return -cos * torch.sqrt(1 - r ** 2 * sin ** 2) * (F_minus - F_teacher) - r * cos * sin * x_t - rj * J


def normalize_tangent(g: torch.Tensor, c: float = 0.1) -> torch.Tensor:
    """g / (||g||_2 + c) per sample over all non-batch dims, in float64."""
    g64 = g.to(torch.float64)
    norm = torch.linalg.vector_norm(_flat(g64), dim=1)
    return g64 / expand_like(norm + c, g64)


def nan_mask(*tensors: torch.Tensor) -> torch.Tensor:
    """True for samples where every tensor is finite."""
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for x in tensors:
        ok &= torch.isfinite(_flat(x)).all(dim=1)
    return ok


def scm_loss(F_theta: torch.Tensor, F_minus: torch.Tensor, g: torch.Tensor, batch_size: int) -> torch.Tensor:
    """sum_b ||F_theta - F^- - g||^2 / batch_size over the finite (unmasked) samples.

    The caller passes only the samples that :func:`nan_mask` kept (and runs the
    network's gradient forward on those alone, so a NaN sample cannot reach the
    weight gradients); masked samples count as zero loss in the batch mean. The
    gradient w.r.t. F_theta at F_theta = F^- is -2 g / batch_size.
    """
    target = (F_minus + g).detach()
    return _flat(F_theta - target).pow(2).sum(1).sum() / batch_size


# ---- DMD and critic -----------------------------------------------------------------

def dmd_loss(G: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor, clip: float = 1e-5) -> torch.Tensor:
    """|| G - sg(G - (x0_fake - x0_real) / weight) ||^2 with weight = mean|G - x0_real|.

    The gradient w.r.t. G is 2 (x0_fake - x0_real) / weight / numel: a descent
    step moves G toward the teacher's (real) denoising and away from the fake's.
    """
    with torch.no_grad():
        weight = _flat((G - x0_real).abs()).mean(1).clamp_min(clip)
        grad = (x0_fake - x0_real) / expand_like(weight, G)
        target = (G - grad).detach()
    return _flat((G - target) ** 2).mean(1).mean()


def critic_loss(G: torch.Tensor, x0_fake: torch.Tensor, t_D: torch.Tensor) -> torch.Tensor:
    """|| G - f_fake(x_D, t_D) ||^2 / sin^2 t_D: flow matching of the fake score on student samples."""
    w = 1 / torch.sin(t_D) ** 2
    return (_flat((G - x0_fake) ** 2).mean(1) * w).mean()


def dcm_loss(x0_theta: torch.Tensor, x0_target: torch.Tensor, delta: float) -> torch.Tensor:
    """Discrete-time consistency: ||f_theta(x_t, t) - sg f_theta(x_t', t')||^2 / delta."""
    return _flat((x0_theta - x0_target.detach()) ** 2).sum(1).mean() / delta


def student_update(step: int, warmup_steps: int, freq: int) -> bool:
    """Student step when step < H or (step - H) mod K == 0; critic step otherwise."""
    return step < warmup_steps or (step - warmup_steps) % freq == 0


def ema_exponent(sigma_rel: float) -> float:
    """EDM2 power-EMA exponent gamma with relative std sigma_rel.

    sigma_rel^2 = (g + 1) / ((g + 2)^2 (g + 3)), i.e. the largest real root of
    g^3 + 7 g^2 + (16 - 1/sigma_rel^2) g + (12 - 1/sigma_rel^2) = 0.
    """
    import numpy as np
    k = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_ema_beta(step: int, gamma: float) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1) for t = step >= 1 (beta_1 = 0: the EMA starts at the weights)."""
    return (1 - 1 / max(step, 1)) ** (gamma + 1)


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)

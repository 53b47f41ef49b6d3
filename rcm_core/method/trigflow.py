"""TrigFlow time and its conversions (rcm-algorithm.md section 1).

TrigFlow time t in [0, pi/2]; x_t = cos(t) x0 + sin(t) eps; noise level
sigma = tan(t); rectified-flow (RF) time s = sigma / (1 + sigma). A network's
TrigFlow output F relates to its clean estimate by f = cos(t) x_t - sin(t) F.
All functions take ``t`` as a tensor and broadcast it over the non-batch dims
of ``x`` when ``t`` has shape (B,).
"""
from __future__ import annotations

import torch

PI_2 = torch.pi / 2


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a per-sample time (B,) as (B, 1, ..., 1) to broadcast against x."""
    if t.dim() == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def sigma_from_t(t: torch.Tensor) -> torch.Tensor:
    return torch.tan(t)


def t_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    return torch.atan(sigma)


def rf_time_from_t(t: torch.Tensor) -> torch.Tensor:
    """s = sin t / (cos t + sin t), equal to sigma / (1 + sigma)."""
    return torch.sin(t) / (torch.cos(t) + torch.sin(t))


def shift_rf_time(s, shift: float):
    """The timestep shift of RF time: s' = shift s / (1 + (shift - 1) s) (Wan's sampler; p_D; dCM's grid)."""
    return shift * s / (1 + (shift - 1) * s)


def t_from_rf_time(s: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rf_time_from_t`: t = atan2(s, 1 - s)."""
    return torch.atan2(s, 1 - s)


def noisy_sample(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = expand_like(t, x0)
    return torch.cos(t) * x0 + torch.sin(t) * eps


def x0_from_F(x_t: torch.Tensor, F: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = expand_like(t, x_t)
    return torch.cos(t) * x_t - torch.sin(t) * F


def F_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = expand_like(t, x_t)
    return (torch.cos(t) * x_t - x0) / torch.sin(t)


def F_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The TrigFlow velocity dx_t/dt = cos t eps - sin t x0 (no division by sin t)."""
    t = expand_like(t, x0)
    return torch.cos(t) * eps - torch.sin(t) * x0


def rf_preconditioning(t: torch.Tensor, timestep_scale: float = 1000.0):
    """(c_in, c_noise, c_skip, c_out) that wrap an RF velocity network in TrigFlow."""
    cs = torch.cos(t) + torch.sin(t)
    c_in = 1 / cs
    c_noise = timestep_scale * torch.sin(t) / cs
    c_skip = 1 / cs
    c_out = -torch.sin(t) / cs
    return c_in, c_noise, c_skip, c_out

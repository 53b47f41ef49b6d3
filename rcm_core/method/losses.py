"""Time distributions and losses of rCM (rcm-algorithm.md sections 2-5).

Each formula is one function named as in the note. Shapes: per-sample times
are (B,); tensors are (B, ...). Reductions as the reference (NVlabs/rcm,
``rcm/models/t2v_model_distill_rcm.py``): every loss is a squared norm SUMMED over
the sample's elements; the batch reduction is the mean (the reference sums over
the batch, a factor common to all three losses). The caller applies the scales
(loss_scale = 100 for sCM, loss_scale_dmd = 1 for DMD). DMD and the critic take a
per-sample finite mask: masked samples contribute zero loss and zero gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .trigflow import expand_like, shift_rf_time, t_from_rf_time


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


# ---- time distributions ---------------------------------------------------------

def t_lognormal(z: torch.Tensor, P_mean: float, P_std: float) -> torch.Tensor:
    """p_G (and Cosmos' p_D) from standard normals z: sigma = exp(P_mean + P_std z), t = arctan(sigma)."""
    return torch.atan(torch.exp(P_mean + P_std * z))


def t_shifted_rf(u: torch.Tensor, shift: float, eps: float = 1e-4) -> torch.Tensor:
    """p_D for Wan from uniforms u: s = shift u / (1 + (shift - 1) u), t = arctan(s / (1 - s))."""
    return t_from_rf_time(shift_rf_time(u.clamp(eps, 1 - eps), shift))


def sample_t_lognormal(n: int, P_mean: float, P_std: float, *, generator=None, device="cpu") -> torch.Tensor:
    """p_G (and Cosmos' p_D): sigma = exp(N(P_mean, P_std^2)), t = arctan(sigma)."""
    return t_lognormal(torch.randn(n, generator=generator, device=device, dtype=torch.float64), P_mean, P_std)


def sample_t_shifted_rf(n: int, shift: float, *, generator=None, device="cpu", eps: float = 1e-4) -> torch.Tensor:
    """p_D for Wan: u ~ U(0,1), s = shift u / (1 + (shift - 1) u), t = arctan(s / (1 - s))."""
    return t_shifted_rf(torch.rand(n, generator=generator, device=device, dtype=torch.float64), shift, eps)


def tangent_warmup_ratio(step: int, warmup_steps: int) -> float:
    """r = min(1, step / H); H = 0 means r = 1 from the start."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


# ---- sCM -------------------------------------------------------------------------

def scm_target(F_minus, F_teacher, J, x_t, t, r: float, *, warmup_scales_jvp: bool = False):
    """g = -cos t sqrt(1 - r^2 sin^2 t) (F^- - F_T) - (r cos t sin t x_t + r' J).

    ``J = cos t sin t dF/dt`` along the teacher's PF-ODE. By default r' = 1: the
    tangent warm-up ratio r scales only the ``sin`` terms and J stays whole, as the
    reference does. ``warmup_scales_jvp=True`` is the variant that also scales J
    (r' = r); the two agree once r = 1, where g = cos t * df/dt.
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

def _masked_mean(per_sample: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the batch of per-sample losses, masked samples counting as zero.

    Masked samples are dropped by indexing (not by ``where``), so their gradient is
    exactly zero even when their loss is NaN.
    """
    if mask is None:
        return per_sample.mean()
    return per_sample[mask].sum() / per_sample.shape[0]


def dmd_direction(G: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor, clip: float = 1e-5) -> torch.Tensor:
    """(x0_fake - x0_real) / w per sample, w = mean|G - x0_real| clipped at ``clip`` (float64, no grad).

    Half the per-sample gradient of :func:`dmd_loss` w.r.t. G.
    """
    with torch.no_grad():
        G64, real = G.detach().to(torch.float64), x0_real.to(torch.float64)
        weight = _flat((G64 - real).abs()).mean(1).clamp_min(clip)
        return (x0_fake.to(torch.float64) - real) / expand_like(weight, G64)


def dmd_loss(G: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor, clip: float = 1e-5,
             mask: Optional[torch.Tensor] = None, direction: Optional[torch.Tensor] = None) -> torch.Tensor:
    """|| G - sg(G - (x0_fake - x0_real) / w) ||^2 summed per sample, w = mean|G - x0_real| (float64).

    The per-sample gradient w.r.t. G is 2 (x0_fake - x0_real) / w: a descent step
    moves G toward the teacher's (real) denoising and away from the fake's. Summed
    over elements like :func:`scm_loss` (a mean would make DMD numel times weaker).
    ``mask`` (B,) keeps the finite samples; the others contribute zero. ``direction``: the caller's
    :func:`dmd_direction` of the same tensors, when it has it already.
    """
    G64 = G.to(torch.float64)
    if direction is None:
        direction = dmd_direction(G, x0_fake, x0_real, clip)
    target = (G64 - direction).detach()
    return _masked_mean(_flat((G64 - target) ** 2).sum(1), mask)


def critic_loss(G: torch.Tensor, x0_fake: torch.Tensor, t_D: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """|| G - f_fake(x_D, t_D) ||^2 / sin^2 t_D summed per sample: flow matching of the fake score."""
    w = 1 / torch.sin(t_D.to(torch.float64)) ** 2
    per_sample = _flat((G.to(torch.float64) - x0_fake.to(torch.float64)) ** 2).sum(1) * w
    return _masked_mean(per_sample, mask)


def dcm_times(u: torch.Tensor, total_steps: int = 48, shift: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """dCM's pair of times (NVlabs/rcm ``_student_dcm_step``) from uniforms u in [0, 1).

    RF times s_0 = 1 - u (1 - du) and s_1 = s_0 - du with du = 1 / total_steps, each shifted
    (s' = shift s / (1 + (shift - 1) s)) and converted to TrigFlow t = arctan(s' / (1 - s')).
    Returns (t_0, t_1), t_0 > t_1.
    """
    du = 1.0 / total_steps
    s0 = 1.0 - u * (1.0 - du)
    return t_from_rf_time(shift_rf_time(s0, shift)), t_from_rf_time(shift_rf_time(s0 - du, shift))


def dcm_loss(x0_theta: torch.Tensor, x0_target: torch.Tensor) -> torch.Tensor:
    """Discrete-time consistency: ||f_theta(x_t0, t0) - sg f_theta(x_t1, t1)||^2 summed per sample, batch mean.

    As the reference, with no 1/delta: the caller scales it by ``loss_scale`` like the sCM loss.
    """
    return _flat((x0_theta - x0_target.detach()) ** 2).sum(1).mean()


def student_update(step: int, warmup_steps: int, freq: int) -> bool:
    """Student step when step < H or (step - H) mod K == 0; critic step otherwise."""
    return step < warmup_steps or (step - warmup_steps) % freq == 0


def student_updates_before(step: int, warmup_steps: int, freq: int) -> int:
    """The student's own update count before ``step``: step if step < H, else H + (step - H) // K.

    The reference's "effective iteration"; at a student step it is that update's index.
    """
    return step if step < warmup_steps else warmup_steps + (step - warmup_steps) // freq


def critic_updates_before(step: int, warmup_steps: int, freq: int) -> int:
    """The critic's own update index at a critic ``step``: step - (student updates up to it) - 1."""
    return step - student_updates_before(step, warmup_steps, freq) - 1


def rollout_steps(updates: int, max_steps: int) -> int:
    """Rollout length n = e mod N_max + 1 from a network's own update count e (every n in turn)."""
    return updates % max_steps + 1


def lr_warmup_factor(updates: int, warmup: int, start: float = 1e-6) -> float:
    """Linear learning-rate warm-up over a network's first ``warmup`` updates (0-based ``updates``).

    f = start + (1 - start) * updates / warmup, then 1: the reference's LambdaLinearScheduler
    (warm_up_steps 100, f_start 1e-6, f_max = f_min = 1). ``warmup = 0``: no warm-up.
    """
    if warmup <= 0 or updates >= warmup:
        return 1.0
    return start + (1.0 - start) * updates / warmup


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

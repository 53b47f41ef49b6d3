"""Samplers: the student's few-step sampler and rollout, and the teacher's ODE sampler.

* :func:`sample_student` - section 6: t_0 = arctan(sigma_max), mid times, renoise.
* :func:`student_rollout` - section 3.1: backward simulation, only the last step keeps the graph.
* :func:`sample_teacher`  - the teacher's Euler (or UniPC, via diffusers) sampler on its RF
  schedule with shift and classifier-free guidance (100 NFE for 50 steps x 2).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ..nets.denoiser import TrigFlowDenoiser, guided
from .trigflow import expand_like, noisy_sample, shift_rf_time, t_from_rf_time


def _full(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device)


def student_times(steps: int, sigma_max: float = 80.0, mid_t: Sequence[float] = (1.3, 1.0, 0.6)) -> list[float]:
    """[t_0 = arctan(sigma_max), mid_t[:steps-1]..., 0]."""
    if steps < 1 or steps - 1 > len(mid_t):
        raise ValueError(f"student steps must be in 1..{len(mid_t) + 1}, got {steps}")
    return [math.atan(sigma_max), *mid_t[:steps - 1], 0.0]


@torch.no_grad()
def sample_student(student: TrigFlowDenoiser, cond: torch.Tensor, noise: torch.Tensor, steps: int = 4,
                   sigma_max: float = 80.0, mid_t: Sequence[float] = (1.3, 1.0, 0.6),
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Few-step consistency sampling: x = eps; x0 = f(x, t_i); x = cos t_{i+1} x0 + sin t_{i+1} eps_i."""
    ts = student_times(steps, sigma_max, mid_t)
    x = noise.to(torch.float64)
    x0 = x
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x0 = student.x0(x, _full(t_cur, x), cond)
        if t_next > 0:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = noisy_sample(x0, eps, _full(t_next, x))
    return x0


def student_rollout(student: TrigFlowDenoiser, cond: torch.Tensor, noise: torch.Tensor, n_steps: int,
                    t_hat: Sequence[torch.Tensor], t_max: float = math.pi / 2,
                    generator: Optional[torch.Generator] = None, keep_graph: bool = True,
                    randn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """Backward simulation of the student (section 3.1).

    Starts at t_1 = t_max, x = eps; t_k = min(t_hat_k, t_{k-1}) per sample; at each
    time x0 = f(x, t_k), then renoise to t_{k+1} with fresh noise (``randn(x)`` if given,
    else from ``generator``). Only the last step keeps the autograd graph (if
    ``keep_graph``). Returns (G, t_last).
    """
    x = noise.to(torch.float64)
    t = _full(t_max, x)
    for k in range(n_steps):
        last = k == n_steps - 1
        with torch.set_grad_enabled(keep_graph and last and torch.is_grad_enabled()):
            x0 = student.x0(x, t, cond)
        if last:
            return x0, t
        t_next = torch.minimum(t_hat[k].to(t), t)
        eps = randn(x) if randn is not None else \
            torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = noisy_sample(x0.detach(), eps, t_next)
        t = t_next
    raise ValueError(f"rollout needs n_steps >= 1, got {n_steps}")


def rf_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """RF times s from 1 to 0 (steps + 1 points), shifted: s' = shift s / (1 + (shift - 1) s)."""
    return shift_rf_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


@torch.no_grad()
def sample_teacher(teacher: TrigFlowDenoiser, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor,
                   *, guidance: float, shift: float, steps: int = 50, solver: str = "euler",
                   progress: bool = False, callback: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Integrate the teacher's probability-flow ODE in RF time with CFG; returns x0.

    ``callback()`` runs after every solver step (progress reports).

    ``guidance`` and ``shift`` have no defaults: pass the teacher's own (``Teacher.guidance``,
    ``Teacher.shift``), so turning CFG off is one setting, not three.

    Euler: x_{s'} = x_s + (s' - s) v with v = eps_hat - x0_hat from the guided
    prediction. UniPC: diffusers' ``UniPCMultistepScheduler`` (flow sigmas, the
    scheduler Wan2.1 ships with) fed with the same guided velocity.
    """
    if solver not in ("euler", "unipc"):
        raise ValueError(f"unknown teacher solver {solver!r}; known: euler, unipc")
    x = noise.to(torch.float64)              # at s = 1, x_s = eps = x_t (t = pi/2)

    def velocity(x_s, s):
        t = t_from_rf_time(_full(s, x_s))
        x_t = x_s * expand_like(torch.cos(t) + torch.sin(t), x_s)
        x0 = guided(teacher, x_t, t, cond, uncond, guidance, want="x0")
        eps = (x_s - (1 - s) * x0) / s
        return eps - x0

    if solver == "euler":
        sched = rf_schedule(steps, shift).tolist()
        it = zip(sched[:-1], sched[1:])
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(list(it), desc="teacher sampling")
        for s, s_next in it:
            x = x + (s_next - s) * velocity(x, s)
            if callback is not None:
                callback()
        return x
    try:
        from diffusers import UniPCMultistepScheduler
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise ImportError("solver='unipc' needs diffusers: pip install 'rcm-pipeline[real]'") from e
    sch = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                  use_flow_sigmas=True, flow_shift=shift, solver_order=2)
    sch.set_timesteps(steps, device=x.device)
    sigmas = sch.sigmas.to(torch.float64)
    for i, ts in enumerate(sch.timesteps):
        v = velocity(x, float(sigmas[i]))
        x = sch.step(v, ts, x, return_dict=False)[0].to(torch.float64)
        if callback is not None:
            callback()
    return x

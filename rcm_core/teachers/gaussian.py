"""An analytic teacher: Gaussian data x0 ~ N(mu, s^2 I) in TrigFlow.

Its denoiser and its consistency map are closed forms, so a distilled student
can be checked against the exact answer:

    E[x0 | x_t] = mu + cos t s^2 (x_t - cos t mu) / (cos^2 t s^2 + sin^2 t)
    f(x_t, t)   = mu + s (x_t - cos t mu) / sqrt(cos^2 t s^2 + sin^2 t)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..nets.denoiser import Parameterization


def _bt(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


class GaussianDenoiserNet(nn.Module):
    """Predicts E[x0 | x_t] exactly (x0 parameterisation, timestep = t)."""

    def __init__(self, mu: torch.Tensor, s: float):
        super().__init__()
        self.register_buffer("mu", mu.clone())
        self.s = float(s)

    def forward(self, x, timestep, cond):
        t = _bt(timestep, x)
        c, n = torch.cos(t), torch.sin(t)
        return self.mu + c * self.s ** 2 * (x - c * self.mu) / (c ** 2 * self.s ** 2 + n ** 2)


def consistency_map(x_t: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, s: float) -> torch.Tensor:
    t = _bt(t, x_t)
    c, n = torch.cos(t), torch.sin(t)
    return mu + s * (x_t - c * mu) / torch.sqrt(c ** 2 * s ** 2 + n ** 2)


class AffineTimeNet(nn.Module):
    """A small student for vector data: F = A(t) * x + B(t), A and B from an MLP of t."""

    def __init__(self, dim: int, hidden: int = 64, freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.arange(1, freqs + 1, dtype=torch.float32))
        self.mlp = nn.Sequential(nn.Linear(2 * freqs + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * dim))
        self.dim = dim

    def forward(self, x, timestep, cond):
        t = timestep.to(self.freqs.dtype)[:, None]
        feats = torch.cat([t, torch.sin(t * self.freqs), torch.cos(t * self.freqs)], dim=1)
        a, b = self.mlp(feats.to(x.dtype)).split(self.dim, dim=1)
        return (1 + a) * x + b


@dataclass
class GaussianTeacher:
    """A Teacher (see rcm_core.teachers) with the analytic network."""
    mu: torch.Tensor
    s: float
    name: str = "gaussian"
    version: str = "analytic"
    param: Parameterization = field(default_factory=lambda: Parameterization("x0", 1.0))
    call = None

    def __post_init__(self):
        self.net = GaussianDenoiserNet(self.mu, self.s)
        self.latent_shape = tuple(self.mu.shape)

    def sample_data(self, n: int, generator=None) -> torch.Tensor:
        return self.mu + self.s * torch.randn((n, *self.mu.shape), generator=generator, dtype=self.mu.dtype)


def fit_to_teacher(net: nn.Module, teacher: GaussianTeacher, param: Parameterization, steps: int = 800,
                   batch: int = 512, lr: float = 3e-3, seed: int = 0) -> float:
    """Regress ``net`` (declared ``param``) onto the teacher's F: 'initialise from the teacher'.

    Returns the final relative error of F.
    """
    from ..nets.denoiser import TrigFlowDenoiser
    from ..method.losses import sample_t_lognormal
    from ..method.trigflow import noisy_sample
    g = torch.Generator().manual_seed(seed)
    T = TrigFlowDenoiser(teacher.net, teacher.param)
    S = TrigFlowDenoiser(net, param)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    cond = torch.zeros(batch, 1, 1)
    rel = float("nan")
    for _ in range(steps):
        x0 = teacher.sample_data(batch, g)
        t = sample_t_lognormal(batch, 0.0, 1.6, generator=g)
        x_t = noisy_sample(x0, torch.randn(x0.shape, generator=g, dtype=x0.dtype), t)
        with torch.no_grad():
            F_T = T(x_t, t, cond)
        err = ((S(x_t, t, cond) - F_T) ** 2).sum(1)
        loss = err.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        rel = float(err.detach().mean().sqrt() / (F_T ** 2).sum(1).mean().sqrt())
    return rel


@torch.no_grad()
def consistency_error(denoiser, teacher: GaussianTeacher, t_values=(0.2, 0.5, 0.8, 1.1, 1.4, 1.55),
                      n: int = 2000, seed: int = 5) -> dict:
    """Relative L2 error of the student's f(x_t, t) against the exact consistency map.

    Normalised by the map's own spread around the mean, ||f - mu|| (stricter than ||f||),
    per TrigFlow time, with x_t drawn from the true marginal.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for tv in t_values:
        x0 = teacher.sample_data(n, g)
        t = torch.full((n,), float(tv), dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * eps
        f = denoiser.x0(x_t, t, torch.zeros(n, 1, 1, dtype=x0.dtype))
        f_true = consistency_map(x_t, t, teacher.mu, teacher.s)
        out[float(tv)] = float((f - f_true).norm() / (f_true - teacher.mu).norm())
    return out


def distill_gaussian(method: str = "scm", steps: int = 800, batch: int = 256, lr: float = 1e-3,
                     warmup: int = 100, seed: int = 0, dim: int = 4, s: float = 0.5, log_every: int = 0):
    """Distil the analytic Gaussian teacher into an AffineTimeNet student; returns (trainer, teacher)."""
    from ..method.config import DistillConfig
    from ..trainer import RCMTrainer
    torch.manual_seed(seed)
    mu = torch.linspace(-2.0, 3.0, dim, dtype=torch.float64)
    teacher = GaussianTeacher(mu, s)
    param = Parameterization("F", 1.0)
    net = AffineTimeNet(dim).double()
    fit_to_teacher(net, teacher, param, steps=300, batch=256, seed=seed)
    cfg = DistillConfig.preset("embedded", method=method, guidance=1.0, tangent_warmup_steps=warmup,
                               lr_student=lr, lr_fake=lr, batch_size=batch, iterations=steps, dtype="float64",
                               P_mean=0.0, P_std=1.6, student_update_freq=2, seed=seed)
    trainer = RCMTrainer(teacher, cfg, student_net=net, fake_net=net, student_param=param)
    g = torch.Generator().manual_seed(seed + 1)
    cond, uncond = torch.zeros(batch, 1, 1, dtype=torch.float64), torch.zeros(1, 1, 1, dtype=torch.float64)
    for i in range(steps):
        m = trainer.train_step({"latents": teacher.sample_data(batch, g), "cond": cond, "uncond": uncond})
        if log_every and i % log_every == 0:
            print(i, m)
    return trainer, teacher

"""An analytic multimodal teacher: a mixture of isotropic Gaussians in TrigFlow, and metrics.

Data x0 ~ sum_k w_k N(mu_k, s^2 I). With x_t = cos t x0 + sin t eps the marginal of x_t is
sum_k w_k N(cos t mu_k, v I), v = cos^2 t s^2 + sin^2 t, and the exact denoiser is

    r_k(x_t)    = w_k N(x_t; cos t mu_k, v I) / sum_j w_j N(x_t; cos t mu_j, v I)
    E[x0 | x_t] = sum_k r_k(x_t) (mu_k + cos t s^2 (x_t - cos t mu_k) / v)

computed in float64 whatever dtype the caller uses. Unlike the single Gaussian of
:mod:`rcm_core.gaussian`, its consistency map is strongly non-linear (noise space is cut into
one region per mode), so a few-step student can blur modes together, drop small modes or
mis-weight them. Metrics: mode assignment, coverage, per-mode weight error (total variation)
and sliced Wasserstein-2 against the true mixture.

:func:`embedded_ring_teacher` puts the same 2-D ring into D dimensions through a fixed random
orthonormal map Q (D x 2): means Q mu_k, every component still N(., s^2 I_D), so the denoiser
above stays exact. The modes live in the plane spanned by Q (``teacher.basis``); the other
D - 2 directions carry only the s-wide noise of each component. Mode metrics are then taken in
that plane, and the spread orthogonal to it is reported against its true value s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..nets.denoiser import Parameterization

D64 = torch.float64


def ring_means(k: int = 8, radius: float = 1.5, dim: int = 2) -> torch.Tensor:
    """``k`` means evenly spaced on a circle of ``radius`` in the first two coordinates (others 0)."""
    a = torch.arange(k, dtype=D64) * (2 * math.pi / k)
    mu = torch.zeros(k, dim, dtype=D64)
    mu[:, 0], mu[:, 1] = radius * torch.cos(a), radius * torch.sin(a)
    return mu


def random_basis(dim: int, seed: int = 0) -> torch.Tensor:
    """A fixed random (dim, 2) matrix with orthonormal columns (QR of a seeded Gaussian matrix)."""
    a = torch.randn(dim, 2, generator=torch.Generator().manual_seed(seed), dtype=D64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None]          # unique: positive diagonal of R


# unequal weights, smallest 4% (a mode a few-step student can easily drop), largest 24%
DEFAULT_WEIGHTS = (0.04, 0.06, 0.08, 0.10, 0.12, 0.16, 0.20, 0.24)


class MixtureDenoiserNet(nn.Module):
    """Predicts E[x0 | x_t] exactly (x0 parameterisation, timestep = t), in float64.

    The mixture's parameters are plain float64 tensors, not buffers, so moving the network
    to another dtype (the trainer casts it to the compute dtype) leaves them exact.
    """

    def __init__(self, means: torch.Tensor, weights: torch.Tensor, s: float):
        super().__init__()
        self.means = means.detach().to(D64).clone()            # (K, D)
        self.log_w = torch.log(weights.detach().to(D64) / weights.sum())
        self.s = float(s)

    def forward(self, x, timestep, cond):
        out_dtype = x.dtype
        x = x.to(D64)
        mu, log_w = self.means.to(x.device), self.log_w.to(x.device)
        t = timestep.to(device=x.device, dtype=D64).reshape(-1, 1)           # (B, 1)
        c, n = torch.cos(t), torch.sin(t)
        v = c ** 2 * self.s ** 2 + n ** 2                                    # (B, 1)
        diff = x[:, None, :] - c[:, :, None] * mu[None]                      # (B, K, D)
        logits = log_w[None] - (diff ** 2).sum(-1) / (2 * v)                 # (B, K); N's constant cancels
        r = torch.softmax(logits, dim=1)
        comp = mu[None] + (c * self.s ** 2 / v)[:, :, None] * diff           # (B, K, D)
        return (r[:, :, None] * comp).sum(1).to(out_dtype)


@dataclass
class GaussianMixtureTeacher:
    """A Teacher (see rcm_core.teachers) with the analytic mixture denoiser.

    Defaults: 8 modes on a circle of radius 1.5 in 2-D, s = 0.1 (adjacent means 11.5 s apart),
    weights :data:`DEFAULT_WEIGHTS`; per-coordinate data std ~1.06 (sigma_data ~ 1).
    """
    means: torch.Tensor = field(default_factory=ring_means)
    weights: torch.Tensor = field(default_factory=lambda: torch.tensor(DEFAULT_WEIGHTS, dtype=D64))
    s: float = 0.1
    name: str = "gaussian-mixture"
    version: str = "analytic"
    param: Parameterization = field(default_factory=lambda: Parameterization("x0", 1.0))
    call = None
    guidance: float = 1.0
    # (D, 2) orthonormal columns spanning the means' plane (embedded_ring_teacher); None: the data's own axes
    basis: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.means = self.means.to(D64)
        if self.basis is not None:
            self.basis = self.basis.to(D64)
            if self.basis.shape != (self.means.shape[1], 2) or \
                    not torch.allclose(self.basis.T @ self.basis, torch.eye(2, dtype=D64), atol=1e-9):
                raise ValueError(f"basis must be ({self.means.shape[1]}, 2) with orthonormal columns")
        self.weights = self.weights.to(D64) / self.weights.sum()
        if self.means.dim() != 2 or self.weights.shape != (self.means.shape[0],):
            raise ValueError(f"means must be (K, D) and weights (K,), got {tuple(self.means.shape)} and "
                             f"{tuple(self.weights.shape)}")
        self.net = MixtureDenoiserNet(self.means, self.weights, self.s)
        self.latent_shape = (self.means.shape[1],)

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    def sample_data(self, n: int, generator=None, return_modes: bool = False):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.means[k] + self.s * torch.randn((n, self.means.shape[1]), generator=generator, dtype=D64)
        return (x, k) if return_modes else x


def embedded_ring_teacher(dim: int = 64, k: int = 8, radius: float = 1.5, s: float = 0.1, weights=DEFAULT_WEIGHTS,
                          seed: int = 0) -> GaussianMixtureTeacher:
    """The default 2-D ring mixture mapped into ``dim`` dimensions by :func:`random_basis` (``seed``).

    Each component is N(Q mu_k, s^2 I_dim): the same mixture in the plane of Q, isotropic noise of std s
    in the other dim - 2 directions, and the same exact denoiser. The student needs
    ``MixtureStudentNet(dim, skip=True)`` for large ``dim``.
    """
    q = random_basis(dim, seed)
    means = ring_means(k, radius, 2) @ q.T
    return GaussianMixtureTeacher(means=means, weights=torch.as_tensor(weights, dtype=D64), s=s, basis=q,
                                  name=f"gaussian-mixture-{dim}d")


def posterior_mean_mc(teacher: GaussianMixtureTeacher, x_t: torch.Tensor, t: float, n: int = 200_000,
                      generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo E[x0 | x_t] by self-normalised importance sampling from the prior (for tests).

    x0_i ~ data, weights N(x_t; cos t x0_i, sin^2 t I). Returns (estimate (B, D), effective sample
    size (B,)).
    """
    x0 = teacher.sample_data(n, generator)                                  # (n, D)
    c, sn = math.cos(t), math.sin(t)
    logp = -((x_t[:, None, :].to(D64) - c * x0[None]) ** 2).sum(-1) / (2 * sn ** 2)   # (B, n)
    w = torch.softmax(logp, dim=1)
    ess = 1.0 / (w ** 2).sum(1)
    return w @ x0, ess


class MixtureStudentNet(nn.Module):
    """A small student for vector data: an MLP of (x, time features) -> F (declare Parameterization("F", 1)).

    Time features: t, sin(k t), cos(k t) for k = 1..freqs. Three hidden layers of 128 (SiLU) by
    default: enough to represent a multimodal consistency map in 2-D.

    ``skip=True`` adds a skip path, F = a(t) x + MLP(x, t) with a scalar a(t) from a small MLP of the time
    features (like a diffusion network's skip connection). Needed in D dimensions (an embedded ring): there the
    teacher's F is, off the means' plane, a time-dependent multiple of x, which a 128-wide MLP without the
    skip cannot pass through for D >= 128 (measured: relative F error 0.82 after the fit at D = 256).
    """

    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, freqs: int = 8, skip: bool = False):
        super().__init__()
        self.register_buffer("freqs", torch.arange(1, freqs + 1, dtype=torch.float32))
        mods, width = [], dim + 2 * freqs + 1
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        mods.append(nn.Linear(width, dim))
        self.mlp = nn.Sequential(*mods)
        self.skip = nn.Sequential(nn.Linear(2 * freqs + 1, 32), nn.SiLU(), nn.Linear(32, 1)) if skip else None
        self.dim = dim

    def forward(self, x, timestep, cond):
        t = timestep.to(x.dtype)[:, None]
        f = self.freqs.to(x.dtype)
        tf = torch.cat([t, torch.sin(t * f), torch.cos(t * f)], dim=1)
        out = self.mlp(torch.cat([x, tf], dim=1))
        if self.skip is not None:
            out = out + self.skip(tf) * x
        return out


# ---- metrics ----------------------------------------------------------------------------------

@torch.no_grad()
def assign_modes(x: torch.Tensor, means: torch.Tensor, s: float, within: float = 4.0) -> torch.Tensor:
    """Index of the nearest mean for each sample, or -1 when it is farther than ``within`` * s.

    For 2-D data a true sample is farther than 4 s from its own mean with probability
    exp(-8) = 3e-4; for higher dimensions raise ``within`` (the distance grows like s sqrt(D)).
    """
    d = torch.cdist(x.to(D64), means.to(D64))
    dmin, k = d.min(1)
    return torch.where(dmin <= within * s, k, torch.full_like(k, -1))


@torch.no_grad()
def mode_stats(x: torch.Tensor, teacher: GaussianMixtureTeacher, within: float = 4.0,
               min_fraction: float = 0.25) -> dict:
    """Coverage, per-mode weight error and off-mode fraction of samples ``x`` (n, D).

    * ``off_mode``: fraction of samples within ``within`` s of no mean;
    * ``freq``: per-mode frequency among the on-mode samples;
    * ``covered``: modes with at least ``min_fraction`` of their expected count n w_k;
    * ``weight_tv``: total variation 0.5 sum_k |freq_k - w_k| (0 = right weights, 1 = disjoint);
    * ``weight_max_err``: max_k |freq_k - w_k|.

    With ``teacher.basis`` (an embedded ring) modes are assigned in the plane of the means (within
    ``within`` s there), and ``perp_std_ratio`` is the RMS per-coordinate spread orthogonal to that plane
    divided by s (1 for the true mixture).
    """
    n, K = x.shape[0], teacher.num_modes
    x = x.to(D64)
    extra = {}
    if teacher.basis is not None:          # modes live in the basis plane; the rest is per-component noise
        q = teacher.basis
        xp = x @ q
        resid = x - xp @ q.T
        extra["perp_std_ratio"] = float(resid.pow(2).sum(1).mean().div(max(x.shape[1] - 2, 1)).sqrt() / teacher.s)
        k = assign_modes(xp, teacher.means @ q, teacher.s, within)
    else:
        k = assign_modes(x, teacher.means, teacher.s, within)
    on = k >= 0
    counts = torch.bincount(k[on], minlength=K).to(D64)
    n_on = int(on.sum())
    freq = counts / max(n_on, 1)
    w = teacher.weights
    covered = counts >= min_fraction * n * w
    return {"n": n, "off_mode": 1.0 - n_on / n, "counts": counts.long().tolist(), "freq": freq.tolist(),
            "covered": int(covered.sum()), "modes": K, "missing": [i for i in range(K) if not bool(covered[i])],
            "weight_tv": float(0.5 * (freq - w).abs().sum()), "weight_max_err": float((freq - w).abs().max()),
            **extra}


@torch.no_grad()
def sliced_w2(x: torch.Tensor, y: torch.Tensor, projections: int = 512, generator=None,
              quantiles: Optional[int] = None) -> float:
    """Sliced Wasserstein-2 distance: sqrt(E_theta W2^2(theta.x, theta.y)), theta uniform on the sphere.

    Each 1-D W2 is computed from sorted samples: with equal sizes by matching order statistics,
    otherwise by comparing ``quantiles`` (default min(n, m)) mid-point quantiles of each set.
    """
    x, y = x.to(D64), y.to(D64)
    theta = torch.randn((x.shape[1], projections), generator=generator, dtype=D64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    # (P, n) rows: sorting contiguous rows is much faster than sorting columns
    px, py = (theta.T @ x.T).sort(1).values, (theta.T @ y.T).sort(1).values
    if px.shape[1] != py.shape[1] or quantiles is not None:
        m = quantiles or min(px.shape[1], py.shape[1])
        u = (torch.arange(m, dtype=D64) + 0.5) / m
        px, py = _quantiles_sorted(px, u), _quantiles_sorted(py, u)
    return float(((px - py) ** 2).mean(1).mean().sqrt())


def _quantiles_sorted(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated quantiles at levels ``u`` of each row of the sorted ``p`` (P, n)."""
    n = p.shape[1]
    pos = (u * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo.to(D64))[None, :]
    return p[:, lo] * (1 - frac) + p[:, hi] * frac


def sliced_w2_gaussians(mu_a: torch.Tensor, s_a: float, mu_b: torch.Tensor, s_b: float) -> float:
    """Closed form of the sliced W2 between N(mu_a, s_a^2 I) and N(mu_b, s_b^2 I) in D dimensions:
    each projection is W2^2 = (theta.(mu_a - mu_b))^2 + (s_a - s_b)^2, and E(theta.d)^2 = |d|^2 / D."""
    d = (mu_a - mu_b).to(D64)
    return math.sqrt(float(d.pow(2).sum()) / d.numel() + (s_a - s_b) ** 2)


@torch.no_grad()
def evaluate_samples(x: torch.Tensor, teacher: GaussianMixtureTeacher, reference: torch.Tensor,
                     projections: int = 512, seed: int = 0) -> dict:
    """Mode statistics and sliced W2 of samples ``x`` against ``reference`` (true-mixture samples); for an
    embedded ring also ``sliced_w2_plane``, the sliced W2 of the projections onto the means' plane."""
    g = torch.Generator().manual_seed(seed)
    out = {**mode_stats(x, teacher), "sliced_w2": sliced_w2(x, reference, projections, generator=g)}
    if teacher.basis is not None:          # the same distance within the means' plane
        q = teacher.basis
        out["sliced_w2_plane"] = sliced_w2(x.to(D64) @ q, reference.to(D64) @ q, projections, generator=g)
    return out


def fit_mixture_student(net: nn.Module, teacher: GaussianMixtureTeacher, steps: int = 1500, batch: int = 512,
                        lr: float = 3e-3, seed: int = 0) -> float:
    """'Start from the teacher's weights': regress ``net`` (an F-predicting student) onto the exact
    teacher's F with :func:`rcm_core.gaussian.fit_to_teacher`; returns the final relative error of F."""
    from .gaussian import fit_to_teacher
    return fit_to_teacher(net, teacher, Parameterization("F", 1.0), steps=steps, batch=batch, lr=lr, seed=seed)

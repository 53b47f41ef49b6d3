"""Gaussian-mixture teacher: exact denoiser, metrics, and a short scm / dmd / rcm distillation.

The closed forms are checked against Monte-Carlo (2-D) and against the 2-D denoiser (the ring embedded in
D = 64 dimensions). The distillation (D = 64, the same number of student updates for every method) asserts
only what held for every seed tried (0-5; bench/bench_mixture.py and BENCHMARKS.md have the numbers and the
bench's longer runs): rCM covers every mode at 1 step, its 1-step sliced W2 is far below the start network's
and below pure DMD's (which ends on 2-5 of 8 modes), and its in-plane sliced W2 is within 25% of sCM's.
rCM's 1-step sliced W2 is NOT below sCM's (in the plane it was 0.5-15% above for all six seeds), so that is not
asserted. Nor is it DMD's doing: DMD scaled down 64x (as before the fix) or to 1e-30 gives the same numbers. At
the reference loss scales the DMD gradient is under 1% of sCM's in this toy.
"""
import copy
import math

import pytest
import torch

from rcm_core.config import DistillConfig
from rcm_core.denoiser import Parameterization, TrigFlowDenoiser
from rcm_core.losses import dmd_loss, sample_t_shifted_rf
from rcm_core.mixture import (GaussianMixtureTeacher, MixtureDenoiserNet, MixtureStudentNet, embedded_ring_teacher,
                              evaluate_samples, fit_mixture_student, mode_stats, posterior_mean_mc, random_basis,
                              ring_means, sliced_w2, sliced_w2_gaussians)
from rcm_core.sampling import sample_student
from rcm_core.trainer import RCMTrainer

D = torch.float64


@pytest.mark.parametrize("t", [0.3, 0.8, 1.3])
def test_exact_denoiser_matches_monte_carlo_posterior_mean(t):
    te = GaussianMixtureTeacher()
    g = torch.Generator().manual_seed(int(t * 10))
    x0 = te.sample_data(6, g)
    x_t = math.cos(t) * x0 + math.sin(t) * torch.randn(x0.shape, generator=g, dtype=D)
    exact = te.net(x_t, torch.full((6,), t, dtype=D), None)
    mc, ess = posterior_mean_mc(te, x_t, t, n=200_000, generator=g)
    assert ess.min() > 5_000
    assert (exact - mc).abs().max() < 0.02, (exact, mc)


def test_exact_denoiser_limits_and_dtype():
    te = GaussianMixtureTeacher()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    # t -> 0: the data itself; t = pi/2: the mixture mean
    assert torch.allclose(te.net(x, torch.full((5,), 1e-6, dtype=D), None), x, atol=1e-6)
    mean = (te.weights[:, None] * te.means).sum(0)
    assert torch.allclose(te.net(x, torch.full((5,), math.pi / 2, dtype=D), None), mean.expand(5, 2), atol=1e-12)
    # casting the network (as the trainer does) leaves the mixture's parameters in float64
    net = copy.deepcopy(te.net).to(torch.float32)
    out = net(x.float(), torch.full((5,), 0.7), None)
    assert out.dtype == torch.float32 and net.means.dtype == D
    assert torch.allclose(out.double(), te.net(x.float().double(), torch.full((5,), 0.7, dtype=D), None), atol=1e-6)
    # a TrigFlow wrapper in x0 parameterisation gives F consistent with x0
    den = TrigFlowDenoiser(te.net, te.param)
    t = torch.full((5,), 0.9, dtype=D)
    x0, F = den.x0_and_F(x, t, torch.zeros(5, 1, 1, dtype=D))
    assert torch.allclose(torch.cos(t)[:, None] * x - torch.sin(t)[:, None] * F, x0)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_sliced_w2_matches_closed_form_for_isotropic_gaussians(dim):
    g = torch.Generator().manual_seed(dim)
    a, b = torch.linspace(0.3, -0.2, dim, dtype=D), torch.linspace(1.0, 0.5, dim, dtype=D)
    n = 10_000
    xa = a + 0.5 * torch.randn(n, dim, generator=g, dtype=D)
    xb = b + 1.2 * torch.randn(n, dim, generator=g, dtype=D)
    exact = sliced_w2_gaussians(a, 0.5, b, 1.2)
    assert sliced_w2(xa, xb, 256, generator=g) == pytest.approx(exact, rel=0.06)
    assert sliced_w2(xa, xb[: n // 2], 256, generator=g) == pytest.approx(exact, rel=0.06)   # unequal sizes
    assert sliced_w2(xa, a + 0.5 * torch.randn(n, dim, generator=g, dtype=D), 256, generator=g) < 0.03


def test_mode_metrics():
    te = GaussianMixtureTeacher()
    g = torch.Generator().manual_seed(0)
    x, k = te.sample_data(20_000, g, return_modes=True)
    st = mode_stats(x, te)
    assert st["covered"] == 8 and st["missing"] == [] and st["weight_tv"] < 0.02 and st["off_mode"] < 0.002
    dropped = x[k != 0]                                            # the smallest mode (4%) missing
    st = mode_stats(dropped, te)
    assert st["covered"] == 7 and st["missing"] == [0] and st["weight_tv"] == pytest.approx(0.04, abs=0.02)
    mid = 0.5 * (te.means[0] + te.means[1])                        # between two modes: off-mode
    st = mode_stats(mid + 0.3 * te.s * torch.randn(100, 2, generator=g, dtype=D), te)
    assert st["off_mode"] == 1.0 and st["covered"] == 0


def test_dmd_gradient_with_exact_scores_sharpens_a_blurred_mixture():
    """Student samples = the mixture blurred by extra noise; its exact denoiser is the same mixture with
    s' = sqrt(s^2 + b^2). With that as the fake score and the teacher as the real one, the library's DMD
    gradient w.r.t. G points away from the nearest mode on average, so a descent step sharpens."""
    te = GaussianMixtureTeacher()
    g = torch.Generator().manual_seed(0)
    n, blur = 8000, 0.1
    fake = TrigFlowDenoiser(MixtureDenoiserNet(te.means, te.weights, math.hypot(te.s, blur)), te.param)
    real = TrigFlowDenoiser(te.net, te.param)
    G = (te.sample_data(n, g) + blur * torch.randn(n, 2, generator=g, dtype=D)).requires_grad_(True)
    t = sample_t_shifted_rf(n, 2.0, generator=g)
    x_D = torch.cos(t)[:, None] * G.detach() + torch.sin(t)[:, None] * torch.randn(n, 2, generator=g, dtype=D)
    cond = torch.zeros(n, 1, 1, dtype=D)
    with torch.no_grad():
        x0_fake, x0_real = fake.x0(x_D, t, cond), real.x0(x_D, t, cond)
    grad, = torch.autograd.grad(dmd_loss(G, x0_fake, x0_real), G)
    radial = G.detach() - te.means[torch.cdist(G.detach(), te.means).argmin(1)]
    outward = (grad * radial).sum(1)
    assert outward.mean() > 0
    assert (outward > 0).double().mean() > 0.53            # measured 0.57 (per-sample DMD signal is noisy in 2-D)
    # with the roles swapped (the blurred mixture as "real") the gradient points inward
    grad_swapped, = torch.autograd.grad(dmd_loss(G, x0_real, x0_fake), G)
    assert (grad_swapped * radial).sum(1).mean() < 0


def test_embedded_ring_denoiser_is_the_2d_one_in_the_plane_and_shrinkage_across_it():
    """E[x0 | x_t] of the ring embedded by Q (D x 2, orthonormal) = Q E_2D[x0 | Q^T x_t] + (cos t s^2 / v) P x_t,
    P = I - Q Q^T: the components are isotropic, so the plane and its complement separate."""
    dim = 64
    te = embedded_ring_teacher(dim, seed=3)
    q = te.basis
    assert torch.allclose(q.T @ q, torch.eye(2, dtype=D), atol=1e-12) and torch.equal(q, random_basis(dim, 3))
    assert torch.allclose(te.means, ring_means() @ q.T)
    flat = GaussianMixtureTeacher()                                      # the same ring, in 2-D
    g = torch.Generator().manual_seed(0)
    for t in (0.2, 0.9, 1.4):
        tt = torch.full((32,), t, dtype=D)
        x_t = math.cos(t) * te.sample_data(32, g) + math.sin(t) * torch.randn(32, dim, generator=g, dtype=D)
        v = math.cos(t) ** 2 * te.s ** 2 + math.sin(t) ** 2
        expect = flat.net(x_t @ q, tt, None) @ q.T + (math.cos(t) * te.s ** 2 / v) * (x_t - x_t @ q @ q.T)
        assert torch.allclose(te.net(x_t, tt, None), expect, atol=1e-12)
    with pytest.raises(ValueError, match="orthonormal"):
        GaussianMixtureTeacher(means=te.means, basis=2 * q)


def test_embedded_ring_metrics():
    te = embedded_ring_teacher(64)
    g = torch.Generator().manual_seed(0)
    x = te.sample_data(20_000, g)
    ref = te.sample_data(20_000, g)
    r0 = evaluate_samples(x, te, ref, projections=128)
    assert r0["covered"] == 8 and r0["off_mode"] < 0.002 and r0["weight_tv"] < 0.02
    # noise floor at 20,000 samples: the plane's sliced W2 is dominated by mode-weight sampling noise (0.04 here)
    assert r0["perp_std_ratio"] == pytest.approx(1.0, abs=0.01) and r0["sliced_w2_plane"] < 0.06
    # the same samples with the spread across the plane halved: modes and plane untouched, perp ratio 0.5
    q = te.basis
    xp = x @ q @ q.T
    r = evaluate_samples(xp + 0.5 * (x - xp), te, ref, projections=128)
    assert r["covered"] == 8 and r["perp_std_ratio"] == pytest.approx(0.5, abs=0.01)
    assert r["sliced_w2_plane"] == pytest.approx(r0["sliced_w2_plane"], rel=1e-9)
    assert r["sliced_w2"] > 5 * r0["sliced_w2"]


def short_distillation(seed: int = 0, dim: int = 64, student_updates: int = 150, batch: int = 64,
                       n_eval: int = 4000, methods=("scm", "dmd", "rcm")) -> dict:
    """Fit a student to the exact embedded-ring teacher, distil it with each method from that same start, with
    the same seed and the same number of STUDENT updates (rCM and DMD also train the critic in between);
    returns {method: 1-step metrics of the EMA student}, the start network's under 'start' and the update
    counts under 'updates'."""
    te = embedded_ring_teacher(dim)
    torch.manual_seed(seed)
    net0 = MixtureStudentNet(dim, skip=True).double()
    fit_mixture_student(net0, te, steps=400, batch=256, seed=seed)
    param = Parameterization("F", 1.0)
    ref = te.sample_data(n_eval, torch.Generator().manual_seed(1000 + seed))
    cond = torch.zeros(n_eval, 1, 1, dtype=D)

    def one_step(den):
        g = torch.Generator().manual_seed(seed + 7)
        x = sample_student(den, cond, torch.randn(n_eval, dim, generator=g, dtype=D), 1, generator=g)
        return evaluate_samples(x, te, ref, projections=128, seed=seed)

    out = {"start": one_step(TrigFlowDenoiser(net0, param)), "updates": {}}
    for method in methods:
        cfg = DistillConfig.preset("embedded", method=method, guidance=1.0, dtype="float64", batch_size=batch,
                                   iterations=student_updates, lr_student=1e-3, lr_fake=1e-3, seed=seed)
        tr = RCMTrainer(te, cfg, student_net=copy.deepcopy(net0), fake_net=copy.deepcopy(net0), student_param=param)
        g = torch.Generator().manual_seed(seed + 1)
        bc, uc = torch.zeros(batch, 1, 1, dtype=D), torch.zeros(1, 1, 1, dtype=D)
        kinds = {"student": 0, "critic": 0}
        while kinds["student"] < student_updates:
            kinds[tr.train_step({"latents": te.sample_data(batch, g), "cond": bc, "uncond": uc})["kind"]] += 1
        out["updates"][method] = kinds
        out[method] = one_step(tr.ema_denoiser())
    return out


def test_short_distillation_same_student_updates_rcm_covers_every_mode_and_beats_dmd():
    r = short_distillation(seed=0)
    print({k: (v["covered"], round(v["off_mode"], 3), round(v["sliced_w2"], 4), round(v["sliced_w2_plane"], 4),
               round(v["perp_std_ratio"], 3)) for k, v in r.items() if k != "updates"}, r["updates"])
    assert r["updates"] == {"scm": {"student": 150, "critic": 0}, "dmd": {"student": 150, "critic": 149},
                            "rcm": {"student": 150, "critic": 129}}          # rcm: every step in the warm-up H = 20
    assert r["start"]["sliced_w2_plane"] > 0.8          # the teacher's 1-step output is the mixture mean
    assert r["rcm"]["covered"] == 8, r["rcm"]
    assert r["rcm"]["sliced_w2_plane"] < 0.3 * r["start"]["sliced_w2_plane"]
    assert r["rcm"]["sliced_w2_plane"] < 0.5 * r["dmd"]["sliced_w2_plane"]
    assert r["rcm"]["sliced_w2"] < 0.5 * r["dmd"]["sliced_w2"]
    assert r["dmd"]["covered"] < 8                        # DMD alone from this start: mode collapse
    # same student updates: rcm close to scm (1.00-1.15x over seeds 0-5), not better
    assert r["rcm"]["sliced_w2_plane"] < 1.25 * r["scm"]["sliced_w2_plane"]

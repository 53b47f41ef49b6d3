"""sCM / DMD / critic losses, time distributions, schedule and EMA against closed forms."""
import math

import numpy as np
import pytest
import torch

from rcm_core.ema import PowerEMA
from rcm_core.losses import (critic_loss, dmd_loss, ema_exponent, nan_mask, normalize_tangent, power_ema_beta,
                             sample_t_lognormal, sample_t_shifted_rf, scm_loss, scm_target, student_update,
                             tangent_warmup_ratio)

D = torch.float64


def test_scm_gradient_is_normalised_g_direction():
    g0 = torch.Generator().manual_seed(0)
    B = 4
    F_minus = torch.randn(B, 3, 5, generator=g0, dtype=D)
    g = normalize_tangent(torch.randn(B, 3, 5, generator=g0, dtype=D) * 7, c=0.1)
    norms = g.reshape(B, -1).norm(dim=1)
    assert torch.all(norms < 1) and torch.all(norms > 0.98)          # ||g|| / (||g|| + 0.1)
    F_theta = F_minus.clone().requires_grad_()
    loss = scm_loss(F_theta, F_minus, g, B)
    (grad,) = torch.autograd.grad(loss, F_theta)
    assert torch.allclose(grad, -2 * g / B, atol=1e-14)               # descent moves F along +g
    assert float(loss.detach()) == pytest.approx(float((g ** 2).sum() / B))


def test_scm_target_closed_form_and_consistency_meaning():
    # At r = 1, g = cos t * d/dt f(x_t, t) along the ODE with f = cos x - sin F.
    t = torch.tensor([0.4, 1.1], dtype=D)
    x = torch.randn(2, 3, dtype=D)
    F_minus, F_T, J = torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D)
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    dFdt = J / (c * s)
    df_dt = -s * x + c * F_T - c * F_minus - s * dFdt
    assert torch.allclose(scm_target(F_minus, F_T, J, x, t, 1.0), c * df_dt, atol=1e-12)
    # during the warm-up (reference, NVlabs/rcm _student_scm_step): J stays whole, r scales the sin terms
    for r in (0.0, 0.3, 0.75):
        ref = -c * torch.sqrt(1 - r ** 2 * s ** 2) * (F_minus - F_T) - (r * c * s * x + J)
        assert torch.allclose(scm_target(F_minus, F_T, J, x, t, r), ref, atol=1e-12)
    # the named variant that also scales J: at r = 0 only the teacher-matching term remains
    assert torch.allclose(scm_target(F_minus, F_T, J, x, t, 0.0, warmup_scales_jvp=True),
                          -c * (F_minus - F_T), atol=1e-12)


def test_nan_mask():
    a = torch.zeros(3, 2)
    b = torch.zeros(3, 2)
    a[1, 0] = float("nan")
    b[2, 1] = float("inf")
    assert nan_mask(a, b).tolist() == [True, False, False]


def test_dmd_loss_sign_and_gradient():
    g0 = torch.Generator().manual_seed(1)
    G = torch.randn(3, 8, generator=g0, dtype=D).requires_grad_()
    x0_real = torch.randn(3, 8, generator=g0, dtype=D)
    x0_fake = torch.randn(3, 8, generator=g0, dtype=D)
    (grad,) = torch.autograd.grad(dmd_loss(G, x0_fake, x0_real), G)
    w = (G.detach() - x0_real).abs().mean(1, keepdim=True)
    # summed over the sample's 8 elements (as sCM), averaged over the batch of 3
    assert torch.allclose(grad, 2 * (x0_fake - x0_real) / w / 3, atol=1e-12)
    # fake == real: no signal
    (g2,) = torch.autograd.grad(dmd_loss(G, x0_real, x0_real), G)
    assert torch.all(g2 == 0)


def test_dmd_step_moves_generator_toward_real_distribution():
    # 1-D: student samples around 2, real score says 0, fake (student's own) says 2: a step must lower G.
    G = torch.full((64, 1), 2.0, dtype=D, requires_grad=True)
    loss = dmd_loss(G, torch.full_like(G, 2.0), torch.zeros_like(G))
    loss.backward()
    assert torch.all(G.grad > 0)


def test_critic_minimiser_is_the_generator_sample():
    G = torch.randn(5, 4, dtype=D)
    t = torch.full((5,), 0.9, dtype=D)
    x0_fake = torch.randn(5, 4, dtype=D, requires_grad=True)
    assert float(critic_loss(G, G, t)) == 0.0
    loss = critic_loss(G, x0_fake, t)
    (grad,) = torch.autograd.grad(loss, x0_fake)
    w = 1 / math.sin(0.9) ** 2
    assert torch.allclose(grad, 2 * (x0_fake - G).detach() * w / 5, atol=1e-12)     # summed per sample, batch mean


def test_time_distributions():
    g = torch.Generator().manual_seed(0)
    t = sample_t_lognormal(200_000, 0.7, 1.6, generator=g)
    z = torch.log(torch.tan(t))
    assert float(z.mean()) == pytest.approx(0.7, abs=0.02) and float(z.std()) == pytest.approx(1.6, abs=0.02)
    t = sample_t_shifted_rf(200_000, 5.0, generator=g)
    s = torch.tan(t) / (1 + torch.tan(t))
    u = s / (5 - 4 * s)                                                 # inverse of the shift
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01)
    assert float((u < 0.25).double().mean()) == pytest.approx(0.25, abs=0.01)
    assert float(t.min()) > 0 and float(t.max()) < math.pi / 2


def test_warmup_and_schedule():
    assert tangent_warmup_ratio(0, 1000) == 0 and tangent_warmup_ratio(500, 1000) == 0.5
    assert tangent_warmup_ratio(5000, 1000) == 1 and tangent_warmup_ratio(0, 0) == 1
    kinds = [student_update(s, 3, 5) for s in range(14)]
    assert kinds == [True, True, True, True, False, False, False, False, True, False, False, False, False, True]


def test_power_ema_exponent_and_average():
    gamma = ema_exponent(0.05)
    assert (gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)) == pytest.approx(0.05 ** 2, rel=1e-9)
    assert gamma == pytest.approx(16.97, abs=0.01)                     # EDM2: sigma_rel 0.05 <-> gamma 16.97
    assert ema_exponent(0.10) == pytest.approx(6.94, abs=0.01)
    assert power_ema_beta(1, gamma) == 0.0
    # The power EMA of a stream theta_1..theta_n is sum w_i theta_i with w_i proportional to i^gamma.
    lin = torch.nn.Linear(1, 1, bias=False)
    ema = PowerEMA(lin, 0.05)
    vals = np.linspace(-1, 3, 50)
    for v in vals:
        with torch.no_grad():
            lin.weight.fill_(v)
        ema.update(lin)
    i = np.arange(1, 51, dtype=np.float64)
    # exact recursion weights: prod of betas; compare to i^gamma weighting within a few percent of the range
    w = i ** gamma
    assert float(ema.module.weight) == pytest.approx(float((w * vals).sum() / w.sum()), abs=0.02)

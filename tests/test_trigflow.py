"""TrigFlow conversions and network wrappers against closed forms."""
import math

import pytest
import torch

from rcm_core.denoiser import Parameterization, TrigFlowDenoiser, check_parameterization, guided
from rcm_core.gaussian import GaussianDenoiserNet
from rcm_core.trigflow import (F_from_x0, F_from_x0_eps, noisy_sample, rf_preconditioning, rf_time_from_t,
                               sigma_from_t, t_from_rf_time, t_from_sigma, x0_from_F)

D = torch.float64


def test_time_round_trips():
    t = torch.linspace(1e-4, math.pi / 2 - 1e-4, 101, dtype=D)
    assert torch.allclose(t_from_sigma(sigma_from_t(t)), t, atol=1e-12)
    assert torch.allclose(t_from_rf_time(rf_time_from_t(t)), t, atol=1e-12)
    s = rf_time_from_t(t)
    sig = sigma_from_t(t)
    assert torch.allclose(s, sig / (1 + sig), atol=1e-12)
    assert float(rf_time_from_t(torch.tensor(math.pi / 2, dtype=D))) == pytest.approx(1.0)


def test_x_t_is_scaled_rf_sample():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g, dtype=D), torch.randn(5, 3, generator=g, dtype=D)
    t = torch.rand(5, generator=g, dtype=D) * 1.5 + 0.01
    x_t = noisy_sample(x0, eps, t)
    s = rf_time_from_t(t)[:, None]
    x_s = (1 - s) * x0 + s * eps
    assert torch.allclose(x_t / (torch.cos(t) + torch.sin(t))[:, None], x_s, atol=1e-12)
    F = F_from_x0_eps(x0, eps, t)
    assert torch.allclose(x0_from_F(x_t, F, t), x0, atol=1e-12)
    assert torch.allclose(F_from_x0(x_t, x0, t), F, atol=1e-10)


def test_rf_preconditioning_values():
    t = torch.tensor([0.3, 1.0], dtype=D)
    c_in, c_noise, c_skip, c_out = rf_preconditioning(t)
    cs = torch.cos(t) + torch.sin(t)
    assert torch.allclose(c_in, 1 / cs) and torch.allclose(c_skip, 1 / cs)
    assert torch.allclose(c_noise, 1000 * torch.sin(t) / cs)
    assert torch.allclose(c_out, -torch.sin(t) / cs)


class OracleRF(torch.nn.Module):
    """An RF 'network' that knows x0 and eps: v = eps - x0, checking the timestep it is given."""

    def __init__(self, x0, eps):
        super().__init__()
        self.x0, self.eps = x0, eps
        self.seen = None
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=D))

    def forward(self, x, timestep, cond):
        self.seen = (x, timestep)
        return self.eps - self.x0 + 0 * self.dummy


def test_rf_wrapper_recovers_x0_and_F():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 2, 3, generator=g, dtype=D), torch.randn(4, 2, 3, generator=g, dtype=D)
    t = torch.tensor([0.1, 0.5, 1.0, 1.5], dtype=D)
    x_t = noisy_sample(x0, eps, t)
    net = OracleRF(x0, eps)
    den = TrigFlowDenoiser(net, "rf")
    x0_hat, F = den.x0_and_F(x_t, t, torch.zeros(4, 1, 1, dtype=D))
    assert torch.allclose(x0_hat, x0, atol=1e-12)
    assert torch.allclose(F, F_from_x0_eps(x0, eps, t), atol=1e-12)
    s = rf_time_from_t(t)
    x_seen, ts_seen = net.seen
    assert torch.allclose(x_seen, (1 - s)[:, None, None] * x0 + s[:, None, None] * eps, atol=1e-12)
    assert torch.allclose(ts_seen, 1000 * s)


@pytest.mark.parametrize("kind", ["x0", "F", "eps"])
def test_other_parameterisations_recover_x0(kind):
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 5, generator=g, dtype=D), torch.randn(3, 5, generator=g, dtype=D)
    t = torch.tensor([0.2, 0.7, 1.3], dtype=D)
    F_true = F_from_x0_eps(x0, eps, t)
    out = {"x0": x0, "F": F_true, "eps": eps}[kind]

    class Net(torch.nn.Module):
        def forward(self, x, timestep, cond):
            assert torch.allclose(timestep.to(D), 10 * t)
            return out

    den = TrigFlowDenoiser(Net(), Parameterization(kind, 10.0))
    x0_hat, F = den.x0_and_F(noisy_sample(x0, eps, t), t, torch.zeros(3, 1, 1))
    assert torch.allclose(x0_hat, x0, atol=1e-10) and torch.allclose(F, F_true, atol=1e-10)


def test_guidance_is_affine_and_batched():
    class Lin(torch.nn.Module):
        def forward(self, x, timestep, cond):
            return x * cond.mean(dim=(1, 2)).view(-1, 1)

    den = TrigFlowDenoiser(Lin(), Parameterization("F", 1.0))
    x = torch.randn(3, 4, dtype=D)
    t = torch.full((3,), 0.7, dtype=D)
    cond, uncond = torch.full((3, 2, 2), 2.0, dtype=D), torch.full((1, 2, 2), 0.5, dtype=D)
    F = guided(den, x, t, cond, uncond, 4.0)
    assert torch.allclose(F, x * (0.5 + 4.0 * (2.0 - 0.5)))
    x0, F2 = guided(den, x, t, cond, uncond, 4.0, want="both")
    assert torch.allclose(x0, x0_from_F(x, F2, t))


def test_parameterisation_mismatch_is_detected():
    mu = torch.tensor([1.0, -1.0, 0.5], dtype=D)
    net = GaussianDenoiserNet(mu, 0.5)            # an x0-predicting network (timestep = t)
    data = mu + 0.5 * torch.randn(256, 3, dtype=D)
    cond = torch.zeros(256, 1, 1, dtype=D)
    errs = check_parameterization(TrigFlowDenoiser(net, Parameterization("x0", 1.0)), data, cond)
    assert errs["x0"] < errs["F"]
    with pytest.raises(ValueError, match="declared parameterisation 'rf'.*Declare 'x0'"):
        check_parameterization(TrigFlowDenoiser(net, Parameterization("rf", 1.0)), data, cond)


def test_wrong_output_shape_and_unknown_parameterisation():
    class Bad(torch.nn.Module):
        def forward(self, x, timestep, cond):
            return x[:, :-1]

    with pytest.raises(ValueError, match="returned .*expected"):
        TrigFlowDenoiser(Bad(), "F")(torch.randn(2, 3), torch.ones(2), torch.zeros(2, 1, 1))
    with pytest.raises(ValueError, match="unknown parameterisation 'v'"):
        Parameterization("v")
    with pytest.raises(ValueError, match="t must have shape"):
        TrigFlowDenoiser(Bad(), "F")(torch.randn(2, 3), torch.ones(3), torch.zeros(2, 1, 1))

"""Samplers against the analytic Gaussian teacher: the PF-ODE from pure noise has a closed form.

For x0 ~ N(mu, s^2 I) the probability-flow ODE maps noise eps (t = pi/2) to mu + s eps,
so the teacher sampler (any solver) must land there, and a perfect consistency student
must too, in any number of steps, in distribution.
"""
import math

import pytest
import torch

from rcm_core.denoiser import Parameterization, TrigFlowDenoiser
from rcm_core.gaussian import GaussianDenoiserNet, consistency_map
from rcm_core.sampling import rf_schedule, sample_student, sample_teacher, student_rollout, student_times

D = torch.float64
MU = torch.tensor([1.0, -2.0, 0.5], dtype=D)
S = 0.5


def teacher():
    return TrigFlowDenoiser(GaussianDenoiserNet(MU, S), Parameterization("x0", 1.0))


def test_rf_schedule_shift():
    s = rf_schedule(4, 1.0)
    assert torch.allclose(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=D))
    s5 = rf_schedule(4, 5.0)
    assert s5[0] == 1 and s5[-1] == 0 and torch.all(s5[1:-1] > s[1:-1])   # shift spends more steps at high noise


def _ode_error(solver, steps):
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(512, 3, generator=g, dtype=D)
    cond = torch.zeros(512, 1, 1, dtype=D)
    x = sample_teacher(teacher(), cond, cond[:1], eps, steps=steps, guidance=1.0, shift=3.0, solver=solver)
    return float((x - (MU + S * eps)).norm() / (S * eps).norm())


def test_euler_teacher_sampler_converges_to_the_exact_ode_solution():
    e100, e1000 = _ode_error("euler", 100), _ode_error("euler", 1000)
    assert e1000 < 0.005 and 7 < e100 / e1000 < 13                         # first order: error ~ 1/steps


def test_unipc_teacher_sampler_is_higher_order():
    pytest.importorskip("diffusers", reason="UniPC comes from diffusers (the 'real' extra)")
    e20, e50 = _ode_error("unipc", 20), _ode_error("unipc", 50)
    assert e50 < 0.005 and e20 / e50 > (50 / 20) ** 2 * 0.9                # at least second order
    assert e50 < _ode_error("euler", 50) / 5


def test_guidance_changes_the_teacher_and_unknown_solver_is_rejected():
    class CondNet(torch.nn.Module):
        def forward(self, x, timestep, cond):
            return torch.zeros_like(x) + cond.mean(dim=(1, 2)).view(-1, 1)   # x0 = cond value

    den = TrigFlowDenoiser(CondNet(), Parameterization("x0", 1.0))
    eps = torch.randn(4, 3, dtype=D)
    c, u = torch.ones(4, 1, 1, dtype=D), torch.zeros(1, 1, 1, dtype=D)
    x = sample_teacher(den, c, u, eps, steps=20, guidance=3.0, shift=1.0)
    assert torch.allclose(x, torch.full_like(x, 3.0), atol=1e-9)              # u + 3 (c - u)
    with pytest.raises(ValueError, match="unknown teacher solver 'heun'"):
        sample_teacher(den, c, u, eps, guidance=3.0, shift=1.0, solver="heun")


class ExactStudent(torch.nn.Module):
    """f(x_t, t) = the exact consistency map (x0 parameterisation)."""

    def forward(self, x, timestep, cond):
        return consistency_map(x, timestep, MU, S)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_few_step_sampler_with_exact_consistency_map(steps):
    den = TrigFlowDenoiser(ExactStudent(), Parameterization("x0", 1.0))
    g = torch.Generator().manual_seed(1)
    n = 20000
    x = sample_student(den, torch.zeros(n, 1, 1, dtype=D), torch.randn(n, 3, generator=g, dtype=D), steps=steps,
                       generator=g)
    assert torch.allclose(x.mean(0), MU, atol=0.02) and torch.allclose(x.std(0), torch.full((3,), S, dtype=D), rtol=0.03)


def test_student_times_and_rollout():
    assert student_times(1) == [math.atan(80.0), 0.0]
    assert student_times(4, 1600.0, (1.5, 1.4, 1.0)) == [math.atan(1600.0), 1.5, 1.4, 1.0, 0.0]
    with pytest.raises(ValueError, match="student steps must be in 1..4"):
        student_times(5)
    den = TrigFlowDenoiser(ExactStudent(), Parameterization("x0", 1.0))
    net_param = torch.nn.Parameter(torch.ones((), dtype=D))

    class Scaled(torch.nn.Module):                                          # only to see what keeps the graph
        def forward(self, x, timestep, cond):
            return consistency_map(x, timestep, MU, S) * net_param

    sden = TrigFlowDenoiser(Scaled(), Parameterization("x0", 1.0))
    noise = torch.randn(6, 3, dtype=D)
    t_hat = [torch.tensor([1.0, 1.6, 0.3, 1.0, 1.0, 1.0], dtype=D), torch.full((6,), 0.5, dtype=D)]
    G, t_last = student_rollout(sden, torch.zeros(6, 1, 1, dtype=D), noise, 3, t_hat)
    assert torch.allclose(t_last, torch.tensor([0.5, 0.5, 0.3, 0.5, 0.5, 0.5], dtype=D))  # t_k = min(t_hat_k, t_{k-1})
    assert G.requires_grad and G.grad_fn is not None
    (grad,) = torch.autograd.grad(G.sum(), net_param)
    assert torch.allclose(grad, G.detach().sum(), atol=1e-9)               # only the last step keeps the graph
    G1, t1 = student_rollout(den, torch.zeros(6, 1, 1, dtype=D), noise, 1, [])
    assert torch.allclose(t1, torch.full((6,), math.pi / 2, dtype=D)) and torch.allclose(G1, MU + S * noise)

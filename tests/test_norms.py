"""RMSNorm on its fused kernel under autocast (rcm_core.nets.norms): the float32 master weight meets a bf16
input as a bf16 weight. Expected values come from a float64 formula written out here (and its derivatives by
hand), not from torch's norm."""
import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad as fwAD

from rcm_core.nets.norms import install_matched_norms, uses_matched_norms

D, EPS = 64, 1e-6


def _ref(x, w):
    """y = x * (mean(x^2) + eps)^-1/2 * w, float64."""
    x, w = x.double(), w.double()
    r = (x.square().mean(-1, keepdim=True) + EPS).rsqrt()
    return x * r * w


def _ref_jvp(x, dx, w):
    """d y along dx: (r dx - x r^3 mean(x dx)) w."""
    x, dx, w = x.double(), dx.double(), w.double()
    r = (x.square().mean(-1, keepdim=True) + EPS).rsqrt()
    return (r * dx - x * r ** 3 * (x * dx).mean(-1, keepdim=True)) * w


def _ops(fn):
    with torch.profiler.profile() as prof:
        fn()
    return [e.name for e in prof.events()]


def _norm():
    torch.manual_seed(0)
    m = nn.RMSNorm(D, eps=EPS)
    with torch.no_grad():
        m.weight.copy_(1 + 0.5 * torch.randn(D))
    return m


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="needs CUDA")])]


@pytest.mark.parametrize("dev", DEVICES)
def test_bf16_input_and_fp32_weight_take_the_fused_kernel_and_match_the_formula(dev):
    m = _norm().to(dev)
    x = torch.randn(8, D).to(torch.bfloat16).to(dev)
    stock = _ops(lambda: m(x))
    assert "aten::_fused_rms_norm" not in stock            # today's behaviour: the composite path
    assert install_matched_norms(m) == 1 and uses_matched_norms(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # no "Mismatch dtype" warning
        ops = _ops(lambda: m(x))
        y = m(x)
    assert "aten::_fused_rms_norm" in ops
    assert y.dtype == torch.bfloat16 and m.weight.dtype == torch.float32
    ref = _ref(x, m.weight)
    assert ((y.double() - ref).abs() <= 2 ** -7 * ref.abs() + 1e-6).all()      # bf16 output rounding + weight's
    # the weight's gradient reaches the fp32 master: dL/dw = sum_rows G * x * r
    g = torch.randn(8, D).to(dev)
    y.backward(g.to(torch.bfloat16))
    xr = _ref(x, torch.ones(D, device=dev))
    gw = (g.to(torch.bfloat16).double() * xr).sum(0)
    assert m.weight.grad.dtype == torch.float32
    torch.testing.assert_close(m.weight.grad.double(), gw, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dev", DEVICES)
def test_tangent_matches_the_formulas_derivative(dev):
    m = _norm().to(dev)
    install_matched_norms(m)
    x, dx = torch.randn(8, D).to(dev), torch.randn(8, D).to(dev)
    with fwAD.dual_level():                                 # float32: compare tightly with float64
        t = fwAD.unpack_dual(m(fwAD.make_dual(x, dx))).tangent
    torch.testing.assert_close(t.double(), _ref_jvp(x, dx, m.weight.detach()), rtol=1e-4, atol=1e-5)
    xb, dxb = x.to(torch.bfloat16), dx.to(torch.bfloat16)
    with fwAD.dual_level():                                 # bf16 input: the fused kernel's own forward-AD rule
        t = fwAD.unpack_dual(m(fwAD.make_dual(xb, dxb))).tangent
    ref = _ref_jvp(xb, dxb, m.weight.detach())
    assert (t.double() - ref).norm() / ref.norm() < 2e-2
    _, tf = torch.func.jvp(m, (xb,), (dxb,))
    assert (tf.double() - ref).norm() / ref.norm() < 2e-2


def test_float_inputs_keep_the_stock_path_and_copies_rebind():
    m = _norm()
    x = torch.randn(4, D)
    want = m(x)
    install_matched_norms(m)
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    assert install_matched_norms(m) == 1                    # idempotent
    c = copy.deepcopy(m)
    with torch.no_grad():
        c.weight.mul_(2)
    torch.testing.assert_close(c(x), 2 * want)              # the copy's forward reads the copy's weight
    assert set(m.state_dict()) == {"weight"}
    p = pickle.loads(pickle.dumps(m))
    torch.testing.assert_close(p(x), want)
    assert install_matched_norms(nn.Linear(2, 2)) == 0


def test_gradient_sum_of_squares_matches_float64():
    """The trainer's gradient norm (one fused pass per list, no float64 copy of the gradients) against a
    float64 sum written out here, over tensors of very different sizes and scales, Nones skipped."""
    from rcm_core.train.update import _grad_norm, _sq_norm
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(1000, 300, generator=g) * 1e-3, None, torch.randn(7, generator=g) * 1e3,
          torch.randn(64, 64, generator=g).to(torch.bfloat16)]
    want = sum(float((t.double() ** 2).sum()) for t in ts if t is not None)
    assert _sq_norm(ts) == pytest.approx(want, rel=1e-5)
    ps = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    ps[0].grad = torch.tensor([3.0, 0.0, 4.0])
    assert _grad_norm(ps) == pytest.approx(5.0, rel=1e-7)
    assert _sq_norm([None]) == 0.0

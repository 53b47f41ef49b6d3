"""Wan's RoPE as an op (rcm_core.nets.rope.wan_rope) and its Triton pass (rcm_kernels.rope).

Expectations come from a second implementation written here: each (even, odd) pair as a complex number times
exp(i theta), in float64; its tangent and gradient by autograd through that complex product. On the CPU the
kernel runs in Triton's interpreter (fp32 / fp16); the bf16 GPU test compares it with the PyTorch formula."""
import pytest
import torch
from torch.autograd import forward_ad as fwAD

from triton_env import cpu_only, gpu  # noqa: F401  (sets TRITON_INTERPRET before Triton loads)
from rcm_core.nets import rope as rope_op  # noqa: E402
from rcm_core.nets.rope import rotate_pairs, wan_rope  # noqa: E402


def tables(n, d, dtype=torch.float32, seed=0):
    """diffusers-shaped rotary tables (1, N, 1, D): each angle repeated for its pair."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(n, d // 2, generator=g, dtype=torch.float64) * 6.0 - 3.0
    rep = theta.repeat_interleave(2, -1)[None, :, None]
    return theta, rep.cos().to(dtype), rep.sin().to(dtype)


def complex_rope(x, theta):
    """The rotation as complex multiplication, float64: x (B, N, H, D) with theta (N, D/2)."""
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    w = torch.polar(torch.ones_like(theta), theta)[None, :, None]
    return torch.view_as_real(z * w).flatten(-2)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_formula_is_the_complex_rotation_in_float64():
    theta, cos, sin = tables(7, 16, torch.float64)
    x = torch.randn(2, 7, 3, 16, dtype=torch.float64)
    assert rel(wan_rope(x, cos, sin), complex_rope(x, theta)) < 1e-14
    assert rel(rotate_pairs(x, cos[..., 0::2], sin[..., 1::2]), complex_rope(x, theta)) < 1e-14


@cpu_only
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("shape", [(1, 5, 2, 32), (2, 9, 3, 24)])     # D/2 = 16 and 12 (not a power of two)
def test_kernel_forward_matches_the_rotation(dtype, tol, shape):
    B, N, H, D = shape
    theta, cos, sin = tables(N, D)
    x = torch.randn(*shape).to(dtype)
    y = wan_rope(x, cos, sin, kernel=True)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel(y, complex_rope(x, theta)) < tol
    # the same rounding as the formula: float32 arithmetic, one cast to x's dtype
    assert rel(y, rotate_pairs(x, cos[..., 0::2], sin[..., 1::2])) < (1e-7 if dtype == torch.float32 else 1e-3)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inverse", [False, True])
def test_split_kernel_equals_the_stride_kernel_and_the_rotation(dtype, inverse):
    """The kernel variant that loads whole rows and splits even/odd lanes in registers (D/2 a power of two)."""
    from rcm_kernels import rope
    B, N, H, D = 2, 9, 3, 32
    theta, _, _ = tables(N, D)
    x = torch.randn(B, N, H, D).to(dtype)
    c, s = theta.cos().float(), theta.sin().float()
    y = rope.rotate(x, c, s, inverse=inverse, split=True)
    assert torch.equal(y, rope.rotate(x, c, s, inverse=inverse))
    assert rel(y, complex_rope(x, -theta if inverse else theta)) < (1e-6 if dtype == torch.float32 else 1e-3)


@cpu_only
def test_kernel_rules_tangent_and_gradient():
    """Forward-mode (a dual input, as the fused sCM pass) and reverse mode through the op, against autograd of the
    complex rotation in float64."""
    B, N, H, D = 2, 6, 2, 32
    theta, cos, sin = tables(N, D)
    x, dx, gy = torch.randn(B, N, H, D), torch.randn(B, N, H, D), torch.randn(B, N, H, D)
    with fwAD.dual_level():
        y, dy = fwAD.unpack_dual(wan_rope(fwAD.make_dual(x, dx), cos, sin, kernel=True))
    assert rel(y, complex_rope(x, theta)) < 1e-6
    assert rel(dy, complex_rope(dx, theta)) < 1e-6               # linear in x: the tangent rotates the same way
    xr = x.clone().requires_grad_(True)
    (wan_rope(xr, cos, sin, kernel=True) * gy).sum().backward()
    x64 = x.double().requires_grad_(True)
    (expect,) = torch.autograd.grad((complex_rope(x64, theta) * gy.double()).sum(), x64)
    assert rel(xr.grad, expect) < 1e-6


@cpu_only
def test_kernel_under_torch_func_jvp_and_vjp():
    B, N, H, D = 1, 5, 2, 32
    theta, cos, sin = tables(N, D)
    x, dx = torch.randn(B, N, H, D), torch.randn(B, N, H, D)
    y, dy = torch.func.jvp(lambda t: wan_rope(t, cos, sin, kernel=True), (x,), (dx,))
    assert rel(y, complex_rope(x, theta)) < 1e-6 and rel(dy, complex_rope(dx, theta)) < 1e-6
    _, vjp = torch.func.vjp(lambda t: wan_rope(t, cos, sin, kernel=True), x)
    (gx,) = vjp(dx)
    assert rel(gx, complex_rope(dx, -theta)) < 1e-6               # R^T = R(-theta)
    # nested transforms (jvp of the vjp) take the differentiable formula and still agree
    _, ddx = torch.func.jvp(lambda t: torch.func.vjp(lambda u: wan_rope(u, cos, sin, kernel=True), x)[1](t)[0],
                            (dx,), (x,))
    assert rel(ddx, complex_rope(x, -theta)) < 1e-6


def test_tables_the_kernel_cannot_take_use_the_formula():
    theta, cos, sin = tables(4, 16)
    x = torch.randn(1, 4, 2, 16)
    # angles shaped per batch (B = 2) are not one (N, D/2) table: the formula runs, with the same result
    cos2, sin2 = cos.expand(2, -1, -1, -1), sin.expand(2, -1, -1, -1)
    assert rope_op._tables(cos2[..., 0::2], sin2[..., 1::2], x) is None
    assert rel(wan_rope(x.expand(2, -1, -1, -1), cos2, sin2, kernel=True), complex_rope(x.expand(2, -1, -1, -1),
                                                                                          theta)) < 1e-6
    # on the CPU, without asking, the formula runs (no kernel)
    assert not rope_op._kernel_wanted(x, None)


@cpu_only
def test_processor_with_the_kernel_equals_the_formula(monkeypatch):
    """A tiny Wan2.1 forward with a tangent through the project's processor: kernel forced vs the formula."""
    from real_fixtures import tiny_wan
    from rcm_core.real import install_rcm_attention
    net = tiny_wan().float()
    install_rcm_attention(net)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 3, 8, 8, generator=g)
    dx = torch.randn(1, 4, 3, 8, 8, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 8, net.config.text_dim, generator=g)

    def run():
        with fwAD.dual_level():
            out = net(fwAD.make_dual(x, dx), t, ctx, return_dict=False)[0]
            return fwAD.unpack_dual(out)

    y0, dy0 = run()
    calls = []
    real_rotate = rope_op._rotate
    monkeypatch.setattr(rope_op, "_kernel_wanted", lambda x, kernel: True)
    monkeypatch.setattr(rope_op, "_rotate", lambda *a, **k: calls.append(1) or real_rotate(*a, **k))
    y1, dy1 = run()
    assert calls                                         # the op ran (forward and tangent rules)
    assert rel(y1, y0) < 1e-5 and rel(dy1, dy0) < 1e-5


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_bf16_on_the_gpu_matches_the_formula():
    B, N, H, D = 1, 32760, 12, 128
    theta, cos, sin = tables(N, D)
    cos, sin = cos.cuda(), sin.cuda()
    x = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16)
    y = wan_rope(x, cos, sin, kernel=True)
    ref = rotate_pairs(x, cos[..., 0::2], sin[..., 1::2])
    assert rel(y, ref) < 4e-3
    assert rel(y, complex_rope(x.cpu(), theta).cuda()) < 4e-3
    from rcm_kernels import rope
    assert torch.equal(rope.rotate(x, cos[0, :, 0, 0::2], sin[0, :, 0, 1::2], split=True), y)   # the split variant
    xr = x.clone().requires_grad_(True)
    gy = torch.randn_like(x)
    (wan_rope(xr, cos, sin, kernel=True).float() * gy.float()).sum().backward()
    assert rel(xr.grad, complex_rope(gy.cpu(), -theta).cuda()) < 4e-3


def test_the_kernel_is_the_default_on_cuda_and_0_turns_it_off(monkeypatch):
    x = torch.randn(1, 4, 2, 16)
    monkeypatch.delenv("RCM_ROPE_KERNEL", raising=False)
    assert not rope_op._kernel_wanted(x, None)                  # the CPU: the formula
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))     # as if on a GPU
    assert rope_op._kernel_wanted(x, None)                      # on since its GPU run
    monkeypatch.setenv("RCM_ROPE_KERNEL", "0")
    assert not rope_op._kernel_wanted(x, None)


def test_a_bad_switch_value_is_refused_at_the_trainers_start(monkeypatch):
    from rcm_core.config import DistillConfig
    from rcm_core.teachers import get_teacher
    from rcm_core.trainer import RCMTrainer

    monkeypatch.setenv("RCM_ROPE_KERNEL", "yes")
    with pytest.raises(ValueError, match=r"RCM_ROPE_KERNEL='yes': expected 1 .* or 0"):
        RCMTrainer(get_teacher("embedded"), DistillConfig.preset("embedded", batch_size=2))


def test_a_bad_split_value_is_refused(monkeypatch):
    from rcm_core.nets.rope import check_rope_request
    monkeypatch.setenv("RCM_ROPE_SPLIT", "yes")
    with pytest.raises(ValueError, match=r"RCM_ROPE_SPLIT='yes': expected 1 .* or 0"):
        check_rope_request()


@cpu_only
def test_the_split_switch_reaches_the_kernel(monkeypatch):
    from rcm_kernels import rope
    calls = []
    real = rope._rope_split_kernel
    monkeypatch.setattr(rope, "_rope_split_kernel", type("K", (), {"__getitem__": lambda self, grid: (
        lambda *a, **k: calls.append(1) or real[grid](*a, **k))})())
    _, cos, sin = tables(5, 32)
    x = torch.randn(1, 5, 2, 32)
    wan_rope(x, cos, sin, kernel=True)
    assert not calls
    monkeypatch.setenv("RCM_ROPE_SPLIT", "1")
    wan_rope(x, cos, sin, kernel=True)
    assert calls

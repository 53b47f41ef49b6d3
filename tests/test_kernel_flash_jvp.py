"""Tests of the Triton forward-with-tangent attention kernel (rcm_kernels.flash_jvp).

CPU: the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/triton_env.py before
rcm_kernels.flash_jvp imports triton's jit) on tiny fp32/fp16 inputs, against float64
``torch.func.jvp`` of naive attention. (bf16 ``tl.dot`` is wrong in the interpreter, so
bf16 is tested on the GPU only.)

GPU (``-m gpu``): bf16 against a float64 reference, fresh random inputs each time,
output memory poisoned with NaN beforehand; also PyTorch's fused flash backward path
and the project op ``rcm_core.attention.attention`` on CUDA.
"""
import math
import os

import pytest
import torch

# first: sets TRITON_INTERPRET (no CUDA: the interpreter) before the kernel imports
from triton_env import BF16_O, BF16_T, GPU_CASES, cpu_only, gpu, poison as _poison
from rcm_core.attention import attention, attention_reference  # noqa: E402
from rcm_kernels import flash_jvp as fj  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make(shape_bhnd, layout, dtype=torch.float64, device="cpu", gen=None):
    B, H, N, D = shape_bhnd
    if layout == "bhnd":
        return torch.randn(B, H, N, D, dtype=dtype, device=device, generator=gen)
    return torch.randn(B, N, H, D, dtype=dtype, device=device, generator=gen).transpose(1, 2)


def reference(q, k, v, dq, dk, dv, scale):
    """float64 O, dO (torch.func.jvp of naive attention) and LSE."""
    q, k, v, dq, dk, dv = (x.double() for x in (q, k, v, dq, dk, dv))
    o, do = torch.func.jvp(lambda a, b, c: attention_reference(a, b, c, scale=scale), (q, k, v), (dq, dk, dv))
    lse = torch.logsumexp(scale * q @ k.transpose(-1, -2), dim=-1)
    return o, do, lse


def ref_grads(q, k, v, go, scale):
    qq, kk, vv = (x.double().detach().requires_grad_() for x in (q, k, v))
    attention_reference(qq, kk, vv, scale=scale).backward(go.double())
    return qq.grad, kk.grad, vv.grad


# (B, H, Nq, Nk, Dqk, Dv, dtype, layout, scale): self/cross, odd lengths, both layouts,
# QK dim != V dim, default and explicit scale.
CPU_CASES = [
    (1, 2, 40, 40, 32, 32, torch.float32, "bhnd", None),     # self, tail 40 % 16
    (1, 2, 33, 70, 64, 32, torch.float16, "bnhd", 0.2),      # cross, Dqk != Dv
    (2, 1, 17, 45, 32, 64, torch.float32, "bnhd", None),     # cross, odd, Dv > Dqk
    (1, 1, 21, 21, 64, 64, torch.float16, "bhnd", 0.5),      # self, odd
]
TOL = {torch.float32: 2e-5, torch.float16: 5e-3}


@cpu_only
@pytest.mark.parametrize("B,H,Nq,Nk,Dqk,Dv,dtype,layout,scale", CPU_CASES)
def test_forward_tangent_cpu_interpreter(B, H, Nq, Nk, Dqk, Dv, dtype, layout, scale):
    g = torch.Generator().manual_seed(1000 + Nq * Nk)
    q, dq = make((B, H, Nq, Dqk), layout, gen=g), make((B, H, Nq, Dqk), layout, gen=g)
    k, dk = make((B, H, Nk, Dqk), layout, gen=g), make((B, H, Nk, Dqk), layout, gen=g)
    v, dv = make((B, H, Nk, Dv), layout, gen=g), make((B, H, Nk, Dv), layout, gen=g)
    s = scale if scale is not None else 1.0 / math.sqrt(Dqk)
    o_ref, do_ref, lse_ref = reference(q, k, v, dq, dk, dv, s)
    args = [x.to(dtype) for x in (q, k, v, dq, dk, dv)]
    o, do, lse = fj.forward_tangent(*args, scale)
    assert o.shape == (B, H, Nq, Dv) and do.shape == (B, H, Nq, Dv) and lse.shape == (B, H, Nq)
    assert lse.dtype == torch.float32 and o.dtype == dtype
    if layout == "bnhd" and H > 1:
        assert o.transpose(1, 2).is_contiguous(), "output should follow the bnhd layout"
    assert torch.isfinite(o).all() and torch.isfinite(do).all()
    assert rel(o, o_ref) < TOL[dtype], rel(o, o_ref)
    assert rel(do, do_ref) < TOL[dtype], rel(do, do_ref)
    assert rel(lse, lse_ref) < TOL[dtype]
    # forward-only kernel gives the same O and LSE
    o2, lse2 = fj.forward(*args[:3], scale)
    assert rel(o2, o_ref) < TOL[dtype] and rel(lse2, lse_ref) < TOL[dtype]


@cpu_only
@pytest.mark.parametrize("B,H,Nq,Nk,Dqk,Dv,dtype,layout,scale", CPU_CASES[:3])
def test_backward_cpu_interpreter(B, H, Nq, Nk, Dqk, Dv, dtype, layout, scale):
    g = torch.Generator().manual_seed(7 + Nq + Nk)
    q, k, v = make((B, H, Nq, Dqk), layout, gen=g), make((B, H, Nk, Dqk), layout, gen=g), \
        make((B, H, Nk, Dv), layout, gen=g)
    go = make((B, H, Nq, Dv), layout, gen=g)
    s = scale if scale is not None else 1.0 / math.sqrt(Dqk)
    gq_ref, gk_ref, gv_ref = ref_grads(q, k, v, go, s)
    qd, kd, vd, god = (x.to(dtype) for x in (q, k, v, go))
    o, lse = fj.forward(qd, kd, vd, scale)
    gq, gk, gv = fj.backward(qd, kd, vd, o, lse, god, scale)
    for name, a, b in (("dq", gq, gq_ref), ("dk", gk, gk_ref), ("dv", gv, gv_ref)):
        assert a.shape == b.shape and a.dtype == dtype
        assert rel(a, b) < 2 * TOL[dtype], (name, rel(a, b))


@cpu_only
def test_noncontiguous_strided_inputs_cpu_interpreter():
    # every other token (stride 2 along N), a head-dim slice of a wider tensor, and a
    # V whose head dim is not the fastest axis: all addressed through strides.
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 38, 48, generator=g)[:, :, ::2, :32]
    dq = torch.randn(1, 2, 19, 32, generator=g)
    k = torch.randn(1, 2, 23, 32, generator=g)
    dk = torch.randn(1, 2, 46, 32, generator=g)[:, :, 1::2]
    v = torch.randn(1, 2, 32, 23, generator=g).transpose(2, 3)
    dv = torch.randn(1, 2, 23, 32, generator=g)
    assert not q.is_contiguous() and not v.is_contiguous() and not dk.is_contiguous()
    s = 1 / math.sqrt(32)
    o_ref, do_ref, _ = reference(q, k, v, dq, dk, dv, s)
    o, do, _ = fj.forward_tangent(q, k, v, dq, dk, dv)
    assert rel(o, o_ref) < 2e-5 and rel(do, do_ref) < 2e-5


def _bad_input_cases():
    def t(*shape, dtype=torch.float32, device="cpu"):
        return torch.randn(*shape, dtype=dtype, device=device)
    ok = (t(1, 2, 8, 32), t(1, 2, 8, 32), t(1, 2, 8, 32))
    return [
        ("batch", (t(1, 2, 8, 32), t(2, 2, 8, 32), t(2, 2, 8, 32)), ValueError, "batch"),
        ("heads", (t(1, 2, 8, 32), t(1, 3, 8, 32), t(1, 3, 8, 32)), ValueError, "head counts"),
        ("kv tokens", (t(1, 2, 8, 32), t(1, 2, 8, 32), t(1, 2, 9, 32)), ValueError, "token counts"),
        ("qk dims", (t(1, 2, 8, 32), t(1, 2, 8, 64), t(1, 2, 8, 32)), ValueError, "head dims differ"),
        ("head dim", (t(1, 2, 8, 48), t(1, 2, 8, 48), t(1, 2, 8, 48)), ValueError, "unsupported"),
        ("v head dim", (t(1, 2, 8, 32), t(1, 2, 8, 32), t(1, 2, 8, 96)), ValueError, "unsupported"),
        ("dtype mix", (ok[0], ok[1].half(), ok[2]), TypeError, "dtypes differ"),
        ("float64", tuple(x.double() for x in ok), TypeError, "unsupported dtype"),
        ("3-D", (ok[0][0], ok[1], ok[2]), ValueError, "4-D"),
        ("device", (ok[0], ok[1].to("meta"), ok[2]), ValueError, "devices differ"),
    ]


@pytest.mark.parametrize("name,qkv,exc,msg", _bad_input_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs_raise_before_launch(name, qkv, exc, msg):
    q, k, v = qkv
    with pytest.raises(exc, match=msg):
        fj.forward(q, k, v)
    with pytest.raises(exc, match=msg):
        fj.forward_tangent(q, k, v, q, k, v)


def test_bad_tangent_shape_and_scale():
    q = torch.randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="dk shape"):
        fj.forward_tangent(q, q, q, q, q[:, :, :4], q)
    with pytest.raises(ValueError, match="scale must be finite"):
        fj.forward(q, q, q, float("nan"))
    assert fj.supports(64) and fj.supports(128) and not fj.supports(80)


def test_cpu_tensors_rejected_without_interpreter():
    """Without TRITON_INTERPRET the kernel needs CUDA tensors: checked in a fresh process."""
    import subprocess
    import sys
    code = ("import torch\nfrom rcm_kernels import flash_jvp as fj\nq = torch.randn(1, 1, 8, 32)\n"
            "try:\n    fj.forward(q, q, q)\nexcept ValueError as e:\n    print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERR") and "CUDA" in out.stdout, out.stdout


# ------------------------------------------------------------------------------------
# GPU (run on the device machine: pytest -m gpu)
# ------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _one_config(monkeypatch):
    """GPU tests use the first autotune config of each kernel: tuning every
    (head dims, length, dtype) key compiles dozens of variants (over 3 minutes on an
    H100). The tuned configs are checked against SDPA by bench/bench_attention.py."""
    monkeypatch.setenv("RCM_FLASH_AUTOTUNE", "0")


@gpu
@needs_cuda
@pytest.mark.parametrize("B,H,Nq,Nk,Dqk,Dv,layout", GPU_CASES)
def test_gpu_forward_tangent_bf16(B, H, Nq, Nk, Dqk, Dv, layout):
    dev = "cuda"
    q, dq = make((B, H, Nq, Dqk), layout, torch.float32, dev), make((B, H, Nq, Dqk), layout, torch.float32, dev)
    k, dk = make((B, H, Nk, Dqk), layout, torch.float32, dev), make((B, H, Nk, Dqk), layout, torch.float32, dev)
    v, dv = make((B, H, Nk, Dv), layout, torch.float32, dev), make((B, H, Nk, Dv), layout, torch.float32, dev)
    args = [x.bfloat16() for x in (q, k, v, dq, dk, dv)]
    s = 1 / math.sqrt(Dqk)
    o_ref, do_ref, lse_ref = reference(*args, s)
    _poison()
    o, do, lse = fj.forward_tangent(*args, None)
    torch.cuda.synchronize()
    assert torch.isfinite(o).all() and torch.isfinite(do).all() and torch.isfinite(lse).all()
    eo, et, el = rel(o, o_ref), rel(do, do_ref), rel(lse, lse_ref)
    print(f"bf16 fwd-tangent {B,H,Nq,Nk,Dqk,Dv,layout}: O {eo:.2e} dO {et:.2e} lse {el:.2e}")
    assert eo < BF16_O and et < BF16_T and el < 1e-3
    _poison()
    o2, lse2 = fj.forward(*args[:3], None)
    assert torch.isfinite(o2).all() and rel(o2, o_ref) < BF16_O and rel(lse2, lse_ref) < 1e-3
    # fp32 inputs: IEEE fp32 products
    o3, do3, _ = fj.forward_tangent(*[x.float() for x in args], None)
    assert rel(o3, o_ref) < 1e-5 and rel(do3, do_ref) < 1e-5


@gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["triton", "aten"])
@pytest.mark.parametrize("B,H,Nq,Nk,Dqk,Dv,layout", GPU_CASES[:3])
def test_gpu_backward_bf16(impl, B, H, Nq, Nk, Dqk, Dv, layout):
    dev = "cuda"
    q = make((B, H, Nq, Dqk), layout, torch.float32, dev).bfloat16()
    k = make((B, H, Nk, Dqk), layout, torch.float32, dev).bfloat16()
    v = make((B, H, Nk, Dv), layout, torch.float32, dev).bfloat16()
    go = make((B, H, Nq, Dv), layout, torch.float32, dev).bfloat16()
    s = 1 / math.sqrt(Dqk)
    refs = ref_grads(q, k, v, go, s)
    o, lse = fj.forward(q, k, v, None)
    _poison()
    grads = fj.backward(q, k, v, o, lse, go, None, impl=impl)
    torch.cuda.synchronize()
    errs = [rel(a, b) for a, b in zip(grads, refs)]
    print(f"bf16 backward[{impl}] {B,H,Nq,Nk,Dqk,Dv,layout}: dq/dk/dv {errs}")
    for a in grads:
        assert torch.isfinite(a).all()
    assert max(errs) < BF16_T, errs


@gpu
@needs_cuda
def test_gpu_project_op_jvp_and_grad():
    """rcm_core.attention.attention on CUDA dispatches to the kernel (jvp + backward)."""
    check_project_op_on_cuda()


def check_project_op_on_cuda():
    """jvp and backward of rcm_core.attention.attention on CUDA (bf16, bnhd, ragged Nq != Nk) against the
    float64 reference (also used by the Hopper kernel's tests)."""
    dev = "cuda"
    B, H, Nq, Nk, D = 1, 3, 700, 333, 128
    q = torch.randn(B, Nq, H, D, device=dev).bfloat16()
    k = torch.randn(B, Nk, H, D, device=dev).bfloat16()
    v = torch.randn(B, Nk, H, D, device=dev).bfloat16()
    dq, dk, dv = (torch.randn_like(x) for x in (q, k, v))
    s = 1 / math.sqrt(D)
    o, do = torch.func.jvp(lambda a, b, c: attention(a, b, c, layout="bnhd"), (q, k, v), (dq, dk, dv))
    o_ref, do_ref = torch.func.jvp(lambda a, b, c: attention_reference(a, b, c, scale=s, layout="bnhd"),
                                   tuple(x.double() for x in (q, k, v)), tuple(x.double() for x in (dq, dk, dv)))
    assert rel(o, o_ref) < BF16_O and rel(do, do_ref) < BF16_T
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    go = torch.randn_like(o)
    attention(qq, kk, vv, layout="bnhd").backward(go)
    qr, kr, vr = (x.double().detach().requires_grad_() for x in (q, k, v))
    attention_reference(qr, kr, vr, scale=s, layout="bnhd").backward(go.double())
    for a, b in ((qq.grad, qr.grad), (kk.grad, kr.grad), (vv.grad, vr.grad)):
        assert rel(a, b) < BF16_T


@cpu_only
def test_project_op_kernel_path_under_transforms_cpu_interpreter(monkeypatch):
    """rcm_core.attention's kernel path (forced on for CPU tensors in the interpreter)
    under torch.func.jvp, forward-mode AD, torch.func.grad and .backward(), and the
    exact fallback for nested transforms (jvp of grad)."""
    import torch.autograd.forward_ad as fwAD
    import rcm_core.attention as A
    g = torch.Generator().manual_seed(11)
    q, k, v, dq, dk, dv = (torch.randn(1, 2, 20, 32, generator=g) for _ in range(6))
    o_ref, do_ref = torch.func.jvp(lambda a, b, c: attention_reference(a, b, c),
                                   (q.double(), k.double(), v.double()), (dq.double(), dk.double(), dv.double()))
    calls = []
    real_ft = fj.forward_tangent
    monkeypatch.setattr(A, "_use_kernel", lambda q_, v_: True)
    monkeypatch.setattr(fj, "forward_tangent", lambda *a: calls.append(1) or real_ft(*a))
    o, do = torch.func.jvp(lambda a, b, c: attention(a, b, c), (q, k, v), (dq, dk, dv))
    assert calls, "kernel path not taken under torch.func.jvp"
    assert rel(o, o_ref) < 2e-5 and rel(do, do_ref) < 2e-5
    with fwAD.dual_level():
        t = fwAD.unpack_dual(attention(fwAD.make_dual(q, dq), fwAD.make_dual(k, dk), fwAD.make_dual(v, dv))).tangent
    assert rel(t, do_ref) < 2e-5
    gq = torch.func.grad(lambda a: (attention(a, k, v) ** 2).sum())(q)
    qq = q.double().requires_grad_()
    (attention_reference(qq, k.double(), v.double()) ** 2).sum().backward()
    assert rel(gq, qq.grad) < 2e-5
    # nested: jvp of grad must equal the exact path's answer
    f = lambda a: torch.func.grad(lambda x: (attention(x, k, v) ** 2).sum())(a)  # noqa: E731
    hk = torch.func.jvp(f, (q,), (dq,))[1]
    monkeypatch.setattr(A, "_use_kernel", lambda q_, v_: False)
    he = torch.func.jvp(f, (q,), (dq,))[1]
    assert rel(hk, he) < 1e-4

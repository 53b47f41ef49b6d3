"""Tests of the Hopper variant of the attention kernels (rcm_kernels.flash_jvp_hopper).

CPU: the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/triton_env.py before the
kernel modules import triton's jit) on small fp32/fp16 inputs, against float64
``torch.func.jvp`` / autograd of naive attention and against the portable kernel
(rcm_kernels.flash_jvp). Both code paths of the constexpr switch are run: tensor
descriptors (emulated by the interpreter) and plain pointers. The interpreter ignores
``tl.range``'s ``num_stages``/``warp_specialize`` and emulates TMA, so these tests check the
maths, tails, layouts and descriptor geometry, not the Hopper hardware paths. (bf16
``tl.dot`` is wrong in the interpreter: bf16 is tested on the GPU only.)

GPU (``-m gpu``, compute capability 9.x, for the next session with a device): bf16 against
a float64 reference and against the portable kernel, NaN-poisoned outputs, and the project
op with ``RCM_ATTN_KERNEL=hopper``.
"""
import math

import pytest
import torch

# first: sets TRITON_INTERPRET (no CUDA: the interpreter) before the kernel imports
from triton_env import BF16_O, BF16_T, GPU_CASES as PORTABLE_GPU_CASES, cpu_only, gpu, poison as _poison
from rcm_core.attention import attention, attention_reference  # noqa: E402
from rcm_kernels import flash_jvp as fj  # noqa: E402
from rcm_kernels import flash_jvp_hopper as fh  # noqa: E402


def _is_hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


needs_hopper = pytest.mark.skipif(not _is_hopper(), reason="needs a CUDA device of compute capability 9.x")


# float64 references and input makers: the portable kernel's tests' (one copy)
from test_kernel_flash_jvp import check_project_op_on_cuda, make, ref_grads, reference, rel  # noqa: E402


@pytest.fixture
def hopper_env(monkeypatch):
    """Set RCM_HOPPER_* knobs for one test and forget the tuned configs before and after."""
    def set_(**kv):
        for k, v in kv.items():
            monkeypatch.setenv(k, v)
        fh._reset_tuning()
    fh._reset_tuning()
    yield set_
    monkeypatch.delenv("RCM_HOPPER_TMA", raising=False)
    monkeypatch.delenv("RCM_HOPPER_CONFIG", raising=False)
    fh._reset_tuning()


# (B, H, Nq, Nk, Dqk, Dv, dtype, layout, scale): ragged tails (not multiples of 16), Nq != Nk,
# head dims 64 and 128, Dqk != Dv, both layouts, default and explicit scale.
CPU_CASES = [
    (1, 2, 40, 40, 64, 64, torch.float32, "bhnd", None),      # self, tail 40 % 16
    (1, 2, 33, 70, 64, 64, torch.float16, "bnhd", 0.2),       # cross, both tails ragged
    (1, 2, 21, 45, 128, 128, torch.float32, "bnhd", None),    # D 128, cross
    (2, 1, 17, 29, 128, 64, torch.float16, "bhnd", 0.5),      # Dqk != Dv, B = 2
]
TOL = {torch.float32: 2e-5, torch.float16: 5e-3}
VS_PORTABLE = {torch.float32: 1e-5, torch.float16: 2e-3}


def _inputs(B, H, Nq, Nk, Dqk, Dv, layout, seed):
    g = torch.Generator().manual_seed(seed)
    q, dq = make((B, H, Nq, Dqk), layout, gen=g), make((B, H, Nq, Dqk), layout, gen=g)
    k, dk = make((B, H, Nk, Dqk), layout, gen=g), make((B, H, Nk, Dqk), layout, gen=g)
    v, dv = make((B, H, Nk, Dv), layout, gen=g), make((B, H, Nk, Dv), layout, gen=g)
    return q, k, v, dq, dk, dv


@cpu_only
@pytest.mark.parametrize("tma", ["1", "0"], ids=["descriptors", "pointers"])
@pytest.mark.parametrize("B,H,Nq,Nk,Dqk,Dv,dtype,layout,scale", CPU_CASES)
def test_hopper_forward_tangent_cpu_interpreter(hopper_env, tma, B, H, Nq, Nk, Dqk, Dv, dtype, layout, scale):
    hopper_env(RCM_HOPPER_TMA=tma)
    q, k, v, dq, dk, dv = _inputs(B, H, Nq, Nk, Dqk, Dv, layout, 2000 + Nq * Nk)
    s = scale if scale is not None else 1.0 / math.sqrt(Dqk)
    o_ref, do_ref, lse_ref = reference(q, k, v, dq, dk, dv, s)
    args = [x.to(dtype) for x in (q, k, v, dq, dk, dv)]
    assert fh.applies(*args)
    o, do, lse = fh.forward_tangent(*args, scale)
    assert fh._fwd_kernel.best_config.kwargs["USE_TMA"] == (tma == "1")
    assert o.shape == (B, H, Nq, Dv) and do.shape == (B, H, Nq, Dv) and lse.shape == (B, H, Nq)
    assert lse.dtype == torch.float32 and o.dtype == dtype and do.dtype == dtype
    if layout == "bnhd" and H > 1:
        assert o.transpose(1, 2).is_contiguous() and do.transpose(1, 2).is_contiguous()
    assert torch.isfinite(o).all() and torch.isfinite(do).all()
    assert rel(o, o_ref) < TOL[dtype], rel(o, o_ref)
    assert rel(do, do_ref) < TOL[dtype], rel(do, do_ref)
    assert rel(lse, lse_ref) < TOL[dtype]
    # the portable kernel's answers
    po, pdo, plse = fj.forward_tangent(*args, scale)
    assert rel(o, po) < VS_PORTABLE[dtype] and rel(do, pdo) < VS_PORTABLE[dtype] and rel(lse, plse) < 1e-6
    # forward alone: same O and LSE
    o2, lse2 = fh.forward(*args[:3], scale)
    assert rel(o2, o_ref) < TOL[dtype] and rel(lse2, lse_ref) < TOL[dtype]
    assert rel(o2, o) < 1e-6 or dtype == torch.float16 and rel(o2, o) < VS_PORTABLE[dtype]


@cpu_only
@pytest.mark.parametrize("tma", ["1", "0"], ids=["descriptors", "pointers"])
@pytest.mark.parametrize("B,H,Nq,Nk,Dqk,Dv,dtype,layout,scale", CPU_CASES[:2] + CPU_CASES[3:])
def test_hopper_backward_cpu_interpreter(hopper_env, tma, B, H, Nq, Nk, Dqk, Dv, dtype, layout, scale):
    hopper_env(RCM_HOPPER_TMA=tma)
    g = torch.Generator().manual_seed(17 + Nq + Nk)
    q, k, v = make((B, H, Nq, Dqk), layout, gen=g), make((B, H, Nk, Dqk), layout, gen=g), \
        make((B, H, Nk, Dv), layout, gen=g)
    go = make((B, H, Nq, Dv), layout, gen=g)
    s = scale if scale is not None else 1.0 / math.sqrt(Dqk)
    refs = ref_grads(q, k, v, go, s)
    qd, kd, vd, god = (x.to(dtype) for x in (q, k, v, go))
    o, lse = fh.forward(qd, kd, vd, scale)
    grads = fh.backward(qd, kd, vd, o, lse, god, scale)
    assert fh._bwd_dq_kernel.best_config.kwargs["USE_TMA"] == (tma == "1")
    pgrads = fj.backward(qd, kd, vd, o, lse, god, scale)
    for name, a, b, p in zip(("dq", "dk", "dv"), grads, refs, pgrads):
        assert a.shape == b.shape and a.dtype == dtype
        assert torch.isfinite(a).all()
        assert rel(a, b) < 2 * TOL[dtype], (name, rel(a, b))
        assert rel(a, p) < VS_PORTABLE[dtype], (name, rel(a, p))


@cpu_only
def test_hopper_gpu_tile_shapes_cpu_interpreter(hopper_env):
    """The GPU's tiles (BLOCK_M 128, BLOCK_N 64, WS flag on: ignored by the interpreter) on a
    ragged cross-attention case: full key blocks in the tl.range loop plus a masked tail."""
    hopper_env(RCM_HOPPER_CONFIG="128,64,2,8,1")
    B, H, Nq, Nk, D = 1, 2, 150, 200, 128
    q, k, v, dq, dk, dv = _inputs(B, H, Nq, Nk, D, D, "bnhd", 5)
    s = 1 / math.sqrt(D)
    o_ref, do_ref, lse_ref = reference(q, k, v, dq, dk, dv, s)
    args = [x.half() for x in (q, k, v, dq, dk, dv)]
    o, do, lse = fh.forward_tangent(*args)
    cfg = fh._fwd_kernel.best_config
    assert (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["WARP_SPEC"], cfg.num_warps) == (128, 64, True, 8)
    assert rel(o, o_ref) < 5e-3 and rel(do, do_ref) < 5e-3 and rel(lse, lse_ref) < 1e-3
    g = torch.Generator().manual_seed(6)
    go = torch.randn(B, Nq, H, D, generator=g).transpose(1, 2)
    refs = ref_grads(q, k, v, go, s)
    grads = fh.backward(*args[:3], o, lse, go.half())
    for a, b in zip(grads, refs):
        assert rel(a, b) < 1e-2, rel(a, b)


@cpu_only
def test_applies_and_rejections():
    q = torch.randn(1, 2, 16, 64)
    assert fh.applies(q, q, q) and fh.supports(128) and not fh.supports(80)
    assert not fh.applies(q.double(), q.double(), q.double())            # dtype
    assert not fh.applies(q[..., :48], q[..., :48], q[..., :48])         # head dim 48
    wide = torch.randn(1, 2, 16, 128)
    assert not fh.applies(wide[..., ::2], q, q)                          # non-unit last stride
    flat = torch.randn(1 * 2 * 16 * 64 + 1).half()
    mis = flat[1:].view(1, 2, 16, 64)                                    # 2-byte offset: misaligned
    assert not fh.applies(mis, mis, mis)
    odd = torch.randn(1, 2, 16, 72).half()[..., :64]                     # row stride 144 B: TMA ok
    assert fh.applies(odd, odd, odd)
    odd2 = torch.randn(1, 2, 16, 68).half()[..., :64]                    # row stride 136 B: not 16-B
    assert not fh.applies(odd2, odd2, odd2)
    with pytest.raises(ValueError, match="not eligible"):
        fh.forward(mis, mis, mis)
    with pytest.raises(ValueError, match="dk shape"):
        fh.forward_tangent(q, q, q, q, q[:, :, :4], q)


@cpu_only
def test_dispatch_opt_in_cpu_interpreter(monkeypatch, hopper_env):
    """RCM_ATTN_KERNEL=hopper sends rcm_core.attention's kernel calls to the Hopper module where it
    applies (forced onto CPU tensors here), the portable module otherwise; the default (auto) on CPU tensors:
    portable (auto picks Hopper on sm90 CUDA tensors: test_gpu_hopper_project_op)."""
    import rcm_core.attention as A
    monkeypatch.setattr(A, "_use_kernel", lambda q_, v_: True)
    calls = []
    for mod, tag in ((fh, "hopper"), (fj, "portable")):
        for fn in ("forward", "forward_tangent", "backward"):
            real = getattr(mod, fn)
            monkeypatch.setattr(mod, fn, lambda *a, _r=real, _t=f"{tag}.{fn}", **kw: calls.append(_t) or _r(*a, **kw))
    g = torch.Generator().manual_seed(21)
    q, k, v, dq, dk, dv = (torch.randn(1, 2, 20, 32, generator=g) for _ in range(6))
    o_ref, do_ref = torch.func.jvp(lambda a, b, c: attention_reference(a, b, c),
                                   (q.double(), k.double(), v.double()), (dq.double(), dk.double(), dv.double()))

    def run():
        calls.clear()
        o, do = torch.func.jvp(lambda a, b, c: attention(a, b, c), (q, k, v), (dq, dk, dv))
        assert rel(o, o_ref) < 2e-5 and rel(do, do_ref) < 2e-5
        qq = q.clone().requires_grad_()
        (attention(qq, k, v) ** 2).sum().backward()
        return list(calls)

    monkeypatch.delenv("RCM_ATTN_KERNEL", raising=False)
    assert set(run()) == {"portable.forward", "portable.forward_tangent", "portable.backward"}
    monkeypatch.setenv("RCM_ATTN_KERNEL", "hopper")
    assert set(run()) == {"hopper.forward", "hopper.forward_tangent", "hopper.backward"}
    # not eligible for the Hopper kernels (float64 never reaches them: exact path; head dim 48
    # goes to the exact path too) -> a misaligned-stride input falls back to the portable kernel
    q2 = torch.randn(1, 2, 20, 34, generator=g)[..., :32]           # row stride 136 B
    calls.clear()
    torch.func.jvp(lambda a: attention(a, k, v), (q2,), (dq,))
    assert calls and all(c.startswith("portable.") for c in calls), calls


# ------------------------------------------------------------------------------------
# GPU (run on the device machine: pytest -m gpu; compute capability 9.x)
# ------------------------------------------------------------------------------------

GPU_CASES = PORTABLE_GPU_CASES + [
    (1, 12, 4096, 4096, 128, 128, "bhnd"),  # the bench's shape, full blocks
]


@pytest.fixture
def gpu_one_config(monkeypatch):
    """First surviving config per kernel (compile time); warp specialisation as RCM_HOPPER_WS says (default off)."""
    monkeypatch.setenv("RCM_FLASH_AUTOTUNE", "0")
    if torch.cuda.is_available():
        fh._reset_tuning()
    yield
    if torch.cuda.is_available():
        fh._reset_tuning()


@gpu
@needs_hopper
@pytest.mark.parametrize("B,H,Nq,Nk,Dqk,Dv,layout", GPU_CASES)
def test_gpu_hopper_forward_tangent_bf16(gpu_one_config, B, H, Nq, Nk, Dqk, Dv, layout):
    dev = "cuda"
    q, k, v, dq, dk, dv = (x.to(dev, torch.float32).bfloat16()
                           for x in _inputs(B, H, Nq, Nk, Dqk, Dv, layout, Nq + Nk))
    args = (q, k, v, dq, dk, dv)
    assert fh.applies(*args)
    s = 1 / math.sqrt(Dqk)
    o_ref, do_ref, lse_ref = reference(*args, s)
    _poison()
    o, do, lse = fh.forward_tangent(*args, None)
    torch.cuda.synchronize()
    print(f"hopper config: {fh._fwd_kernel.best_config}")
    assert torch.isfinite(o).all() and torch.isfinite(do).all() and torch.isfinite(lse).all()
    eo, et, el = rel(o, o_ref), rel(do, do_ref), rel(lse, lse_ref)
    po, pdo, _ = fj.forward_tangent(*args, None)
    print(f"bf16 hopper fwd-tangent {B,H,Nq,Nk,Dqk,Dv,layout}: O {eo:.2e} dO {et:.2e} lse {el:.2e}; "
          f"vs portable O {rel(o, po):.2e} dO {rel(do, pdo):.2e}")
    assert eo < BF16_O and et < BF16_T and el < 1e-3
    assert rel(o, po) < BF16_O and rel(do, pdo) < BF16_T
    _poison()
    o2, lse2 = fh.forward(q, k, v, None)
    torch.cuda.synchronize()
    assert torch.isfinite(o2).all() and rel(o2, o_ref) < BF16_O and rel(lse2, lse_ref) < 1e-3


@gpu
@needs_hopper
@pytest.mark.parametrize("B,H,Nq,Nk,Dqk,Dv,layout", GPU_CASES[:3])
def test_gpu_hopper_backward_bf16(gpu_one_config, B, H, Nq, Nk, Dqk, Dv, layout):
    dev = "cuda"
    g = torch.Generator().manual_seed(Nq * 3 + Nk)
    q, k, v = (make(sh, layout, torch.float32, gen=g).to(dev).bfloat16()
               for sh in ((B, H, Nq, Dqk), (B, H, Nk, Dqk), (B, H, Nk, Dv)))
    go = make((B, H, Nq, Dv), layout, torch.float32, gen=g).to(dev).bfloat16()
    refs = ref_grads(q, k, v, go, 1 / math.sqrt(Dqk))
    o, lse = fh.forward(q, k, v, None)
    _poison()
    grads = fh.backward(q, k, v, o, lse, go, None)
    torch.cuda.synchronize()
    pgrads = fj.backward(q, k, v, o, lse, go, None)
    errs = [rel(a, b) for a, b in zip(grads, refs)]
    print(f"bf16 hopper backward {B,H,Nq,Nk,Dqk,Dv,layout}: dq/dk/dv {errs}; "
          f"configs {fh._bwd_dkdv_kernel.best_config} / {fh._bwd_dq_kernel.best_config}")
    for a, p in zip(grads, pgrads):
        assert torch.isfinite(a).all() and rel(a, p) < BF16_T
    assert max(errs) < BF16_T, errs


@gpu
@needs_hopper
@pytest.mark.parametrize("asked", ["hopper", None])
def test_gpu_hopper_project_op(gpu_one_config, monkeypatch, asked):
    """rcm_core.attention with RCM_ATTN_KERNEL=hopper, and by default (auto) on sm90: jvp and backward
    through the Hopper kernels."""
    if asked:
        monkeypatch.setenv("RCM_ATTN_KERNEL", asked)
    else:
        monkeypatch.delenv("RCM_ATTN_KERNEL", raising=False)
    monkeypatch.setenv("RCM_ATTN_PRIMAL", "op")
    calls = []
    for fn in ("forward", "forward_tangent", "backward"):
        real = getattr(fh, fn)
        monkeypatch.setattr(fh, fn, lambda *a, _r=real, _n=fn, **kw: calls.append(_n) or _r(*a, **kw))
    check_project_op_on_cuda()
    assert {"forward", "forward_tangent", "backward"} <= set(calls), calls

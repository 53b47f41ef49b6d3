"""The project attention op: forward, reverse and forward-mode derivatives vs float64 references."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jvp

import rcm_core.attention as A
from rcm_core.attention import attention, attention_reference

D = torch.float64


def _inputs(layout, B=2, H=3, Nq=9, Nk=9, Dqk=8, Dv=8, dtype=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    sh = (lambda n, d: (B, H, n, d)) if layout == "bhnd" else (lambda n, d: (B, n, H, d))
    mk = lambda n, d: torch.randn(sh(n, d), generator=g, dtype=D).to(dtype)  # noqa: E731
    prim = (mk(Nq, Dqk), mk(Nk, Dqk), mk(Nk, Dv))
    tang = (mk(Nq, Dqk), mk(Nk, Dqk), mk(Nk, Dv))
    return prim, tang


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("Nq,Nk,Dqk,Dv", [(9, 9, 8, 8), (13, 5, 8, 6), (33, 17, 16, 16)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_forward_and_jvp_match_float64_naive(layout, Nq, Nk, Dqk, Dv, scale):
    prim, tang = _inputs(layout, Nq=Nq, Nk=Nk, Dqk=Dqk, Dv=Dv)
    o, do = jvp(lambda q, k, v: attention(q, k, v, scale=scale, layout=layout), prim, tang)
    o_ref, do_ref = jvp(lambda q, k, v: attention_reference(q, k, v, scale=scale, layout=layout), prim, tang)
    assert _rel(o, o_ref) < 1e-12 and _rel(do, do_ref) < 1e-12
    with fwAD.dual_level():
        out = attention(*[fwAD.make_dual(p, t) for p, t in zip(prim, tang)], scale=scale, layout=layout)
        assert _rel(fwAD.unpack_dual(out).tangent, do_ref) < 1e-12


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_float32_and_chunked_path(layout, monkeypatch):
    monkeypatch.setattr(A, "_CHUNK", 4)                     # many query chunks, ragged tail
    prim, tang = _inputs(layout, Nq=11, Nk=7, dtype=torch.float32)
    o, do = jvp(lambda q, k, v: attention(q, k, v, layout=layout), prim, tang)
    p64, t64 = [x.double() for x in prim], [x.double() for x in tang]
    o_ref, do_ref = jvp(lambda q, k, v: attention_reference(q, k, v, layout=layout), tuple(p64), tuple(t64))
    assert o.dtype == torch.float32
    assert _rel(o, o_ref) < 1e-5 and _rel(do, do_ref) < 1e-5


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_backward_gradcheck(layout, monkeypatch):
    monkeypatch.setattr(A, "_CHUNK", 3)
    prim, _ = _inputs(layout, B=1, H=2, Nq=5, Nk=4, Dqk=3, Dv=2)
    prim = [p.requires_grad_() for p in prim]
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, layout=layout), prim)
    # and equal to autograd of the naive reference
    go = torch.randn_like(attention(*prim, layout=layout))
    g1 = torch.autograd.grad(attention(*prim, layout=layout), prim, go)
    g2 = torch.autograd.grad(attention_reference(*prim, layout=layout), prim, go)
    for a, b in zip(g1, g2):
        assert _rel(a, b) < 1e-12


def test_jvp_of_grad_free_forward_inside_no_grad():
    prim, tang = _inputs("bhnd")
    with torch.no_grad():
        _, do = jvp(lambda q, k, v: attention(q, k, v), prim, tang)
    _, do_ref = jvp(attention_reference, prim, tang)
    assert _rel(do, do_ref) < 1e-12


def test_bad_inputs_name_the_culprit():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="k must be 4-D"):
        attention(q, torch.randn(2, 4, 8), q)
    with pytest.raises(TypeError, match="dtypes differ"):
        attention(q, q.double(), q)
    with pytest.raises(ValueError, match="head dims differ"):
        attention(q, torch.randn(1, 2, 4, 6), torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="k and v token counts differ"):
        attention(q, q, torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match="head counts differ"):
        attention(q, torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8))
    with pytest.raises(ValueError, match="layout"):
        attention(q, q, q, layout="nhd")
    with pytest.raises(TypeError, match="floating point"):
        attention(q.long(), q.long(), q.long())


# --- primal-only calls: dispatch to the fastest backend (issue 15) -------------------------------------

def test_primal_backend_choice(monkeypatch):
    bf, cap = torch.bfloat16, (9, 0)
    monkeypatch.setattr(A, "_fa3", lambda: None)                          # FlashAttention-3 not installed
    assert A.primal_backend("cuda", bf, (128, 128), cap, "auto") == "sdpa"
    assert A.primal_backend("cuda", bf, (128, 128), cap, "fa3") == "sdpa"  # asked for, absent: SDPA
    assert A.primal_backend("cuda", bf, (128, 128), cap, "op") == "op"
    assert A.primal_backend("cpu", D, (8, 8), choice="auto") == "op"       # CPU: the exact path
    assert A.primal_backend("cpu", D, (8, 8), choice="sdpa") == "sdpa"
    monkeypatch.setattr(A, "_fa3", lambda: (lambda *a, **k: None))          # installed
    assert A.primal_backend("cuda", bf, (128, 128), cap, "auto") == "fa3"
    assert A.primal_backend("cuda", torch.float32, (128, 128), cap, "auto") == "sdpa"   # FA3: fp16/bf16 only
    assert A.primal_backend("cuda", bf, (128, 128), (8, 0), "auto") == "sdpa"           # FA3: Hopper only
    assert A.primal_backend("cuda", bf, (128, 64), cap, "auto") == "sdpa"               # unequal head dims
    monkeypatch.setenv("RCM_ATTN_PRIMAL", "flash")
    with pytest.raises(ValueError, match="RCM_ATTN_PRIMAL='flash'"):
        A.primal_backend("cuda", bf, (128, 128), cap)


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_sdpa_primal_path_values_and_gradients(layout, monkeypatch):
    """With SDPA for primal calls, values and gradients still equal the float64 naive reference, and
    calls with tangents (torch.func.jvp, forward-AD duals) still take the op's own forward-mode rule."""
    monkeypatch.setenv("RCM_ATTN_PRIMAL", "sdpa")
    calls = []
    real = A._primal_attention
    monkeypatch.setattr(A, "_primal_attention", lambda *a: calls.append(a[-1]) or real(*a))
    prim, tang = _inputs(layout, Nq=13, Nk=5)
    prim = [p.requires_grad_() for p in prim]
    o = attention(*prim, layout=layout, scale=0.4)
    assert calls == ["sdpa"]
    o_ref = attention_reference(*prim, layout=layout, scale=0.4)
    assert _rel(o, o_ref) < 1e-12
    go = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, prim, go), torch.autograd.grad(o_ref, prim, go)):
        assert _rel(a, b) < 1e-12
    _, do = jvp(lambda q, k, v: attention(q, k, v, layout=layout), tuple(p.detach() for p in prim), tang)
    _, do_ref = jvp(lambda q, k, v: attention_reference(q, k, v, layout=layout),
                    tuple(p.detach() for p in prim), tang)
    with fwAD.dual_level():
        out = attention(*[fwAD.make_dual(p.detach(), t) for p, t in zip(prim, tang)], layout=layout)
        do_dual = fwAD.unpack_dual(out).tangent
    assert calls == ["sdpa"]                                  # neither tangent call went to SDPA
    assert _rel(do, do_ref) < 1e-12 and _rel(do_dual, do_ref) < 1e-12


@pytest.mark.gpu
def test_gpu_primal_calls_take_the_fastest_backend_and_agree_with_the_kernel():
    """On CUDA in bf16 a primal call goes to FA3/SDPA, and its output and gradients agree with the
    project's Triton kernel (RCM_ATTN_PRIMAL=op) and a float64 reference."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    import os
    dev, cap = torch.device("cuda"), torch.cuda.get_device_capability()
    assert A.primal_backend("cuda", torch.bfloat16, (128, 128), cap) in ("fa3", "sdpa")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, 4, 1000, 128, generator=g, device=dev, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    go = torch.randn(1, 4, 1000, 128, generator=g, device=dev, dtype=torch.bfloat16)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attention_reference(q64, k64, v64)
    ref_g = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    out = {}
    for choice in ("auto", "op"):
        os.environ["RCM_ATTN_PRIMAL"] = choice
        try:
            o = attention(q, k, v)
            out[choice] = (o, *torch.autograd.grad(o, (q, k, v), go))
        finally:
            del os.environ["RCM_ATTN_PRIMAL"]
    for choice, (o, *grads) in out.items():
        assert _rel(o, ref) < 1e-2, choice
        for a, b in zip(grads, ref_g):
            assert _rel(a, b) < 3e-2, choice
    for a, b in zip(out["auto"], out["op"]):
        assert _rel(a, b) < 2e-2

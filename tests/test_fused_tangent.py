"""The fused sCM tangent: J from the same forward pass that records the student's graph.

Checked against the unfused path (a separate ``torch.func.jvp`` pass, then the
student's forward) in float64: the attention op alone, whole networks (the
embedded VideoDiT and a tiny diffusers Wan2.1), and one trainer step.
"""
import math

import pytest
import torch
from torch.autograd import forward_ad as fwAD

from rcm_core.attention import attention
from rcm_core.config import DistillConfig
from rcm_core.teachers import get_teacher
from rcm_core.trainer import RCMTrainer

D = torch.float64


def _dual_call(f, primals, tangents):
    with fwAD.dual_level():
        out = f(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        y, jy = fwAD.unpack_dual(out)
    return y, jy


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_attention_dual_path_matches_jvp_rule_and_backward(layout):
    g = torch.Generator().manual_seed(0)
    shp = (2, 3, 37, 16) if layout == "bhnd" else (2, 37, 3, 16)
    kshp = (2, 3, 11, 16) if layout == "bhnd" else (2, 11, 3, 16)
    q = torch.randn(shp, generator=g, dtype=D, requires_grad=True)
    k, v = (torch.randn(kshp, generator=g, dtype=D, requires_grad=True) for _ in range(2))
    dq = torch.randn(shp, generator=g, dtype=D)
    w = torch.randn(shp, generator=g, dtype=D)

    # self-attention-like: all of q, k, v carry tangents; cross-attention-like: only q
    for tangents in ((dq, torch.randn(kshp, generator=g, dtype=D), torch.randn(kshp, generator=g, dtype=D)),
                     (dq, None, None)):
        ref_o, ref_do = torch.func.jvp(
            lambda a, b, c: attention(a, b, c, layout=layout), (q.detach(), k.detach(), v.detach()),
            tuple(torch.zeros_like(x) if t is None else t for x, t in zip((q, k, v), tangents)))
        with fwAD.dual_level():
            args = [x if t is None else fwAD.make_dual(x, t) for x, t in zip((q, k, v), tangents)]
            o, do = fwAD.unpack_dual(attention(*args, layout=layout))
        assert torch.allclose(o, ref_o, atol=1e-12) and torch.allclose(do, ref_do, atol=1e-12)
        # reverse mode through the fused op equals reverse mode through the plain op
        grads = torch.autograd.grad((o * w).sum(), (q, k, v))
        ref = torch.autograd.grad((attention(q, k, v, layout=layout) * w).sum(), (q, k, v))
        for a, b in zip(grads, ref):
            assert torch.allclose(a, b, atol=1e-12)


def _embedded_net():
    from rcm_core.embedded.dit import VideoDiT, VideoDiTConfig
    torch.manual_seed(0)
    net = VideoDiT(VideoDiTConfig(dim=24, heads=2, layers=2, ffn_dim=48, text_dim=16, freq_dim=16))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.double(), (2, 1, 2, 4, 4), (2, 5, 16), lambda n, x, t, c: n(x, t, c)


def _wan_net():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    net = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                          in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                          num_layers=2, rope_max_seq_len=32)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn_like(p) / math.sqrt(max(1, p.shape[-1])) + (p == 1) * 1.0)
    from rcm_core.real import diffusers_rf_call, install_rcm_attention
    install_rcm_attention(net)
    return net.double(), (2, 4, 2, 4, 4), (2, 6, 16), diffusers_rf_call


@pytest.mark.parametrize("make", [_embedded_net, _wan_net], ids=["embedded", "wan"])
def test_whole_network_fused_forward_matches_jvp_and_gradients(make):
    net, xs, cs, call = make()
    g = torch.Generator().manual_seed(1)
    x, dx = torch.randn(xs, generator=g, dtype=D), torch.randn(xs, generator=g, dtype=D)
    ts = torch.tensor([250.0, 800.0], dtype=D)
    dts = torch.tensor([30.0, -70.0], dtype=D)
    ctx = torch.randn(cs, generator=g, dtype=D)
    f = lambda a, b: call(net, a, b, ctx)
    ref_y, ref_j = torch.func.jvp(f, (x, ts), (dx, dts))
    y, j = _dual_call(f, (x, ts), (dx, dts))
    assert torch.allclose(y, ref_y, atol=1e-10)
    # diffusers' Wan casts the timestep to float32 for its sinusoidal embedding: allow fp32 round-off there
    tol = 1e-10 if make is _embedded_net else 1e-6
    assert float((j - ref_j).norm() / ref_j.norm()) < tol
    w = torch.randn(xs, generator=g, dtype=D)
    params = [p for p in net.parameters()]
    got = torch.autograd.grad((y * w).sum(), params, allow_unused=True)
    ref = torch.autograd.grad((f(x, ts) * w).sum(), params, allow_unused=True)
    for a, b in zip(got, ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-9)


def test_trainer_fused_step_equals_unfused_step():
    teacher = get_teacher("embedded")
    batch_g = torch.Generator().manual_seed(3)
    b = 3
    batch = {"latents": torch.randn(b, *teacher.latent_shape, generator=batch_g),
             "cond": torch.randn(b, 16, 64, generator=batch_g), "uncond": torch.zeros(1, 16, 64)}
    out = {}
    for fused in (True, False):
        cfg = DistillConfig.preset("embedded", method="scm", dtype="float64", fused_tangent=fused,
                                   tangent_warmup_steps=4)
        tr = RCMTrainer(teacher, cfg)
        tr.step = 2                                        # mid warm-up: r = 0.5
        m = tr.train_step(batch)
        out[fused] = (m, {k: v.detach().clone() for k, v in tr.student.net.state_dict().items()})
    (mf, sf), (mu, su) = out[True], out[False]
    assert math.isclose(mf["loss_cm"], mu["loss_cm"], rel_tol=1e-10)
    assert math.isclose(mf["grad_norm_student"], mu["grad_norm_student"], rel_tol=1e-9)
    assert mf["g_norm"] == pytest.approx(mu["g_norm"], rel=1e-10)
    for k in sf:
        assert torch.allclose(sf[k], su[k], atol=1e-12, rtol=0), k


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_outputs_tangents_and_gradients(mode):
    import copy
    from rcm_core.parallel import ParallelConfig, parallelize
    net, xs, cs, call = _embedded_net()
    net.blocks.append(copy.deepcopy(net.blocks[0]))                  # 3 blocks: selective checkpoints 0 and 2
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    ck = copy.deepcopy(parallelize(copy.deepcopy(net), ParallelConfig(mode, ac_every=2)))
    assert sum(isinstance(b, CheckpointWrapper) for b in ck.blocks) == (3 if mode == "full" else 2)
    assert list(ck.state_dict()) == list(net.state_dict())          # checkpoints stay loadable either way
    g = torch.Generator().manual_seed(2)
    x, dx = torch.randn(xs, generator=g, dtype=D), torch.randn(xs, generator=g, dtype=D)
    ts, dts = torch.tensor([100.0, 900.0], dtype=D), torch.tensor([5.0, -3.0], dtype=D)
    ctx = torch.randn(cs, generator=g, dtype=D)
    w = torch.randn(xs, generator=g, dtype=D)
    res = []
    for m in (net, ck):
        y, j = _dual_call(lambda a, b: call(m, a, b, ctx), (x, ts), (dx, dts))
        gd = torch.autograd.grad((y * w).sum(), list(m.parameters()))
        gp = torch.autograd.grad((call(m, x, ts, ctx) * w).sum(), list(m.parameters()))  # plain checkpoint path
        res.append((y.detach(), j, gd, gp))
    (y0, j0, gd0, gp0), (y1, j1, gd1, gp1) = res
    assert torch.allclose(y0, y1, atol=1e-12) and torch.allclose(j0, j1, atol=1e-12)
    for a, b in zip(gd0 + gp0, gd1 + gp1):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("modes", [("none", "full"), ("full", "keep_attention")])
def test_trainer_with_activation_checkpointing_takes_the_same_step(modes):
    teacher = get_teacher("embedded")
    g = torch.Generator().manual_seed(4)
    batch = {"latents": torch.randn(2, *teacher.latent_shape, generator=g),
             "cond": torch.randn(2, 16, 64, generator=g), "uncond": torch.zeros(1, 16, 64)}
    states = []
    for ac in modes:
        cfg = DistillConfig.preset("embedded", method="rcm", dtype="float64", tangent_warmup_steps=0,
                                   student_update_freq=2, activation_checkpointing=ac)
        tr = RCMTrainer(teacher, cfg)
        ms = [tr.train_step(batch) for _ in range(2)]                 # a student (sCM + DMD) and a critic step
        assert [m["kind"] for m in ms] == ["student", "critic"]
        states.append((ms, tr.student.net.state_dict(), tr.fake.net.state_dict()))
    (m0, s0, f0), (m1, s1, f1) = states
    for a, b in zip(m0, m1):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-10)
    for k in s0:
        assert torch.allclose(s0[k], s1[k], atol=1e-12, rtol=0), k
    for k in f0:
        assert torch.allclose(f0[k], f1[k], atol=1e-12, rtol=0), k
    with pytest.raises(ValueError, match="activation_checkpointing"):
        DistillConfig.preset("embedded", activation_checkpointing="some")

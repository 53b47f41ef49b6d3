"""Activation checkpointing that keeps attention (``activation_checkpointing="keep_attention"``, issue 22).

Every block is checkpointed, but its self-attention outputs are kept from the forward, so the backward's
recomputation runs everything except self-attention. Checked in float64 against the network without any
checkpointing (outputs, forward-AD tangents, gradients; the fused-tangent path and the plain path, through the
project's op and through PyTorch's SDPA), and by counting the self-attention forwards that run inside the
backward: none with ``keep_attention``, one per block with ``full``.
"""
import copy

import pytest
import torch
from torch.autograd import forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

import rcm_core.nets.attention as attn_mod
from rcm_core.config import DistillConfig
from rcm_core.parallel import ParallelConfig, parallelize
from test_fused_tangent import _embedded_net as _fused_tangent_embedded, _wan_net  # the same small networks

D = torch.float64


def _embedded_net():
    """test_fused_tangent's embedded VideoDiT with a third block (a copy of the first)."""
    net, xs, cs, call = _fused_tangent_embedded()
    net.blocks.append(copy.deepcopy(net.blocks[0]))
    return net, xs, cs, call


def _inputs(xs, cs, seed=2):
    g = torch.Generator().manual_seed(seed)
    x, dx = torch.randn(xs, generator=g, dtype=D), torch.randn(xs, generator=g, dtype=D)
    ts, dts = torch.tensor([100.0, 900.0], dtype=D), torch.tensor([5.0, -3.0], dtype=D)
    return x, dx, ts, dts, torch.randn(cs, generator=g, dtype=D), torch.randn(xs, generator=g, dtype=D)


def _fused_and_plain(m, call, x, dx, ts, dts, ctx, w):
    """(output, tangent, gradients through the fused dual forward, gradients through a plain forward)."""
    with fwAD.dual_level():
        y, j = fwAD.unpack_dual(call(m, fwAD.make_dual(x, dx), fwAD.make_dual(ts, dts), ctx))
    gd = torch.autograd.grad((y * w).sum(), list(m.parameters()))
    gp = torch.autograd.grad((call(m, x, ts, ctx) * w).sum(), list(m.parameters()))
    return y.detach(), j, gd, gp


@pytest.mark.parametrize("primal", ["op", "sdpa"])
@pytest.mark.parametrize("make", [_embedded_net, _wan_net], ids=["embedded", "wan"])
def test_keep_attention_equals_no_checkpointing(make, primal, monkeypatch):
    monkeypatch.setenv("RCM_ATTN_PRIMAL", primal)
    net, xs, cs, call = make()
    ck = parallelize(copy.deepcopy(net), ParallelConfig("keep_attention"))
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    blocks = getattr(ck, "blocks", None) or ck.transformer_blocks
    assert all(isinstance(b, CheckpointWrapper) for b in blocks)
    assert list(ck.state_dict()) == list(net.state_dict())
    args = _inputs(xs, cs)
    (y0, j0, gd0, gp0), (y1, j1, gd1, gp1) = (_fused_and_plain(m, call, *args) for m in (net, ck))
    assert torch.allclose(y0, y1, atol=1e-12, rtol=0) and torch.allclose(j0, j1, atol=1e-12, rtol=0)
    for a, b in zip(gd0 + gp0, gd1 + gp1):
        assert torch.allclose(a, b, atol=1e-11, rtol=0)


class _CountAttention(TorchDispatchMode):
    """Counts fused SDPA forwards whose query and key have one shape (self-attention)."""

    def __init__(self):
        super().__init__()
        self.self_attention = 0
        self.cudnn_backward = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("aten._scaled_dot_product_") and "backward" not in name and args[0].shape == args[1].shape:
            self.self_attention += 1
        if name == "aten._scaled_dot_product_cudnn_attention_backward.default" and args[1].shape == args[2].shape:
            self.cudnn_backward += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode,recomputed", [("full", 3), ("keep_attention", 0)])
def test_keep_attention_skips_self_attention_in_the_backward(mode, recomputed, monkeypatch):
    """The recomputation inside the backward runs each block's self-attention again under "full" (3 blocks)
    and never under "keep_attention": counted at the dispatcher for the plain path (SDPA), and by the
    op's exact forward functions for the fused-tangent path."""
    net, xs, cs, call = _embedded_net()
    ck = parallelize(copy.deepcopy(net), ParallelConfig(mode))
    x, dx, ts, dts, ctx, w = _inputs(xs, cs)

    monkeypatch.setenv("RCM_ATTN_PRIMAL", "sdpa")          # plain path: PyTorch's SDPA op, seen by the dispatcher
    y = call(ck, x, ts, ctx)
    counter = _CountAttention()
    with counter:
        torch.autograd.grad((y * w).sum(), list(ck.parameters()))
    assert counter.self_attention == recomputed

    monkeypatch.setenv("RCM_ATTN_PRIMAL", "op")            # fused path: the op's own forward in the recomputation
    calls = []
    real = attn_mod._exact_forward

    def spy(q, k, v, s):
        calls.append(q.shape[-2] == k.shape[-2])
        return real(q, k, v, s)
    monkeypatch.setattr(attn_mod, "_exact_forward", spy)
    with fwAD.dual_level():
        y, _ = fwAD.unpack_dual(call(ck, fwAD.make_dual(x, dx), fwAD.make_dual(ts, dts), ctx))
    assert calls == []                                      # the forward computes O with its tangent in one pass
    torch.autograd.grad((y * w).sum(), list(ck.parameters()))
    assert sum(calls) == recomputed                          # self-attention forwards in the backward
    assert len(calls) - sum(calls) == 3                      # cross-attention is always recomputed (cheap)


@pytest.mark.parametrize("primal", ["op", "sdpa"])
def test_keep_attention_inside_an_autocast_region_that_cast_the_weights_before(primal, monkeypatch):
    """An rCM rollout runs the student several times in one bf16 autocast region: the autocast cache then holds
    the weights' casts before the checkpointed forward, which would issue fewer casts than its recomputation
    (torch's selective checkpointing refused that: "aten._to_copy ... not found in storage")."""
    monkeypatch.setenv("RCM_ATTN_PRIMAL", primal)
    net, xs, cs, call = _wan_net()
    net = net.float()
    x, _, ts, _, ctx, w = (a.float() for a in _inputs(xs, cs))
    grads = {}
    for mode in ("full", "keep_attention"):
        m = parallelize(copy.deepcopy(net), ParallelConfig(mode))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                call(m, x, ts, ctx)                              # casts (and caches) the weights
            y = call(m, x, ts, ctx)
        grads[mode] = torch.autograd.grad((y.float() * w).sum(), list(m.parameters()))
    for a, b in zip(grads["keep_attention"], grads["full"]):
        assert float((a - b).norm()) <= 1e-2 * float(b.norm()) + 1e-6


def test_kept_attention_refuses_a_recomputation_that_differs():
    keep = attn_mod.KeptAttention()
    q = torch.randn(1, 2, 6, 4, dtype=D)
    with attn_mod.kept_attention(keep):
        with fwAD.dual_level():
            attn_mod.attention(fwAD.make_dual(q, torch.ones_like(q)), q, q)
    assert len(keep.kept) == 1
    with attn_mod.kept_attention(keep, replay=True), pytest.raises(RuntimeError, match="deterministic blocks"):
        attn_mod.attention(q[:, :, :5], q[:, :, :5], q[:, :, :5])


def test_fsdp_fused_tangent_takes_keep_attention():
    """FSDP's fused tangent needs every block checkpointed: keep_attention qualifies, selective does not (the
    trainer's steps under keep_attention: test_fused_tangent.py, test_fsdp.py, test_cp_trainer.py)."""
    DistillConfig.preset("embedded", fsdp=True, activation_checkpointing="keep_attention")
    with pytest.raises(ValueError, match="keep_attention"):
        DistillConfig.preset("embedded", fsdp=True, activation_checkpointing="selective")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_keep_attention_on_the_gpu_in_bf16_matches_full_checkpointing():
    """CUDA takes other paths: the fused path's recomputation runs cuDNN's SDPA backward on the Triton kernel's kept
    O and LSE; the plain path keeps the cuDNN/flash SDPA outputs through torch's selective checkpointing. Head dim
    64, so the Triton kernels (not the exact path) compute the kept tensors."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    net = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64,
                                          in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=64,
                                          num_layers=2, rope_max_seq_len=32)
    from rcm_core.real import diffusers_rf_call, install_rcm_attention
    install_rcm_attention(net)
    net, xs, cs, call = net.cuda(), (2, 4, 4, 8, 8), (2, 6, 16), diffusers_rf_call
    nets = {m: parallelize(copy.deepcopy(net), ParallelConfig(m)) for m in ("full", "keep_attention")}
    x, dx, ts, dts, ctx, w = (a.float().cuda() for a in _inputs(xs, cs))
    res = {}
    for mode, m in nets.items():
        counter = _CountAttention()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with fwAD.dual_level():
                y, j = fwAD.unpack_dual(call(m, fwAD.make_dual(x, dx), fwAD.make_dual(ts, dts), ctx))
        with counter:
            gd = torch.autograd.grad((y.float() * w).sum(), list(m.parameters()))
        fused_bwd = counter.self_attention, counter.cudnn_backward
        counter = _CountAttention()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y2 = call(m, x, ts, ctx)
        with counter:
            gp = torch.autograd.grad((y2.float() * w).sum(), list(m.parameters()))
        res[mode] = (y.float(), j.float(), gd, gp, fused_bwd, counter.self_attention)
    (y0, j0, gd0, gp0, f0, n0), (y1, j1, gd1, gp1, f1, n1) = res["full"], res["keep_attention"]
    assert n0 == 2 and n1 == 0                                 # plain path: self-attention forwards in the backward
    assert f0[0] == 2 and f1 == (0, 2)                         # fused path: none, and cuDNN's backward on the kept O
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
    assert rel(y1, y0) < 1e-6 and rel(j1, j0) < 1e-6          # the forward is the same computation
    for a, b in zip(gd1 + gp1, gd0 + gp0):
        assert rel(a, b) < 3e-2

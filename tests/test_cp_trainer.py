"""Ulysses context parallelism applied to the whole trainer (issue 11, parts 3 and 7), real gloo ranks.

The embedded video DiT in float64: rCM steps (student with the sCM tangent + DMD, critic) on 2 ranks
with cp=2 (one sample's tokens split over both), and on 4 ranks with FSDP2 x cp (dp=2, cp=2), must
equal the same steps in one process on the same global batch: losses, gradient norms, weights.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 3          # student (sCM + DMD), critic, student


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(**kw):
    from rcm_core.config import DistillConfig
    return DistillConfig.preset("embedded", method="rcm", dtype="float64", tangent_warmup_steps=0, lr_warmup_steps=0,
                                student_update_freq=2, activation_checkpointing="full", **kw)


def _batch(b):
    from rcm_core.teachers import get_teacher
    te = get_teacher("embedded")
    g = torch.Generator().manual_seed(5)
    return te, {"latents": torch.randn(b, *te.latent_shape, generator=g, dtype=torch.float64),
                "cond": torch.randn(b, 16, 64, generator=g, dtype=torch.float64),
                "uncond": torch.zeros(1, 16, 64, dtype=torch.float64)}


def _steps(tr, batch):
    ms = [tr.train_step(batch) for _ in range(STEPS)]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(tr.student.net, options=opts) if tr.sharded else tr.student.net.state_dict()
    return ms, {k: v.detach().cpu().clone() for k, v in sd.items()}


def _worker(rank, world, port, out, cp, fsdp, device="cpu"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group("nccl" if device != "cpu" else "gloo", rank=rank, world_size=world)
    try:
        from rcm_core.trainer import RCMTrainer
        dp = world // cp
        te, full = _batch(dp)
        tr = RCMTrainer(te, _config(context_parallel=cp, fsdp=fsdp, fused_tangent=not fsdp), device=device)
        assert (tr.dp_rank, tr.dp_size) == (rank // cp, dp)
        rows = slice(tr.dp_rank, tr.dp_rank + 1)
        local = {"latents": full["latents"][rows], "cond": full["cond"][rows], "uncond": full["uncond"]}
        ms, sd = _steps(tr, local)
        if rank == 0:
            torch.save({"ms": ms, "sd": sd}, out)
    finally:
        dist.destroy_process_group()


def _reference(dp, device="cpu"):
    from rcm_core.trainer import RCMTrainer
    te, full = _batch(dp)
    return _steps(RCMTrainer(te, _config(), device=device), full)


def _compare(got, ref, dp):
    ms_ref, sd_ref = ref
    assert [m["kind"] for m in ms_ref] == ["student", "critic", "student"] and "loss_dmd" in ms_ref[0]
    # losses are per rank (its data-parallel rows), so they equal the reference's only when dp = 1;
    # gradient norms are global (after the reduction) and weights too
    keys = ("grad_norm_student", "grad_norm_fake") + (("loss_cm", "loss_dmd", "loss_fake") if dp == 1 else ())
    for a, b in zip(ms_ref, got["ms"]):
        for k in keys:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-9), (k, a["step"])
    assert list(got["sd"]) == list(sd_ref)
    for k, v in sd_ref.items():
        assert torch.allclose(got["sd"][k].double(), v.double(), rtol=0, atol=1e-10), k


@pytest.mark.parametrize("world,cp,fsdp", [(2, 2, False), (4, 2, True)])
def test_context_parallel_steps_equal_the_single_process_steps(tmp_path, world, cp, fsdp):
    out = str(tmp_path / "r.pt")
    mp.start_processes(_worker, args=(world, _free_port(), out, cp, fsdp), nprocs=world, join=True,
                       start_method="spawn")
    _compare(torch.load(out, weights_only=False), _reference(world // cp), world // cp)


@pytest.mark.gpu
@pytest.mark.parametrize("world,cp,fsdp", [(2, 2, False), (2, 2, True), (4, 2, True)])
def test_context_parallel_on_gpus_nccl_equals_one_gpu_process(tmp_path, world, cp, fsdp):
    """The reference runs on one GPU too: CUDA generators draw other numbers than CPU ones."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs (NCCL)")
    out = str(tmp_path / "r.pt")
    mp.start_processes(_worker, args=(world, _free_port(), out, cp, fsdp, "cuda"), nprocs=world, join=True,
                       start_method="spawn")
    _compare(torch.load(out, weights_only=False), _reference(world // cp, "cuda:0"), world // cp)


def test_bad_context_parallel_degrees_fail_before_training():
    from rcm_core.context_parallel import check_context_parallel
    with pytest.raises(ValueError, match="does not divide the 12 attention heads"):
        check_context_parallel(8, world=8, heads=12, tokens=32760)
    with pytest.raises(ValueError, match="does not divide the 6 ranks"):
        check_context_parallel(4, world=6, heads=12, tokens=32760)
    with pytest.raises(ValueError, match="does not divide the 32760 tokens"):
        check_context_parallel(16, world=16, heads=16, tokens=32760)
    with pytest.raises(ValueError, match="context_parallel must be > 0"):
        _config(context_parallel=0)


def _wan_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = _wan_fwd_bwd(cp_group=dist.group.WORLD)
        for g in res["grads"].values():
            dist.all_reduce(g)                        # each rank holds its tokens' share: the sum is the gradient
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


def _wan_fwd_bwd(cp_group=None):
    """Tiny Wan2.1 transformer (project attention), float64: output, its forward-AD tangent w.r.t. (x, t)
    recorded together with the graph (the fused sCM mode), and the parameter gradients of <out, cot>."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from real_fixtures import tiny_wan
    from torch.autograd import forward_ad as fwAD
    from rcm_core.real import install_rcm_attention
    net = tiny_wan().double()
    install_rcm_attention(net)
    if cp_group is not None:
        from rcm_core.context_parallel import apply_context_parallel
        apply_context_parallel(net, cp_group)
    g = torch.Generator().manual_seed(0)
    x, dx = (torch.randn(1, 4, 2, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t, dt = torch.tensor([400.0], dtype=torch.float64), torch.tensor([30.0], dtype=torch.float64)
    ctx = torch.randn(1, 8, 16, generator=g, dtype=torch.float64)
    cot = torch.randn(1, 4, 2, 8, 8, generator=g, dtype=torch.float64)
    with fwAD.dual_level():
        o = net(hidden_states=fwAD.make_dual(x, dx), timestep=fwAD.make_dual(t, dt), encoder_hidden_states=ctx,
                return_dict=False)[0]
        y, j = fwAD.unpack_dual(o)
    (y * cot).sum().backward()
    return {"y": y.detach(), "j": j.detach(), "grads": {n: p.grad.detach().clone() for n, p in net.named_parameters()}}


def test_wan_transformer_under_context_parallel_equals_one_process(tmp_path):
    pytest.importorskip("diffusers")
    out = str(tmp_path / "wan.pt")
    mp.start_processes(_wan_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
    got, ref = torch.load(out, weights_only=False), _wan_fwd_bwd()
    assert torch.allclose(got["y"], ref["y"], rtol=0, atol=1e-10)
    assert torch.allclose(got["j"], ref["j"], rtol=0, atol=1e-9)
    for n, gr in ref["grads"].items():    # Wan keeps its time embedding and FP32LayerNorms in fp32 in a float64 model
        assert torch.allclose(got["grads"][n], gr, rtol=1e-5, atol=1e-9), n

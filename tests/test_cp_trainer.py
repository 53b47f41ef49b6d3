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
from spawn_ranks import end_rank, gloo_rank

STEPS = 3          # student (sCM + DMD), critic, student


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(**kw):
    from rcm_core.config import DistillConfig
    return DistillConfig.preset("embedded", method="rcm", dtype="float64", tangent_warmup_steps=0, lr_warmup_steps=0,
                                student_update_freq=2, **{"activation_checkpointing": "full", **kw})


def _batch(b):
    from rcm_core.teachers import get_teacher
    te = get_teacher("embedded")
    g = torch.Generator().manual_seed(5)
    return te, {"latents": torch.randn(b, *te.latent_shape, generator=g, dtype=torch.float64),
                "cond": torch.randn(b, 16, 64, generator=g, dtype=torch.float64),
                "uncond": torch.zeros(1, 16, 64, dtype=torch.float64)}


def _steps(tr, batch, steps=STEPS):
    ms = [tr.train_step(batch) for _ in range(steps)]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(tr.student.net, options=opts) if tr.sharded else tr.student.net.state_dict()
    return ms, {k: v.detach().cpu().clone() for k, v in sd.items()}


def _init(rank, world, port, device):
    """Join the process group of ``world`` spawned ranks (nothing for world 1: the test's own process)."""
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        torch.set_num_threads(1)
        dist.init_process_group("nccl" if device != "cpu" else "gloo", rank=rank, world_size=world)
    return device


def _worker(rank, world, port, out, cp, fsdp, device="cpu", job="steps", extra=None):
    """One rank of ``world``: runs ``_JOBS[job]``; rank 0 saves its result to ``out``."""
    device = _init(rank, world, port, device)
    try:
        res = _JOBS[job](rank, world, cp, fsdp, device, dict(extra or {}))
        if rank == 0:
            torch.save(res, out)
    except BaseException:
        if world > 1:
            dist.destroy_process_group()
        raise
    if world > 1:
        end_rank()


def _local_rows(tr, full):
    """This rank's rows of the global batch: one per data-parallel index (the cp peers share it)."""
    rows = slice(tr.dp_rank, tr.dp_rank + 1) if tr.dp_size > 1 else slice(None)
    return {"latents": full["latents"][rows], "cond": full["cond"][rows], "uncond": full["uncond"]}


def _steps_job(rank, world, cp, fsdp, device, extra):
    from rcm_core.trainer import RCMTrainer
    dp = world // cp
    te, full = _batch(dp)
    tr = RCMTrainer(te, _config(context_parallel=cp, fsdp=fsdp, fused_tangent=not fsdp,
                                **{k: v for k, v in extra.items() if k != "steps"}), device=device)
    assert (tr.dp_rank, tr.dp_size) == (rank // cp, dp)
    ms, sd = _steps(tr, _local_rows(tr, full), extra.pop("steps", STEPS))
    out = {"ms": ms, "sd": sd}
    if "lora" in extra and not fsdp:
        out["ema_student"] = _ema_student(tr, full) if rank == 0 else None     # rank 0 alone: local
    return out


def _ema_student(tr, full):
    """LoRA: the merged EMA student (a standalone copy) and its output on the whole batch. Under cp it must be
    local, as the full fine-tuning EMA is (no cp hooks: called on one rank, a hook's collective would hang)."""
    net = tr.student_ema
    assert getattr(net, "_rcm_cp_group", None) is None
    assert not [n for n, m in net.named_modules() if m._forward_hooks or m._forward_pre_hooks], "cp hooks left"
    dev = next(net.parameters()).device
    t = torch.full((full["latents"].shape[0],), 500.0, dtype=torch.float64, device=dev)
    with torch.no_grad():
        y = net(full["latents"].to(dev), t, full["cond"].to(dev))
    return {"sd": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, "y": y.cpu()}


# ---- DCP checkpoints under context parallel: save on FSDP2 x cp2 (4 ranks), resume there and resharded ----
DCP_GLOBAL = 2     # the global batch: one row per data-parallel index on 4 ranks (dp 2 x cp 2) and on 2 ranks,
DCP_STEPS = 2      # both rows in one process; steps before the save (student, critic): the next is a student step


def _dcp_config(cp, fsdp):
    return _config(context_parallel=cp, fsdp=fsdp, fused_tangent=False)


def _all_metrics(m):
    """Every rank's metrics of a step (rank order): losses are per data-parallel rank."""
    if not dist.is_initialized():
        return [m]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, {k: v for k, v in m.items() if "time" not in k and "per_s" not in k})
    return out


def _state(tr):
    """Student, fake score and EMA as full tensors, canonical names (a collective under FSDP; rank 0 has it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    o = StateDictOptions(full_state_dict=tr.sharded, cpu_offload=tr.sharded)
    out = {name: {k: v.detach().cpu().clone() for k, v in get_model_state_dict(net, options=o).items()}
           for name, net in (("student", tr.student.net), ("fake", tr.fake.net), ("ema", tr.ema.module))}
    return {**out, "step": tr.step, "ema_updates": tr.ema.num_updates}


def _dcp_save_job(rank, world, cp, fsdp, device, extra):
    """Train DCP_STEPS steps, save a DCP checkpoint (auto: sharded), then take the next step (uninterrupted);
    then, on the same ranks (one spawn less: CI time), a fresh trainer resumes from the checkpoint."""
    from rcm_core.trainer import RCMTrainer
    te, full = _batch(DCP_GLOBAL)
    tr = RCMTrainer(te, _dcp_config(cp, fsdp), device=device)
    assert tr.sharded == fsdp and tr.dp_size == world // cp
    local = _local_rows(tr, full)
    kinds = [tr.train_step(local)["kind"] for _ in range(DCP_STEPS)]
    tr.save_checkpoint(extra["ckpt"])
    out = {"kinds": kinds, "next": _all_metrics(tr.train_step(local)), "after": _state(tr)}
    del tr
    return {**out, "resumed": _dcp_load_job(rank, world, cp, fsdp, device, extra)}


def _dcp_load_job(rank, world, cp, fsdp, device, extra):
    """A fresh trainer on this layout loads the checkpoint (resharding it when the layout differs) and takes
    the next step on the same global batch."""
    from rcm_core.trainer import RCMTrainer
    te, full = _batch(DCP_GLOBAL)
    tr = RCMTrainer(te, _dcp_config(cp, fsdp), device=device)
    assert tr.sharded == fsdp and tr.dp_size * cp == world
    tr.load_checkpoint(extra["ckpt"])
    assert tr.step == DCP_STEPS
    return {"next": _all_metrics(tr.train_step(_local_rows(tr, full))), "after": _state(tr)}


_JOBS = {"steps": _steps_job, "dcp_save": _dcp_save_job, "dcp_load": _dcp_load_job}


def _dcp_run(out_dir, world, cp, fsdp, job, device="cpu"):
    extra = {"ckpt": str(out_dir / "ck.dcp")}
    out = out_dir / f"{job}_{world}.pt"
    if world == 1:
        _worker(0, 1, 0, str(out), cp, fsdp, device, job, extra)
        return torch.load(out, weights_only=False)
    return _spawn(world, out, cp, fsdp, device, job, extra)


def _next_step(ms, cp):
    """The step's global values from every rank's metrics: losses averaged over the data-parallel ranks
    (each is the mean over its rows; cp peers agree), the rest as rank 0 has it."""
    assert all(m["kind"] == "student" and m["step"] == DCP_STEPS for m in ms)
    for r, m in enumerate(ms):                       # the ranks of one cp group computed the same loss
        assert m["loss"] == ms[r - r % cp]["loss"], (r, m["loss"], ms[r - r % cp]["loss"])
    dp = ms[::cp]
    out = {k: sum(m[k] for m in dp) / len(dp) for k in ("loss", "loss_cm", "loss_dmd")}
    return {**out, "grad_norm_student": ms[0]["grad_norm_student"], "rollout_steps": ms[0]["rollout_steps"]}


def _assert_states(a, b, atol):
    assert (a["step"], a["ema_updates"]) == (b["step"], b["ema_updates"]) == (DCP_STEPS + 1, 2)
    for part in ("student", "fake", "ema"):
        assert list(a[part]) == list(b[part]), part
        for k, v in a[part].items():
            ok = torch.equal(v, b[part][k]) if atol == 0 else torch.allclose(v, b[part][k], rtol=0, atol=atol)
            assert ok, (part, k, (v - b[part][k]).abs().max())


@pytest.fixture(scope="module")
def cp_checkpoint(tmp_path_factory):
    """DCP_STEPS steps on 4 gloo ranks (FSDP2 x cp2), a DCP checkpoint, and the uninterrupted next step."""
    d = tmp_path_factory.mktemp("cpdcp")
    got = _dcp_run(d, 4, 2, True, "dcp_save")
    assert got["kinds"] == ["student", "critic"]
    from rcm_core.checkpoint import read_meta
    meta = read_meta(str(d / "ck.dcp"))
    assert meta["world_size"] == 4 and meta["step"] == DCP_STEPS and meta["config"]["context_parallel"] == 2
    return d, got


@pytest.mark.parametrize("world,cp,fsdp", [(4, 2, True), (2, 1, True), (1, 1, False)])
def test_dcp_checkpoint_under_context_parallel_resumes_and_reshards(cp_checkpoint, world, cp, fsdp):
    """The DCP checkpoint of 4 ranks (FSDP2 x cp2) loads on the same layout, on 2 FSDP ranks without cp and
    in one process without FSDP; on the same global batch (per-sample randomness keyed by the global sample
    index) the next step equals the uninterrupted 4-rank run's: losses, gradient norm, student, fake score
    and EMA. On the same layout exactly (every rank's metrics too)."""
    d, saved = cp_checkpoint
    same = (world, cp) == (4, 2)
    got = saved["resumed"] if same else _dcp_run(d, world, cp, fsdp, "dcp_load")
    if same:
        assert got["next"] == saved["next"]
    ref, nxt = _next_step(saved["next"], 2), _next_step(got["next"], cp)
    assert nxt["rollout_steps"] == ref["rollout_steps"]
    for k in ("loss", "loss_cm", "loss_dmd", "grad_norm_student"):
        assert nxt[k] == pytest.approx(ref[k], rel=1e-9), k
    _assert_states(got["after"], saved["after"], atol=0 if same else 1e-10)


@pytest.mark.gpu
def test_dcp_checkpoint_under_context_parallel_on_gpus_nccl(tmp_path):
    """The same on 4 GPUs (NCCL): resumed on 4 (FSDP2 x cp2), resharded on 2 (FSDP2) and on one GPU."""
    if torch.cuda.device_count() < 4:
        pytest.skip("needs 4 GPUs (NCCL)")
    saved = _dcp_run(tmp_path, 4, 2, True, "dcp_save", "cuda")
    ref = _next_step(saved["next"], 2)
    for world, cp, fsdp in ((4, 2, True), (2, 1, True), (1, 1, False)):
        got = saved["resumed"] if world == 4 else _dcp_run(tmp_path, world, cp, fsdp, "dcp_load", "cuda")
        nxt = _next_step(got["next"], cp)
        for k in ("loss", "loss_cm", "loss_dmd", "grad_norm_student"):
            assert nxt[k] == pytest.approx(ref[k], rel=1e-9), (world, k)
        _assert_states(got["after"], saved["after"], atol=1e-10)


def _reference(dp, device="cpu", extra=None):
    from rcm_core.trainer import RCMTrainer
    extra = dict(extra or {})
    steps = extra.pop("steps", STEPS)
    te, full = _batch(dp)
    return _steps(RCMTrainer(te, _config(**extra), device=device), full, steps)


def _spawn(world, out, *args):
    mp.start_processes(_worker, args=(world, _free_port(), str(out)) + args, nprocs=world, join=True,
                       start_method="spawn")
    return torch.load(out, weights_only=False)


def _compare(got, ref, dp):
    ms_ref, sd_ref = ref
    assert [m["kind"] for m in ms_ref] == ["student", "critic", "student"][:len(ms_ref)] and "loss_dmd" in ms_ref[0]
    assert len(got["ms"]) == len(ms_ref)
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


_LORA = {"lora": {"rank": 2, "alpha": 3.0}, "lr_student": 1e-2, "lr_fake": 1e-2}


@pytest.mark.parametrize("world,cp,fsdp", [(2, 2, False), (4, 2, True)])
def test_context_parallel_steps_equal_the_single_process_steps(tmp_path, world, cp, fsdp):
    got = _spawn(world, tmp_path / "r.pt", cp, fsdp)
    _compare(got, _reference(world // cp), world // cp)


def test_keep_attention_under_context_parallel_equals_the_single_process_steps(tmp_path):
    """Kept self-attention outputs (issue 22) through the Ulysses all-to-alls: the same steps as one process with
    full checkpointing."""
    got = _spawn(2, tmp_path / "r.pt", 2, False, "cpu", "steps", {"activation_checkpointing": "keep_attention"})
    _compare(got, _reference(1), 1)


@pytest.mark.parametrize("world,cp,fsdp,steps", [(2, 2, False, 3), (4, 2, True, 2)])
def test_lora_under_context_parallel_equals_the_single_process_lora_run(tmp_path, world, cp, fsdp, steps):
    """DistillConfig.lora (one shared network: teacher = no adapter, student and fake adapters, the EMA
    adapter) under cp=2 (3 steps), and FSDP2 x cp on 4 ranks (2 steps: CI time): student + critic steps
    equal one process (losses when dp = 1, gradient norms; the shared network's whole state: base
    unchanged, the three adapters); without FSDP also the merged EMA student, local on rank 0."""
    extra = {**_LORA, "steps": steps}
    got = _spawn(world, tmp_path / "r.pt", cp, fsdp, "cpu", "steps", extra)
    ref = _reference(world // cp, extra=extra)
    if not fsdp:                                         # the merged EMA student: a local copy, as without cp
        from rcm_core.teachers import get_teacher
        from rcm_core.trainer import RCMTrainer
        te, full = _batch(world // cp)
        tr = RCMTrainer(te, _config(**_LORA))
        tr.student.net.load_state_dict(ref[1])
        want, have = _ema_student(tr, full), got["ema_student"]
        assert sorted(have["sd"]) == sorted(get_teacher("embedded").net.state_dict())
        for k, v in want["sd"].items():
            assert torch.allclose(have["sd"][k], v, rtol=0, atol=1e-10), k
        assert torch.allclose(have["y"], want["y"], rtol=0, atol=1e-10)
    lora_keys = [k for k in ref[1] if ".lora_" in k]
    assert {k.split(".lora_")[1].split(".")[1] for k in lora_keys} == {"student", "fake", "ema"}
    for k in lora_keys:                                  # the adapters trained (B starts at zero)
        if ".lora_B.student." in k or ".lora_B.fake." in k:
            assert ref[1][k].abs().max() > 0, k
    _compare(got, ref, world // cp)


@pytest.mark.gpu
@pytest.mark.parametrize("world,cp,fsdp,extra", [(2, 2, False, None), (2, 2, True, None), (4, 2, True, None),
                                                 (2, 2, False, _LORA), (4, 2, True, _LORA)])
def test_context_parallel_on_gpus_nccl_equals_one_gpu_process(tmp_path, world, cp, fsdp, extra):
    """The reference runs on one GPU too: CUDA generators draw other numbers than CPU ones."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs (NCCL)")
    got = _spawn(world, tmp_path / "r.pt", cp, fsdp, "cuda", "steps", extra)
    _compare(got, _reference(world // cp, "cuda:0", extra), world // cp)


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
    with gloo_rank(rank, world, port):
        res = _wan_fwd_bwd(cp_group=dist.group.WORLD)
        for g in res["grads"].values():
            dist.all_reduce(g)                        # each rank holds its tokens' share: the sum is the gradient
        if rank == 0:
            torch.save(res, out)


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

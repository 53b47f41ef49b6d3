"""FSDP2 sharding (rcm_core.parallel) against plain data parallel, 2 ranks, real gloo (and NCCL: gpu marker).

The same rCM steps (student with the sCM tangent + DMD, critic) on the embedded teacher in float64 with
full activation checkpointing, once with student, fake score, EMA and frozen teacher sharded by FSDP2
(blocks and root) and once replicated with the trainer's gradient all-reduce: the weights, EMA and
losses must agree, and a checkpoint written under FSDP (a sharded DCP directory) must resume to the
same next step. The tangent comes from a separate no-grad pass, or fused into the student's forward
(``fused=True``: allowed under FSDP with every block checkpointed).
"""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, fsdp, device="cpu", dtype="float64", fused=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=world)
    try:
        from rcm_core.config import DistillConfig
        from rcm_core.teachers import get_teacher
        from rcm_core.trainer import RCMTrainer

        teacher = get_teacher("embedded")
        cfg = DistillConfig.preset("embedded", method="rcm", dtype=dtype, tangent_warmup_steps=0, lr_warmup_steps=0,
                                   student_update_freq=2, activation_checkpointing="full", fsdp=fsdp,
                                   fused_tangent=fused)
        tr = RCMTrainer(teacher, cfg, device=device)
        assert tr.sharded == fsdp
        if fsdp:                                                    # blocks AND root: every parameter a DTensor
            from torch.distributed.tensor import DTensor
            assert all(isinstance(p, DTensor) for p in tr.student.parameters())
            assert all(isinstance(p, DTensor) for p in tr.teacher.parameters())     # the frozen teacher too
        g = torch.Generator().manual_seed(10 + rank)
        batch = {"latents": torch.randn(2, *teacher.latent_shape, generator=g),
                 "cond": torch.randn(2, 16, 64, generator=g), "uncond": torch.zeros(1, 16, 64)}
        ms = [tr.train_step(batch) for _ in range(3)]               # student, critic, student
        ckpt = os.path.join(out_dir, f"ckpt_{fsdp}.pt")
        if fsdp or rank == 0:                                       # as distill: collective under FSDP
            tr.save_checkpoint(ckpt)
        dist.barrier()
        sd = copy.deepcopy(tr.state_dict())                       # state_dict() holds live tensors
        dist.barrier()
        tr2 = RCMTrainer(teacher, cfg, device=device)
        tr2.load_checkpoint(ckpt)
        nxt = tr.train_step(batch)["loss"], tr2.train_step(batch)["loss"]
        if rank == 0:
            torch.save({"ms": ms, "student": sd["student"], "fake": sd["fake"], "ema": sd["ema"]["module"],
                        "next": nxt}, os.path.join(out_dir, f"res_{fsdp}.pt"))
    finally:
        dist.destroy_process_group()


def _run(out_dir, fsdp, device="cpu", dtype="float64", fused=False):
    mp.start_processes(_worker, args=(2, _free_port(), str(out_dir), fsdp, device, dtype, fused), nprocs=2,
                       join=True, start_method="spawn")
    return torch.load(os.path.join(out_dir, f"res_{fsdp}.pt"), weights_only=False, map_location="cpu")


def test_fsdp_matches_data_parallel_and_resumes(tmp_path):
    _compare(_run(tmp_path, True), _run(tmp_path, False))


def test_fused_tangent_under_fsdp_matches_data_parallel(tmp_path):
    """With every block checkpointed, the fused sCM tangent runs under FSDP2 (issue 11, part 2)."""
    _compare(_run(tmp_path, True, fused=True), _run(tmp_path, False, fused=True))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_fsdp_matches_data_parallel_on_two_gpus_nccl(tmp_path):
    _compare(_run(tmp_path, True, "cuda"), _run(tmp_path, False, "cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_fsdp_bf16_mixed_precision_on_two_gpus_nccl(tmp_path):
    """bf16: FSDP's mixed-precision policy (bf16 params, fp32 reduce) against replicated autocast."""
    _compare(_run(tmp_path, True, "cuda", "bfloat16"), _run(tmp_path, False, "cuda", "bfloat16"), rel=5e-2,
             atol=5e-3, resume_rel=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_fused_tangent_under_fsdp_on_two_gpus_nccl(tmp_path):
    _compare(_run(tmp_path, True, "cuda", fused=True), _run(tmp_path, False, "cuda", fused=True))


def _compare(got, ref, rel=1e-9, atol=1e-10, resume_rel=1e-12):
    assert [m["kind"] for m in got["ms"]] == ["student", "critic", "student"]
    for a, b in zip(got["ms"], ref["ms"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=rel)
        for k in ("grad_norm_student", "grad_norm_fake"):
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=rel), k
    for part in ("student", "fake", "ema"):
        assert list(got[part]) == list(ref[part])                 # full, unprefixed keys: loadable anywhere
        for k in ref[part]:
            assert torch.allclose(got[part][k].double(), ref[part][k].double(), atol=atol, rtol=0), (part, k)
    # a gathered FSDP checkpoint resumes to the same next step (and so does the replicated one)
    for res in (got, ref):
        assert res["next"][0] == pytest.approx(res["next"][1], rel=resume_rel)
    # and the weights moved (the comparison is not between two untouched copies)
    from rcm_core.teachers import get_teacher
    t0 = get_teacher("embedded").net.state_dict()
    assert max(float((got["student"][k] - t0[k].double()).abs().max()) for k in t0) > 1e-6

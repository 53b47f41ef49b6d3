"""Gradient accumulation and per-sample randomness: for one global batch the result does not depend
on the micro-batch size or on the number of ranks (issue 11, part 4).

The reference for each case is the same trainer with the whole batch in one pass on one process;
the runs compared differ only in how the batch is cut (micro-batches, ranks).
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rcm_core.config import DistillConfig
from rcm_core.denoiser import Parameterization
from rcm_core.gaussian import AffineTimeNet, GaussianTeacher
from rcm_core.rng import SampleRNG
from rcm_core.trainer import RCMTrainer
from spawn_ranks import end_rank

D = torch.float64
STEPS = 6          # student (sCM), student (sCM), student (sCM + DMD), critic, student, critic


def make(micro_batch=0, device="cpu"):
    torch.manual_seed(0)
    teacher = GaussianTeacher(torch.tensor([1.0, -1.0, 0.5], dtype=D), 0.5)
    net = AffineTimeNet(3).double()
    cfg = DistillConfig.preset("embedded", method="rcm", guidance=2.0, tangent_warmup_steps=2, student_update_freq=2,
                               lr_student=1e-3, lr_fake=1e-3, dtype="float64", lr_warmup_steps=2,
                               micro_batch=micro_batch, rollout_cycle=False)
    return RCMTrainer(teacher, cfg, device=device, student_net=net, fake_net=net,
                      student_param=Parameterization("F", 1.0)), teacher


def global_batches(teacher, b=4):
    g = torch.Generator().manual_seed(3)
    return [{"latents": teacher.sample_data(b, g), "cond": torch.randn(b, 2, 3, generator=g, dtype=D),
             "uncond": torch.zeros(1, 2, 3, dtype=D)} for _ in range(STEPS)]


def _weights(tr):
    return [p.detach().clone() for net in (tr.student.net, tr.fake.net, tr.ema.module) for p in net.parameters()]


def _run(tr, batches, rows=slice(None), offset=0):
    ms = []
    for bt in batches:
        local = {"latents": bt["latents"][rows], "cond": bt["cond"][rows], "uncond": bt["uncond"]}
        ms.append(tr.train_step(local, sample_offset=offset))
    return ms


def test_sample_streams_do_not_depend_on_how_the_batch_is_cut():
    whole = SampleRNG(7, 3, range(0, 4))
    a = whole.randn((2,))
    parts = [SampleRNG(7, 3, range(0, 2)), SampleRNG(7, 3, range(2, 4))]
    assert torch.equal(a, torch.cat([p.randn((2,)) for p in parts]))
    assert not torch.equal(a[0], a[1])                                   # distinct samples, distinct noise
    assert not torch.equal(SampleRNG(7, 4, range(1)).randn(), SampleRNG(7, 3, range(1)).randn())


@pytest.mark.parametrize("micro", [1, 2, 3])
def test_micro_batches_give_the_whole_batch_result(micro):
    ref, te = make()
    got, _ = make(micro_batch=micro)
    bs = global_batches(te)
    m_ref, m_got = _run(ref, bs), _run(got, bs)
    assert [m["kind"] for m in m_ref] == ["student", "student", "student", "critic", "student", "critic"]
    assert "loss_dmd" in m_ref[2]
    for a, b in zip(m_ref, m_got):
        for k in ("loss", "loss_cm", "loss_dmd", "loss_fake", "grad_norm_student", "grad_norm_fake", "rollout_steps"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-11, abs=1e-14), (k, a["step"])
    for x, y in zip(_weights(ref), _weights(got)):
        assert torch.allclose(x, y, rtol=0, atol=1e-12)
    assert max(float((x - y).abs().max()) for x, y in zip(_weights(ref), _weights(make()[0]))) > 1e-5   # weights moved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tr, te = make(micro_batch=1 if rank == 0 else 0)                # ranks may even cut differently
        per = 4 // world
        ms = _run(tr, global_batches(te), rows=slice(rank * per, (rank + 1) * per), offset=rank * per)
        if rank == 0:
            torch.save({"ms": ms, "w": _weights(tr)}, out)
    except BaseException:
        dist.destroy_process_group()
        raise
    end_rank()


def test_two_ranks_give_the_single_process_result(tmp_path):
    out = str(tmp_path / "r.pt")
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
    got = torch.load(out, weights_only=False)
    ref, te = make()
    m_ref = _run(ref, global_batches(te))
    for a, b in zip(m_ref, got["ms"]):
        for k in ("grad_norm_student", "grad_norm_fake"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-11), (k, a["step"])
    for x, y in zip(_weights(ref), got["w"]):
        assert torch.allclose(x, y, rtol=0, atol=1e-12)

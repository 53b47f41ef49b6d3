"""Sharded checkpoints (torch.distributed.checkpoint): save on 4 FSDP ranks, load on 2 and on 1, real gloo.

The embedded teacher in float64 with full activation checkpointing, as tests/test_fsdp.py. A DCP
directory written by 4 ranks (each its own shards), the single file of the same state gathered on
rank 0 and the single file of a non-sharded trainer load into 2 FSDP ranks and into one process
without FSDP: weights, EMA and both AdamW states equal the saved ones exactly (gathered for the
comparison), and a run resumed on the same 4 ranks takes the same next step as the uninterrupted one.
Half-written checkpoints are ignored by distill's ``_latest``; the EMA export has the teacher's
(diffusers) state-dict names.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rcm_core.checkpoint import MARKER, IncompleteCheckpointError, detect_format, is_complete
from spawn_ranks import end_rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TEACHER = []


def _trainer(fsdp: bool):
    from rcm_core.config import DistillConfig
    from rcm_core.teachers import get_teacher
    from rcm_core.trainer import RCMTrainer

    if not _TEACHER:
        _TEACHER.append(get_teacher("embedded"))
    teacher = _TEACHER[0]
    cfg = DistillConfig.preset("embedded", method="rcm", dtype="float64", tangent_warmup_steps=0, lr_warmup_steps=0,
                               student_update_freq=2, activation_checkpointing="full", fsdp=fsdp,
                               fused_tangent=False)
    return RCMTrainer(teacher, cfg), teacher


def _batch(teacher, rank: int, b: int = 1):
    g = torch.Generator().manual_seed(10 + rank)
    return {"latents": torch.randn(b, *teacher.latent_shape, generator=g),
            "cond": torch.randn(b, 16, 64, generator=g), "uncond": torch.zeros(1, 16, 64)}


def _full(tr) -> dict:
    """The whole state as full tensors with canonical FQN keys (a collective under FSDP; rank 0 gets it)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    o = StateDictOptions(full_state_dict=tr.sharded, cpu_offload=tr.sharded, flatten_optimizer_state_dict=True)
    out = {"step": tr.step, "ema_updates": tr.ema.num_updates}
    for name, net, opt in (("student", tr.student.net, tr.opt_student), ("fake", tr.fake.net, tr.opt_fake),
                           ("ema", tr.ema.module, None)):
        out[name] = {k: v.detach().clone() for k, v in get_model_state_dict(net, options=o).items()}
        if opt is not None:
            out["opt_" + name] = {k: v.detach().clone() if torch.is_tensor(v) else v
                                  for k, v in get_optimizer_state_dict(net, opt, options=o).items()}
    return out


def _worker(rank, world, port, out_dir, phase):
    if world > 1:                        # a spawned rank (world 1 runs in the test's own process)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = _PHASES[phase](rank, world, out_dir)
        if rank == 0:
            torch.save(res, os.path.join(out_dir, f"res_{phase}.pt"))
    except BaseException:
        if world > 1:
            dist.destroy_process_group()
        raise
    if world > 1:
        end_rank()


def _save_on_4(rank, world, out_dir):
    """Train 3 steps (student, critic, student) on 4 FSDP ranks, save DCP + a gathered file, resume on 4."""
    tr, teacher = _trainer(fsdp=True)
    assert tr.sharded
    batch = _batch(teacher, rank)
    kinds = [tr.train_step(batch)["kind"] for _ in range(3)]
    dcp_dir, file = os.path.join(out_dir, "ck.dcp"), os.path.join(out_dir, "ck.pt")
    tr.save_checkpoint(dcp_dir)                                  # auto: DCP, each rank its shards
    tr.save_checkpoint(file, format="file")                      # gathered, rank 0 writes
    saved = _full(tr)
    tr2, _ = _trainer(fsdp=True)
    tr2.load_checkpoint(dcp_dir)
    loaded = _full(tr2)
    nxt = tr.train_step(batch), tr2.train_step(batch)            # the same next step, uninterrupted vs resumed
    return {"kinds": kinds, "saved": saved, "loaded": loaded, "next": nxt, "after": (_full(tr), _full(tr2))}


def _load(rank, world, out_dir, fsdp):
    res = {}
    for fmt in _FORMATS:
        tr, teacher = _trainer(fsdp=fsdp)
        assert tr.sharded == fsdp
        tr.load_checkpoint(os.path.join(out_dir, _FORMATS[fmt]))
        res[fmt] = _full(tr)
        if fmt == "dcp":
            m = tr.train_step(_batch(teacher, rank))             # and it trains on from there
            res["next"] = (m["kind"], m["loss"], tr.step)
    if fsdp:                                                     # the EMA export: the teacher's names
        from rcm_core.checkpoint import ema_safetensors
        data = ema_safetensors(tr, expected_keys=teacher.net.state_dict().keys())
        assert (data is None) == (rank != 0)
        res["ema_export"] = data
        res["wan_export"] = _wan_export(rank)
    return res


def _wan_export(rank):
    """EMA export of a trainer on a tiny diffusers Wan2.1 transformer, sharded on these ranks."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import diffusers
    except ImportError:
        return None
    from types import SimpleNamespace

    from rcm_core.checkpoint import ema_safetensors
    from rcm_core.config import DistillConfig
    from rcm_core.denoiser import Parameterization
    from rcm_core.real import install_fp32_time_embedding
    from rcm_core.trainer import RCMTrainer

    torch.manual_seed(0)
    net = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                          in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                          num_layers=2, rope_max_seq_len=32)
    keys = list(net.state_dict())
    install_fp32_time_embedding(net)
    teacher = SimpleNamespace(net=net, param=Parameterization("rf", 1000.0))
    cfg = DistillConfig.preset("embedded", dtype="float32", fsdp=True, activation_checkpointing="full",
                               fused_tangent=False)
    tr = RCMTrainer(teacher, cfg)
    assert tr.sharded
    return {"keys": keys, "data": ema_safetensors(tr, expected_keys=keys)}


# the DCP directory of 4 ranks, the single file they gathered, and that state as a single file of a
# non-sharded trainer (optimiser states by parameter index): all load everywhere
_FORMATS = {"dcp": "ck.dcp", "file": "ck.pt", "plain": "ck_plain.pt"}
_PHASES = {"save4": _save_on_4, "load2": lambda r, w, d: _load(r, w, d, True),
           "load1": lambda r, w, d: _load(r, w, d, False)}


def _spawn(out_dir, phase, world):
    if world == 1:
        _worker(0, 1, 0, str(out_dir), phase)
    else:
        mp.start_processes(_worker, args=(world, _free_port(), str(out_dir), phase), nprocs=world, join=True,
                           start_method="spawn")
    return torch.load(os.path.join(out_dir, f"res_{phase}.pt"), weights_only=False)


def _assert_equal(a: dict, b: dict, where: str):
    assert set(a) == set(b), (where, sorted(set(a) ^ set(b))[:5])
    for k in a:
        if isinstance(a[k], dict):
            _assert_equal(a[k], b[k], f"{where}.{k}")
        elif torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), f"{where}.{k}"
        elif isinstance(a[k], (list, tuple)):       # AdamW betas: a tuple, or a list after a full-state load
            assert list(a[k]) == list(b[k]), f"{where}.{k}: {a[k]!r} != {b[k]!r}"
        else:
            assert a[k] == b[k], f"{where}.{k}: {a[k]!r} != {b[k]!r}"


@pytest.fixture(scope="module")
def saved_on_4(tmp_path_factory):
    """3 steps on 4 FSDP ranks, saved as DCP (``ck.dcp``) and as a gathered single file (``ck.pt``)."""
    d = tmp_path_factory.mktemp("dcp")
    got = _spawn(d, "save4", 4)
    tr, _ = _trainer(fsdp=False)
    tr.load_checkpoint(str(d / "ck.dcp"))
    tr.save_checkpoint(str(d / "ck_plain.pt"))                   # auto: one file, as any non-sharded run
    return d, got


def test_dcp_directory_is_sharded_with_canonical_names(saved_on_4):
    d, got = saved_on_4
    assert got["kinds"] == ["student", "critic", "student"]
    saved = got["saved"]
    assert saved["step"] == 3 and saved["ema_updates"] == 2
    # one shard file per rank, DCP's metadata, our marker (written last); nothing else left behind
    assert sorted(os.listdir(d / "ck.dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp",
                                                "__3_0.distcp", MARKER]
    assert not [n for n in os.listdir(d) if n.startswith(".tmp-")]
    assert detect_format(str(d / "ck.dcp")) == "dcp" and detect_format(str(d / "ck.pt")) == "file"
    from rcm_core.checkpoint import read_meta
    meta = read_meta(str(d / "ck.dcp"))
    assert meta["step"] == 3 and meta["world_size"] == 4 and meta["sharded"] and meta["ema"]["num_updates"] == 2
    assert meta["parts"] == ["ema", "fake", "student", "opt_student", "opt_fake"]
    from torch.distributed.checkpoint import FileSystemReader
    md = FileSystemReader(str(d / "ck.dcp")).read_metadata().state_dict_metadata
    assert not [k for k in md if "_checkpoint_wrapped_module" in k or "_fsdp" in k or "_orig_mod" in k]
    for part in ("student", "fake", "ema"):
        for k, v in saved[part].items():                         # global shapes, not shards
            assert list(md[f"{part}.{k}"].size) == list(v.shape), (part, k)
    for part in ("opt_student", "opt_fake"):
        for k, v in saved[part].items():
            if torch.is_tensor(v) and v.dim():
                assert list(md[f"{part}.{k}"].size) == list(v.shape), (part, k)
    # each rank wrote its own shard of every parameter (4 chunks), nothing was gathered on one rank
    assert len(md["student.blocks.0.self_attn.q.weight"].chunks) == 4
    assert len(md["opt_student.state.blocks.0.self_attn.q.weight.exp_avg"].chunks) == 4


def test_resume_on_the_same_4_ranks_takes_the_same_next_step(saved_on_4):
    _, got = saved_on_4
    _assert_equal(got["loaded"], got["saved"], "4->4")
    (m1, m2), (a1, a2) = got["next"], got["after"]
    assert m1["kind"] == "critic"
    assert {k: v for k, v in m1.items() if "time" not in k and "per_s" not in k} == \
           {k: v for k, v in m2.items() if "time" not in k and "per_s" not in k}
    _assert_equal(a1, a2, "next step")


@pytest.mark.parametrize("phase,world", [("load2", 2), ("load1", 1)])
def test_resharded_load_on_2_fsdp_ranks_and_on_1_process(saved_on_4, phase, world):
    """The DCP directory of 4 ranks, the gathered single file and a non-sharded single file load into 2
    FSDP ranks and into one process without FSDP: weights, EMA and both AdamW states exactly as saved;
    training continues.
    On 2 ranks also: the EMA export has the teacher's names (embedded, and a diffusers Wan2.1)."""
    d, got = saved_on_4
    saved = got["saved"]
    res = _spawn(d, phase, world)
    for fmt in _FORMATS:
        _assert_equal(res[fmt], saved, f"{phase}/{fmt}")
    kind, loss, step = res["next"]
    assert kind == "critic" and step == 4 and loss == loss
    if phase != "load2":
        return
    from safetensors.torch import load as st_load

    from rcm_core.teachers import get_teacher
    ema = st_load(res["ema_export"])
    assert sorted(ema) == sorted(get_teacher("embedded").net.state_dict())
    for k, v in saved["ema"].items():
        assert ema[k].dtype == torch.float32 and torch.equal(ema[k], v.float()), k
    wan = res["wan_export"]
    if wan is not None:                  # a diffusers Wan2.1 transformer: exactly its state-dict names
        assert sorted(st_load(wan["data"])) == sorted(wan["keys"])


class _DCPOnOneProcess:
    """A one-process trainer that checkpoints in DCP format, as distill's trainer does under FSDP."""
    sharded = True

    def __init__(self, tr):
        self.tr = tr

    def save_checkpoint(self, url, storage_options=None):
        self.tr.save_checkpoint(url, storage_options, format="dcp")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_half_written_checkpoints_are_never_picked_up(tmp_path, monkeypatch, where):
    """A save killed after the shards (before the marker) and a directory without its marker are ignored
    by distill's ``_latest``, refused by ``load_checkpoint``, and cleared by the next save. Locally the
    directory is written under a temporary name; on ``memory://`` (an fsspec filesystem standing in for
    an object store: DCP's fsspec writer, no rename) in place with the marker last."""
    import uuid

    import torch.distributed.checkpoint as dcp
    from rcm_steps.distill import _latest, _save
    from rcm_steps.storage import Storage

    out = Storage(str(tmp_path / "out") if where == "local" else f"memory://dcp-{uuid.uuid4().hex}/out")
    tr, _ = _trainer(fsdp=False)
    w = _DCPOnOneProcess(tr)
    tr.step = 2
    _save(w, out, 2)
    assert _latest(out) == {"step": 2, "file": "ckpt/step-0000002.dcp"}

    real_save = dcp.save

    def killed(*a, **k):                      # every shard and DCP's .metadata written, then the kill
        real_save(*a, **k)
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(dcp, "save", killed)
    tr.step = 4
    with pytest.raises(KeyboardInterrupt):
        _save(w, out, 4)
    monkeypatch.setattr(dcp, "save", real_save)
    names = out.list("ckpt")
    if where == "local":                      # still under its temporary name
        assert "step-0000004.dcp" not in names and [n for n in names if n.endswith("-step-0000004.dcp")]
    else:                                     # in place, without the marker
        assert "step-0000004.dcp" in names and not out.exists(f"ckpt/step-0000004.dcp/{MARKER}")
        assert out.exists("ckpt/step-0000004.dcp/.metadata")
        with pytest.raises(IncompleteCheckpointError, match="incomplete checkpoint directory"):
            tr.load_checkpoint(out.url("ckpt/step-0000004.dcp"))
    assert _latest(out)["step"] == 2

    tr.step = 6                               # complete, then its marker removed: no longer a checkpoint
    _save(w, out, 6)
    assert _latest(out)["step"] == 6
    out.rm(f"ckpt/step-0000006.dcp/{MARKER}")
    assert _latest(out)["step"] == 2 and not is_complete(out.url("ckpt/step-0000006.dcp"))
    with pytest.raises(IncompleteCheckpointError):
        tr.load_checkpoint(out.url("ckpt/step-0000006.dcp"))

    tr.step = 8                               # the next save clears the debris, keeps 2 complete ones
    _save(w, out, 8)
    assert out.list("ckpt") == ["latest.json", "step-0000002.dcp", "step-0000008.dcp"]
    assert _latest(out) == {"step": 8, "file": "ckpt/step-0000008.dcp"}
    tr2, _ = _trainer(fsdp=False)
    tr2.load_checkpoint(out.url(_latest(out)["file"]))
    assert tr2.step == 8

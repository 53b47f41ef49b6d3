import json
import os
import subprocess
import sys

import pytest

from pipeline_fixtures import *  # noqa: F401,F403
from pipeline_fixtures import FakeTeacher
from rcm_steps.cache import CacheConfig, cache_teacher
from rcm_steps.launcher import run_torchrun, TorchrunError
from rcm_steps.storage import Storage

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = json.dumps({"tangent_warmup_steps": 2, "lr_warmup_steps": 1, "student_update_freq": 2,
                   "lr_student": 1e-3, "lr_fake": 1e-3,
                   "guidance": 2.0})


def _env(tmp_path):
    return {"PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "TQDM_DISABLE": "1"}


@pytest.fixture
def cache_url(tmp_path):
    st = Storage(str(tmp_path / "store"))
    return cache_teacher(FakeTeacher(), [f"p{i}" for i in range(4)], st,
                         CacheConfig(samples_per_prompt=4, shard_size=8)).url


def test_two_processes_gloo_with_mlflow(tmp_path, cache_url):
    import mlflow
    import torch

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = mlflow.MlflowClient().create_run(mlflow.set_experiment("t").experiment_id).info.run_id
    out = str(tmp_path / "out")
    run_torchrun("rcm_steps.distill", ["--teacher", "pipeline_fixtures:FakeTeacher", "--cache", cache_url,
                                       "--out", out, "--iterations", "6", "--batch-size", "4", "--config", TINY,
                                       "--ckpt-every", "3", "--log-every", "2", "--mlflow-run-id", run_id],
                 env=_env(tmp_path), nproc_per_node=2)
    res = json.load(open(os.path.join(out, "result.json")))
    assert res["world_size"] == 2 and res["backend"] == "gloo" and res["steps"] == 6
    assert os.path.exists(os.path.join(out, "student_ema.safetensors"))
    client = mlflow.MlflowClient()
    # the student's and the critic's losses are two series (their steps alternate), no mixed train/loss, and the
    # step is MLflow's own (no train/step metric)
    student = [m.step for m in client.get_metric_history(run_id, "train/student_loss")]
    critic = [m.step for m in client.get_metric_history(run_id, "train/critic_loss")]
    assert student and critic and sorted(student + critic) == [1, 2, 3, 4, 5, 6]
    logged = client.get_run(run_id).data.metrics
    assert not {"train/loss", "train/step", "train/loss_fake"} & set(logged), sorted(logged)
    assert client.get_run(run_id).data.params["distill.world_size"] == "2"
    assert client.get_metric_history(run_id, "train/grad_norm_student")
    # diagnostics.json next to result.json (rank 0): the series of the steps that reported them, the phases
    diag = json.load(open(os.path.join(out, "diagnostics.json")))
    assert res["diagnostics_url"] == os.path.join(out, "diagnostics.json")
    assert set(diag["series"]) == {"dmd_scm_ratio_out", "dmd_scm_ratio_w", "critic_loss_rel", "critic_behind",
                                   "nan_masked_frac", "dmd_nan_masked_frac"}
    assert all(1 <= int(s) <= 6 for series in diag["series"].values() for s in series)
    assert sorted(int(k) for v in diag["losses"].values() for k in v) == [1, 2, 3, 4, 5, 6]
    # samples over training: before training and at each checkpoint (the FSDP test samples collectively)
    from rcm_steps.previews import load_previews_url

    prev = load_previews_url(res["previews_url"])
    assert sorted(prev["clips"]) == [0, 3, 6] and len(prev["prompts"]) == 2 and prev["student_steps"] == 4
    assert prev["clips"][6].dtype == torch.uint8 and prev["clips"][6].shape[:2] == (2, 1)
    if diag["stages"]:               # the trainer reports its phase: the run's tag names the current one
        last = diag["stages"][-1]
        assert client.get_run(run_id).data.tags["rcm.current_stage"] == f"{last['stage']}:{last['method']}"


def test_killed_then_retried_resumes_from_checkpoint(tmp_path, cache_url):
    out = str(tmp_path / "out")
    args = ["--teacher", "pipeline_fixtures:FakeTeacher", "--cache", cache_url, "--out", out,
            "--iterations", "6", "--batch-size", "2", "--config", TINY, "--ckpt-every", "2"]
    with pytest.raises(TorchrunError, match="exited with code"):
        run_torchrun("rcm_steps.distill", args + ["--fault-at-step", "4"], env=_env(tmp_path))
    assert json.load(open(os.path.join(out, "ckpt", "latest.json")))["step"] == 4
    assert not os.path.exists(os.path.join(out, "result.json"))
    run_torchrun("rcm_steps.distill", args + ["--fault-at-step", "4"], env=_env(tmp_path))   # the retry
    res = json.load(open(os.path.join(out, "result.json")))
    assert res["resumed_from"] == 4 and res["start_step"] == 4 and res["steps"] == 6
    # diagnostics.json keeps the killed attempt's steps (written with its checkpoints) and adds the retry's
    steps = sorted({int(k) for series in json.load(open(os.path.join(out, "diagnostics.json")))["series"].values()
                    for k in series})
    if steps:                        # (a trainer that reports no diagnostics: nothing to keep)
        assert steps[0] <= 4 < steps[-1] <= 6


class BlockTeacher(FakeTeacher):
    """FakeTeacher whose text path runs through a ModuleList of blocks (so FSDP has blocks to shard)."""

    def __init__(self, device="cpu"):
        import torch

        super().__init__()
        net = self.net
        net.blocks = torch.nn.ModuleList([_Residual() for _ in range(2)])
        proj = net.proj
        net.proj = torch.nn.Sequential(*net.blocks, proj)     # forward: proj(blocks(cond.mean(1)))
        net.float()


class _Residual(__import__("torch").nn.Module):
    def __init__(self):
        import torch

        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        torch.nn.init.normal_(self.lin.weight, std=0.1)

    def forward(self, h):
        return h + self.lin(h)


def test_fsdp_dcp_checkpoint_of_4_ranks_resumes_on_2_and_ema_is_full(tmp_path, cache_url):
    """FSDP: each rank writes its shards of a DCP checkpoint (ckpt/step-XXXXXXX.dcp/); a rerun on 2 ranks
    resumes from the one 4 ranks wrote; the EMA export has the teacher's full names and shapes."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from rcm_core.checkpoint import MARKER, read_meta

    out = str(tmp_path / "out")
    cfg = json.dumps({**json.loads(TINY), "fsdp": True, "fused_tangent": False, "activation_checkpointing": "full"})
    args = ["--teacher", "test_steps_distill:BlockTeacher", "--cache", cache_url, "--out", out, "--batch-size", "4",
            "--config", cfg, "--ckpt-every", "2"]
    run_torchrun("rcm_steps.distill", args + ["--iterations", "2"], env=_env(tmp_path), nproc_per_node=4)
    first = os.path.join(out, "ckpt", "step-0000002.dcp")
    assert sorted(os.listdir(first)) == [".metadata"] + [f"__{r}_0.distcp" for r in range(4)] + [MARKER]
    assert read_meta(first)["world_size"] == 4
    run_torchrun("rcm_steps.distill", args + ["--iterations", "4"], env=_env(tmp_path), nproc_per_node=2)
    res = json.load(open(os.path.join(out, "result.json")))
    assert res["world_size"] == 2 and res["steps"] == 4 and res["config"]["fsdp"] is True
    assert res["resumed_from"] == 2 and res["start_step"] == 2 and res["checkpoint"] == "ckpt/step-0000004.dcp"
    from rcm_steps.previews import load_previews_url      # FSDP: every rank samples the sharded EMA student
    assert sorted(load_previews_url(res["previews_url"])["clips"]) == [0, 2, 4]    # 4 ranks wrote 0, 2; 2 ranks 4
    ck = os.path.join(out, res["checkpoint"])
    assert sorted(os.listdir(ck)) == [".metadata", "__0_0.distcp", "__1_0.distcp", MARKER]
    meta = read_meta(ck)
    assert meta["step"] == 4 and meta["world_size"] == 2 and meta["config"]["fsdp"] is True
    ref = BlockTeacher().net.state_dict()
    md = FileSystemReader(ck).read_metadata().state_dict_metadata
    for part in ("student", "fake", "ema"):                       # full names, no FSDP/wrapper prefixes
        assert {k.split(".", 1)[1] for k in md if k.startswith(part + ".")} == set(ref)
        for k, v in ref.items():
            assert list(md[f"{part}.{k}"].size) == list(v.shape), k   # global shapes
    dcp_to_torch_save(ck, str(tmp_path / "one.pt"))                # the documented conversion to one file
    one = torch.load(tmp_path / "one.pt", weights_only=False)
    assert not torch.equal(one["student"]["blocks.0.lin.weight"], ref["blocks.0.lin.weight"])
    ema = load_file(os.path.join(out, "student_ema.safetensors"))
    assert set(ema) == set(ref)                                   # the teacher's names, gathered (not shards)
    for k, v in ref.items():
        assert tuple(ema[k].shape) == tuple(v.shape), k
    assert torch.equal(ema["blocks.0.lin.weight"], one["ema"]["blocks.0.lin.weight"].float())

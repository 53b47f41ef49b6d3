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
    hist = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in hist] == [1, 2, 3, 4, 5, 6]
    assert client.get_run(run_id).data.params["distill.world_size"] == "2"
    assert client.get_metric_history(run_id, "train/grad_norm_student")


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


def test_two_processes_fsdp_checkpoint_and_ema_are_full(tmp_path, cache_url):
    import torch
    from safetensors.torch import load_file

    out = str(tmp_path / "out")
    cfg = json.dumps({**json.loads(TINY), "fsdp": True, "fused_tangent": False, "activation_checkpointing": "full"})
    run_torchrun("rcm_steps.distill", ["--teacher", "test_steps_distill:BlockTeacher", "--cache", cache_url,
                                       "--out", out, "--iterations", "4", "--batch-size", "4", "--config", cfg,
                                       "--ckpt-every", "2"], env=_env(tmp_path), nproc_per_node=2)
    res = json.load(open(os.path.join(out, "result.json")))
    assert res["world_size"] == 2 and res["steps"] == 4 and res["config"]["fsdp"] is True
    ema = load_file(os.path.join(out, "student_ema.safetensors"))
    ck = torch.load(os.path.join(out, res["checkpoint"]), weights_only=False)
    ref = BlockTeacher().net.state_dict()
    for sd in (ema, ck["student"], ck["fake"], ck["ema"]["module"]):
        assert set(sd) == set(ref)                                  # full keys, no FSDP/wrapper prefixes
        for k, v in ref.items():
            assert tuple(sd[k].shape) == tuple(v.shape), k          # gathered, not shards
    assert ck["step"] == 4 and not torch.equal(ck["student"]["blocks.0.lin.weight"], ref["blocks.0.lin.weight"])

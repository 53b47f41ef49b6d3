"""Shared fixtures of the pipeline tests (tests/test_flow_*.py, tests/test_steps_*.py).

Imported explicitly (``from pipeline_fixtures import *``) rather than through a
conftest.py, so that the pipeline tests do not touch fixtures of rcm_core's tests.
"""
from __future__ import annotations

import json
import os
import uuid

import pytest

os.environ.setdefault("METAFLOW_USER", "tester")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

__all__ = ["moto_server", "s3_bucket", "pipeline_env"]

FLOW = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flows", "distill_flow.py")


def flow_env(tmp):
    """Environment of a flow run in ``tmp``: Metaflow datastore and sqlite MLflow under it, quiet, 1 thread."""
    return {"METAFLOW_USER": "tester", "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1",
            "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp / "mf"), "GX_ANALYTICS_ENABLED": "false",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}


def _finished(running):
    run = running.run
    tasks_err = "".join(t.stderr or "" for st in run for t in st) if run is not None else ""
    return run, running.stdout, running.stderr + tasks_err


def run_flow(tmp, extra_env=None, **params):
    """Run the DAG through metaflow.Runner (smoke profile unless given) in ``tmp``; returns (run, stdout, stderr).
    ``extra_env``: more environment for that run only (e.g. the test hook ``RCM_FAULT_AT_STEP``)."""
    from metaflow import Runner

    env = flow_env(tmp)
    os.environ.update(env)
    env = {**env, **(extra_env or {})}
    params.setdefault("storage_root", str(tmp / "store"))
    params.setdefault("profile", "smoke")
    with Runner(FLOW, show_output=False, env=env, cwd=str(tmp)).run(
            mlflow_tracking_uri=env["MLFLOW_TRACKING_URI"], **params) as running:
        return _finished(running)


def resume_flow(tmp, origin_run_id, **kw):
    """``resume`` the run ``origin_run_id`` (made by run_flow or the CLI in ``tmp``); returns (run, stdout, stderr)."""
    from metaflow import Runner

    env = flow_env(tmp)
    os.environ.update(env)
    with Runner(FLOW, show_output=False, env=env, cwd=str(tmp)).resume(origin_run_id=str(origin_run_id),
                                                                       **kw) as running:
        return _finished(running)


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 protocol endpoint on 127.0.0.1 (random port)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    yield url
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(moto_server, monkeypatch):
    """A fresh bucket; returns (s3 url, storage_options)."""
    import boto3

    name = f"rcm-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=name)
    opts = {"endpoint_url": moto_server}
    monkeypatch.setenv("RCM_STORAGE_OPTIONS", json.dumps(opts))
    return f"s3://{name}", opts


@pytest.fixture
def pipeline_env(tmp_path, monkeypatch):
    """Metaflow datastore, MLflow store and storage root all in tmp dirs."""
    monkeypatch.setenv("METAFLOW_USER", "tester")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("METAFLOW_DATASTORE_SYSROOT_LOCAL", str(tmp_path / "mf"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return tmp_path


class FakeTeacher:
    """A tiny analytic teacher (Gaussian data) with the Teacher interface; no weights."""

    name, version = "fake", "1"
    negative_prompt = ""
    latent_shape = (1, 2, 4, 4)
    guidance, sample_steps, shift, solver = 2.0, 4, 1.0, "euler"

    def __init__(self, latent_shape=None):
        import torch

        from rcm_core.gaussian import GaussianDenoiserNet

        if latent_shape is not None:
            self.latent_shape = tuple(latent_shape)
        inner = GaussianDenoiserNet(torch.zeros(self.latent_shape, dtype=torch.float64), 1.0)

        class _Net(torch.nn.Module):  # the analytic denoiser plus a few trainable weights
            def __init__(self):
                super().__init__()
                self.inner = inner
                self.gain = torch.nn.Parameter(torch.ones(1))   # FSDP2 shards no 0-d parameters
                self.proj = torch.nn.Linear(8, 1)
                torch.nn.init.zeros_(self.proj.weight)
                torch.nn.init.zeros_(self.proj.bias)

            def forward(self, x, timestep, cond):
                bias = self.proj(cond.mean(1)).reshape(-1, *([1] * (x.dim() - 1)))
                return self.inner(x, timestep, cond) * self.gain + bias

        self.net = _Net().float()
        self.param = "x0"

    def encode_text(self, prompts):
        import zlib

        import torch

        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            out.append(torch.randn(3, 8, generator=g))
        return torch.stack(out)

    def decode(self, latents):
        return (latents * 0.25 + 0.5).clamp(0, 1)

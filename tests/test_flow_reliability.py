"""Reliability of the DAG: resume across runs after a kill, MLflow runs closed FAILED/KILLED, short error messages.

Real processes throughout: the flow runs as ``python flows/distill_flow.py run`` (killed with SIGTERM to
its process group) or through metaflow.Runner, torchrun workers, a real sqlite MLflow store.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

# Import torch.export before Metaflow (see test_flow_distill.py).
import torch.export  # noqa: F401

from pipeline_fixtures import *  # noqa: F401,F403
from pipeline_fixtures import FLOW, flow_env, resume_flow, run_flow

ITERATIONS = 10          # smoke profile: a checkpoint after every step, ~0.4 s a step on one CPU thread


def _mlflow(tmp):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=flow_env(tmp)["MLFLOW_TRACKING_URI"])


def _all_runs(client):
    from mlflow.entities import ViewType

    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(exps, run_view_type=ViewType.ALL) if exps else []


def _group_alive(pgid):
    """Processes of group ``pgid`` that have not exited (zombies excluded)."""
    alive = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(d))
    return alive


def _ema(url):
    from safetensors.torch import load_file

    return load_file(url[len("file://"):] if url.startswith("file://") else url)


def _ckpt(distill_url, step):
    import torch

    root = distill_url[len("file://"):] if distill_url.startswith("file://") else distill_url
    return torch.load(os.path.join(root, "ckpt", f"step-{step:07d}.pt"), map_location="cpu", weights_only=False)


def _same_tensors(a, b):
    import torch

    assert set(a) == set(b)
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_resume_after_kill_continues_from_the_last_checkpoint(tmp_path):
    """Kill the flow (SIGTERM to its process group) once distill has checkpointed, ``resume`` it: distill starts
    at the killed run's last checkpoint and the final weights equal an uninterrupted run's, bit for bit.

    The killed run's first distill attempt also dies after step 1 (test hook ``RCM_FAULT_AT_STEP``): Metaflow's
    retry resumes inside the run, and the kill comes after the retry's first checkpoint, so both kinds of resume are covered
    (and the MLflow run goes FAILED -> reopened -> KILLED -> reopened -> FINISHED).
    """
    env = {**os.environ, **flow_env(tmp_path)}
    store = tmp_path / "store"
    params = {"profile": "smoke", "iterations": ITERATIONS, "storage_root": str(store),
              "mlflow_tracking_uri": env["MLFLOW_TRACKING_URI"]}
    cmd = [sys.executable, FLOW, "run", "--run-id-file", str(tmp_path / "run_id")]
    for k, v in params.items():
        cmd += [f"--{k}", str(v)]
    t0 = time.perf_counter()
    with open(tmp_path / "killed_run.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=str(tmp_path), env={**env, "RCM_FAULT_AT_STEP": "1"}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            step, deadline = 0, time.time() + 600
            while step < 2:                     # the retried attempt (resumed at 1) has checkpointed step 2
                assert proc.poll() is None, "flow ended before it was killed:\n" + \
                    (tmp_path / "killed_run.log").read_text()[-3000:]
                assert time.time() < deadline, "no distill checkpoint after 600 s"
                for f in glob.glob(str(store / "runs" / "RCMDistillFlow" / "*" / "distill" / "ckpt" / "latest.json")):
                    try:
                        with open(f) as fh:
                            step = json.load(fh)["step"]
                    except (OSError, ValueError):
                        pass
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)
            deadline = time.time() + 120
            while _group_alive(proc.pid):       # the step marks MLflow KILLED and stops torchrun
                assert time.time() < deadline, f"processes left after SIGTERM: {_group_alive(proc.pid)}"
                time.sleep(0.2)
        finally:
            if proc.poll() is None or _group_alive(proc.pid):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    t_killed = time.perf_counter() - t0
    killed_log = (tmp_path / "killed_run.log").read_text()
    origin = (tmp_path / "run_id").read_text().strip()
    ckpt_dir = store / "runs" / "RCMDistillFlow" / origin / "distill"
    killed_at = json.loads((ckpt_dir / "ckpt" / "latest.json").read_text())["step"]
    assert 2 <= killed_at < ITERATIONS, killed_log[-3000:]
    assert not (ckpt_dir / "result.json").exists()

    client = _mlflow(tmp_path)
    (mrun,) = _all_runs(client)
    assert mrun.info.status == "KILLED", killed_log[-3000:]
    assert mrun.data.tags["killed_by"] == "SIGTERM" and mrun.data.tags["killed.where"].startswith(f"{origin}/distill/")
    assert "resume" in killed_log and "interrupted by SIGTERM" in killed_log
    # attempt 0 died after step 1 and ended the run FAILED; its retry reopened it
    history = mrun.data.tags["rcm.history"]
    assert f"FAILED at {origin}/distill/" in history and "reopened at" in history and "KILLED at" in history

    t1 = time.perf_counter()
    run, out, err = resume_flow(tmp_path, origin)
    t_resume = time.perf_counter() - t1
    assert run is not None and run.successful, err[-3000:]
    assert run.id != origin
    d = run.data
    assert d.distill_result["start_step"] == killed_at and d.distill_result["resumed_from"] == killed_at
    assert d.distill_result["steps"] == ITERATIONS
    assert d.distill_url.rstrip("/").endswith(f"{origin}/distill")
    # the same MLflow run, re-linked to the resumed run, and the model version agrees with it
    assert d.mlflow_run_id == mrun.info.run_id
    (mrun2,) = _all_runs(client)
    tags = mrun2.data.tags
    assert mrun2.info.status == "FINISHED"
    assert tags["metaflow.run_id"] == run.id and tags["metaflow.origin_run_id"] == origin
    assert tags["metaflow.run_ids"] == f"{origin},{run.id}" and tags["rcm.storage_run_id"] == origin
    assert not any(k in tags for k in ("error", "killed_by"))
    mv = client.get_model_version(d.model_name, d.model_version)
    assert mv.tags["metaflow.run_id"] == run.id == tags["metaflow.run_id"]
    assert mv.tags["metaflow.origin_run_id"] == origin and mv.tags["mlflow_run_id"] == mrun.info.run_id
    assert mv.tags["rcm.storage_run_id"] == origin
    # both segments of training logged to the one MLflow run
    loss_steps = {m.step for k in ("train/student_loss", "train/critic_loss")
                  for m in client.get_metric_history(mrun.info.run_id, k)}
    assert set(range(1, ITERATIONS + 1)) <= loss_steps

    # the reference: the same flow, uninterrupted (same cache, same MLflow store)
    t2 = time.perf_counter()
    base, _, berr = run_flow(tmp_path, iterations=ITERATIONS)
    t_base = time.perf_counter() - t2
    assert base is not None and base.successful, berr[-3000:]
    b = base.data
    assert b.distill_result["start_step"] == 0 and b.distill_result["resumed_from"] is None
    assert b.cache_url == d.cache_url and b.distill_url != d.distill_url
    assert _same_tensors(_ema(d.distill_result["ema_url"]), _ema(b.distill_result["ema_url"])) == []
    final_resumed, final_base = _ckpt(d.distill_url, ITERATIONS), _ckpt(b.distill_url, ITERATIONS)
    for part in ("student", "fake"):
        assert _same_tensors(final_resumed[part], final_base[part]) == [], part
    assert all(r.info.status == "FINISHED" for r in _all_runs(client))
    print(f"killed run {t_killed:.0f}s, resume {t_resume:.0f}s, uninterrupted run {t_base:.0f}s")


def test_failed_flow_ends_mlflow_run_failed_and_says_why_first(tmp_path):
    """Bad prompts stop the flow at curate: the MLflow run ends FAILED with the error as tags (none left
    RUNNING), and the curate task's error output starts with the short rCM message (culprit, fix)."""
    bad = tmp_path / "bad_prompts.txt"
    bad.write_text("a 1 drifting up\n\n a 1  drifting up\nhi\n")
    run, out, err = run_flow(tmp_path, prompts=str(bad))
    assert run is not None and not run.successful
    (curate,) = [t for t in run["curate"]]
    stderr = curate.stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    first_rcm = next(i for i, ln in enumerate(lines) if ln.startswith("rCM:"))
    first_trace = next(i for i, ln in enumerate(lines) if "Traceback" in ln or "Internal error" in ln
                       or "failed:" in ln and not ln.startswith("rCM:"))
    assert first_rcm < first_trace, stderr[:3000]
    head = lines[first_rcm:first_rcm + 3]
    assert head[0].startswith("rCM: curate failed: DataValidationError: prompt gate failed")
    assert str(bad) in head[0]                                   # the culprit
    assert head[1].startswith("rCM: fix: ") and "--prompts" in head[1]
    assert "resume" in head[2]

    client = _mlflow(tmp_path)
    runs = _all_runs(client)
    assert [r.info.status for r in runs] == ["FAILED"]
    tags = runs[0].data.tags
    assert tags["error.type"] == "DataValidationError" and "prompt gate failed" in tags["error"]
    assert tags["error.where"].startswith(f"{run.id}/curate/") and tags["error.retry_pending"] == "false"


def test_worker_error_reaches_the_step_message(tmp_path, monkeypatch):
    """A distill worker failing on a project error (no teacher cache there) prints its rCM line; the launcher's
    TorchrunError carries it, so the flow step's message names the missing cache, not just an exit code."""
    import pytest

    from rcm_steps.errors import headline
    from rcm_steps.launcher import TorchrunError, run_torchrun

    missing = tmp_path / "no-cache"
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(TorchrunError) as ei:
        run_torchrun("rcm_steps.distill", ["--teacher", "embedded", "--cache", str(missing),
                                           "--out", str(tmp_path / "out")])
    e = ei.value
    assert e.summary.startswith("distill worker (rank 0) failed: ShardError: ")
    assert str(missing) in e.summary and str(missing) in headline(e)
    assert "cache" in e.fix and "resume" in e.fix

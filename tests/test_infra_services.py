"""End to end against real services: PostgreSQL as MLflow's backend store, `mlflow server` (basic auth)
as a subprocess, moto's S3 server as the artifact store and the storage root.

One module-scoped scenario, read by every test here:
* two tiny teacher checkpoints in a folder, one already distilled (a student version carries its
  revision); the teacher_watch flow finds the other one only and prints its rcm.new_teacher event;
* three flow runs at once against the same server: the run the event triggers (metaflow.Runner with the
  event's payload as parameters, the tiny Wan teacher) and two embedded smoke runs (CLI), which register
  versions of the same model concurrently;
then the REST API, pyfunc, a scan of every output for the credentials, and the MLflow UI in Chromium.
"""
import base64
import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch.export  # noqa: F401  (before Metaflow: see tests/test_flow_distill.py)

from pipeline_fixtures import FLOW, flow_env
from real_fixtures import tiny_wan, write_checkpoint

from rcm_steps.services import LocalStack, ServiceCredentialError, check_tracking, postgres_binaries

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(postgres_binaries() is None, reason="no PostgreSQL binaries (Debian postgresql "
                                                                       "or pip install pgserver)")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WATCH_FLOW = os.path.join(ROOT, "flows", "teacher_watch_flow.py")
TINY = dict(frames=5, height=8, width=8, text_len=8)
MODEL = "rcm-student-embedded-smoke"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    st = LocalStack(workdir=str(tmp_path_factory.mktemp("stack")), workers=2)
    try:
        st.start()
    except Exception:
        st.stop()
        raise
    yield st
    st.stop()


def _client(stack):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=stack.mlflow.url)


@pytest.fixture(scope="module")
def scenario(stack, tmp_path_factory):
    from metaflow import Flow, Runner, namespace

    import torch

    from rcm_steps.watch import event_parameters, teacher_revision

    tmp = tmp_path_factory.mktemp("e2e")
    saved = dict(os.environ)
    env = {**flow_env(tmp), **stack.env()}
    os.environ.update(env)
    try:
        teachers = tmp / "teachers"
        older = tiny_wan()
        with torch.no_grad():
            next(older.parameters()).add_(0.5)                    # another version of the teacher
        write_checkpoint(teachers / "old-wan", "wan", transformer=older)
        write_checkpoint(teachers / "new-wan", "wan", transformer=tiny_wan())
        client = _client(stack)
        old_rev = teacher_revision(str(teachers / "old-wan"))
        client.create_registered_model("rcm-student-old-wan")     # "already distilled": a student has its revision
        client.create_model_version("rcm-student-old-wan", "s3://mlflow-artifacts/elsewhere/student",
                                    tags={"teacher_revision": old_rev})
        root = stack.storage_root("e2e")
        # the watcher, as a flow: prints the event instead of posting it to Argo Events
        with Runner(WATCH_FLOW, show_output=False, env=env, cwd=str(tmp)).run(
                sources=str(teachers), mlflow_tracking_uri=stack.mlflow.url, publish="print") as r:
            watch_run, watch_out = r.run, r.stdout + r.stderr
        assert watch_run is not None and watch_run.successful, watch_out[-3000:]
        event = watch_run.data.published[0]
        # two embedded smoke runs (CLI, concurrently) and the triggered run (Runner) against the same server
        procs = []
        for seed in (0, 1):
            rid = tmp / f"run-id-{seed}"
            log = open(tmp / f"cli-{seed}.log", "w")
            procs.append((rid, log, subprocess.Popen(
                [sys.executable, FLOW, "run", "--profile", "smoke", "--seed", str(seed),
                 "--mlflow_tracking_uri", stack.mlflow.url, "--storage_root", root, "--run-id-file", str(rid)],
                env={**os.environ, **env}, cwd=str(tmp), stdout=log, stderr=subprocess.STDOUT)))
            time.sleep(2)
        params = event_parameters({k: event[k] for k in ("teacher", "teacher_revision", "teacher_source")})
        t0 = time.perf_counter()
        with Runner(FLOW, show_output=False, env=env, cwd=str(tmp)).run(
                mlflow_tracking_uri=stack.mlflow.url, storage_root=root, profile="smoke", **params, **TINY) as r:
            trig = r.run
            trig_out = r.stdout + r.stderr + ("".join(t.stderr or "" for s in trig for t in s) if trig else "")
        for _, log, p in procs:
            p.wait(timeout=900)
            log.close()
        elapsed = time.perf_counter() - t0
        namespace(None)
        cli_logs = [open(tmp / f"cli-{s}.log").read() for s in (0, 1)]
        runs = []
        for (rid, _, p), log in zip(procs, cli_logs):
            assert p.returncode == 0, log[-4000:]
            runs.append(Flow("RCMDistillFlow")[open(rid).read().strip()])
        assert trig is not None and trig.successful, trig_out[-4000:]
        print(f"3 concurrent flow runs against the server: {elapsed:.0f}s")
        yield dict(tmp=tmp, teachers=teachers, old_rev=old_rev, watch_run=watch_run, event=event, trig=trig,
                   runs=runs, logs=cli_logs + [trig_out, watch_out], root=root, env=env)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _rest(stack, endpoint, **params):
    import requests

    r = requests.get(f"{stack.mlflow.url}/api/2.0/mlflow/{endpoint}", params=params,
                     auth=("admin", stack.admin_password), timeout=30)
    assert r.status_code == 200, (endpoint, r.status_code, r.text[:500])
    return r.json()


def test_watcher_finds_the_new_teacher_only(scenario, stack):
    from rcm_steps.watch import new_teachers, scan

    w = scenario["watch_run"].data
    assert [c["location"] for c in w.new] == [str(scenario["teachers"] / "new-wan")]
    assert [c["location"] for c in w.skipped] == [str(scenario["teachers"] / "old-wan")]
    assert w.skipped[0]["reason"].startswith("distilled: rcm-student-old-wan v1")
    ev = scenario["event"]
    assert ev["teacher"] == str(scenario["teachers"] / "new-wan") and ev["teacher_revision"].startswith("sha256:")
    # after the triggered run, nothing is new any more
    # the server's client, explicitly: a bare MlflowClient() follows a tracking URI that an earlier test set
    new, skipped = new_teachers(scan(str(scenario["teachers"])), _client(stack))
    assert new == [] and sorted(s["reason"].split(":")[0] for s in skipped) == ["distilled", "distilled"]


def test_triggered_run_registers_a_student_naming_its_teacher(scenario, stack):
    d, ev = scenario["trig"].data, scenario["event"]
    client = _client(stack)
    mv = client.get_model_version(d.model_name, d.model_version)
    assert mv.tags["teacher_location"] == ev["teacher"] and mv.tags["teacher_revision"] == ev["teacher_revision"]
    assert mv.tags["teacher_source"] == ev["teacher_source"] == str(scenario["teachers"])
    assert mv.tags["metaflow.run_id"] == scenario["trig"].id
    # the registry answers "which student came from which teacher"
    found = client.search_model_versions(f"tags.teacher_revision = '{ev['teacher_revision']}'")
    assert [(m.name, str(m.version)) for m in found] == [(d.model_name, str(d.model_version))]
    run = client.get_run(d.mlflow_run_id)
    assert run.data.tags["teacher_revision"] == ev["teacher_revision"] and run.info.status == "FINISHED"


def test_run_reads_back_over_the_rest_api(scenario, stack):
    import requests

    d = scenario["runs"][0].data
    run = _rest(stack, "runs/get", run_id=d.mlflow_run_id)["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["profile"] == "smoke" and params["teacher"] == "embedded" and params["storage_root"] == scenario["root"]
    assert any(k.startswith("settings.") for k in params) and "lr_student" in json.dumps(params)   # DistillConfig
    metrics = {m["key"] for m in run["data"]["metrics"]}
    for k in ("train/student_loss", "train/step_time_s", "eval/student_4/digit_acc", "eval/teacher/digit_acc",
              "eval/gates_passed"):
        assert k in metrics, (k, sorted(metrics))
    assert any(k.startswith("train/grad_norm") for k in metrics) and any("nan_masked" in k for k in metrics)
    hist = _rest(stack, "metrics/get-history", run_id=d.mlflow_run_id, metric_key="train/student_loss")["metrics"]
    assert len(hist) == 2 and len({m["step"] for m in hist}) == 2          # per-step curve
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["metaflow.run_id"] == scenario["runs"][0].id and tags["teacher_revision"].startswith("version:")
    arts = _rest(stack, "artifacts/list", run_id=d.mlflow_run_id, path="eval")
    names = {f["path"] for f in arts["files"]}
    assert {"eval/samples_grid.png", "eval/samples.gif"} <= names
    r = requests.get(f"{stack.mlflow.url}/get-artifact", params={"path": "eval/samples_grid.png",
                                                                  "run_uuid": d.mlflow_run_id},
                     auth=("admin", stack.admin_password), timeout=30)
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    import boto3                                                             # the bytes live in S3
    s3 = boto3.client("s3", endpoint_url=stack.s3.url, region_name="us-east-1", aws_access_key_id=stack.aws_key,
                      aws_secret_access_key=stack.aws_secret)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.artifact_bucket).get("Contents", [])]
    assert any(k.endswith(f"{d.mlflow_run_id}/artifacts/eval/samples.gif") for k in keys)
    mv = _rest(stack, "model-versions/get", name=d.model_name, version=d.model_version)["model_version"]
    mtags = {t["key"]: t["value"] for t in mv["tags"]}
    assert mtags["metaflow.run_id"] == scenario["runs"][0].id and mtags["data_hash"] == d.data_hash
    assert mtags["teacher"] == "embedded" and "teacher_revision" in mtags and "candidate" in json.dumps(
        _rest(stack, "registered-models/get", name=d.model_name))
    assert "distilled from teacher `embedded`" in mv["description"] and "teacher (baseline)" in mv["description"]


def test_concurrent_runs_register_own_versions_and_keep_aliases(scenario, stack):
    client = _client(stack)
    mine = {str(r.data.model_version): r.id for r in scenario["runs"]}
    assert len(mine) == 2                                                    # two distinct versions
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{MODEL}'")}
    assert set(mine) <= set(versions)
    for v, rid in mine.items():
        assert versions[v].tags["metaflow.run_id"] == rid
    for alias in ("candidate", "champion"):
        assert str(client.get_model_version_by_alias(MODEL, alias).version) in mine
    hist = client.get_registered_model(MODEL).tags["champion.history"].split(",")
    assert hist and set(hist) <= set(mine) and hist[-1] == str(client.get_model_version_by_alias(MODEL, "champion").version)
    assert {scenario["runs"][0].data.model_aliases[0], scenario["runs"][1].data.model_aliases[0]} == {"candidate"}


def test_champion_loads_through_pyfunc_from_the_server(scenario, stack):
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(stack.mlflow.url)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    clips = model.predict(pd.DataFrame({"prompt": ["a 3 drifting up"], "seed": [0]}))
    assert clips.shape == (1, 1, 4, 16, 16) and 0 <= clips.min() and clips.max() <= 1


def _texts(data: bytes):
    yield data
    if data[:2] == b"\x1f\x8b":
        try:
            yield gzip.decompress(data)
        except OSError:
            pass


def test_no_credential_in_any_output(scenario, stack):
    """Artifacts (S3: storage root and MLflow's), Metaflow's datastore (artifacts, logs, cards), the runs'
    output, MLflow params/tags: none holds a credential value (plain or base64)."""
    import boto3

    needles = []
    for v in stack.secrets().values():
        needles += [v.encode(), base64.b64encode(v.encode())]
    hits, n = [], 0

    def scan(name, data):
        nonlocal n
        n += 1
        for t in _texts(data):
            for s in needles:
                if s in t:
                    hits.append(name)

    s3 = boto3.client("s3", endpoint_url=stack.s3.url, region_name="us-east-1", aws_access_key_id=stack.aws_key,
                      aws_secret_access_key=stack.aws_secret)
    for b in (stack.storage_bucket, stack.artifact_bucket):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=b):
            for o in page.get("Contents", []):
                scan(f"s3://{b}/{o['Key']}", s3.get_object(Bucket=b, Key=o["Key"])["Body"].read())
    for p in glob.glob(str(scenario["tmp"] / "mf" / "**" / "*"), recursive=True):
        if os.path.isfile(p):
            scan(p, open(p, "rb").read())
    for i, log in enumerate(scenario["logs"]):
        scan(f"run output {i}", log.encode())
    for r in scenario["runs"] + [scenario["trig"]]:
        run = _rest(stack, "runs/get", run_id=r.data.mlflow_run_id)["run"]
        scan(f"mlflow run {r.id}", json.dumps(run).encode())
    assert n > 50 and not hits, hits[:10]


def test_wrong_credential_names_the_service(scenario, stack, monkeypatch):
    from metaflow import Runner

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(ServiceCredentialError) as e:
        check_tracking(stack.mlflow.url)
    assert f"MLflow tracking server {stack.mlflow.url}" in str(e.value) and "401" in str(e.value)
    env = {**scenario["env"], "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    t0 = time.perf_counter()
    with Runner(FLOW, show_output=False, env=env, cwd=str(scenario["tmp"])).run(
            mlflow_tracking_uri=stack.mlflow.url, storage_root=scenario["root"], profile="smoke") as r:
        run, err = r.run, r.stderr + "".join(t.stderr or "" for s in (r.run or []) for t in s)
    assert run is not None and not run.successful and {s.id for s in run} == {"start"}
    assert f"rejected the credentials (HTTP 401" in err and stack.mlflow.url in err
    assert "not-the-password" not in err
    print(f"wrong credential: failed in {time.perf_counter() - t0:.0f}s")


def _chromium():
    for p in (os.environ.get("RCM_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
              shutil.which("google-chrome")):
        if p and os.path.exists(p):
            return p
    return None


@pytest.mark.skipif(_chromium() is None, reason=(
    "MLflow UI browser check skipped: it needs a Chromium binary and none was found ($RCM_CHROMIUM, chromium, "
    "chromium-browser, google-chrome on PATH); Playwright's own browser download cannot run offline, so install "
    "Debian's: apt-get install chromium"))
def test_mlflow_ui_shows_metrics_and_champion(scenario, stack, tmp_path):
    """What a data scientist sees: the run page lists the metrics; the model page shows `champion`."""
    pw = pytest.importorskip("playwright.sync_api", reason="MLflow UI browser check skipped: the playwright package "
                             "(test extra) is not installed")
    d = scenario["runs"][0].data
    exp = _rest(stack, "runs/get", run_id=d.mlflow_run_id)["run"]["info"]["experiment_id"]
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_context(http_credentials={"username": "admin", "password": stack.admin_password},
                                       viewport={"width": 1400, "height": 1000}).new_page()
            page.goto(f"{stack.mlflow.url}/#/experiments/{exp}/runs/{d.mlflow_run_id}", timeout=90_000)
            page.get_by_text("train/student_loss").first.wait_for(timeout=90_000)
            page.screenshot(path=str(tmp_path / "run.png"), full_page=True)
            body = page.inner_text("body")
            assert "eval/student_4/digit_acc" in body or "eval/teacher/digit_acc" in body
            page.goto(f"{stack.mlflow.url}/#/models/{MODEL}", timeout=90_000)
            page.get_by_text("champion").first.wait_for(timeout=90_000)
            page.screenshot(path=str(tmp_path / "model.png"), full_page=True)
            assert "candidate" in page.inner_text("body")
        finally:
            browser.close()

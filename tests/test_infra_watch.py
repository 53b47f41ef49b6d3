"""Teacher revisions, the watcher's scan against the registry, the new-teacher event, and bad input at start:
an unreachable tracking server or S3 endpoint fails `start` within seconds naming the URL; an event
payload without a teacher location is rejected before anything runs."""
import json
import os
import subprocess
import sys
import time

import pytest

from pipeline_fixtures import FLOW, flow_env

from rcm_steps.errors import ConfigError
from rcm_steps.services import ServiceUnreachable, check_storage, check_tracking, free_port
from rcm_steps.watch import (EVENT_NAME, EventError, TeacherCandidate, check_event_env, event_parameters,
                             event_payload, new_teachers, publish, scan, teacher_revision)


def _ckpt(root, weights=b"\0" * 64):
    for sub in ("transformer", "vae", "text_encoder", "tokenizer"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "config.json").write_text("{}")
    (root / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return root


def test_revision_is_a_content_hash(tmp_path):
    a = _ckpt(tmp_path / "a")
    b = _ckpt(tmp_path / "b")
    assert teacher_revision(str(a)) == teacher_revision(str(b)) and teacher_revision(str(a)).startswith("sha256:")
    (b / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\1" * 64)
    assert teacher_revision(str(a)) != teacher_revision(str(b))
    snap = _ckpt(tmp_path / "hub" / "models--org--wan" / "snapshots" / "abc123")
    assert teacher_revision(str(snap)) == "hf:abc123"
    assert teacher_revision("models:/teachers/3") == "mlflow:teachers/3"


def test_scan_finds_checkpoints_and_skips_distilled(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    root = tmp_path / "teachers"
    _ckpt(root / "wan-v1")
    _ckpt(root / "wan-v2", weights=b"\2" * 64)
    _ckpt(root / "copy-of-v1")                       # same content as wan-v1: one revision
    cands = scan(str(root), client)
    assert sorted(c.name for c in cands) == ["copy-of-v1", "wan-v1", "wan-v2"]
    v1 = teacher_revision(str(root / "wan-v1"))
    client.create_registered_model("rcm-student-wan")
    client.create_model_version("rcm-student-wan", str(tmp_path), tags={"teacher_revision": v1})
    new, skipped = new_teachers(cands, client)
    assert [c.name for c in new] == ["wan-v2"]
    assert sorted(s["reason"].split(":")[0] for s in skipped) == ["distilled", "duplicate of another candidate"]
    # a run in progress for a revision also counts (no second run while one is training)
    exp = client.create_experiment("rcm-distill-wan")
    client.create_run(exp, tags={"teacher_revision": new[0].revision})
    assert new_teachers(cands, client)[0] == []
    # MLflow registered teacher models as a source
    client.create_registered_model("wan-teachers", tags={"rcm.role": "teacher"})
    client.create_model_version("wan-teachers", str(tmp_path))
    got = scan("mlflow:", client)
    assert [(c.location, c.revision) for c in got] == [("models:/wan-teachers/1", "mlflow:wan-teachers/1")]


def test_event_payload_round_trip_and_rejection(capsys):
    c = TeacherCandidate(location="/models/wan", revision="sha256:ab", source="/models", name="wan")
    payload = event_payload(c)
    assert event_parameters(payload) == {"teacher": "/models/wan", "teacher_revision": "sha256:ab",
                                         "teacher_source": "/models"}
    for bad in ({}, {"teacher": ""}, {"teacher_revision": "sha256:ab"}, ["x"]):
        with pytest.raises(EventError, match="teacher location|JSON object"):
            event_parameters(bad)
    with pytest.raises(EventError):
        publish({"teacher_revision": "x"}, "print")              # never published
    publish(payload, "print")
    assert json.loads(capsys.readouterr().out)["name"] == EVENT_NAME
    env = {"METAFLOW_ARGO_EVENT_PAYLOAD_event_x": json.dumps({"name": EVENT_NAME, "payload": payload})}
    assert check_event_env(env)["teacher"] == "/models/wan"
    assert check_event_env({"METAFLOW_ARGO_EVENT_PAYLOAD_event_x": "null"}) is None
    assert check_event_env({"METAFLOW_ARGO_EVENT_PAYLOAD_event_x": json.dumps({"name": "other"})}) is None
    with pytest.raises(EventError):
        check_event_env({"METAFLOW_ARGO_EVENT_PAYLOAD_event_x": json.dumps({"name": EVENT_NAME, "payload": {}})})
    assert issubclass(EventError, ValueError) and not issubclass(EventError, ConfigError)


def test_service_checks_fail_fast_naming_the_url(monkeypatch):
    port = free_port()
    t0 = time.perf_counter()
    with pytest.raises(ServiceUnreachable, match=f"MLflow tracking server http://127.0.0.1:{port} is not reachable"):
        check_tracking(f"http://127.0.0.1:{port}")
    monkeypatch.setenv("RCM_STORAGE_OPTIONS", json.dumps({"endpoint_url": f"http://127.0.0.1:{port}"}))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with pytest.raises(ServiceUnreachable, match=f"S3 endpoint http://127.0.0.1:{port} is not reachable"):
        check_storage("s3://bucket/rcm")
    assert time.perf_counter() - t0 < 20
    assert check_tracking("sqlite:///x.db")["auth"] == "local store" and check_storage("/tmp/x")["service"] == "file"


def test_bad_input_stops_start(tmp_path):
    """Three flow runs at once: unreachable MLflow, unreachable S3, an event without a teacher. Each fails in
    `start`, within seconds of it starting, and names the culprit; nothing after start runs."""
    port = free_port()
    cases = {
        "tracking": ([f"--mlflow_tracking_uri", f"http://127.0.0.1:{port}"], {},
                     f"MLflow tracking server http://127.0.0.1:{port} is not reachable"),
        "s3": (["--storage_root", "s3://rcm-bucket/root"],
               {"RCM_STORAGE_OPTIONS": json.dumps({"endpoint_url": f"http://127.0.0.1:{port}"}),
                "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
               f"S3 endpoint http://127.0.0.1:{port} is not reachable for storage root 's3://rcm-bucket/root'"),
        "event": ([], {"METAFLOW_ARGO_EVENT_PAYLOAD_event_rcmnew_teacher": json.dumps(
            {"name": EVENT_NAME, "payload": {"teacher_revision": "sha256:ab"}})},
                  "new-teacher event without a teacher location"),
    }
    procs = {}
    for name, (args, extra, _) in cases.items():
        d = tmp_path / name
        d.mkdir()
        env = {**os.environ, **flow_env(d), **extra}
        if name != "tracking":
            args = args + ["--mlflow_tracking_uri", env["MLFLOW_TRACKING_URI"]]
        if name != "s3":
            args = args + ["--storage_root", str(d / "store")]
        procs[name] = (time.perf_counter(), subprocess.Popen(
            [sys.executable, FLOW, "run", "--profile", "smoke", *args], env=env, cwd=str(d),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for name, (t0, p) in procs.items():
        out = p.communicate(timeout=300)[0]
        assert p.returncode != 0, out[-3000:]
        assert cases[name][2] in out, (name, out[-3000:])
        assert "rCM: start failed" in out and "/curate/" not in out
        # no MLflow run was created (the checks come before it)
        db = tmp_path / name / "mlflow.db"
        if db.exists():
            import sqlite3

            with sqlite3.connect(str(db)) as c:
                tables = {r[0] for r in c.execute("select name from sqlite_master where type='table'")}
                assert "runs" not in tables or c.execute("select count(*) from runs").fetchone()[0] == 0
        print(f"{name}: failed after {time.perf_counter() - t0:.0f}s (Metaflow start-up included)")

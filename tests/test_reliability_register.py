"""Champion policy per teacher kind, compared only between versions evaluated alike; promotion,
no promotion and rollback - against a real sqlite MLflow store and an MLflow tracking server."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from pipeline_fixtures import *  # noqa: F401,F403
from rcm_steps.register import ChampionError, main, register_student, rollback_champion, set_champion

SETTINGS = {"prompts_sha256": "ab12", "n_prompts": 4, "seeds": 3, "seed": 0, "teacher_steps": 12,
            "metrics": "teacher-relative", "teacher": {"name": "tiny-wan", "version": "v1", "latent_shape": [4, 3, 4, 4]}}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 (sqlite backend, proxied artifacts), started and stopped here."""
    d = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{d / 'server.db'}",
                             "--artifacts-destination", str(d / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(d / 'server.log').read_text()[-2000:]}")
        else:
            raise RuntimeError(f"mlflow server did not come up: {(d / 'server.log').read_text()[-2000:]}")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(params=["sqlite", "server"])
def tracking(request, tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'm.db'}" if request.param == "sqlite" else request.getfixturevalue("mlflow_server")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.create_experiment(f"e-{tmp_path.name}",
                                   artifact_location=f"file://{tmp_path / 'art'}" if request.param == "sqlite" else None)
    return client, exp


def _reg(client, exp, name, teacher, metrics, passed=True, settings=SETTINGS, steps=2, gates=None):
    run_id = client.create_run(exp).info.run_id
    meta = {"teacher": teacher, "teacher_version": "v1", "latent_shape": [1, 2, 4, 4], "default_steps": steps,
            "sigma_max": 80.0, "mid_t": [1.3, 1.0, 0.6], "method": "rcm"}
    return register_student(b"weights", meta, run_id, {"metaflow.run_id": run_id}, metrics, passed, model_name=name,
                            eval_settings=settings, gates=gates)


def _rel(fd, rmse, div=0.9, steps=2, **extra):
    return {f"student_{steps}/fd_teacher": fd, f"student_{steps}/latent_rmse_teacher": rmse,
            f"student_{steps}/diversity_rel": div, **extra}


def _champion(client, name):
    return str(client.get_model_version_by_alias(name, "champion").version)


def test_real_teacher_promotion_no_promotion_and_rollback(tracking):
    client, exp = tracking
    name, teacher = "rcm-student-tiny-wan", "tests.fake_teacher:make"   # judged relative to the teacher
    r1 = _reg(client, exp, name, teacher, _rel(2.0, 0.5))
    assert r1.champion and r1.reason == "first version that passes the gates"
    r2 = _reg(client, exp, name, teacher, _rel(1.5, 0.6))               # lower FD at 2 steps: wins
    assert r2.champion and r2.reason.startswith("beats champion v1 under teacher-relative: lower "
                                                "student_2/fd_teacher, then lower student_2/latent_rmse_teacher")
    # worse at the registered 2 steps, better at 4: the registered steps decide
    r3 = _reg(client, exp, name, teacher, {**_rel(3.0, 0.1), **_rel(0.1, 0.01, steps=4)})
    assert not r3.champion and r3.reason.startswith("does not beat champion v2") and _champion(client, name) == "2"
    r4 = _reg(client, exp, name, teacher, _rel(1.0, 0.1, div=0.01))     # better, but collapsed diversity
    assert not r4.champion
    assert r4.reason == ("gate failed under policy teacher-relative: student_2/diversity_rel 0.01 < "
                         "min_diversity_rel 0.05")
    r5 = _reg(client, exp, name, teacher, _rel(1.5, 0.4))               # FD ties v2, lower RMSE breaks the tie
    assert r5.champion and "beats champion v2" in r5.reason
    r6 = _reg(client, exp, name, teacher, _rel(0.5, 0.1), settings={**SETTINGS, "seeds": 5})
    assert not r6.champion
    assert r6.reason.startswith("not comparable with champion v5: evaluated with other settings (field 'seeds': "
                                "champion 3, this version 5)")
    r7 = _reg(client, exp, name, teacher, {"student_2/latent_rmse_teacher": 0.01, "student_2/diversity_rel": 1.0})
    assert not r7.champion and r7.reason == ("not eligible under policy teacher-relative: student_2/fd_teacher "
                                             "missing or NaN")
    r8 = _reg(client, exp, name, teacher, _rel(0.1, 0.01), passed=False)
    assert not r8.champion and r8.reason == "evaluation gates failed"
    assert _champion(client, name) == "5"
    mv = client.get_model_version(name, "6")
    assert mv.tags["eval_settings"] != client.get_model_version(name, "5").tags["eval_settings"]
    assert mv.tags["champion_decision"] == r6.reason and mv.tags["student_steps"] == "2"
    assert client.get_registered_model(name).tags["champion.history"] == "1,2,5"

    # rollback: one step back at a time, along the promotion history
    assert rollback_champion(name, reason="v5 looks off") == "2" and _champion(client, name) == "2"
    assert client.get_model_version(name, "2").tags["champion_decision"] == "rollback from v5: v5 looks off"
    assert rollback_champion(name) == "1" and _champion(client, name) == "1"
    with pytest.raises(ChampionError, match="no earlier champion to roll back to"):
        rollback_champion(name)
    # explicit promotion: a comparable-but-unpromoted or incomparable version; gate failures need force
    assert set_champion(name, 6, reason="new eval protocol") == "1" and _champion(client, name) == "6"
    with pytest.raises(ChampionError, match="v8 failed its evaluation gates"):
        set_champion(name, 8)
    with pytest.raises(ChampionError, match="has no version 99"):
        set_champion(name, 99)
    assert main(["rollback", "--model", name, "--to", "5"]) == 0 and _champion(client, name) == "5"
    # a new version is compared with the current champion (v5) again
    r9 = _reg(client, exp, name, teacher, _rel(1.5, 0.45))
    assert not r9.champion and "does not beat champion v5" in r9.reason


def test_embedded_policy_digit_accuracy_then_fd(tracking):
    client, exp = tracking
    name = "rcm-student-embedded"
    emb = lambda acc, fd: {"student_4/digit_acc": acc, "student_4/fd_data": fd}  # noqa: E731
    settings = {**SETTINGS, "metrics": "digits"}
    assert _reg(client, exp, name, "embedded", emb(0.5, 2.0), settings=settings, steps=4).champion
    r = _reg(client, exp, name, "embedded", emb(0.5, 1.0), settings=settings, steps=4)   # same accuracy, lower FD
    assert r.champion and "higher student_4/digit_acc, then lower student_4/fd_data" in r.reason
    r = _reg(client, exp, name, "embedded", emb(0.4, 0.1), settings=settings, steps=4)   # accuracy first
    assert not r.champion and _champion(client, name) == "2"
    # fd_teacher does not count for the embedded teacher
    r = _reg(client, exp, name, "embedded", {**emb(0.5, 1.0), "student_4/fd_teacher": 0.0}, settings=settings,
             steps=4)
    assert not r.champion and "does not beat champion v2" in r.reason

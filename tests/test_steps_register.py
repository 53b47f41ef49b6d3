import pytest

from pipeline_fixtures import *  # noqa: F401,F403
from rcm_steps.register import register_student

META = {"teacher": "embedded", "teacher_version": "x", "latent_shape": [1, 4, 16, 16], "default_steps": 4,
        "sigma_max": 80.0, "mid_t": [1.3, 1.0, 0.6], "method": "rcm"}


def test_aliases_champion_logic_and_rollback(tmp_path, monkeypatch):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    client = mlflow.MlflowClient()
    exp = client.create_experiment("e", artifact_location=f"file://{tmp_path / 'art'}")

    def reg(acc, passed, **kw):
        run_id = client.create_run(exp).info.run_id
        return register_student(b"weights", META, run_id, {"metaflow.run_id": run_id, "data_hash": "h"},
                                {"student_4/digit_acc": acc, "student_4/fd_data": 1.0}, passed,
                                model_name="m", **kw)

    r1 = reg(0.5, True)
    assert r1.aliases == ["candidate", "champion"]
    r2 = reg(0.4, True)                      # worse: candidate only
    assert r2.aliases == ["candidate"] and "does not beat" in r2.reason
    r3 = reg(0.9, False)                     # better but gates fail
    assert r3.aliases == ["candidate"] and r3.reason == "evaluation gates failed"
    r4 = reg(0.7, True)
    assert r4.champion
    with pytest.raises(RuntimeError, match="injected"):
        reg(0.99, True, fail_after_version=True)
    versions = sorted(int(v.version) for v in client.search_model_versions("name='m'"))
    assert versions == [1, 2, 3, 4]          # the failed one was removed again
    assert str(client.get_model_version_by_alias("m", "champion").version) == r4.version
    assert str(client.get_model_version_by_alias("m", "candidate").version) == r4.version
    tags = client.get_model_version("m", r1.version).tags
    assert tags["metaflow.run_id"] and tags["metric.student_4/digit_acc"] == "0.5" and tags["data_hash"] == "h"

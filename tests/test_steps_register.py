import json

import numpy as np
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


def test_embedded_version_card_signature_and_no_diffusers_export(tmp_path, capsys):
    """A version without a diffusers export (embedded teacher): its description is a card with the load code, the
    sample grid (an artifact) and its components; its signature says prompt/steps/seed -> (N, 1, 4, 16, 16);
    asking it for a diffusers pipeline or export says what to do instead of "re-register"."""
    import mlflow

    from rcm_steps.register import MissingComponentError, load_diffusers_pipeline, main, register_card

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    client = mlflow.MlflowClient()
    exp = client.create_experiment("e", artifact_location=f"file://{tmp_path / 'art'}")
    png = b"\x89PNG\r\n\x1a\n" + b"grid"
    lineage = {"metaflow.pathspec": "RCMDistillFlow/7/register/21", "teacher_revision": "abc123"}
    r = register_student(b"weights", META, client.create_run(exp).info.run_id, lineage,
                         {"student_4/digit_acc": 0.75, "student_4/fd_data": 2.0, "teacher/digit_acc": 0.9}, True,
                         model_name="emb",
                         sample_grid=png)
    uri = f"models:/emb/{r.version}"
    card = client.get_model_version("emb", r.version).description
    assert card == r.card
    for s in ("# emb v1", "distilled from teacher `embedded` (revision `abc123`", "RCMDistillFlow/7/register/21",
              "Aliases: candidate, champion", "| digit_acc | 0.75 | 0.9 |", "artifact `samples_grid.png`",
              f"model = mlflow.pyfunc.load_model({uri!r})", "# (N, 1, 4, 16, 16) float32 in [0, 1]",
              f"python -m rcm_steps.generate --model {uri}", "Components: in code"):
        assert s in card, s
    root = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl"))
    assert open(f"{root}/artifacts/samples_grid.png", "rb").read() == png

    info = mlflow.models.get_model_info(uri)
    inputs = {c["name"]: (c["type"], c.get("required", True)) for c in info.signature.inputs.to_dict()}
    assert inputs == {"prompt": ("string", True), "steps": ("long", False), "seed": ("long", False)}
    (out,) = info.signature.outputs.inputs
    assert out.type == np.dtype("float32") and tuple(out.shape) == (-1, 1, 4, 16, 16)
    assert {p.name: p.default for p in info.signature.params.params} == {"steps": 4, "seed": 0}
    example = json.load(open(f"{root}/input_example.json"))
    assert example["columns"] == ["prompt", "steps", "seed"] and example["data"] == [["a 3 drifting up", 4, 0]]

    with pytest.raises(MissingComponentError) as e:
        load_diffusers_pipeline(uri, dst=str(tmp_path / "dl2"))
    msg = str(e.value)
    assert "teacher 'embedded' is not a diffusers pipeline" in msg and "re-register" not in msg
    assert f"fix: load it with mlflow.pyfunc.load_model({uri!r})" in msg
    assert main(["export", "--model", uri, "--out", str(tmp_path / "x")]) == 2
    assert "is not a diffusers pipeline" in capsys.readouterr().err and not (tmp_path / "x").exists()

    # the register step's Metaflow card: version, aliases, the model URI, load code
    md = register_card(r, "sqlite:///m.db")
    for s in ("# Registered: emb v1", "aliases: candidate, champion - first version that passes the gates",
              "`models:/emb@champion`", f"`{uri}`", "mlflow.set_tracking_uri('sqlite:///m.db')",
              f"model = mlflow.pyfunc.load_model({uri!r})", "Components: in code"):
        assert s in md, s


def test_mlflow_asks_for_no_predict_type_hint(tmp_path):
    """MLflow warns "Add type hints to the `predict` method" when a PythonModel subclass is defined without them
    (at import: every registration and every load printed it)."""
    import os
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-W", "always::UserWarning", "-c", "import rcm_steps.serving"], cwd=tmp_path,
                       env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "type hint" not in p.stderr.lower(), p.stderr[-2000:]

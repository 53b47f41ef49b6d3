"""Register the EMA student as an MLflow pyfunc model that generates from prompts.

    model = mlflow.pyfunc.load_model("models:/rcm-student-embedded@champion")
    clips = model.predict(pd.DataFrame({"prompt": ["a 3 drifting up"], "seed": [0]}))
    # -> float32 array (N, C, T, H, W) in [0, 1]; optional columns "seed", "steps"

* One registered model per teacher (``rcm-student-<teacher>``); each flow run adds a
  version, created with its lineage tags in the same call (flow/run id, teacher
  name and version, data manifest hash, method, metrics).
* Alias ``candidate`` always; ``champion`` only if the evaluation gates pass and the
  version beats the current champion on ``score`` (student 4-step digit accuracy,
  then lower ``fd_data``).
* Nothing half-registered: if anything fails after the version exists (tags,
  aliases), the version is deleted again and the error re-raised.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import mlflow.pyfunc

__all__ = ["RCMStudentModel", "model_name_for", "register_student", "RegistrationResult", "score_of"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def model_name_for(teacher: str) -> str:
    return "rcm-student-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", teacher).strip("-")


class RCMStudentModel(mlflow.pyfunc.PythonModel):
    """Few-step generator: prompt(s) -> clips, with the distilled EMA student."""

    def load_context(self, context):
        import torch
        from safetensors.torch import load_file

        from rcm_steps import teacher as T
        from rcm_steps.evaluate import student_denoiser

        with open(context.artifacts["meta"]) as f:
            self.meta = json.load(f)
        self.teacher = T.load_teacher(self.meta["teacher"], device="cpu", options=self.meta.get("teacher_options"))
        got = str(getattr(self.teacher, "version", "unknown"))
        if got != self.meta["teacher_version"]:
            import warnings

            warnings.warn(f"student was distilled from teacher {self.meta['teacher']} version "
                          f"{self.meta['teacher_version']}, loaded version {got}")
        self.student = student_denoiser(self.teacher, load_file(context.artifacts["weights"]))
        self.uncond = T.negative_embedding(self.teacher)
        self._torch = torch

    def _rows(self, model_input) -> List[Dict[str, Any]]:
        import pandas as pd

        if isinstance(model_input, str):
            model_input = [model_input]
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if isinstance(model_input, list):
            model_input = pd.DataFrame({"prompt": model_input})
        if "prompt" not in model_input.columns:
            raise ValueError(f"input needs a 'prompt' column, got {list(model_input.columns)}")
        return model_input.to_dict("records")

    def predict(self, context, model_input, params: Optional[Dict[str, Any]] = None):
        import numpy as np
        from rcm_core.sampling import sample_student

        from rcm_steps import teacher as T

        torch = self._torch
        params = params or {}
        outs = []
        for r in self._rows(model_input):
            steps = int(r.get("steps") or params.get("steps") or self.meta["default_steps"])
            seed = int(r.get("seed") if r.get("seed") is not None else params.get("seed", 0))
            cond = T.encode(self.teacher, [str(r["prompt"])])
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn((1, *self.meta["latent_shape"]), generator=g, dtype=torch.float64)
            lat = sample_student(self.student, cond, noise, steps=steps, sigma_max=self.meta["sigma_max"],
                                 mid_t=tuple(self.meta["mid_t"]), generator=g)
            outs.append(T.decode(self.teacher, lat.float()).numpy())
        return np.concatenate(outs).astype(np.float32)


@dataclass
class RegistrationResult:
    name: str
    version: str
    aliases: List[str]
    champion: bool
    reason: str
    model_uri: str


def score_of(metrics: Dict[str, Any]) -> tuple:
    acc = float(metrics.get("student_4/digit_acc", float("nan")))
    fd = float(metrics.get("student_4/fd_data", float("nan")))
    return (-1.0 if math.isnan(acc) else acc, -(1e18 if math.isnan(fd) else fd))


def _champion_metrics(client, name: str) -> Optional[Dict[str, float]]:
    try:
        mv = client.get_model_version_by_alias(name, "champion")
    except Exception:  # noqa: BLE001 - no model / no alias yet
        return None
    out = {}
    for k, v in (mv.tags or {}).items():
        if k.startswith("metric."):
            try:
                out[k[len("metric."):]] = float(v)
            except ValueError:
                pass
    return out


def register_student(ema_weights_bytes: bytes, meta: Dict[str, Any], run_id: str, lineage: Dict[str, str],
                     metrics: Dict[str, float], gates_passed: bool, model_name: Optional[str] = None,
                     fail_after_version: bool = False) -> RegistrationResult:
    """Log the pyfunc model into ``run_id`` and register it (see module doc).

    ``fail_after_version`` injects a failure after the version exists (tests of rollback).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name = model_name or model_name_for(meta["teacher"])
    with tempfile.TemporaryDirectory() as d:
        wpath, mpath = os.path.join(d, "student_ema.safetensors"), os.path.join(d, "meta.json")
        with open(wpath, "wb") as f:
            f.write(ema_weights_bytes)
        with open(mpath, "w") as f:
            json.dump(meta, f, indent=1)
        import rcm_core

        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            info = mlflow.pyfunc.log_model(
                name="student", python_model=RCMStudentModel(),
                artifacts={"weights": wpath, "meta": mpath},
                code_paths=[_HERE, os.path.dirname(os.path.abspath(rcm_core.__file__))],
                pip_requirements=["torch", "numpy", "pandas", "safetensors", "mlflow"])
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001
        client.create_registered_model(name, description=f"rCM students distilled from teacher {meta['teacher']}")
    tags = {**{k: str(v) for k, v in lineage.items()},
            **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items() if isinstance(v, (int, float))},
            "gates_passed": str(bool(gates_passed))}
    mv = client.create_model_version(name, info.model_uri, run_id=run_id, tags=tags)
    try:
        if fail_after_version:
            raise RuntimeError("injected failure after the model version was created")
        client.set_registered_model_alias(name, "candidate", mv.version)
        aliases = ["candidate"]
        current = _champion_metrics(client, name)
        if not gates_passed:
            champion, reason = False, "evaluation gates failed"
        elif current is None:
            champion, reason = True, "first version that passes the gates"
        elif score_of(metrics) > score_of(current):
            champion, reason = True, f"beats champion: {score_of(metrics)} > {score_of(current)}"
        else:
            champion, reason = False, f"does not beat champion: {score_of(metrics)} <= {score_of(current)}"
        if champion:
            client.set_registered_model_alias(name, "champion", mv.version)
            aliases.append("champion")
        client.set_model_version_tag(name, mv.version, "champion_decision", reason)
    except BaseException:
        try:
            client.delete_model_version(name, mv.version)
        finally:
            raise
    return RegistrationResult(name=name, version=str(mv.version), aliases=aliases, champion=champion,
                              reason=reason, model_uri=f"models:/{name}/{mv.version}")

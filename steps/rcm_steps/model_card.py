"""The model card of a registered version: its lineage lines, the distilled guidance, the evaluate step's
sample grid, and the description text (:func:`student_card`, :func:`rcm_core.export.model_card` with the
registry's load code).

Part of :mod:`rcm_steps.register` (which re-exports :func:`student_card`); see its module doc.
"""
from __future__ import annotations

import tempfile
from typing import Any, Dict, Optional


def _guidance(meta: Dict[str, Any], run_id: Optional[str], spec) -> Optional[float]:
    """The CFG weight distilled into the student: meta's, the distill run's ``guidance`` param, else the teacher's."""
    if meta.get("guidance") is not None:
        return float(meta["guidance"])
    if run_id:
        try:
            from mlflow.tracking import MlflowClient

            v = MlflowClient().get_run(run_id).data.params.get("guidance")
            if v not in (None, "", "None"):
                return float(v)
        except Exception:  # noqa: BLE001 - no run params: fall back to the teacher's
            pass
    return float(spec.guidance) if spec is not None else None


def _run_grid(run_id: Optional[str]) -> Optional[bytes]:
    """The evaluate step's sample grid (run artifact ``eval/samples_grid.png``), if the run has one."""
    if not run_id:
        return None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        if not any(a.path == "eval/samples_grid.png" for a in client.list_artifacts(run_id, "eval")):
            return None
        with tempfile.TemporaryDirectory() as d:
            with open(client.download_artifacts(run_id, "eval/samples_grid.png", d), "rb") as f:
                return f.read()
    except Exception:  # noqa: BLE001 - the card goes without a grid
        return None

def _card_lineage(meta: Dict[str, Any], lineage: Dict[str, str], bundle: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Lineage lines of the model card: the teacher's version and path first, then the run's lineage tags
    (the most telling first; the card drops lines from the end when it must fit 5000 characters)."""
    first = ("teacher_revision", "teacher_location", "metaflow.flow", "metaflow.run_id", "mlflow_run_id", "method",
             "data_hash", "prompts_hash", "profile")
    out = {"teacher version": meta.get("teacher_version"), "registered from": (bundle or {}).get("registered_from")}
    out.update({k: lineage[k] for k in first if lineage.get(k)})
    out.update({k: v for k, v in lineage.items() if k not in out and k not in ("teacher", "teacher_version") and v})
    return out


def student_card(name: str, version: str, info: Dict[str, Any], card: Dict[str, Any], max_chars: int = 5000) -> str:
    """The model version's description: :func:`rcm_core.export.model_card` with the registry's load code."""
    from rcm_core.export import model_card

    steps = info["scheduler"]["num_inference_steps"]
    out_attr = "frames" if info["pipeline_class"] == "WanPipeline" else "images"
    load = ["diffusers (the version's text encoder, tokenizer and VAE fetched and hash-checked):", "```python",
            "from rcm_steps.register import load_diffusers_pipeline",
            f"pipe = load_diffusers_pipeline(\"models:/{name}/{version}\")   # RCMScheduler; GPU bf16 when there is one",
            f"out = pipe(\"...\", num_inference_steps={steps}, guidance_scale=1.0).{out_attr}[0]", "```"]
    extra = ("Artifacts: `diffusers/` (this pipeline without text encoder/tokenizer/VAE, README.md, single file), "
             "`meta.json`" + (", `teacher/` (text encoder, tokenizer, VAE)"
                              if info.get("components", {}).get("registry", {}).get("mode") == "copy" else ""))
    return model_card(info, lineage=card.get("lineage"), metrics=card.get("metrics"),
                      grid="artifact:diffusers/samples_grid.png" if card.get("grid") else None,
                      model_uri=f"models:/{name}/{version}", export_path="<artifacts>/diffusers", version=version,
                      extra=extra, max_chars=max_chars, diffusers_load=load)

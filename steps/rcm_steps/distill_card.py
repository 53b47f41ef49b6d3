"""The distill step's card: what was trained, the loss curves (student and critic apart), the samples over
training, and what each training metric means.

:func:`build` (the flow's distill step, node 0) reads distill's ``diagnostics.json`` and ``previews.safetensors``,
puts the two images into the MLflow run (``train/losses.png``, ``train/samples_over_training.png``) and returns
the card as plain parts, ``(kind, data, label)`` with kind ``"markdown"`` (label None) or ``"image"`` (PNG
bytes), that the flow turns into Metaflow card components (:func:`card_parts` does the same without I/O).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

from . import diagnostics, glossary

__all__ = ["build", "card_parts", "summary_markdown", "log_to_mlflow"]


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def summary_markdown(result: Mapping[str, Any]) -> str:
    """The run in one table: steps, where it resumed, ranks, time, speed, the last losses."""
    last = result.get("final_metrics") or {}
    rows = [("steps", result.get("steps")), ("started at step", result.get("start_step")),
            ("resumed from checkpoint", result.get("resumed_from")), ("ranks (world size)", result.get("world_size")),
            ("backend", result.get("backend")), ("seconds", result.get("seconds")),
            ("samples / s", result.get("samples_per_s")), ("non-finite samples masked", result.get("nan_count_total")),
            ("student layout", result.get("student_layout")), ("method", (result.get("config") or {}).get("method"))]
    rows += [(f"last {k}", last[k]) for k in ("student_loss", "critic_loss") if k in last]
    body = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None)
    return f"# Distillation\n\n| | |\n|---|---|\n{body}"


def card_parts(result: Mapping[str, Any], diag: Mapping[str, Any],
               previews: Optional[Mapping[str, Any]]) -> Tuple[List[tuple], Dict[str, bytes]]:
    """The card's parts and the images by MLflow artifact name. ``result``: distill's result.json; ``diag``:
    its diagnostics.json (losses); ``previews``: :func:`rcm_steps.previews.load_previews` (None: none)."""
    from .previews import grid_png

    parts: List[tuple] = [("markdown", summary_markdown(result), None)]
    images: Dict[str, bytes] = {}
    if any((diag.get("losses") or {}).get(k) for k in diagnostics.LOSSES):
        images["losses.png"] = diagnostics.loss_plot_png(diag)
        parts.append(("image", images["losses.png"], "student loss (top) and critic loss (bottom) per step, "
                                                     "log scale; dashed: phases"))
    else:
        parts.append(("markdown", "Loss curves: no losses recorded (diagnostics.json has none).", None))
    grid = grid_png(previews) if previews else None
    if grid is not None:
        images["samples_over_training.png"] = grid
        parts.append(("image", grid, f"samples over training: the EMA student at {previews['student_steps']} "
                                     f"steps, same prompts and noise; columns: training steps"))
    else:
        parts.append(("markdown", "Samples over training: none recorded (previews turned off for the distill "
                                  "worker (bench/node_run.py does), or they failed: see the distill log).", None))
    parts.append(("markdown", glossary.markdown(glossary.TRAIN, title="Training metrics (MLflow train/*)"), None))
    return parts, images


def log_to_mlflow(client, run_id: str, images: Mapping[str, bytes]) -> None:
    """The card's images as MLflow artifacts under ``train/``."""
    with tempfile.TemporaryDirectory() as d:
        for name, data in images.items():
            with open(os.path.join(d, name), "wb") as fh:
                fh.write(data)
            client.log_artifact(run_id, os.path.join(d, name), artifact_path="train")


def build(result: Mapping[str, Any], client, run_id: str) -> List[tuple]:
    """The distill card's parts from distill's outputs (``result``: its result.json); logs the images to the
    MLflow run ``run_id``."""
    from .previews import load_previews_url

    url = result.get("diagnostics_url") or f"{result['ema_url'].rsplit('/', 1)[0]}/{diagnostics.FILE}"
    parts, images = card_parts(result, diagnostics.load(url), load_previews_url(result.get("previews_url")))
    log_to_mlflow(client, run_id, images)
    return parts

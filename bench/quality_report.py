"""HTML report of bench/bench_quality.py: tables (mean ± sd over seeds), sample grids side by side (teacher and
every method, two samples per prompt: diversity is visible), and the DMD/sCM gradient ratio through training."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from bench.bench_quality import GRID, KEYS, mean_sd


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"/>'


def _table(summary: dict) -> str:
    rows = ["<tr><th>method</th><th>steps</th>" + "".join(f"<th>{k}</th>" for k in KEYS) + "</tr>"]
    for m, r in summary["results"].items():
        for s in ("1", "2", "4"):
            rows.append(f"<tr><td>{m}</td><td>{s}</td>" + "".join(f"<td>{mean_sd(r[s][k], '&plusmn;')}</td>" for k in KEYS) + "</tr>")
    t = summary["teacher_metrics"]
    rows.append(f"<tr><td>teacher</td><td>50 x 2</td><td>{t['fd_real']:.3f}</td><td>0</td><td>{t['accuracy']:.3f}"
                "</td><td>1</td><td>1</td></tr>")
    return "<table border=1 cellpadding=3>" + "".join(rows) + "</table>"


def grids_png(grids: dict, shared: dict, steps: str, seed: int = 0, sample: int = 0) -> bytes:
    """Columns: teacher, then each method's seed-``seed`` student at ``steps``; rows: one prompt per digit."""
    from rcm_steps.evaluate import clip_grid_png
    clips = {"teacher": shared["teacher_clips_grid"]}
    for (m, s), g in grids.items():
        if s == seed:
            clips[m] = g[steps]
    return clip_grid_png(clips, [shared["prompts"][i] for i in GRID], max_prompts=len(GRID), seed=sample)


def write_report(summary: dict, grids: dict, shared: dict, path: Path) -> None:
    from rcm_steps.diagnostics import plot_png
    r0 = summary["dmd_scm_grad_ratio_init"]
    parts = ["<html><head><meta charset='utf-8'><title>rCM quality benchmark</title></head><body>",
             "<h1>rCM quality benchmark (issue 20)</h1>",
             f"<p>Teacher: {html.escape(summary['teacher'])}. Device: {html.escape(str(summary['device']))}. "
             f"Seeds {summary['seeds']}, {summary['student_updates']} student updates per method, batch "
             f"{summary['batch']}, {summary['samples_per_eval']} samples per evaluation. DMD/sCM gradient ratio at "
             f"init: outputs {r0['outputs']:.3f}, weights {r0['weights']:.3f}.</p>",
             "<h2>Metrics (mean &plusmn; sd over seeds)</h2>", _table(summary)]
    for steps in ("1", "2", "4"):
        parts.append(f"<h2>Samples, {steps}-step students (seed 0): two samples per prompt</h2>")
        for sample in (0, 1):
            parts.append(_img(grids_png(grids, shared, steps, sample=sample), f"{steps}-step sample {sample}"))
    parts.append("<h2>Training diagnostics (seed 0)</h2>")
    for run in summary["runs"]:
        if run["seed"] == min(summary["seeds"]) and run["method"] in ("rcm", "rcm_staged", "dmd"):
            parts.append(f"<h3>{run['method']}</h3>" + _img(plot_png(run["diagnostics"]), run["method"]))
    parts.append("</body></html>")
    Path(path).write_text("\n".join(parts))

"""Per-step training diagnostics of a distill run (issue 20 part 4): collected on rank 0 from the trainer's
metrics, written to ``diagnostics.json`` next to ``result.json``, drawn as a PNG and summarised in Markdown
for the evaluate step's card (and MLflow: ``train/diagnostics.png``, ``train/diagnostics.json``).

``diagnostics.json``: ``series`` {name: {"<step>": value}} for :data:`SERIES` (only the steps where the
trainer reported it; non-finite values are null), ``stages`` [{"stage", "method", "start_step"}] (each phase
of a staged schedule as it began), ``planned_stages`` [[method, student_updates]] (DistillConfig.stages),
``critic_lag_warn`` and ``warnings`` [{"step", "kind": "critic_behind", "critic_loss_rel"}], and ``losses``
{name: {"<step>": value}} for :data:`LOSSES` (the distill card's loss curves, :func:`loss_plot_png`). Every
diagnostic may be missing (a trainer that does not report it): the plot then says "no data".
"""
from __future__ import annotations

import io
import json
import math
import os
import statistics
import tempfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

SERIES = ("dmd_scm_ratio_out", "dmd_scm_ratio_w", "critic_loss_rel", "critic_behind", "nan_masked_frac",
          "dmd_nan_masked_frac")
LOSSES = ("student_loss", "critic_loss")      # rcm_steps.distill.train_metrics names them
FILE = "diagnostics.json"


def _num(v: Any) -> Optional[float]:
    """A reported value as a float (bools too); None when non-finite or not a number."""
    return float(v) if isinstance(v, (bool, int, float)) and math.isfinite(v) else None


class DiagnosticsCollector:
    """Collects the diagnostics of each step's metrics (:meth:`add`); ``previous`` (an earlier attempt's
    ``diagnostics.json``) is kept up to ``upto`` (the step a resumed run starts from)."""

    def __init__(self, planned_stages: Sequence[Any] = (), critic_lag_warn: Optional[float] = None,
                 previous: Optional[Mapping[str, Any]] = None, upto: Optional[int] = None):
        prev, keep = previous or {}, (lambda s: upto is None or int(s) <= upto)
        self.series: Dict[str, Dict[int, Optional[float]]] = {
            k: {int(s): v for s, v in (prev.get("series", {}).get(k) or {}).items() if keep(s)} for k in SERIES}
        self.stages: List[Dict[str, Any]] = [dict(s) for s in prev.get("stages", []) if keep(s["start_step"])]
        self.warnings: List[Dict[str, Any]] = [dict(w) for w in prev.get("warnings", []) if keep(w["step"])]
        self.losses: Dict[str, Dict[int, Optional[float]]] = {
            k: {int(s): v for s, v in (prev.get("losses", {}).get(k) or {}).items() if keep(s)} for k in LOSSES}
        self.planned = [_phase(p) for p in planned_stages or ()]
        self.critic_lag_warn = critic_lag_warn

    def add(self, step: int, metrics: Mapping[str, Any]) -> Optional[Tuple[int, Optional[str]]]:
        """Record ``metrics`` (a trainer step's dict) at ``step``; returns (stage, method) when the stage
        changed (or is seen first), else None."""
        for k in SERIES:
            if isinstance(metrics.get(k), (bool, int, float)):
                self.series[k][step] = _num(metrics[k])
        for k in LOSSES:
            if isinstance(metrics.get(k), (int, float)):
                self.losses[k][step] = _num(metrics[k])
        if _num(metrics.get("critic_behind")):
            self.warnings.append({"step": step, "kind": "critic_behind",
                                  "critic_loss_rel": _num(metrics.get("critic_loss_rel"))})
        if "stage" not in metrics:
            return None
        stage, method = int(metrics["stage"]), metrics.get("stage_method")
        method = str(method) if method is not None else (self.planned[stage][0] if stage < len(self.planned) else None)
        if self.stages and self.stages[-1]["stage"] == stage:
            return None
        self.stages.append({"stage": stage, "method": method, "start_step": step})
        return stage, method

    def to_dict(self) -> Dict[str, Any]:
        return {"series": {k: {str(s): v for s, v in sorted(d.items())} for k, d in self.series.items()},
                "stages": self.stages, "planned_stages": self.planned, "critic_lag_warn": self.critic_lag_warn,
                "warnings": self.warnings,
                "losses": {k: {str(s): v for s, v in sorted(d.items())} for k, d in self.losses.items()}}

    def save(self, out) -> str:
        """Write ``diagnostics.json`` into ``out`` (a :class:`rcm_steps.storage.Storage`); returns its URL."""
        return out.write_json(FILE, self.to_dict())


def _phase(p: Any) -> List[Any]:
    """A planned phase, [method, student_updates], from a (method, updates) pair, a dict or a Stage."""
    if isinstance(p, Mapping):
        return [str(p["method"]), int(p["updates"])]
    if hasattr(p, "method"):
        return [str(p.method), int(p.updates)]
    method, updates = p
    return [str(method), int(updates)]


def collect(steps: Iterable[Tuple[int, Mapping[str, Any]]], **kw: Any) -> Dict[str, Any]:
    """The ``diagnostics.json`` content of (step, metrics) pairs (``kw``: :class:`DiagnosticsCollector`'s)."""
    c = DiagnosticsCollector(**kw)
    for step, m in steps:
        c.add(step, m)
    return c.to_dict()


def load(url: str) -> Dict[str, Any]:
    """A ``diagnostics.json`` by URL; ``{}`` when missing, ``{"error": ...}`` when unreadable."""
    from .storage import Storage

    base, name = url.rsplit("/", 1)
    try:
        st = Storage(base)
        return st.read_json(name) if st.exists(name) else {}
    except Exception as e:  # noqa: BLE001 - diagnostics never fail the step that shows them
        return {"error": f"{url}: {type(e).__name__}: {e}"}


def _points(diag: Mapping[str, Any], name: str) -> List[Tuple[int, Optional[float]]]:
    src = (diag.get("losses") or {}) if name in LOSSES else (diag.get("series") or {})
    return sorted((int(s), v) for s, v in (src.get(name) or {}).items())


def _ranges(warned: Sequence[int], reported: Sequence[int], limit: int = 12) -> str:
    """Warning steps as runs "a-b": a run ends at a reported step without the warning (critic steps may
    be every other step, so a run need not be consecutive steps)."""
    warned_set, runs, prev = set(warned), [], False
    for s in sorted(set(reported) | warned_set):
        if s in warned_set and prev:
            runs[-1][1] = s
        elif s in warned_set:
            runs.append([s, s])
        prev = s in warned_set
    text = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    return ", ".join(text[:limit]) + (f", ... ({len(text) - limit} more)" if len(text) > limit else "")


def markdown(diag: Mapping[str, Any]) -> str:
    """The card's summary: latest / median / min / max per diagnostic, the phases, the warnings."""
    lines = ["## Training diagnostics"]
    if diag.get("error"):
        lines.append(f"diagnostics unreadable: {diag['error']}")
    rows = []
    for name in SERIES:
        pts = _points(diag, name)
        vals = [v for _, v in pts if v is not None]
        if pts:
            fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
            rows.append(f"| {name} | {fmt(pts[-1][1])} (step {pts[-1][0]}) | "
                        f"{fmt(statistics.median(vals) if vals else None)} | {fmt(min(vals, default=None))} | "
                        f"{fmt(max(vals, default=None))} | {len(pts)} |")
    if rows:
        lines.append("\n".join(["| diagnostic | latest | median | min | max | steps |", "|---|---|---|---|---|---|"]
                               + rows))
    else:
        lines.append("No data: the trainer reported none of " + ", ".join(f"`{n}`" for n in SERIES) + ".")
    stages = diag.get("stages") or []
    if stages:
        lines.append("Phases: " + "; ".join(f"stage {s['stage']} `{s.get('method') or '?'}` from step "
                                            f"{s['start_step']}" for s in stages) + ".")
    warns = [w["step"] for w in diag.get("warnings") or []]
    if warns:
        thr = diag.get("critic_lag_warn")
        lines.append(f"**Warning: the critic fell behind** (smoothed critic loss relative to its start above "
                     f"critic_lag_warn{'' if thr is None else f' = {thr:g}'}) at steps "
                     f"{_ranges(warns, [st for st, _ in _points(diag, 'critic_behind')])} "
                     f"({len(warns)} steps).")
    elif rows:
        lines.append("No warnings.")
    return "\n\n".join(lines)


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
_PANELS = [("DMD / sCM gradient ratio (log)", ["dmd_scm_ratio_out", "dmd_scm_ratio_w"], True),
           ("critic loss relative to its start", ["critic_loss_rel"], False),
           ("NaN-masked fraction of the batch", ["nan_masked_frac", "dmd_nan_masked_frac"], False)]


_LOSS_PANELS = [("student loss: loss_scale x sCM + loss_scale_dmd x DMD (log)", ["student_loss"], True),
                ("critic (fake score) loss (log)", ["critic_loss"], True)]


def loss_plot_png(diag: Mapping[str, Any], width: int = 960, panel_h: int = 230) -> bytes:
    """The distill card's loss curves: the student's and the critic's loss, each on its own log axis (their
    steps alternate and their scales differ by orders of magnitude), phase starts as dashed lines."""
    return plot_png(diag, width, panel_h, panels=_LOSS_PANELS)


def plot_png(diag: Mapping[str, Any], width: int = 960, panel_h: int = 230, panels=None) -> bytes:
    """Three panels (DMD/sCM ratios on a log axis with a line at 1; critic loss relative to its start with
    the warning level and the warning steps in red; NaN-masked fractions), phase starts as dashed lines.
    ``panels``: other [(title, [series names], log axis)] (the warning marks are for the default panels)."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=12)
    except TypeError:                                      # Pillow < 10.1
        font = ImageFont.load_default()
    diag_panels = panels is None
    panels = _PANELS if panels is None else panels
    img = Image.new("RGB", (width, panel_h * len(panels)), "white")
    d = ImageDraw.Draw(img)
    names = [n for _, ns, _ in panels for n in ns]
    steps = [s for n in names for s, _ in _points(diag, n)] + [s["start_step"] for s in diag.get("stages") or []]
    x0, x1 = (min(steps), max(steps)) if steps else (0, 1)
    x0, x1 = (x0, x1) if x1 > x0 else (x0 - 1, x0 + 1)
    L, R, T, B = 70, 20, 24, 28
    warn_steps = {w["step"] for w in diag.get("warnings") or []} if diag_panels else set()
    thr = diag.get("critic_lag_warn") if diag_panels else None
    for i, (title, names, log) in enumerate(panels):
        top, bot = i * panel_h + T, (i + 1) * panel_h - B
        d.rectangle([L, top, width - R, bot], outline="black")
        d.text((L, top - 16), title, fill="black", font=font)
        px = lambda s: L + (s - x0) / (x1 - x0) * (width - L - R)  # noqa: E731
        for s in sorted({round(x0 + (x1 - x0) * k / 4) for k in range(5)}):
            d.text((px(s) - 10, bot + 4), str(s), fill="black", font=font)
        series = [(n, [(s, v) for s, v in _points(diag, n) if v is not None and (v > 0 or not log)]) for n in names]
        hlines = ([1.0] if log else ([thr] if i == 1 and thr is not None else [])) if diag_panels else []
        vals = [v for _, p in series for _, v in p]
        for j, s in enumerate(diag.get("stages") or []):
            x = px(s["start_step"])
            for y in range(top, bot, 8):
                d.line([(x, y), (x, min(y + 4, bot))], fill=(120, 120, 120))
            d.text((x + 3, top + 2 + 12 * (j % 2)), f"{s['stage']}:{s.get('method') or '?'}", fill=(90, 90, 90),
                   font=font)
        if not vals:
            d.text(((L + width - R) / 2 - 20, (top + bot) / 2 - 6), "no data", fill=(150, 150, 150), font=font)
            continue
        legend = [(n + ("" if pts else " (no data)"), _COLORS[j]) for j, (n, pts) in enumerate(series)]
        legend += [(f"critic_lag_warn = {thr:g}", (200, 60, 60))] if hlines and i == 1 else []
        f = (lambda v: math.log10(v)) if log else (lambda v: v)
        lo, hi = min(map(f, vals + hlines)), max(map(f, vals + hlines))
        decades = range(math.ceil(lo), math.floor(hi) + 1)
        stride = max(1, math.ceil(len(decades) / 6))        # at most ~6 decades labelled, 1 among them
        ticks = ({10.0 ** k for k in decades if k % stride == 0} | set(hlines) if log
                 else {lo + (hi - lo) * k / 4 for k in range(5)})
        if log and len(ticks) < 3:                          # under two decades: the extremes too
            ticks |= {min(vals + hlines), max(vals + hlines)}
        pad = (hi - lo) * 0.08 or 0.5
        lo, hi = lo - pad, hi + pad
        py = lambda v: bot - (f(v) - lo) / (hi - lo) * (bot - top)  # noqa: E731
        for t in ticks:
            d.line([(L - 4, py(t)), (L, py(t))], fill="black")
            d.text((4, py(t) - 7), f"{t:.3g}", fill="black", font=font)
        for h in hlines:
            d.line([(L, py(h)), (width - R, py(h))], fill=(200, 60, 60) if i == 1 else (0, 0, 0))
        for j, (n, pts) in enumerate(series):
            c = _COLORS[j]
            xy = [(px(s), py(v)) for s, v in pts]
            if len(xy) > 1:
                d.line(xy, fill=c, width=2)
            for x, y in xy if len(xy) <= 50 else []:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c)
            if i == 1:
                for s, v in pts:
                    if s in warn_steps:
                        d.ellipse([px(s) - 3, py(v) - 3, px(s) + 3, py(v) + 3], fill=(214, 39, 40))
        for s in warn_steps if i == 1 else ():                # every warning step: a red tick on the axis
            d.line([(px(s), bot - 6), (px(s), bot)], fill=(214, 39, 40), width=2)
        x = L + d.textlength(title, font=font) + 24           # the legend: in the title row
        for text, c in legend:
            d.text((x, top - 16), text, fill=c, font=font)
            x += d.textlength(text, font=font) + 16
    d.text((L - 40, img.height - 16), "step", fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def log_to_mlflow(client, run_id: str, diag: Mapping[str, Any], png: bytes) -> None:
    """The plot and the JSON as MLflow artifacts ``train/diagnostics.png`` and ``train/diagnostics.json``."""
    with tempfile.TemporaryDirectory() as d:
        for name, data in (("diagnostics.png", png), (FILE, json.dumps(diag, indent=1).encode())):
            with open(os.path.join(d, name), "wb") as fh:
                fh.write(data)
            client.log_artifact(run_id, os.path.join(d, name), artifact_path="train")

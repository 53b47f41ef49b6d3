"""Evaluation: teacher (full sampler, CFG) vs the EMA student at 1, 2, 4 steps.

For every eval prompt and several seeds (the same noise for every model):

* quality - digit accuracy of :mod:`rcm_steps.digit_classifier` on the generated
  clips (and the drift-direction accuracy from the centroid motion), and the
  Frechet distance of clip features to real held-out clips (``fd_data``) and, for
  students, to the teacher's samples (``fd_teacher``);
* diversity - mean pairwise feature distance across the seeds of one prompt,
  averaged over prompts; ``diversity_rel`` = student / teacher;
* cost - NFE (teacher: steps x 2 for CFG) and wall-clock seconds per sample.

Prompts that are not embedded-style ("a 3 drifting up") get no accuracy (NaN).
"""
from __future__ import annotations

import copy
import io
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from . import digit_classifier as dc
from . import teacher as T

__all__ = ["EvalConfig", "EvalResult", "evaluate", "student_denoiser", "clip_grid_png", "clips_gif",
           "check_gates", "DEFAULT_GATES"]

DEFAULT_GATES = {"min_digit_acc": 0.2, "max_fd_data": 1e9, "min_diversity_rel": 0.05}


@dataclass
class EvalConfig:
    seeds: int = 3
    student_steps: Sequence[int] = (1, 2, 4)
    teacher_steps: Optional[int] = None
    batch_size: int = 64
    real_clips: int = 256
    grid_prompts: int = 6
    seed: int = 0


@dataclass
class EvalResult:
    metrics: Dict[str, float]
    clips: Dict[str, torch.Tensor] = field(default_factory=dict)   # model -> (P, S, C, T, H, W)
    prompts: List[str] = field(default_factory=list)


def student_denoiser(teacher, ema_state: Dict[str, torch.Tensor]):
    from rcm_core.denoiser import TrigFlowDenoiser

    net = copy.deepcopy(teacher.net).float()
    net.load_state_dict(ema_state)
    return TrigFlowDenoiser(net.eval().requires_grad_(False), teacher.param, getattr(teacher, "call", None))


def _labels(prompts: List[str]):
    try:
        from rcm_core.embedded.data import parse_prompt
    except ImportError:  # pragma: no cover
        return None
    out = []
    for p in prompts:
        try:
            out.append(parse_prompt(p))
        except ValueError:
            return None
    return out


@torch.no_grad()
def evaluate(teacher, student, prompts: List[str], cfg: EvalConfig, sigma_max: float = 80.0,
             mid_t: Sequence[float] = (1.3, 1.0, 0.6), progress: bool = False) -> EvalResult:
    from rcm_core.sampling import sample_student

    if not prompts:
        raise ValueError("evaluate: no eval prompts")
    P, S = len(prompts), cfg.seeds
    info = T.teacher_info(teacher)
    lshape = tuple(info["latent_shape"])
    cond = T.encode(teacher, prompts).repeat_interleave(S, 0)              # (P*S, L, D)
    uncond = T.negative_embedding(teacher)
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn((P * S, *lshape), generator=g, dtype=torch.float64)
    t_steps = cfg.teacher_steps or info["steps"]
    models: Dict[str, Dict[str, Any]] = {}

    def run(name, fn, nfe):
        t0 = time.perf_counter()
        outs = [fn(cond[i:i + cfg.batch_size], noise[i:i + cfg.batch_size], i)
                for i in range(0, P * S, cfg.batch_size)]
        secs = time.perf_counter() - t0
        clips = T.decode(teacher, torch.cat(outs).float())
        models[name] = {"clips": clips, "nfe": nfe, "sec_per_sample": secs / (P * S)}

    run("teacher", lambda c, n, i: T.sample_teacher_latents(teacher, c, uncond, n, steps=t_steps), 2 * t_steps)
    for k in cfg.student_steps:
        def fn(c, n, i, k=k):
            sg = torch.Generator().manual_seed(cfg.seed * 7919 + 31 * k + i)
            return sample_student(student, c, n, steps=k, sigma_max=sigma_max, mid_t=mid_t, generator=sg)
        run(f"student_{k}", fn, k)

    labels = _labels(prompts)
    real = None
    try:
        from rcm_core.embedded.data import make_clips

        if labels is not None:
            real = make_clips(cfg.real_clips, seed=cfg.seed + 1, split="eval")[0]
    except ImportError:  # pragma: no cover
        pass
    feats = {m: dc.clip_features(v["clips"]) for m, v in models.items()}
    real_feats = dc.clip_features(real) if real is not None else None
    div = {}
    metrics: Dict[str, float] = {"eval_prompts": P, "seeds_per_prompt": S}
    for m, v in models.items():
        f = feats[m]
        div[m] = float(np.mean([dc.mean_pairwise_distance(f[p * S:(p + 1) * S]) for p in range(P)]))
        metrics[f"{m}/nfe"] = v["nfe"]
        metrics[f"{m}/sec_per_sample"] = v["sec_per_sample"]
        metrics[f"{m}/diversity"] = div[m]
        if labels is not None:
            pred, _ = dc.classify_clips(v["clips"])
            want = np.repeat([d for d, _ in labels], S)
            metrics[f"{m}/digit_acc"] = float((pred == want).mean())
            dirs = dc.clip_directions(v["clips"])
            want_dir = np.repeat([w for _, w in labels], S)
            metrics[f"{m}/direction_acc"] = float(np.mean([a == b for a, b in zip(dirs, want_dir)]))
        else:
            metrics[f"{m}/digit_acc"] = float("nan")
            metrics[f"{m}/direction_acc"] = float("nan")
        if real_feats is not None and len(f) > 2:
            metrics[f"{m}/fd_data"] = dc.frechet_distance(f, real_feats)
        if m != "teacher" and len(f) > 2:
            metrics[f"{m}/fd_teacher"] = dc.frechet_distance(f, feats["teacher"])
    for m in models:
        if m != "teacher":
            metrics[f"{m}/diversity_rel"] = div[m] / div["teacher"] if div["teacher"] > 0 else float("nan")
            metrics[f"{m}/speedup"] = (models["teacher"]["sec_per_sample"] / models[m]["sec_per_sample"]
                                       if models[m]["sec_per_sample"] > 0 else float("nan"))
    clips = {m: v["clips"].reshape(P, S, *v["clips"].shape[1:]) for m, v in models.items()}
    return EvalResult(metrics=metrics, clips=clips, prompts=list(prompts))


def check_gates(metrics: Dict[str, float], gates: Dict[str, float], steps: int = 4) -> Dict[str, Any]:
    """Evaluation gates on the ``student_<steps>`` metrics; returns {passed, failures}."""
    g = {**DEFAULT_GATES, **(gates or {})}
    m = lambda k: metrics.get(f"student_{steps}/{k}", float("nan"))  # noqa: E731
    failures = []
    acc = m("digit_acc")
    if not math.isnan(acc) and acc < g["min_digit_acc"]:
        failures.append(f"digit_acc {acc:.3f} < {g['min_digit_acc']}")
    fd = m("fd_data")
    if not math.isnan(fd) and fd > g["max_fd_data"]:
        failures.append(f"fd_data {fd:.3f} > {g['max_fd_data']}")
    dv = m("diversity_rel")
    if not math.isnan(dv) and dv < g["min_diversity_rel"]:
        failures.append(f"diversity_rel {dv:.3f} < {g['min_diversity_rel']}")
    return {"passed": not failures, "failures": failures, "gates": g}


# --- media ------------------------------------------------------------------------

def _strip(clip: torch.Tensor, scale: int) -> np.ndarray:
    """(C, T, H, W) -> uint8 (H*scale, T*(W+1)*scale) frames left to right."""
    x = clip.float().mean(0).clamp(0, 1).numpy()      # (T, H, W)
    t, h, w = x.shape
    pad = np.ones((t, h, 1), np.float32)
    row = np.concatenate([np.concatenate([x[i], pad[i]], 1) for i in range(t)], 1)
    return (np.kron(row, np.ones((scale, scale))) * 255).astype(np.uint8)


def clip_grid_png(clips: Dict[str, torch.Tensor], prompts: List[str], max_prompts: int = 6, seed: int = 0,
                  scale: int = 4) -> bytes:
    """Rows = prompts, columns = models (teacher, student_1, ...); each cell a frame strip."""
    from PIL import Image, ImageDraw

    names = list(clips)
    rows = []
    for p in range(min(max_prompts, len(prompts))):
        cells = [_strip(clips[m][p, seed], scale) for m in names]
        sep = np.full((cells[0].shape[0], 2 * scale), 128, np.uint8)
        rows.append(np.concatenate(sum(([c, sep] for c in cells), [])[:-1], 1))
    body = np.concatenate([np.concatenate([r, np.full((scale, r.shape[1]), 128, np.uint8)], 0) for r in rows], 0)
    head = 14
    img = Image.new("L", (body.shape[1] + 150, body.shape[0] + head), 255)
    img.paste(Image.fromarray(body), (150, head))
    d = ImageDraw.Draw(img)
    cw = body.shape[1] // len(names)
    for i, m in enumerate(names):
        d.text((150 + i * cw + 2, 1), m, fill=0)
    rh = body.shape[0] // max(1, len(rows))
    for i in range(len(rows)):
        d.text((2, head + i * rh + rh // 2 - 5), prompts[i][:24], fill=0)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def clips_gif(clips: torch.Tensor, scale: int = 6, duration_ms: int = 250) -> bytes:
    """Animated GIF of a batch of clips (B, C, T, H, W) side by side."""
    from PIL import Image

    x = clips.float().mean(1).clamp(0, 1).numpy()      # (B, T, H, W)
    b, t, h, w = x.shape
    frames = []
    for f in range(t):
        row = np.concatenate([np.pad(x[i, f], ((1, 1), (1, 1)), constant_values=0.5) for i in range(b)], 1)
        frames.append(Image.fromarray((np.kron(row, np.ones((scale, scale))) * 255).astype(np.uint8)))
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return buf.getvalue()


def config_dict(cfg: EvalConfig) -> Dict[str, Any]:
    d = asdict(cfg)
    d["student_steps"] = list(d["student_steps"])
    return d

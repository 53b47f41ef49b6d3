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

The digit classifier only knows the embedded teacher's data. Any other teacher (Wan2.1,
Cosmos-Predict2, custom) gets what is meaningful without extra weights, all relative to the
teacher: Frechet distance to the teacher's samples on pooled decoded pixels (``fd_teacher``)
and on pooled latents (``fd_teacher_latent``), the RMS latent distance to the teacher's
sample from the same noise (``latent_rmse_teacher``), diversity on pooled pixels, NFE, seconds
per sample and speedup. Clips are decoded with the teacher's VAE (``teacher.decode``); for the
media (grid PNG, GIF, MP4) they are kept as thumbnails (at most 64 px high, 33 frames).

On a machine with a GPU a real teacher's latents are decoded with the fast decode of
:mod:`rcm_core.real.fast_vae` (a bf16, channels-last copy of the VAE on the GPU, cuDNN autotuned, 5 latent
frames per decoder call; :func:`decode_latents`), the same decode the registered model serves with; the eval
settings then record ``decode`` (so versions evaluated with the fp32 CPU decode are not compared with them).
``RCM_FAST_DECODE=0`` turns it off; ``RCM_COMPILE_DECODE=1`` also compiles the decoder (serving).
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

__all__ = ["EvalConfig", "EvalResult", "evaluate", "student_denoiser", "clip_grid_png", "clips_gif", "clips_mp4",
           "as_clips", "pooled_features", "uses_digit_metrics", "check_gates", "DEFAULT_GATES", "eval_settings",
           "decode_latents", "fast_decode_device", "fast_decode_label", "metric_table"]

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
    # serving variants (rcm_core.nets.serving.parse_variant: "fp8-static", "compile", "fp8-static+compile",
    # "sta:t3x8x8:w3x3x5") sampled like the students, same prompts and noise: their speed and quality cost
    # against the plain student, in the metrics (serve_<variant>_<k>/...) and the version's card
    serving: Sequence[str] = ()

    def __post_init__(self):
        from rcm_core.nets.serving import parse_variant
        self.serving = tuple(self.serving)
        for v in self.serving:
            parse_variant(v, network_only=True)          # ValueError naming the variant, before anything samples


@dataclass
class EvalResult:
    metrics: Dict[str, float]
    clips: Dict[str, torch.Tensor] = field(default_factory=dict)   # model -> (P, S, C, T, H, W)
    prompts: List[str] = field(default_factory=list)
    # what the metrics depend on besides the student (see eval_settings): only versions evaluated with
    # equal settings are compared for "champion"
    settings: Dict[str, Any] = field(default_factory=dict)
    # FP8 static activation scales {layer: amax / 448} of the student's block linears, recorded while it sampled
    # the eval prompts (rcm_core.nets.fp8.activation_scales): stored with the registered model for fp8=static
    # serving; None when the student's network has no transformer blocks
    fp8_scales: Optional[Dict[str, float]] = None


def eval_settings(teacher_info: Dict[str, Any], prompts: Sequence[str], cfg: "EvalConfig",
                  digits: bool) -> Dict[str, Any]:
    """Everything the evaluation metrics depend on except the student: eval prompts (hash), seeds, noise seed,
    teacher sampler steps, the teacher (name, version, latent shape, sampler, text length, dtype) and the
    metric family. Recorded on the model version (tag ``eval_settings``)."""
    import hashlib

    t = {k: teacher_info[k] for k in ("name", "version", "latent_shape", "guidance", "shift", "solver", "text_len",
                                      "dtype") if k in teacher_info}
    return {"prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
            "n_prompts": len(prompts), "seeds": int(cfg.seeds), "seed": int(cfg.seed),
            "teacher_steps": int(cfg.teacher_steps or teacher_info["steps"]),
            "metrics": "digits" if digits else "teacher-relative",
            **({"real_clips": int(cfg.real_clips)} if digits else {}), "teacher": t}


# Latent frames per decoder call (fast_vae's ``chunk``; 1 = diffusers' frame-by-frame). 5: measured fastest at
# Wan2.1 480p x 81 (BENCHMARKS, issue 13: 1.52 -> 1.44 s on an H200, 1.71 -> 1.61 s on an H100; +8 GiB peak).
FAST_DECODE_CHUNK = 5


def _compile_decode() -> bool:
    """``RCM_COMPILE_DECODE=1``: also ``torch.compile`` the decoder (0.82 s instead of 1.44 s per 480p x 81 clip on
    an H200, after a one-off compilation of about 2-3 minutes: for serving processes, not one-shot evaluation)."""
    import os
    return os.environ.get("RCM_COMPILE_DECODE", "0") == "1"


def fast_decode_label() -> str:
    """The decode recorded in the eval settings (chunk 1: the text recorded before chunking existed)."""
    return ("fast_vae bf16 channels_last" + (f" chunk{FAST_DECODE_CHUNK}" if FAST_DECODE_CHUNK > 1 else "")
            + (" compiled" if _compile_decode() else "") + " (cuda)")


def fast_decode_device(teacher) -> Optional[torch.device]:
    """The GPU a real teacher's latents are decoded on with :mod:`rcm_core.real.fast_vae`, or None (no GPU,
    no VAE codec - the embedded teacher - or ``RCM_FAST_DECODE=0``): then ``teacher.decode`` as is."""
    import os

    codec = (getattr(teacher, "meta", None) or {}).get("codec")
    if codec is None or not hasattr(codec, "vae") or os.environ.get("RCM_FAST_DECODE", "1") == "0":
        return None
    if not torch.cuda.is_available():
        return None
    dev = next(codec.vae.parameters()).device
    return dev if dev.type == "cuda" else torch.device("cuda")


@torch.no_grad()
def decode_latents(teacher, latents: torch.Tensor, inplace: bool = False,
                   compile: Optional[bool] = None) -> torch.Tensor:
    """Latents -> pixels in [0, 1] on the CPU: the fast decode on a GPU (see the module doc), else
    ``teacher.decode``. The prepared VAE is made once per teacher (``inplace``: convert the teacher's own
    VAE instead of a copy, for a serving process that decodes only this way). ``compile``: also compile the
    decoder (None: ``RCM_COMPILE_DECODE``; the served model passes its ``compile`` serving option); decided when
    the prepared VAE is made."""
    dev = fast_decode_device(teacher)
    if dev is None:
        return T.decode(teacher, latents)
    from rcm_core.real import fast_vae

    codec = teacher.meta["codec"]
    vae = getattr(codec, "_rcm_fast_vae", None)
    if vae is None:
        vae = fast_vae.prepare_vae_for_decode(codec.vae, dtype=torch.bfloat16, channels_last=True,
                                              inplace=inplace, chunk=FAST_DECODE_CHUNK,
                                              compile=_compile_decode() if compile is None else compile).to(dev)
        codec._rcm_fast_vae = vae
    raw = latents.to(torch.float64).cpu() * codec.std + codec.mean
    x = fast_vae.decode(vae, raw.to(dev))
    x = ((x + 1) / 2).clamp(0, 1)
    return (x if codec.video else x[:, :, 0]).float().cpu()


def is_two_expert_state(ema_state) -> bool:
    """A two-expert student's weights (``transformer.*`` and ``transformer_2.*``, rcm_core.denoiser.TimestepExperts)."""
    return any(k.startswith("transformer_2.") for k in ema_state)


def student_denoiser(teacher, ema_state: Dict[str, torch.Tensor]):
    """The EMA student as a denoiser, in the structure its weights have: the teacher's network, or for a
    two-expert teacher (Wan2.2 A14B) whose student is one network (``DistillConfig.moe_student="one"``: weights
    without the ``transformer_2.`` prefix) a copy of one expert (same architecture) with those weights."""
    from rcm_core.denoiser import TrigFlowDenoiser

    src = teacher.net
    if hasattr(src, "experts") and not is_two_expert_state(ema_state):
        src = src.transformer_2                  # one network: the experts share the architecture
    net = copy.deepcopy(src).float()
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


def uses_digit_metrics(teacher) -> bool:
    """The digit classifier (accuracy, fd_data) applies to the embedded teacher's clips only."""
    return getattr(teacher, "name", None) == "embedded"


def as_clips(x: torch.Tensor) -> torch.Tensor:
    """Decoded samples as clips (B, C, T, H, W): images (B, C, H, W) become one-frame clips."""
    return x.unsqueeze(2) if x.dim() == 4 else x


def pooled_features(x: torch.Tensor, frames: int = 4, size: int = 4) -> np.ndarray:
    """(N, C, T, H, W) (or (N, C, H, W)) -> (N, C * min(T, frames) * size * size) average-pooled, float64."""
    x = as_clips(x.detach().float().cpu())
    return torch.nn.functional.adaptive_avg_pool3d(x, (min(x.shape[2], frames), size, size)).flatten(1).double().numpy()


def _thumbs(clips: torch.Tensor, max_side: int = 64, max_frames: int = 33) -> torch.Tensor:
    """Media-sized copies: at most ``max_side`` px high and ``max_frames`` frames (no-op for small clips)."""
    c = as_clips(clips.float())
    if c.shape[2] > max_frames:
        c = c[:, :, torch.linspace(0, c.shape[2] - 1, max_frames).round().long()]
    h, w = c.shape[-2:]
    if h > max_side:
        size = (c.shape[2], max_side, max(1, round(w * max_side / h)))
        c = torch.nn.functional.interpolate(c, size=size, mode="area")
    return c


@torch.no_grad()
def evaluate(teacher, student, prompts: List[str], cfg: EvalConfig, sigma_max: float = 80.0,
             mid_t: Sequence[float] = (1.3, 1.0, 0.6), progress: bool = True) -> EvalResult:
    """Sample teacher and students from the same noise, decode, and measure (module doc). ``progress``:
    lines in sampler steps and decode batches (:class:`rcm_steps.progress.Progress`). The student's sampling
    also records the FP8 static scales of its block linears (``EvalResult.fp8_scales``, no extra passes)."""
    from rcm_core.nets.fp8 import activation_scales

    from .progress import Progress

    if not prompts:
        raise ValueError("evaluate: no eval prompts")
    check_serving_variants(cfg.serving, student)       # FP8 on a device without FP8 tensor cores: now, not after
    P, S = len(prompts), cfg.seeds
    info = T.teacher_info(teacher)
    lshape = tuple(info["latent_shape"])
    digits = uses_digit_metrics(teacher)
    cond = T.encode(teacher, prompts).repeat_interleave(S, 0)              # (P*S, L, D)
    uncond = T.negative_embedding(teacher)
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn((P * S, *lshape), generator=g, dtype=torch.float64)
    t_steps = cfg.teacher_steps or info["steps"]
    models: Dict[str, Dict[str, Any]] = {}
    decode_batch = cfg.batch_size if digits else min(cfg.batch_size, 4)
    n_batches = math.ceil(P * S / cfg.batch_size)
    decodes = 1 if digits else math.ceil(P * S / decode_batch)
    bar = Progress(f"evaluate ({P * S} samples: teacher {t_steps} steps, students "
                   f"{'/'.join(map(str, cfg.student_steps))} steps)",
                   (1 + len(cfg.serving)) * (n_batches * sum(cfg.student_steps) + decodes * len(cfg.student_steps))
                   + len(cfg.serving) * cfg.student_steps[0] + n_batches * t_steps + decodes + 1,
                   unit="sampler steps and decodes", enabled=progress)

    def run(name, fn, nfe):
        t0 = time.perf_counter()
        outs = [fn(cond[i:i + cfg.batch_size], noise[i:i + cfg.batch_size], i)
                for i in range(0, P * S, cfg.batch_size)]
        secs = time.perf_counter() - t0
        lat = torch.cat(outs).float()
        if digits:
            clips = as_clips(decode_latents(teacher, lat))
            models[name] = {"clips": clips, "feats": dc.clip_features(clips), "latents": lat}
            bar.update(1)
        else:   # decode in small batches; keep pooled features and media thumbnails, not full-size videos
            thumbs, feats = [], []
            for j in range(0, lat.shape[0], decode_batch):
                px = as_clips(decode_latents(teacher, lat[j:j + decode_batch]))
                feats.append(pooled_features(px))
                thumbs.append(_thumbs(px))
                bar.update(1)
            models[name] = {"clips": torch.cat(thumbs), "feats": np.concatenate(feats),
                            "lat_feats": pooled_features(lat), "latents": lat}
        models[name].update(nfe=nfe, sec_per_sample=secs / (P * S))

    run("teacher", lambda c, n, i: T.sample_teacher_latents(teacher, c, uncond, n, steps=t_steps,
                                                            callback=bar.update), 2 * t_steps)
    # the FP8 calibration comes free: the scales are recorded over the student's own sampling of the eval prompts
    with activation_scales(getattr(student, "net", student)) as fp8_scales:
        for k in cfg.student_steps:
            run(f"student_{k}", _student_sampler(student, k, cfg, sigma_max, mid_t, bar), k)

    serve_metrics = _serving_variants(cfg, student, dict(fp8_scales), run,
                                      lambda fn: fn(cond[:cfg.batch_size], noise[:cfg.batch_size], 0),
                                      sigma_max, mid_t, bar)
    metrics: Dict[str, float] = {"eval_prompts": P, "seeds_per_prompt": S, **serve_metrics}
    for m, v in models.items():          # a serving variant against the plain student at its step count
        if m.startswith("serve_"):
            base = models[f"student_{v['nfe']}"]
            metrics[f"{m}/rel_l2_student"] = float((v["latents"] - base["latents"]).norm()
                                                   / base["latents"].norm().clamp_min(1e-30))
            metrics[f"{m}/speedup_student"] = base["sec_per_sample"] / max(v["sec_per_sample"], 1e-12)
    if digits:
        _digit_metrics(models, prompts, S, cfg, metrics)
    else:
        _relative_metrics(models, metrics)
    div = {}
    for m, v in models.items():
        f = v["feats"]
        div[m] = float(np.mean([dc.mean_pairwise_distance(f[p * S:(p + 1) * S]) for p in range(P)]))
        metrics[f"{m}/nfe"] = v["nfe"]
        metrics[f"{m}/sec_per_sample"] = v["sec_per_sample"]
        metrics[f"{m}/diversity"] = div[m]
        if m != "teacher" and len(f) > 2:
            metrics[f"{m}/fd_teacher"] = dc.frechet_distance(f, models["teacher"]["feats"])
    for m in models:
        if m != "teacher":
            metrics[f"{m}/diversity_rel"] = div[m] / div["teacher"] if div["teacher"] > 0 else float("nan")
            metrics[f"{m}/speedup"] = (models["teacher"]["sec_per_sample"] / models[m]["sec_per_sample"]
                                       if models[m]["sec_per_sample"] > 0 else float("nan"))
    clips = {m: v["clips"].reshape(P, S, *v["clips"].shape[1:]) for m, v in models.items()}
    settings = eval_settings(info, prompts, cfg, digits)
    if fast_decode_device(teacher) is not None:
        settings["decode"] = fast_decode_label()
    bar.update(1)                                   # the metrics
    bar.close()
    return EvalResult(metrics=metrics, clips=clips, prompts=list(prompts), settings=settings,
                      fp8_scales=dict(fp8_scales) or None)


def serving_variants_option(value: str) -> tuple:
    """The flow's ``--eval_serving`` (comma list of serving variants) as a tuple; :class:`ConfigError` naming
    the option and the variant it cannot read."""
    from rcm_core.nets.serving import VARIANT_HELP, parse_variant

    from .errors import ConfigError

    out = tuple(v.strip() for v in str(value or "").split(",") if v.strip())
    for v in out:
        try:
            parse_variant(v, network_only=True)
        except ValueError as e:
            raise ConfigError(f"--eval_serving: {e}", fix=f"pass --eval_serving a comma list of {VARIANT_HELP}, "
                                                          "or leave it empty") from None
    return out


def check_serving_variants(variants: Sequence[str], student) -> None:
    """Before evaluate samples: each variant can run on the student's device (FP8 needs compute capability 8.9+,
    CUDA graphs a GPU; ``rcm_core.nets.serving.check_serving_options``, naming the device) and FP8 finds
    transformer blocks in the student's network."""
    import dataclasses

    from rcm_core.nets.base import transformer_blocks
    from rcm_core.nets.serving import check_serving_options, parse_variant

    if not variants:
        return
    dev = next(student.parameters()).device
    for v in variants:
        opts = parse_variant(v, network_only=True)
        try:          # static FP8's scales come from this evaluation's own sampling: checked by apply, later
            check_serving_options(dataclasses.replace(opts, fp8="dynamic") if opts.fp8 == "static" else opts, dev)
            if opts.fp8 != "off":
                transformer_blocks(getattr(student, "net", student))
        except ValueError as e:
            raise ValueError(f"evaluate: serving variant {v!r}: {e}") from None


def _student_sampler(student, k: int, cfg: EvalConfig, sigma_max, mid_t, bar):
    """fn(cond, noise, i) -> x0 (CPU) of ``student`` at ``k`` steps, the renoising draws keyed by (seed, k, i): the
    same for the student and each of its serving variants."""
    from rcm_core.sampling import sample_student

    def fn(c, n, i):
        sg = torch.Generator().manual_seed(cfg.seed * 7919 + 31 * k + i)
        dev = next(student.parameters()).device
        x = sample_student(student, c.to(dev), n.to(dev), steps=k, sigma_max=sigma_max, mid_t=mid_t,
                           generator=sg if dev.type == "cpu" else None).cpu()
        bar.update(k)
        return x
    return fn


def _serving_variants(cfg: EvalConfig, student, fp8_scales, run, warm, sigma_max, mid_t, bar) -> Dict[str, float]:
    """Each of ``cfg.serving`` applied to a copy of the student as the registered model applies it
    (``apply_serving_options``; fp8=static with the scales just recorded), then sampled at every step count
    through ``run`` (entries ``serve_<variant>_<k>``). The first call of each variant (the first batch at the
    first step count: compilation at the batch's shape, autotuning) is timed apart, as
    ``serve_<variant>/first_call_s``, so the steady-state seconds per sample exclude it (a shorter last batch can
    still compile once more inside them). On CUDA, ``serve_<variant>/peak_gib`` is the peak memory of
    its sampling."""
    import copy

    from rcm_core.nets.serving import apply_serving_options, parse_variant, variant_label

    out: Dict[str, float] = {}
    for v in cfg.serving:
        label = f"serve_{variant_label(v)}"
        sv = apply_serving_options(copy.deepcopy(student), parse_variant(v, network_only=True), fp8_scales or None)
        dev = next(student.parameters()).device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()                      # the first call, alone: the first batch, first step count
        warm(_student_sampler(sv, cfg.student_steps[0], cfg, sigma_max, mid_t, bar))
        out[f"{label}/first_call_s"] = time.perf_counter() - t0
        for k in cfg.student_steps:
            run(f"{label}_{k}", _student_sampler(sv, k, cfg, sigma_max, mid_t, bar), k)
        if dev.type == "cuda":
            out[f"{label}/peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
        del sv
    return out


def _digit_metrics(models, prompts, S, cfg, metrics) -> None:
    """Embedded teacher: digit / direction accuracy and Frechet distance to real held-out clips."""
    labels = _labels(prompts)
    real = None
    try:
        from rcm_core.embedded.data import make_clips

        if labels is not None:
            real = make_clips(cfg.real_clips, seed=cfg.seed + 1, split="eval")[0]
    except ImportError:  # pragma: no cover
        pass
    real_feats = dc.clip_features(real) if real is not None else None
    for m, v in models.items():
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
        if real_feats is not None and len(v["feats"]) > 2:
            metrics[f"{m}/fd_data"] = dc.frechet_distance(v["feats"], real_feats)


def _relative_metrics(models, metrics) -> None:
    """Other teachers: latent-space distances of each student to the teacher (same noise per sample)."""
    ref = models["teacher"]
    for m, v in models.items():
        if m == "teacher":
            continue
        metrics[f"{m}/latent_rmse_teacher"] = float((v["latents"] - ref["latents"]).pow(2).mean().sqrt())
        if len(v["lat_feats"]) > 2:
            metrics[f"{m}/fd_teacher_latent"] = dc.frechet_distance(v["lat_feats"], ref["lat_feats"])


def metric_table(metrics: Dict[str, float], models: Sequence[str], digits: bool) -> Dict[str, List[Any]]:
    """The evaluation as a table, a row per model (teacher, student_1, ...) and a column per metric (NaN where a
    model has none; floats at 6 significant digits): the card's table and the MLflow table
    ``eval/metrics_table.json``."""
    keys = (["nfe", "sec_per_sample", "digit_acc", "direction_acc", "fd_data", "fd_teacher", "diversity",
             "diversity_rel"] if digits else
            ["nfe", "sec_per_sample", "speedup", "fd_teacher", "fd_teacher_latent", "latent_rmse_teacher",
             "diversity", "diversity_rel"])
    def cell(v):
        return float(f"{float(v):.6g}") if isinstance(v, (int, float)) else float("nan")
    return {"model": list(models), **{k: [cell(metrics.get(f"{m}/{k}")) for m in models] for k in keys}}


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

def _frame_index(t: int, max_frames: int) -> List[int]:
    return list(range(t)) if t <= max_frames else np.linspace(0, t - 1, max_frames).round().astype(int).tolist()


def _rgb(clip: torch.Tensor) -> bool:
    return clip.shape[0] == 3


def _strip(clip: torch.Tensor, scale: int, max_frames: int = 8) -> np.ndarray:
    """(C, T, H, W) -> uint8 frames left to right: (H*scale, T*(W+1)*scale) grey, or (..., 3) for RGB clips.

    At most ``max_frames`` frames (evenly spaced) are shown.
    """
    x = clip.float().clamp(0, 1)
    x = (x.permute(1, 2, 3, 0) if _rgb(clip) else x.mean(0)[..., None]).numpy()      # (T, H, W, c)
    x = x[_frame_index(x.shape[0], max_frames)]
    t, h, w, c = x.shape
    pad = np.ones((h, 1, c), np.float32)
    row = np.concatenate([np.concatenate([x[i], pad], 1) for i in range(t)], 1)
    row = np.repeat(np.repeat(row, scale, 0), scale, 1)
    out = (row * 255).astype(np.uint8)
    return out if c == 3 else out[..., 0]


def _auto_scale(clips: Dict[str, torch.Tensor]) -> int:
    h = next(iter(clips.values())).shape[-2]
    return max(1, 64 // max(1, h))


def clip_grid_png(clips: Dict[str, torch.Tensor], prompts: List[str], max_prompts: int = 6, seed: int = 0,
                  scale: Optional[int] = None) -> bytes:
    """Rows = prompts, columns = models (teacher, student_1, ...); each cell a frame strip.

    ``clips[model]`` is (P, S, C, T, H, W); RGB clips (C = 3) give an RGB image, others greyscale.
    ``scale`` None: small clips are enlarged to about 64 px high.
    """
    from PIL import Image, ImageDraw

    names = list(clips)
    scale = _auto_scale(clips) if scale is None else scale
    rgb = any(_rgb(clips[m][0, 0]) for m in names)
    mode, white, black = ("RGB", (255, 255, 255), (0, 0, 0)) if rgb else ("L", 255, 0)

    def cell(m, p):
        a = _strip(clips[m][p, seed], scale)
        return np.repeat(a[..., None], 3, -1) if rgb and a.ndim == 2 else a

    rows = []
    for p in range(min(max_prompts, len(prompts))):
        cells = [cell(m, p) for m in names]
        sep = np.full((cells[0].shape[0], 2 * scale, *cells[0].shape[2:]), 128, np.uint8)
        rows.append(np.concatenate(sum(([c, sep] for c in cells), [])[:-1], 1))
    body = np.concatenate([np.concatenate([r, np.full((scale, *r.shape[1:]), 128, np.uint8)], 0) for r in rows], 0)
    head = 14
    img = Image.new(mode, (body.shape[1] + 150, body.shape[0] + head), white)
    img.paste(Image.fromarray(body), (150, head))
    d = ImageDraw.Draw(img)
    cw = body.shape[1] // len(names)
    for i, m in enumerate(names):
        d.text((150 + i * cw + 2, 1), m, fill=black)
    rh = body.shape[0] // max(1, len(rows))
    for i in range(len(rows)):
        d.text((2, head + i * rh + rh // 2 - 5), prompts[i][:24], fill=black)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _video_frames(clips: torch.Tensor, scale: Optional[int], even: bool = False) -> List[np.ndarray]:
    """A batch of clips (B, C, T, H, W) side by side -> uint8 frames (H', W') grey or (H', W', 3) RGB."""
    c = as_clips(clips.float()).clamp(0, 1)
    rgb = _rgb(c[0])
    x = (c.permute(0, 2, 3, 4, 1) if rgb else c.mean(1)[..., None]).numpy()      # (B, T, H, W, ch)
    b, t, h, w, ch = x.shape
    scale = max(1, 96 // max(1, h)) if scale is None else scale
    frames = []
    for f in range(t):
        row = np.concatenate([np.pad(x[i, f], ((1, 1), (1, 1), (0, 0)), constant_values=0.5) for i in range(b)], 1)
        row = np.repeat(np.repeat(row, scale, 0), scale, 1)
        if even:   # H.264 / yuv420p wants even sizes
            row = np.pad(row, ((0, row.shape[0] % 2), (0, row.shape[1] % 2), (0, 0)), constant_values=0.5)
        a = (row * 255).astype(np.uint8)
        frames.append(a if rgb else a[..., 0])
    return frames


def clips_gif(clips: torch.Tensor, scale: Optional[int] = 6, duration_ms: int = 250) -> bytes:
    """Animated GIF of a batch of clips (B, C, T, H, W) side by side (RGB for 3-channel clips).

    ``scale`` None: enlarge small clips to about 96 px high.
    """
    from PIL import Image

    frames = [Image.fromarray(a) for a in _video_frames(clips, scale)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return buf.getvalue()


def ffmpeg_exe() -> Optional[str]:
    """The ffmpeg binary: imageio-ffmpeg's bundled one if installed, else ``ffmpeg`` on PATH, else None."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # noqa: BLE001 - not installed / no binary
        import shutil

        return shutil.which("ffmpeg")


def clips_mp4(clips: torch.Tensor, fps: int = 16, scale: Optional[int] = None) -> tuple:
    """MP4 (H.264, or MPEG-4 part 2 if ffmpeg lacks libx264) of clips (B, C, T, H, W) side by side.

    Returns ``(bytes, "")``, or ``(None, reason)`` when no ffmpeg is available (install
    ``imageio-ffmpeg`` or put ``ffmpeg`` on PATH) or it fails: the caller falls back to the GIF.
    """
    import subprocess
    import tempfile

    exe = ffmpeg_exe()
    if exe is None:
        return None, "no ffmpeg (pip install imageio-ffmpeg, or put ffmpeg on PATH): MP4 not written, GIF only"
    frames = _video_frames(clips, scale, even=True)
    frames = [np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a for a in frames]
    h, w = frames[0].shape[:2]
    raw = b"".join(np.ascontiguousarray(a).tobytes() for a in frames)
    err = ""
    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/clips.mp4"
        for codec in (["-c:v", "libx264", "-pix_fmt", "yuv420p"], ["-c:v", "mpeg4", "-q:v", "3"]):
            cmd = [exe, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
                   "-r", str(int(fps)), "-i", "-", *codec, "-r", str(int(fps)), out]
            r = subprocess.run(cmd, input=raw, capture_output=True)
            if r.returncode == 0:
                with open(out, "rb") as f:
                    return f.read(), ""
            err = r.stderr.decode(errors="replace")[-300:]
    return None, f"ffmpeg ({exe}) failed: {err}; MP4 not written, GIF only"


def config_dict(cfg: EvalConfig) -> Dict[str, Any]:
    d = asdict(cfg)
    d["student_steps"] = list(d["student_steps"])
    return d

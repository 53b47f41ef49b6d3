"""rCM's claim, measured (issue 20): sCM, rCM (joint and staged), DMD and dCM students of one teacher in the
reference's DMD/sCM regime, >= 3 seeds, the same number of student updates each, >= 1000 samples per evaluation.

Teacher: the embedded moving-digit video DiT with its CFG (4.0), its latents LIFTED by a fixed orthonormal map to
a larger size (``--lift k``: every latent pixel becomes a k x k block, divided by k; N = 1024 k^2 elements per
sample). The lifted network is the same DiT applied to the block sums (``U^T x``), its velocity mapped back by U,
plus the exact velocity of the directions orthogonal to range(U) (there the data is 0, so x0 = 0 exactly and
v = x_s / s). Nothing is learnt in those directions: student, critic and sCM target live in range(U) (g is
exactly in range(U) once the tangent warm-up ends), so the lift changes ONE thing, the DMD term's weight
w = mean|G - x0_real| per ELEMENT, which falls by k while the gradient's norm stays: the DMD/sCM gradient ratio
grows by k = sqrt(N / 1024), as it grows with sqrt(N) from the toys to Wan (rcm-algorithm.md section 9). The
lift is therefore the same as loss_scale_dmd = k on the unlifted teacher; it is said so in BENCHMARKS.md.

Training data: the teacher's own samples (Euler 50 steps x CFG, as the pipeline's cache_teacher), drawn once.
Evaluation of each EMA student at 1, 2 and 4 steps on ``--eval-per-prompt`` x 80 prompts (10 digits x 8
directions; >= 1000 samples), fixed noise, against held-out real clips and the teacher's samples of the same
prompts (other noise than the training data): Frechet distance on the digit classifier's 66-d clip features
(``fd_real``, ``fd_teacher``), classifier accuracy against the prompt's digit, per-prompt diversity (mean pairwise
feature distance within a prompt, over prompts) relative to the teacher's, sharpness (energy of the frames' 2-D
spectrum above half the Nyquist radius) relative to the teacher's.

    python bench/bench_quality.py --out bench/results/quality            # GPU: all methods x 3 seeds
    python bench/bench_quality.py --smoke --out /tmp/q                     # CPU: tiny, minutes

Writes ``<out>/quality_summary.json`` (the issue's schema plus ``runs`` with the training diagnostics), per-run
JSON under ``<out>/runs/``, and ``<out>/quality_report.html`` (tables, sample grids, the DMD/sCM ratio through
training). Each (method, seed) trains in its own process; ``--jobs`` run at once on the one device.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "steps", ROOT / "kernels"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

METHODS = ("scm", "rcm", "rcm_staged", "dmd", "dcm")
GRID = list(range(0, 80, 8))          # the prompts shown in the report's grids: one per digit
KEYS = ("fd_real", "fd_teacher", "accuracy", "diversity_rel", "sharpness_rel")     # per (method, steps, seed)
STEPS = (1, 2, 4)


# ---- the lifted teacher -----------------------------------------------------------------------------

def lift_down(x: torch.Tensor, k: int) -> torch.Tensor:
    """U^T x: (..., kH, kW) -> (..., H, W), the sum of each k x k block divided by k."""
    *lead, H, W = x.shape
    return x.reshape(*lead, H // k, k, W // k, k).sum((-3, -1)) / k


def lift_up(y: torch.Tensor, k: int) -> torch.Tensor:
    """U y: every element becomes a k x k block of y / k (U^T U = I)."""
    return y.repeat_interleave(k, -2).repeat_interleave(k, -1) / k


class LiftedNet(nn.Module):
    """A rectified-flow network ``net`` (v = eps - x0 at timestep = scale * s) lifted to k x larger frames."""

    def __init__(self, net: nn.Module, k: int, timestep_scale: float = 1000.0):
        super().__init__()
        self.net, self.k, self.scale = net, int(k), float(timestep_scale)

    def forward(self, x, timestep, cond):
        small = lift_down(x, self.k)
        s = (timestep.to(x.dtype) / self.scale).reshape(-1, *[1] * (x.dim() - 1))
        return lift_up(self.net(small, timestep, cond), self.k) + (x - lift_up(small, self.k)) / s


def lifted_teacher(k: int, device="cpu"):
    from rcm_core.embedded.data import from_latent
    from rcm_core.teachers import Teacher, get_teacher

    base = get_teacher("embedded", device=device)
    if k == 1:
        return base
    C, T, H, W = base.latent_shape
    return Teacher(name=f"embedded-lift{k}", version=base.version, net=LiftedNet(base.net, k, 1000.0),
                   param=base.param, latent_shape=(C, T, H * k, W * k), guidance=base.guidance,
                   encode_text=base.encode_text, decode=lambda z: from_latent(lift_down(z, k)),
                   negative_prompt=base.negative_prompt, sample_steps=base.sample_steps, shift=base.shift,
                   solver=base.solver, preset="embedded", meta=base.meta)


# ---- method configurations: the same number of student updates ----------------------------------------

def method_config(label: str, updates: int, seed: int, batch: int, overrides: dict):
    """DistillConfig of ``label`` with exactly ``updates`` student updates."""
    from rcm_core.config import DistillConfig

    base = DistillConfig.preset("embedded", **{"batch_size": batch, "seed": seed, **overrides})
    K, H = base.student_update_freq, min(base.tangent_warmup_steps, updates // 2)   # short runs: half warm-up
    base = base.replace(tangent_warmup_steps=H, lr_warmup_steps=min(base.lr_warmup_steps, updates))
    if label in ("scm", "dcm"):
        return base.replace(method=label, iterations=updates)
    if label == "rcm":           # student every iteration for H, then every K-th: the last iteration a student one
        return base.replace(method="rcm", iterations=H + (updates - H - 1) * K + 1)
    if label == "dmd":           # no warm-up: student at step % K == 0
        return base.replace(method="dmd", iterations=(updates - 1) * K + 1)
    if label == "rcm_staged":    # the release README's recommendation: dCM warm-up -> sCM -> sCM + DMD
        frac = overrides.get("stage_fractions", (0.1, 0.3, 0.6))
        a = max(1, round(updates * frac[0]))
        b = max(1, round(updates * frac[1]))
        stages = (("dcm", a), ("scm", b), ("rcm", updates - a - b))
        its = a + b + (updates - a - b) * K
        return base.replace(method="rcm", stages=stages, iterations=its, tangent_warmup_steps=min(H, a + b))
    raise ValueError(f"unknown bench method {label!r}; known: {METHODS}")


def count_student_updates(cfg) -> int:
    """Student updates of ``cfg`` by the trainer's own schedule (its mixin, on the config alone: no networks)."""
    from rcm_core.train.schedule import _Schedule

    sched = _Schedule()
    sched.cfg, sched.step = cfg, 0
    return sum(sched.is_student_step(s) for s in range(cfg.iterations))


# ---- metrics ---------------------------------------------------------------------------------------------

def sharpness(clips: torch.Tensor) -> float:
    """Mean energy of the frames' 2-D spectrum above half the Nyquist radius (clips (N, C, T, H, W) in [0, 1])."""
    x = clips.float().mean(1)                                        # (N, T, H, W)
    x = x - x.mean((-1, -2), keepdim=True)
    P = torch.fft.fft2(x).abs() ** 2
    H, W = x.shape[-2:]
    fy, fx = torch.fft.fftfreq(H).abs(), torch.fft.fftfreq(W).abs()
    high = (fy[:, None] ** 2 + fx[None] ** 2).sqrt() > 0.25          # 0.5 cycles/px is Nyquist
    return float(P[..., high].sum(-1).mean() / (H * W))


def per_prompt_diversity(feats: np.ndarray, prompt_ids: np.ndarray) -> float:
    from rcm_steps.digit_classifier import mean_pairwise_distance
    return float(np.mean([mean_pairwise_distance(feats[prompt_ids == p]) for p in np.unique(prompt_ids)]))


def clip_metrics(clips: torch.Tensor, digits: np.ndarray, prompt_ids: np.ndarray, ref: dict, feats=None) -> dict:
    """The metrics of ``clips``; ``ref`` (real and teacher features and metrics) adds the relative ones;
    ``feats``: the clips' classifier features when the caller has them."""
    from rcm_steps.digit_classifier import classify_clips, clip_features, frechet_distance
    f = clip_features(clips) if feats is None else feats
    pred, _ = classify_clips(clips)
    out = {"accuracy": float((pred == digits).mean()),
           "diversity": per_prompt_diversity(f, prompt_ids), "sharpness": sharpness(clips)}
    if ref:
        out["fd_real"] = frechet_distance(f, ref["real_feats"])
        out["fd_teacher"] = frechet_distance(f, ref["teacher_feats"])
        out["diversity_rel"] = out["diversity"] / ref["teacher"]["diversity"]
        out["sharpness_rel"] = out["sharpness"] / ref["teacher"]["sharpness"]
    return out


# ---- shared data: teacher samples for training and evaluation, real clips ---------------------------------

def prepare(a, device) -> dict:
    from rcm_core.embedded.data import embedded_prompts, make_clips, parse_prompt
    from rcm_core.sampling import sample_teacher
    from rcm_steps.digit_classifier import classify_clips, clip_features, frechet_distance

    teacher = lifted_teacher(a.lift, device)
    den = teacher.denoiser()
    prompts = embedded_prompts()
    uncond = teacher.encode_text([teacher.negative_prompt]).to(device)

    def teacher_samples(prompt_idx, seed):
        out = []
        g = torch.Generator(device="cpu").manual_seed(seed)
        for i in range(0, len(prompt_idx), a.sample_batch):
            idx = prompt_idx[i:i + a.sample_batch]
            cond = teacher.encode_text([prompts[j] for j in idx]).to(device)
            noise = torch.randn(len(idx), *teacher.latent_shape, generator=g, dtype=torch.float64).to(device)
            out.append(sample_teacher(den, cond, uncond, noise, guidance=teacher.guidance, shift=teacher.shift,
                                      steps=a.teacher_steps, solver="euler").cpu())
        return torch.cat(out)

    t0 = time.perf_counter()
    gen = np.random.default_rng(12345)
    train_idx = gen.integers(0, len(prompts), a.train_samples).tolist()
    train_lat = lift_down(teacher_samples(train_idx, 1), a.lift).float()      # stored small; lifted per batch
    eval_idx = [p for p in range(len(prompts)) for _ in range(a.eval_per_prompt)]
    eval_lat = teacher_samples(eval_idx, 2)
    t_teacher = time.perf_counter() - t0
    real, real_prompts, _ = make_clips(a.real_samples, seed=7, split="eval")
    teacher_clips = teacher.decode(eval_lat.float())
    digits = np.array([parse_prompt(prompts[i])[0] for i in eval_idx])
    pid = np.array(eval_idx)
    ref = {"real_feats": clip_features(real), "teacher_feats": clip_features(teacher_clips)}
    ref["teacher"] = clip_metrics(teacher_clips, digits, pid, {}, feats=ref["teacher_feats"])
    ref["teacher"]["fd_real"] = frechet_distance(ref["teacher_feats"], ref["real_feats"])
    real_digits = np.array([parse_prompt(p)[0] for p in real_prompts])
    ref["real"] = {"sharpness": sharpness(real), "accuracy": float((classify_clips(real)[0] == real_digits).mean())}
    return {"lift": a.lift, "prompts": prompts, "train_idx": train_idx, "train_latents": train_lat, "eval_idx": eval_idx,
            "eval_digits": digits, "teacher_clips_grid": teacher_clips.reshape(len(prompts), a.eval_per_prompt,
                                                                               *teacher_clips.shape[1:])[GRID, :2],
            "ref": ref, "teacher_seconds": t_teacher}


def grad_ratio_init(a, device, shared) -> dict:
    """The DMD/sCM ratio at init (student = fake = teacher; r = 1): 4 student steps of a joint rCM trainer with
    zero learning rates, on the training data; outputs and weights."""
    from rcm_core.trainer import RCMTrainer
    teacher = lifted_teacher(a.lift, device)
    cfg = method_config("rcm", 8, 0, a.batch, {**a.overrides, "tangent_warmup_steps": 0, "lr_student": 0.0,
                                               "lr_fake": 0.0, "lr_warmup_steps": 0})
    tr = RCMTrainer(teacher, cfg, device=device)
    out, ow = [], []
    for i in range(4):
        tr.step = 0
        tr._reseed()
        b = _batch(teacher, shared, a.batch, 100 + i, device)
        m = tr.student_step(b["latents"].to(device, torch.float64), b["cond"], b["uncond"],
                            tr._sample_rng(a.batch, i * a.batch))
        out.append(m["dmd_scm_ratio_out"])
        ow.append(m["dmd_scm_ratio_w"])
    return {"outputs": float(np.mean(out)), "weights": float(np.mean(ow)), "per_batch_outputs": out,
            "per_batch_weights": ow, "lift": a.lift, "latent_elements": int(np.prod(teacher.latent_shape))}


def _batch(teacher, shared, b, seed, device):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(shared["train_idx"]), (b,), generator=g)
    prompts = [shared["prompts"][shared["train_idx"][i]] for i in idx.tolist()]
    return {"latents": lift_up(shared["train_latents"][idx].double(), shared["lift"]), "cond": teacher.encode_text(prompts).to(device),
            "uncond": teacher.encode_text([teacher.negative_prompt]).to(device)}


# ---- one (method, seed) run -------------------------------------------------------------------------------

def run_one(a, label: str, seed: int, shared: dict, device) -> dict:
    from rcm_core.trainer import RCMTrainer

    torch.manual_seed(seed)
    teacher = lifted_teacher(a.lift, device)
    cfg = method_config(label, a.updates, seed, a.batch, a.overrides)
    tr = RCMTrainer(teacher, cfg, device=device)
    from rcm_steps.diagnostics import DiagnosticsCollector
    col = DiagnosticsCollector(cfg.stages, cfg.critic_lag_warn)
    updates, skipped, t0 = 0, 0, time.perf_counter()
    for it in range(cfg.iterations):
        m = tr.train_step(_batch(teacher, shared, a.batch, seed * 1_000_003 + it, device))
        updates += m["kind"] == "student"
        skipped += int(m.get("skipped", 0))
        col.add(it + 1, m)
        if a.deadline and time.time() > a.deadline:      # out of time: stop here, the summary flags the shortfall
            print(f"[{label} s{seed}] deadline: stopped after {updates} student updates ({it + 1} iterations)",
                  flush=True)
            break
        if a.progress and it % 100 == 0:
            print(f"[{label} s{seed}] it {it}/{cfg.iterations} updates {updates} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    train_s = time.perf_counter() - t0
    den = tr.ema_denoiser()
    ev, grids, x0 = evaluate_student(a, teacher, den, shared, cfg, device)
    serving, serving_grids = {}, {}
    for v in a.serving:
        sden, ctx = serving_student(a, teacher, den, v, shared, cfg, device)
        with ctx:
            serving[v], serving_grids[v], x0_v = evaluate_student(a, teacher, sden, shared, cfg, device)
        for s in STEPS:        # the same noise as the base student: the latents' own difference
            serving[v][str(s)]["latent_rel_l2"] = float((x0_v[s] - x0[s]).norm() / x0[s].norm().clamp_min(1e-30))
    return {"method": label, "seed": seed, "student_updates": updates, "iterations": cfg.iterations,
            "skipped_steps": skipped, "train_seconds": train_s, "config": cfg.to_dict(), "eval": ev,
            "serving": serving, "diagnostics": col.to_dict(), "grids": grids, "serving_grids": serving_grids}


def _student_samples(a, teacher, den, shared, cfg, device, steps: int, noise_seed: int) -> torch.Tensor:
    """x0 of the student ``den`` at ``steps`` on the eval prompts, noise from ``noise_seed`` (float64, CPU)."""
    from rcm_core.sampling import sample_student
    prompts, eval_idx = shared["prompts"], shared["eval_idx"]
    g = torch.Generator().manual_seed(noise_seed)
    out = []
    for i in range(0, len(eval_idx), a.sample_batch):
        idx = eval_idx[i:i + a.sample_batch]
        cond = teacher.encode_text([prompts[j] for j in idx]).to(device)
        noise = torch.randn(len(idx), *teacher.latent_shape, generator=g, dtype=torch.float64).to(device)
        out.append(sample_student(den, cond, noise, steps=steps, sigma_max=cfg.sigma_max, mid_t=cfg.mid_t,
                                  generator=torch.Generator(device=device).manual_seed(steps * 7 + i)).cpu())
    return torch.cat(out)


def evaluate_student(a, teacher, den, shared, cfg, device):
    """The metrics, report grids and latents of ``den`` at each of STEPS on the eval prompts, with the noise
    every method, seed and serving variant shares."""
    prompts, eval_idx = shared["prompts"], shared["eval_idx"]
    ev, grids, x0s = {}, {}, {}
    for steps in STEPS:
        x0s[steps] = _student_samples(a, teacher, den, shared, cfg, device, steps, 4242)
        clips = teacher.decode(x0s[steps].float())
        ev[str(steps)] = clip_metrics(clips, shared["eval_digits"], np.array(eval_idx), shared["ref"])
        grids[str(steps)] = clips.reshape(len(prompts), a.eval_per_prompt, *clips.shape[1:])[GRID, :2].clone()
    return ev, grids, x0s


def serving_student(a, teacher, den, variant: str, shared, cfg, device):
    """(a copy of the student ``den`` with the serving ``variant`` applied, the context its sampling runs in).

    The options act on the embedded DiT inside the lift, as ``apply_serving_options`` acts on a registered
    student's network: FP8 replaces its blocks' linears (``fp8-static``: scales recorded over the student's own
    sampling of the eval prompts at 1, 2 and 4 steps, with other noise than the evaluation's, as the flow's
    evaluate step records them); ``sta:...`` runs its self-attention as sliding-tile attention over the DiT's
    token grid. On the CPU, FP8 runs through ``torch._scaled_mm``'s CPU kernel (E4M3 operands: the same
    rounding of inputs and weights as on the GPU)."""
    import copy
    from rcm_core.nets.fp8 import activation_scales, check_fp8_device, quantize_fp8
    from rcm_core.nets.serving import check_scales, check_serving_options, parse_variant
    from rcm_core.nets.sparse_attention import sparse_self_attention, token_grid

    opts = parse_variant(variant)
    if opts.compile != "off":
        raise SystemExit(f"--serving {variant}: compile changes speed, not the sampled clips; leave it out here")
    sden = copy.deepcopy(den)
    dit = sden.net.net if isinstance(sden.net, LiftedNet) else sden.net
    # FP8's device check is the GPU's (sm89+); on the CPU, torch._scaled_mm's CPU kernel computes the same E4M3
    # products, so the quality cost is measured there too
    check_serving_options(dataclasses.replace(opts, fp8="off"), device)
    if opts.fp8 != "off" and device.type == "cuda":
        check_fp8_device(device)
    scales = None
    if opts.fp8 == "static":
        with torch.no_grad(), activation_scales(dit) as scales:
            for steps in STEPS:
                _student_samples(a, teacher, sden, shared, cfg, device, steps, 777)
    if opts.fp8 != "off":
        quantize_fp8(dit, calibration=check_scales(scales) if scales is not None else None, out_dtype=sden.dtype)
    ctx = contextlib.nullcontext()
    if opts.sparse != "off":
        small = (1, *teacher.latent_shape[:-2], *(n // a.lift for n in teacher.latent_shape[-2:]))
        ctx = sparse_self_attention(opts.sliding_tile.spec(token_grid(dit, small)))
    return sden, ctx


# ---- orchestration ------------------------------------------------------------------------------------------

def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/quality")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--updates", type=int, default=500, help="student updates of every method")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lift", type=int, default=4, help="latent lift factor per spatial side (N = 1024 k^2)")
    ap.add_argument("--train-samples", type=int, default=4096)
    ap.add_argument("--eval-per-prompt", type=int, default=13, help="x 80 prompts = samples per evaluation")
    ap.add_argument("--real-samples", type=int, default=2000)
    ap.add_argument("--teacher-steps", type=int, default=50)
    ap.add_argument("--sample-batch", type=int, default=1040)
    ap.add_argument("--jobs", type=int, default=15, help="runs at once (processes sharing the device)")
    ap.add_argument("--config", default="{}", help="DistillConfig overrides for every run (JSON)")
    ap.add_argument("--variant", default="", help="label suffix, e.g. ':k5' for a run of other settings")
    ap.add_argument("--serving", default="",
                    help="serving variants to evaluate on every trained student, comma list as bench/serving.py's "
                         "--variants: fp8-static, fp8-dynamic, sta:t<F>x<H>x<W>:w<F>x<H>x<W>, joined with + "
                         "(e.g. fp8-static,fp8-static+sta:t1x4x4:w3x1x1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU settings (tests)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--train-budget-s", type=float, default=0.0,
                    help="stop training every run this many seconds after the bench starts (0: no limit); runs cut "
                         "short are flagged in the summary (fewer student updates than --updates)")
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)   # internal: epoch seconds
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)      # internal: 'method:seed'
    a = ap.parse_args(argv)
    if a.smoke:
        a.updates, a.batch, a.lift, a.train_samples = min(a.updates, 6), min(a.batch, 4), min(a.lift, 2), 32
        a.eval_per_prompt, a.real_samples, a.teacher_steps, a.sample_batch = 2, 64, 4, 160
    a.overrides = json.loads(a.config)
    a.serving = [v for v in a.serving.split(",") if v]
    if a.smoke:
        a.overrides = {"tangent_warmup_steps": 2, "lr_warmup_steps": 2, **a.overrides}
    return a


@contextlib.contextmanager
def _smoke_env(a):
    """--smoke on the CPU: attention calls without tangents (sampling, teacher forwards) take SDPA instead of
    the exact path the CPU tests default to; tangent calls keep the op's own rules. Set for this bench's
    work only and restored after (the bench runs inside the test process too)."""
    if not a.smoke or "RCM_ATTN_PRIMAL" in os.environ:
        yield {}
        return
    os.environ["RCM_ATTN_PRIMAL"] = "sdpa"
    try:
        yield {"RCM_ATTN_PRIMAL": "sdpa"}
    finally:
        os.environ.pop("RCM_ATTN_PRIMAL", None)


def _env_info(device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "date": time.strftime("%Y-%m-%d")}
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def summarise(a, runs: list, shared: dict, ratio0: dict, info: dict, wall: float) -> dict:
    methods = [m for m in a.methods.split(",")]
    res, deltas = {}, {}
    for m in methods:
        rs = sorted([r for r in runs if r["method"] == m], key=lambda r: r["seed"])
        res[m] = {str(s): {k: [r["eval"][str(s)][k] for r in rs] for k in KEYS} for s in STEPS}
        res[m]["student_updates"] = [r["student_updates"] for r in rs]
        res[m]["iterations"] = [r["iterations"] for r in rs]
        res[m]["train_seconds"] = [r["train_seconds"] for r in rs]
        for v in a.serving:
            name = f"{m}+{v}"
            res[name] = {str(s): {k: [r["serving"][v][str(s)][k] for r in rs] for k in (*KEYS, "latent_rel_l2")}
                         for s in STEPS}
            deltas[name] = {str(s): serving_delta(res[m][str(s)], res[name][str(s)]) for s in STEPS}
    t = shared["ref"]["teacher"]
    return {"teacher": f"embedded video DiT, CFG 4.0, latents lifted x{a.lift} per side "
                       f"(N = {ratio0['latent_elements']}; DMD/sCM balance = loss_scale_dmd x {a.lift} unlifted)",
            "device": info.get("gpu") or info.get("cpu"), "env": info,
            "dmd_scm_grad_ratio_init": ratio0, "seeds": sorted({r["seed"] for r in runs}),
            "samples_per_eval": len(shared["eval_idx"]), "student_updates": a.updates, "batch": a.batch,
            "overrides": a.overrides, "variant": a.variant,
            "teacher_metrics": {"fd_real": t["fd_real"], "accuracy": t["accuracy"], "diversity": t["diversity"],
                                "sharpness": t["sharpness"]},
            "real_metrics": shared["ref"]["real"], "teacher_sampling_seconds": shared["teacher_seconds"],
            "wall_seconds": wall, "results": res, "serving_deltas": deltas,
            "runs": [{k: v for k, v in r.items() if k not in ("grids", "serving_grids")} for r in runs]}


def serving_delta(base: dict, variant: dict) -> dict:
    """A serving variant against the same students without it (same seeds, same noise): per-seed differences
    of fd_real and accuracy, and whether the mean fd_real difference lies within the base's seed spread (one
    sd over seeds, the issue's "within its seed spread")."""
    d_fd = [v - b for v, b in zip(variant["fd_real"], base["fd_real"])]
    d_acc = [v - b for v, b in zip(variant["accuracy"], base["accuracy"])]
    spread = float(np.std(base["fd_real"], ddof=1)) if len(base["fd_real"]) > 1 else float("nan")
    return {"fd_real_delta": d_fd, "accuracy_delta": d_acc, "fd_real_seed_sd": spread,
            "within_seed_spread": bool(abs(float(np.mean(d_fd))) <= spread),
            "latent_rel_l2": variant["latent_rel_l2"]}


def main(argv=None) -> None:
    a = _args(argv)
    with _smoke_env(a):
        _main(a, argv)


def _main(a, argv) -> None:
    device = torch.device(a.device)
    out = Path(a.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    shared_path = out / "shared.pt"
    if a.worker:
        label, seed = a.worker.rsplit(":", 1)
        shared = torch.load(shared_path, weights_only=False)
        r = run_one(a, label, int(seed), shared, device)
        torch.save({"": r["grids"], **r["serving_grids"]}, out / "runs" / f"{label}_{seed}_grids.pt")
        (out / "runs" / f"{label}_{seed}.json").write_text(
            json.dumps({k: v for k, v in r.items() if k not in ("grids", "serving_grids")}))
        return
    t0 = time.perf_counter()
    info = _env_info(device)
    from tqdm import tqdm
    shared = prepare(a, device)
    torch.save(shared, shared_path)
    ratio0 = grad_ratio_init(a, device, shared)
    print(f"DMD/sCM gradient ratio at init: outputs {ratio0['outputs']:.3f}, weights {ratio0['weights']:.3f} "
          f"(N = {ratio0['latent_elements']})", flush=True)
    jobs = [f"{m}:{s}" for s in a.seeds.split(",") for m in a.methods.split(",")]
    for j in jobs:       # a bad method name fails here, before any process starts
        method_config(j.split(":")[0], a.updates, 0, a.batch, a.overrides)
    from rcm_core.nets.serving import parse_variant
    for v in a.serving:  # and a bad serving variant
        try:
            parse_variant(v)
        except ValueError as e:
            raise SystemExit(f"--serving: {e}") from None
    base = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
    if a.train_budget_s:
        base += ["--deadline", str(time.time() - (time.perf_counter() - t0) + a.train_budget_s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running, failed = [], []
    bar = tqdm(total=len(jobs), desc="runs")
    pending = list(jobs)
    while pending or running:
        while pending and len(running) < a.jobs:
            j = pending.pop(0)
            log = open(out / "runs" / f"{j.replace(':', '_')}.log", "w")
            running.append((j, subprocess.Popen(base + ["--worker", j], env=env, stdout=log, stderr=subprocess.STDOUT),
                            log))
        time.sleep(0.5)
        for item in list(running):
            j, p, log = item
            if p.poll() is not None:
                running.remove(item)
                log.close()
                bar.update(1)
                if p.returncode != 0:
                    failed.append(j)
                    print(f"run {j} failed (exit {p.returncode}); log: {log.name}", flush=True)
    bar.close()
    runs, grids = [], {}
    for j in jobs:
        m, s = j.split(":")
        f = out / "runs" / f"{m}_{s}.json"
        if f.exists():
            runs.append(json.loads(f.read_text()))
            for v, g in torch.load(out / "runs" / f"{m}_{s}_grids.pt", weights_only=False).items():
                grids[(m + (f"+{v}" if v else ""), int(s))] = g
    if failed:
        raise SystemExit(f"bench_quality: {len(failed)} run(s) failed: {failed}")
    summary = summarise(a, runs, shared, ratio0, info, time.perf_counter() - t0)
    short = [f"{r['method']}:{r['seed']}={r['student_updates']}" for r in runs if r["student_updates"] != a.updates]
    summary["unequal_updates"] = short
    if short:
        print(f"WARNING: runs with other than {a.updates} student updates (deadline): {short}", flush=True)
    (out / "quality_summary.json").write_text(json.dumps(summary, indent=1))
    from bench.quality_report import write_report
    write_report(summary, grids, shared, out / "quality_report.html")
    print_table(summary)
    shared_path.unlink(missing_ok=True)


def mean_sd(v, pm: str = "±") -> str:
    """'mean ± sd' over seeds (sd 0 for one seed)."""
    v = np.asarray(v, float)
    return f"{v.mean():.3f} {pm} {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def print_table(summary: dict) -> None:
    print(f"\nteacher: {summary['teacher']}; device {summary['device']}; "
          f"DMD/sCM ratio at init: outputs {summary['dmd_scm_grad_ratio_init']['outputs']:.3f}, "
          f"weights {summary['dmd_scm_grad_ratio_init']['weights']:.3f}")
    w = max(14, *(len(m) + 1 for m in summary["results"]))
    print(f"{'method':<{w}}{'steps':>6}  " + "".join(f"{k:>16}" for k in KEYS))
    for m, r in summary["results"].items():
        for s in STEPS:
            e = r[str(s)]
            print(f"{m:<{w}}{s:>6}  " + "".join(f"{mean_sd(e[k]):>16}" for k in KEYS))
    for name, d in summary.get("serving_deltas", {}).items():
        for s in STEPS:
            e = d[str(s)]
            print(f"{name:<{w}}{s:>3} steps: fd_real - base {mean_sd(e['fd_real_delta'], '+-')} (base seed sd "
                  f"{e['fd_real_seed_sd']:.3f}: {'within' if e['within_seed_spread'] else 'OUTSIDE'}), accuracy - base "
                  f"{mean_sd(e['accuracy_delta'], '+-')}, latent rel L2 {mean_sd(e['latent_rel_l2'], '+-')}")
    t = summary["teacher_metrics"]
    print(f"{'teacher':<{w}}{'50x2':>6}  {t['fd_real']:>16.3f}{'':>16}{t['accuracy']:>16.3f}")


if __name__ == "__main__":
    main()

"""sCM vs DMD vs rCM on an exact Gaussian-mixture teacher (CPU): mode coverage, weight error, sliced W2.

All methods start from the same network (an MLP regressed onto the exact teacher, "the teacher's
weights"), use the same seed, iterations and batch, and are evaluated on their EMA students at 1, 2
and 4 steps against samples of the true mixture. Reference rows: the fitted start network, the
teacher's own Euler sampler, and the true mixture against an independent draw of itself (noise floor
of the sliced W2 at this sample size).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_mixture.py                 # -> bench/results/mixture.json
    # the same bench on another rcm_core (e.g. the commit before the DMD-strength fix):
    PYTHONPATH=/tmp/rcm_before OMP_NUM_THREADS=1 .venv/bin/python bench/bench_mixture.py \
        --label before --out bench/results/mixture_before.json

``--variants`` are ``method`` or ``method:key=value,key=value`` (DistillConfig overrides), e.g.
``rcm:loss_scale_dmd=250``. With an older rcm_core that has no ``rcm_core.mixture``, this file's
``rcm_core/mixture.py`` is loaded into that package; settings the older DistillConfig lacks are
dropped and listed in the JSON.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_mixture():
    try:
        import rcm_core.mixture as mixture
    except ModuleNotFoundError:          # an older rcm_core: load this tree's mixture.py into it
        spec = importlib.util.spec_from_file_location("rcm_core.mixture", ROOT / "rcm_core" / "mixture.py")
        mixture = importlib.util.module_from_spec(spec)
        sys.modules["rcm_core.mixture"] = mixture
        spec.loader.exec_module(mixture)
    return mixture


def parse_variant(v: str) -> tuple[str, str, dict]:
    """'rcm' or 'rcm:loss_scale_dmd=250,student_update_freq=5' -> (label, method, overrides)."""
    method, _, rest = v.partition(":")
    over = {}
    for kv in filter(None, rest.split(",")):
        k, _, val = kv.partition("=")
        over[k] = json.loads(val)
    return v, method, over


def weights_digest(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, t in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def grad_ratio(trainer, teacher, batches: int = 8, seed: int = 99) -> dict:
    """||grad of loss_scale_dmd * L_DMD|| / ||grad of loss_scale * L_sCM|| on the student's weights.

    Both terms are rebuilt from the trainer's networks (``student``, ``fake``, ``teacher``), its config
    and the library's loss functions (so an older rcm_core shows its own DMD scaling), at the end of
    training with the tangent warm-up over (r = 1), on ``batches`` fresh batches (guidance 1; rollout
    lengths 1..N_max in turn). Only public functions are used, so trainer refactors do not break it.
    """
    from torch.autograd import forward_ad as fwAD

    from rcm_core.losses import (dmd_loss, normalize_tangent, sample_t_lognormal, sample_t_shifted_rf, scm_loss,
                                 scm_target)
    from rcm_core.sampling import student_rollout
    from rcm_core.trigflow import noisy_sample
    c = trainer.cfg
    gen = torch.Generator().manual_seed(seed)
    params = list(trainer.student.parameters())
    student, fake, real = trainer.student, trainer.fake, trainer.teacher

    def t_D(n):
        if c.dmd_time == "rf_shift":
            return sample_t_shifted_rf(n, c.dmd_shift, generator=gen)
        return sample_t_lognormal(n, c.dmd_P_mean, c.dmd_P_std, generator=gen)

    def norm_of(loss):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))

    out = {"scm": [], "dmd": []}
    b = c.batch_size
    cond = torch.zeros(b, 1, 1, dtype=torch.float64)
    for i in range(batches):
        x0 = teacher.sample_data(b, gen)
        t = sample_t_lognormal(b, c.P_mean, c.P_std, generator=gen)
        x_t = noisy_sample(x0, torch.randn(x0.shape, generator=gen, dtype=torch.float64), t)
        with torch.no_grad():
            F_T = real(x_t, t, cond)
            cs = torch.cos(t) * torch.sin(t)
            with fwAD.dual_level():           # J = cos t sin t dF/dt along the teacher's PF-ODE
                out_dual = student(fwAD.make_dual(x_t, cs[:, None] * F_T), fwAD.make_dual(t, cs), cond)
                F_minus, J = fwAD.unpack_dual(out_dual)
        g = normalize_tangent(scm_target(F_minus, F_T, J, x_t, t, 1.0), c.tangent_norm_c)
        out["scm"].append(norm_of(c.loss_scale * scm_loss(student(x_t, t, cond), F_minus, g, b)))
        n = i % c.rollout_max_steps + 1
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        G, _ = student_rollout(student, cond, noise, n, [t_D(b) for _ in range(n)], c.rollout_t_max,
                               generator=gen, keep_graph=True)
        tD = t_D(b)
        x_D = noisy_sample(G.detach(), torch.randn(G.shape, generator=gen, dtype=torch.float64), tD)
        with torch.no_grad():
            x0_fake, x0_real = fake.x0(x_D, tD, cond), real.x0(x_D, tD, cond)
        out["dmd"].append(norm_of(c.loss_scale_dmd * dmd_loss(G, x0_fake, x0_real)))
    s, d = sum(out["scm"]) / batches, sum(out["dmd"]) / batches
    return {"grad_norm_scm": s, "grad_norm_dmd": d, "dmd_over_scm": d / s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="scm,dmd,rcm,rcm:loss_scale_dmd=70")
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="lr_student and lr_fake")
    p.add_argument("--fit-steps", type=int, default=1500)
    p.add_argument("--n-eval", type=int, default=20000)
    p.add_argument("--projections", type=int, default=512)
    p.add_argument("--teacher-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="seed of the start network's fit")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (same start network for all)")
    p.add_argument("--label", default="after")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "mixture.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    import rcm_core
    from rcm_core.config import DistillConfig
    from rcm_core.denoiser import Parameterization, TrigFlowDenoiser
    from rcm_core.sampling import sample_student, sample_teacher
    from rcm_core.trainer import RCMTrainer
    mx = _import_mixture()
    D64 = torch.float64
    F_PARAM = Parameterization("F", 1.0)

    t_start = time.perf_counter()
    teacher = mx.GaussianMixtureTeacher()
    dim = teacher.means.shape[1]
    ref = teacher.sample_data(a.n_eval, torch.Generator().manual_seed(123))
    cond = torch.zeros(a.n_eval, 1, 1, dtype=D64)
    uncond = torch.zeros(1, 1, 1, dtype=D64)

    def evaluate(x):
        r = mx.evaluate_samples(x, teacher, ref, projections=a.projections, seed=5)
        return {k: r[k] for k in ("covered", "modes", "missing", "weight_tv", "weight_max_err", "off_mode",
                                  "sliced_w2", "freq")}

    def eval_student(den, cfg_like):
        res = {}
        for steps in (1, 2, 4):
            g = torch.Generator().manual_seed(7)
            noise = torch.randn(a.n_eval, dim, generator=g, dtype=D64)
            x = sample_student(den, cond, noise, steps, cfg_like.sigma_max, cfg_like.mid_t, generator=g)
            res[str(steps)] = evaluate(x)
        return res

    rows = {}
    floor = evaluate(teacher.sample_data(a.n_eval, torch.Generator().manual_seed(124)))
    rows["true mixture (independent draw)"] = {"steps": {"-": floor}}
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(11)
    xt = sample_teacher(TrigFlowDenoiser(teacher.net, teacher.param), cond, uncond,
                        torch.randn(a.n_eval, dim, generator=g, dtype=D64),
                        guidance=1.0, shift=1.0, steps=a.teacher_steps, solver="euler")
    rows[f"teacher Euler {a.teacher_steps} steps"] = {"steps": {str(a.teacher_steps): evaluate(xt)},
                                                      "seconds": time.perf_counter() - t0}

    torch.manual_seed(a.seed)
    net0 = mx.MixtureStudentNet(dim).double()
    t0 = time.perf_counter()
    fit_rel = mx.fit_mixture_student(net0, teacher, steps=a.fit_steps, seed=a.seed)
    fit_s = time.perf_counter() - t0
    digest = weights_digest(net0)
    print(f"start network: relative F error {fit_rel:.4f} after {a.fit_steps} fit steps ({fit_s:.1f} s), "
          f"weights {digest}", flush=True)
    base = DistillConfig.preset("embedded")
    rows["start (fitted teacher copy)"] = {"steps": eval_student(TrigFlowDenoiser(net0, F_PARAM), base)}

    known = DistillConfig.field_names()
    seeds = [int(x) for x in a.seeds.split(",")]
    configs = {}
    for label, method, over in map(parse_variant, _split_variants(a.variants)):
        runs = []
        for seed in seeds:
            settings = {**dict(guidance=1.0, dtype="float64", batch_size=a.batch, iterations=a.iterations,
                               lr_student=a.lr, lr_fake=a.lr, seed=seed), **over, "method": method}
            dropped = sorted(k for k in settings if k not in known)
            cfg = DistillConfig.preset("embedded", **{k: v for k, v in settings.items() if k in known})
            configs[label] = {"config": {**cfg.to_dict(), "seed": seeds}, "dropped": dropped}
            torch.manual_seed(seed)
            tr = RCMTrainer(teacher, cfg, student_net=copy.deepcopy(net0), fake_net=copy.deepcopy(net0),
                            student_param=F_PARAM)
            gb = torch.Generator().manual_seed(seed + 1)
            bc = torch.zeros(cfg.batch_size, 1, 1, dtype=D64)
            t0 = time.perf_counter()
            skipped = 0
            for _ in range(cfg.iterations):
                m = tr.train_step({"latents": teacher.sample_data(cfg.batch_size, gb), "cond": bc,
                                   "uncond": uncond})
                skipped += int(m.get("skipped", 0) or 0)
            run = {"seed": seed, "train_seconds": time.perf_counter() - t0, "skipped_steps": skipped,
                   "student_updates": sum(tr.is_student_step(i) for i in range(cfg.iterations)),
                   "steps": eval_student(tr.ema_denoiser(), cfg)}
            if tr.fake is not None and cfg.uses_consistency:
                run["grad_ratio"] = grad_ratio(tr, teacher)
            runs.append(run)
            r1 = run["steps"]["1"]
            print(f"{label} seed {seed}: {run['train_seconds']:.1f} s; 1 step: covered {r1['covered']}/{r1['modes']} "
                  f"tv {r1['weight_tv']:.3f} off {r1['off_mode']:.3f} sw2 {r1['sliced_w2']:.4f}"
                  + (f"; |grad DMD|/|grad sCM| {run['grad_ratio']['dmd_over_scm']:.4f}" if "grad_ratio" in run
                     else ""), flush=True)
        rows[label] = {"method": method, "overrides": over, "runs": runs,
                       "steps": {k: aggregate([r["steps"][k] for r in runs]) for k in ("1", "2", "4")}}
        if "grad_ratio" in runs[0]:
            rows[label]["dmd_over_scm"] = aggregate([r["grad_ratio"] for r in runs], ("dmd_over_scm",))["dmd_over_scm"]

    total = time.perf_counter() - t_start
    result = {
        "label": a.label, "date": time.strftime("%Y-%m-%d"), "rcm_core": os.path.dirname(rcm_core.__file__),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "total_seconds": total,
        "teacher": {"means": teacher.means.tolist(), "weights": teacher.weights.tolist(), "s": teacher.s},
        "student": "MixtureStudentNet(dim=2, hidden=128, layers=3, freqs=8), F parameterisation, float64",
        "start": {"fit_steps": a.fit_steps, "fit_rel_error_F": fit_rel, "fit_seconds": fit_s, "weights": digest},
        "eval": {"n": a.n_eval, "projections": a.projections, "mode_radius_s": 4.0, "coverage_min_fraction": 0.25,
                 "student_noise_seed": 7, "reference_seed": 123},
        "settings": vars(a), "configs": configs, "rows": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(markdown_table(result))
    print(f"total {total:.0f} s -> {a.out}")
    return result


def aggregate(results: list[dict], keys=("covered", "weight_tv", "weight_max_err", "off_mode", "sliced_w2")) -> dict:
    """Mean, sample std, min and max over seeds of each metric (modes: the total)."""
    out = {}
    for k in keys:
        v = torch.tensor([float(r[k]) for r in results], dtype=torch.float64)
        out[k] = {"mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else 0.0,
                  "min": float(v.min()), "max": float(v.max()), "values": v.tolist()}
    if "modes" in results[0]:
        out["modes"] = results[0]["modes"]
    return out


def _split_variants(s: str) -> list[str]:
    """Split 'scm,dmd,rcm:a=1,b=2,rcm' on the commas that start a new method."""
    out = []
    for part in s.split(","):
        if "=" in part and ":" not in part and out:        # another override of the previous method
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def _cell(r, k, fmt):
    v = r[k]
    if not isinstance(v, dict):
        return format(v, fmt)
    return format(v["mean"], fmt) + (f" ± {format(v['std'], fmt)}" if v["std"] > 0 else "")


def markdown_table(result: dict) -> str:
    n = len(result["settings"]["seeds"].split(","))
    lines = [f"| {result['label']} (mean ± sd over {n} training seeds) | steps | modes covered (min) | weight TV | "
             "off-mode | sliced W2 |", "|---|---:|---:|---:|---:|---:|"]
    for label, row in result["rows"].items():
        for steps, r in row["steps"].items():
            cov = r["covered"]
            cov = f"{int(cov['min'])}/{r['modes']}" if isinstance(cov, dict) else f"{cov}/{r['modes']}"
            lines.append(f"| {label} | {steps} | {cov} | {_cell(r, 'weight_tv', '.3f')} | "
                         f"{_cell(r, 'off_mode', '.3f')} | {_cell(r, 'sliced_w2', '.4f')} |")
    ratios = [f"{label}: {row['dmd_over_scm']['mean']:.4f}" for label, row in result["rows"].items()
              if "dmd_over_scm" in row]
    if ratios:
        lines.append("")
        lines.append("|grad of loss_scale_dmd L_DMD| / |grad of loss_scale L_sCM| at the end: " + "; ".join(ratios))
    return "\n".join(lines)


if __name__ == "__main__":
    main()

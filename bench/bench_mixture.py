"""sCM vs DMD vs rCM on an exact Gaussian-mixture teacher (CPU): mode coverage, weight error, sliced W2.

Teacher: 8 isotropic Gaussians on a ring (``rcm_core.mixture``), in 2-D (``--dim 2``) or embedded by a fixed
random orthonormal map into ``--dim`` D dimensions (``embedded_ring_teacher``: the same ring in a random
plane, std s in every direction, the posterior mean still exact). All methods start from the same network
(an MLP regressed onto the exact teacher, "the teacher's weights") and get the SAME NUMBER OF STUDENT
UPDATES (``--student-updates``): sCM trains that many iterations; rCM and DMD alternate with critic updates
(rCM: every iteration during the tangent warm-up H, then one student update every K iterations; DMD: no
warm-up), so they run more iterations; the critic's extra compute is reported (forward calls of each network
and seconds spent in critic steps). Each is evaluated on its EMA student at 1, 2 and 4 steps against samples
of the true mixture. Reference rows: the fitted start network, the teacher's own Euler sampler, and the true
mixture against an independent draw of itself (noise floor of the sliced W2 at this sample size).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_mixture.py --dim 64 --out bench/results/mixture_d64.json

``--variants`` are ``method`` or ``method:key=value,key=value`` (DistillConfig overrides), e.g.
``rcm:loss_scale_dmd=250``. Bench-only keys: ``student_updates=U`` (this variant's budget), ``iterations=N``
(a fixed iteration count instead of the student-update budget) and ``dmd_reduction=mean``: the DMD loss as it
was before the fix (55528f4: a per-element MEAN of the same per-sample squared norm with the same weight w),
which is exactly the summed loss times 1/numel, so it is run as loss_scale_dmd / numel (numel = D). The
library's loss is not changed. (The old critic loss was a mean too; AdamW is invariant to that constant factor
up to its epsilon.) Settings an older DistillConfig lacks are dropped and listed in the JSON; with an older
rcm_core that has no ``rcm_core.mixture``, this file's ``rcm_core/mixture.py`` is loaded into that package.
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
        try:
            over[k] = json.loads(val)
        except json.JSONDecodeError:          # a bare string, e.g. dmd_reduction=mean
            over[k] = val
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


BENCH_KEYS = ("student_updates", "iterations", "dmd_reduction")


def iterations_for(is_student_step, student_updates: int) -> int:
    """The smallest iteration count whose schedule contains ``student_updates`` student updates."""
    n = count = 0
    while count < student_updates:
        count += bool(is_student_step(n))
        n += 1
    return n


class CallCounter:
    """Counts forward calls and rows through a module (forward hooks; a forward-AD pass counts once)."""

    def __init__(self, module):
        self.calls = self.rows = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, mod, args, out):
        self.calls += 1
        self.rows += int(args[0].shape[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="scm,dmd,rcm,rcm:dmd_reduction=mean")
    p.add_argument("--dim", type=int, default=2, help="data dimension D (2: the plain ring; >2: embedded ring)")
    p.add_argument("--basis-seed", type=int, default=0, help="seed of the random orthonormal embedding (D > 2)")
    p.add_argument("--student-updates", type=int, default=1500, help="student updates of every method")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="lr_student and lr_fake")
    p.add_argument("--fit-steps", type=int, default=1500)
    p.add_argument("--n-eval", type=int, default=20000)
    p.add_argument("--projections", type=int, default=512)
    p.add_argument("--teacher-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="seed of the start network's fit")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (same start network for all)")
    p.add_argument("--no-grad-ratio", action="store_true", help="skip the end-of-training gradient ratio")
    p.add_argument("--label", default=None)
    p.add_argument("--out", default=None, help="default bench/results/mixture_d{dim}.json")
    a = p.parse_args(argv)
    a.label = a.label or f"D = {a.dim}"
    a.out = a.out or str(ROOT / "bench" / "results" / f"mixture_d{a.dim}.json")
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
    teacher = mx.GaussianMixtureTeacher() if a.dim == 2 else mx.embedded_ring_teacher(a.dim, seed=a.basis_seed)
    dim = teacher.means.shape[1]
    ref = teacher.sample_data(a.n_eval, torch.Generator().manual_seed(123))
    cond = torch.zeros(a.n_eval, 1, 1, dtype=D64)
    uncond = torch.zeros(1, 1, 1, dtype=D64)
    keys = ("covered", "modes", "missing", "weight_tv", "weight_max_err", "off_mode", "sliced_w2", "freq",
            "sliced_w2_plane", "perp_std_ratio")

    def evaluate(x):
        r = mx.evaluate_samples(x, teacher, ref, projections=a.projections, seed=5)
        return {k: r[k] for k in keys if k in r}

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
    net0 = mx.MixtureStudentNet(dim, skip=dim > 2).double()
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
        bench = {k: over[k] for k in BENCH_KEYS if k in over}
        over = {k: v for k, v in over.items() if k not in BENCH_KEYS}
        budget = int(bench.get("student_updates", a.student_updates))
        runs = []
        for seed in seeds:
            settings = {**dict(guidance=1.0, dtype="float64", batch_size=a.batch, iterations=budget,
                               lr_student=a.lr, lr_fake=a.lr, seed=seed), **over, "method": method}
            if bench.get("dmd_reduction", "sum") == "mean":      # the pre-fix DMD loss: sum / numel
                settings["loss_scale_dmd"] = settings.get("loss_scale_dmd", base.loss_scale_dmd) / dim
            elif bench.get("dmd_reduction", "sum") != "sum":
                raise ValueError(f"dmd_reduction={bench['dmd_reduction']!r}; known: sum, mean")
            dropped = sorted(k for k in settings if k not in known)
            cfg = DistillConfig.preset("embedded", **{k: v for k, v in settings.items() if k in known})
            torch.manual_seed(seed)
            tr = RCMTrainer(teacher, cfg, student_net=copy.deepcopy(net0), fake_net=copy.deepcopy(net0),
                            student_param=F_PARAM)
            iters = int(bench["iterations"]) if "iterations" in bench else iterations_for(tr.is_student_step, budget)
            tr.cfg = cfg = cfg.replace(iterations=iters)
            configs[label] = {"config": {**cfg.to_dict(), "seed": seeds}, "dropped": dropped, "bench": bench}
            counters = {name: CallCounter(getattr(tr, name).net) for name in ("student", "fake", "teacher")
                        if getattr(tr, name, None) is not None}
            gb = torch.Generator().manual_seed(seed + 1)
            bc = torch.zeros(cfg.batch_size, 1, 1, dtype=D64)
            secs = {"student": 0.0, "critic": 0.0}
            kinds = {"student": 0, "critic": 0}
            t0 = time.perf_counter()
            skipped = 0
            for _ in range(cfg.iterations):
                m = tr.train_step({"latents": teacher.sample_data(cfg.batch_size, gb), "cond": bc,
                                   "uncond": uncond})
                skipped += int(m.get("skipped", 0) or 0)
                kinds[m["kind"]] += 1
                secs[m["kind"]] += m["step_time_s"]
            run = {"seed": seed, "iterations": cfg.iterations, "train_seconds": time.perf_counter() - t0,
                   "skipped_steps": skipped, "student_updates": kinds["student"], "critic_updates": kinds["critic"],
                   "student_step_seconds": secs["student"], "critic_step_seconds": secs["critic"],
                   "forward_calls": {k: c.calls for k, c in counters.items()},
                   "forward_rows": {k: c.rows for k, c in counters.items()}}
            for c in counters.values():
                c.handle.remove()
            run["steps"] = eval_student(tr.ema_denoiser(), cfg)
            if tr.fake is not None and cfg.uses_consistency and not a.no_grad_ratio:
                run["grad_ratio"] = grad_ratio(tr, teacher)
            runs.append(run)
            r1 = run["steps"]["1"]
            print(f"{label} seed {seed}: {cfg.iterations} it ({kinds['student']} student, {kinds['critic']} critic), "
                  f"{run['train_seconds']:.1f} s (critic {secs['critic']:.1f} s); 1 step: covered "
                  f"{r1['covered']}/{r1['modes']} tv {r1['weight_tv']:.3f} off {r1['off_mode']:.3f} "
                  f"sw2 {r1['sliced_w2']:.4f}"
                  + (f" sw2-plane {r1['sliced_w2_plane']:.4f} perp {r1['perp_std_ratio']:.3f}"
                     if "sliced_w2_plane" in r1 else "")
                  + (f"; |grad DMD|/|grad sCM| {run['grad_ratio']['dmd_over_scm']:.4f}" if "grad_ratio" in run
                     else ""), flush=True)
        metric_keys = [k for k in ("covered", "weight_tv", "weight_max_err", "off_mode", "sliced_w2",
                                   "sliced_w2_plane", "perp_std_ratio") if k in runs[0]["steps"]["1"]]
        rows[label] = {"method": method, "overrides": over, "bench": bench, "runs": runs,
                       "steps": {k: aggregate([r["steps"][k] for r in runs], metric_keys) for k in ("1", "2", "4")},
                       "cost": aggregate(runs, ("iterations", "student_updates", "critic_updates", "train_seconds",
                                                "student_step_seconds", "critic_step_seconds"))}
        if "grad_ratio" in runs[0]:
            rows[label]["dmd_over_scm"] = aggregate([r["grad_ratio"] for r in runs], ("dmd_over_scm",))["dmd_over_scm"]

    total = time.perf_counter() - t_start
    result = {
        "label": a.label, "date": time.strftime("%Y-%m-%d"), "rcm_core": os.path.dirname(rcm_core.__file__),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "total_seconds": total,
        "teacher": {"dim": dim, "means": teacher.means.tolist(), "weights": teacher.weights.tolist(), "s": teacher.s,
                    "basis_seed": a.basis_seed if dim > 2 else None},
        "student": f"MixtureStudentNet(dim={dim}, hidden=128, layers=3, freqs=8, skip={dim > 2}), F parameterisation, "
                   "float64",
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
    plane = result["teacher"].get("dim", 2) > 2
    extra_h = " sliced W2 in the plane | perp. std / s |" if plane else ""
    lines = [f"| {result['label']} (mean ± sd over {n} training seeds) | steps | modes covered (min) | weight TV | "
             "off-mode | sliced W2 |" + extra_h, "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if plane else "")]
    for label, row in result["rows"].items():
        for steps, r in row["steps"].items():
            cov = r["covered"]
            cov = f"{int(cov['min'])}/{r['modes']}" if isinstance(cov, dict) else f"{cov}/{r['modes']}"
            extra = (f" {_cell(r, 'sliced_w2_plane', '.4f')} | {_cell(r, 'perp_std_ratio', '.3f')} |"
                     if plane else "")
            lines.append(f"| {label} | {steps} | {cov} | {_cell(r, 'weight_tv', '.3f')} | "
                         f"{_cell(r, 'off_mode', '.3f')} | {_cell(r, 'sliced_w2', '.4f')} |" + extra)
    lines += ["", "| variant | iterations | student updates | critic updates | train s | of which critic steps s | "
              "forward calls student / fake / teacher (seed 0) | |grad DMD| / |grad sCM| at the end |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, row in result["rows"].items():
        if "cost" not in row:
            continue
        c, r0 = row["cost"], row["runs"][0]
        calls = " / ".join(str(r0["forward_calls"].get(k, 0)) for k in ("student", "fake", "teacher"))
        ratio = _cell(row, "dmd_over_scm", ".2e") if "dmd_over_scm" in row else "-"
        lines.append(f"| {label} | {int(c['iterations']['mean'])} | {int(c['student_updates']['mean'])} | "
                     f"{int(c['critic_updates']['mean'])} | {c['train_seconds']['mean']:.0f} | "
                     f"{c['critic_step_seconds']['mean']:.0f} | {calls} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

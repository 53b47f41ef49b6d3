"""LoRA vs full student on the CPU, same budget: the Gaussian-mixture test and the embedded task.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_lora_cpu.py              # -> bench/results/lora_cpu.json

Both tasks distil a NETWORK teacher (LoRA adapts the teacher's own network, so an analytic teacher has no
weights to adapt): every variant starts from the same teacher network, with the same seed, iterations,
batch and learning rates (``--lr-mult`` scales the LoRA variants' rates, default 1: the same budget).

* mixture: the teacher is ``MixtureStudentNet`` regressed onto the exact 8-mode mixture
  (``rcm_core.mixture.fit_mixture_student``, F parameterisation, float64). Full: student and fake score are
  copies of it; ``lora<R>``: rank-R adapters on its three hidden linear layers (``mlp.0``, ``mlp.2``,
  ``mlp.4``). Metrics of the EMA student at 1/2/4 steps against the true mixture (modes covered, weight TV,
  sliced W2; as bench/bench_mixture.py), mean over ``--seeds``.
* embedded: the shipped moving-digit video DiT. Full vs ``lora<R>`` (default targets: every linear layer of
  its blocks). Metrics of the EMA student at 1/2/4 steps from the same noise as the teacher's own sampler
  (Euler, ``--teacher-steps``, CFG): latent RMSE to the teacher's samples, and digit accuracy of the
  decoded clips (the pipeline's digit classifier) against the prompts' digits.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
D64 = torch.float64


def lora_rank(variant: str):
    return None if variant == "full" else int(variant[4:])


def mixture_task(a) -> dict:
    from rcm_core.config import DistillConfig
    from rcm_core.denoiser import Parameterization
    from rcm_core.mixture import GaussianMixtureTeacher, MixtureStudentNet, evaluate_samples, fit_mixture_student
    from rcm_core.sampling import sample_student
    from rcm_core.teachers import Teacher
    from rcm_core.trainer import RCMTrainer

    exact = GaussianMixtureTeacher()
    dim = exact.means.shape[1]
    torch.manual_seed(a.seed)
    net0 = MixtureStudentNet(dim).double()
    fit = fit_mixture_student(net0, exact, steps=a.fit_steps, seed=a.seed)
    teacher = Teacher(name="mixture-net", version="fit", net=net0, param=Parameterization("F", 1.0),
                      latent_shape=(dim,), guidance=1.0)
    ref = exact.sample_data(a.n_eval, torch.Generator().manual_seed(123))
    cond = torch.zeros(a.n_eval, 1, 1, dtype=D64)
    uncond = torch.zeros(1, 1, 1, dtype=D64)
    rows = {}
    for variant in a.variants.split(","):
        r = lora_rank(variant)
        runs = []
        for seed in [int(s) for s in a.seeds.split(",")]:
            lr = a.mixture_lr * (a.lr_mult if r else 1.0)
            cfg = DistillConfig.preset("embedded", method="rcm", guidance=1.0, dtype="float64", batch_size=a.batch,
                                       iterations=a.mixture_iters, lr_student=lr, lr_fake=lr, seed=seed,
                                       lora=None if r is None else {"rank": r,
                                                                    "target_modules": ["mlp.0", "mlp.2", "mlp.4"]})
            torch.manual_seed(seed)
            tr = RCMTrainer(teacher, cfg)
            gb = torch.Generator().manual_seed(seed + 1)
            bc = torch.zeros(cfg.batch_size, 1, 1, dtype=D64)
            t0 = time.perf_counter()
            for _ in range(cfg.iterations):
                tr.train_step({"latents": exact.sample_data(cfg.batch_size, gb), "cond": bc, "uncond": uncond})
            secs = time.perf_counter() - t0
            res = {}
            for steps in (1, 2, 4):
                g = torch.Generator().manual_seed(7)
                noise = torch.randn(a.n_eval, dim, generator=g, dtype=D64)
                x = sample_student(tr.ema_denoiser(), cond, noise, steps, cfg.sigma_max, cfg.mid_t, generator=g)
                e = evaluate_samples(x, exact, ref, projections=256, seed=5)
                res[str(steps)] = {k: e[k] for k in ("covered", "modes", "weight_tv", "sliced_w2")}
            runs.append({"seed": seed, "seconds": secs, "steps": res,
                         "trainable": sum(p.numel() for p in tr.student.parameters())})
            print(f"mixture {variant} seed {seed}: {secs:.1f} s, 1 step covered {res['1']['covered']}/8 "
                  f"tv {res['1']['weight_tv']:.3f} sw2 {res['1']['sliced_w2']:.4f}", flush=True)
        rows[variant] = {"runs": runs, "trainable": runs[0]["trainable"],
                         "steps": {k: {m: sum(float(r_["steps"][k][m]) for r_ in runs) / len(runs)
                                       for m in ("covered", "weight_tv", "sliced_w2")} for k in ("1", "2", "4")}}
    start = {}
    for steps in (1, 2, 4):                                 # the teacher network used as a few-step student
        from rcm_core.denoiser import TrigFlowDenoiser
        g = torch.Generator().manual_seed(7)
        noise = torch.randn(a.n_eval, dim, generator=g, dtype=D64)
        cfg = DistillConfig.preset("embedded")
        x = sample_student(TrigFlowDenoiser(net0, teacher.param), cond, noise, steps, cfg.sigma_max, cfg.mid_t,
                           generator=g)
        e = evaluate_samples(x, exact, ref, projections=256, seed=5)
        start[str(steps)] = {k: float(e[k]) for k in ("covered", "weight_tv", "sliced_w2")}
    rows["start (teacher net, no distillation)"] = {"steps": start, "trainable": 0}
    return {"fit_rel_error_F": fit, "iterations": a.mixture_iters, "batch": a.batch, "lr": a.mixture_lr,
            "rows": rows}


def embedded_task(a) -> dict:
    from rcm_core.config import DistillConfig
    from rcm_core.embedded.data import from_latent, make_clips, parse_prompt, to_latent
    from rcm_core.sampling import sample_student, sample_teacher
    from rcm_core.teachers import get_teacher
    from rcm_core.trainer import RCMTrainer
    sys.path.insert(0, str(ROOT / "steps"))
    from rcm_steps.digit_classifier import classify_clips

    teacher = get_teacher("embedded")
    clips, prompts, _ = make_clips(a.emb_data, seed=0)
    lat = to_latent(clips).double()
    with torch.no_grad():
        cond_all = teacher.encode_text(prompts)
        uncond = teacher.negative_embedding()[None] if teacher.negative_embedding().dim() == 2 else \
            teacher.negative_embedding()
    from rcm_core.embedded.data import embedded_prompts
    eval_prompts = embedded_prompts()[:: max(1, 80 // a.emb_eval)]
    with torch.no_grad():
        ec = teacher.encode_text(eval_prompts)
    g = torch.Generator().manual_seed(11)
    noise = torch.randn((len(eval_prompts), *teacher.latent_shape), generator=g, dtype=D64)
    t0 = time.perf_counter()
    with torch.no_grad():
        x_t = sample_teacher(teacher.denoiser(), ec, uncond, noise, guidance=teacher.guidance, shift=teacher.shift,
                             steps=a.teacher_steps, solver="euler")
    digits = [parse_prompt(p)[0] for p in eval_prompts]

    def acc(x):
        pred, _ = classify_clips(from_latent(x.float()))
        return float(sum(int(p) == d for p, d in zip(pred, digits)) / len(digits))
    rows = {f"teacher Euler {a.teacher_steps} steps": {"digit_acc": acc(x_t), "seconds": time.perf_counter() - t0}}
    print(f"embedded teacher: digit acc {rows[f'teacher Euler {a.teacher_steps} steps']['digit_acc']:.3f}", flush=True)
    for variant in a.variants_embedded.split(","):
        r = lora_rank(variant)
        lr_mult = a.lr_mult if r else 1.0
        cfg = DistillConfig.preset("embedded", iterations=a.emb_iters, batch_size=a.emb_batch,
                                   tangent_warmup_steps=min(20, a.emb_iters), lr_warmup_steps=min(10, a.emb_iters),
                                   lr_student=1e-4 * lr_mult, lr_fake=1e-4 * lr_mult, seed=0,
                                   lora=None if r is None else {"rank": r})
        torch.manual_seed(0)
        tr = RCMTrainer(teacher, cfg)
        gb = torch.Generator().manual_seed(1)
        t0 = time.perf_counter()
        for _ in range(cfg.iterations):
            idx = torch.randint(0, lat.shape[0], (cfg.batch_size,), generator=gb)
            tr.train_step({"latents": lat[idx], "cond": cond_all[idx], "uncond": uncond})
        secs = time.perf_counter() - t0
        res = {}
        for steps in (1, 2, 4):
            gs = torch.Generator().manual_seed(11)
            x = sample_student(tr.ema_denoiser(), ec, noise, steps, cfg.sigma_max, cfg.mid_t, generator=gs)
            rmse = float(((x - x_t) ** 2).mean().sqrt() / (x_t ** 2).mean().sqrt())
            res[str(steps)] = {"rel_rmse_teacher": rmse, "digit_acc": acc(x)}
        rows[variant] = {"seconds": secs, "steps": res, "trainable": sum(p.numel() for p in tr.student.parameters())}
        print(f"embedded {variant}: {secs:.1f} s, " + ", ".join(
            f"{k} step rmse {v['rel_rmse_teacher']:.3f} acc {v['digit_acc']:.2f}" for k, v in res.items()), flush=True)
    return {"iterations": a.emb_iters, "batch": a.emb_batch, "eval_prompts": len(eval_prompts), "rows": rows}


def markdown(result: dict) -> str:
    out = []
    if "mixture" in result:
        m = result["mixture"]
        out += [f"Gaussian mixture (8 modes), {m['iterations']} iterations, batch {m['batch']}, lr {m['lr']}, "
                f"mean over seeds {result['settings']['seeds']}",
                "| student | trainable params | steps | modes covered | weight TV | sliced W2 |",
                "|---|---:|---:|---:|---:|---:|"]
        for name, row in m["rows"].items():
            for k, v in row["steps"].items():
                out.append(f"| {name} | {row['trainable']} | {k} | {v['covered']:.2f}/8 | {v['weight_tv']:.3f} | "
                           f"{v['sliced_w2']:.4f} |")
        out.append("")
    if "embedded" in result:
        e = result["embedded"]
        out += [f"Embedded moving-digit DiT, {e['iterations']} iterations, batch {e['batch']}, "
                f"{e['eval_prompts']} evaluation prompts",
                "| student | trainable params | steps | latent RMSE to teacher (rel.) | digit accuracy | train s |",
                "|---|---:|---:|---:|---:|---:|"]
        for name, row in e["rows"].items():
            if "steps" not in row:
                out.append(f"| {name} | - | - | 0 | {row['digit_acc']:.3f} | - |")
                continue
            for k, v in row["steps"].items():
                out.append(f"| {name} | {row['trainable']} | {k} | {v['rel_rmse_teacher']:.3f} | {v['digit_acc']:.3f} | "
                           f"{row['seconds']:.0f} |")
    return "\n".join(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="mixture,embedded")
    p.add_argument("--variants", default="full,lora4,lora16", help="mixture: full and/or lora<rank> (rank <= 19)")
    p.add_argument("--variants-embedded", default="full,lora8,lora32")
    p.add_argument("--lr-mult", type=float, default=1.0, help="learning-rate factor of the LoRA variants")
    p.add_argument("--mixture-iters", type=int, default=1500)
    p.add_argument("--mixture-lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--fit-steps", type=int, default=1500)
    p.add_argument("--n-eval", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--emb-iters", type=int, default=120)
    p.add_argument("--emb-batch", type=int, default=16)
    p.add_argument("--emb-data", type=int, default=512)
    p.add_argument("--emb-eval", type=int, default=40)
    p.add_argument("--teacher-steps", type=int, default=30)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "lora_cpu.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version(),
              "threads": torch.get_num_threads(), "settings": vars(a)}
    tasks = a.tasks.split(",")
    if "mixture" in tasks:
        result["mixture"] = mixture_task(a)
    if "embedded" in tasks:
        result["embedded"] = embedded_task(a)
    result["total_seconds"] = time.perf_counter() - t0
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"total {result['total_seconds']:.0f} s -> {a.json}")
    return result


if __name__ == "__main__":
    main()

"""The FP8 teacher option's error where it enters training (issue 22, item 5): the sCM target g and the DMD
gradient direction with the teacher's blocks in FP8 (DistillConfig.teacher_fp8) against the bf16 teacher, on the
same inputs (same x_t, t, student, rollout and x_D).

    python bench/fp8_teacher_error.py [--teacher wan2.1-1.3b] [--samples 4] [--out bench/results/fp8_teacher_error.json]
    RCM_FP8_EMULATE=1 python bench/fp8_teacher_error.py --tiny      # CPU check of the script

Rows: relative L2 (||a - b|| / ||b||, per sample, then mean and max) of the teacher's CFG velocity F_T, the sCM
target g (tangent from the student's JVP with each F_T, normalised as in training), the teacher's CFG x0 at x_D
and the DMD direction (x0_fake - x0_real) / w. The FP8 option may become a default only if these are within
the noise of training (issue 22): this script gives the first half of that evidence; the quality benchmark
(bench/bench_quality.py with teacher_fp8) the second.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rel(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    a, b = a.double().flatten(1), b.double().flatten(1)
    return ((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).tolist()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    from bench_real import size_args
    size_args(ap)
    ap.add_argument("--samples", type=int, default=4, help="noise levels / samples, one at a time")
    ap.add_argument("--critic-steps", type=int, default=8,
                    help="critic updates before measuring: at init the fake score IS the teacher, the DMD direction "
                         "is ~0 and any error is 100%% of it; a few updates give it the size it has in training")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="bench/results/fp8_teacher_error.json")
    a = ap.parse_args(argv)

    from bench_real import build_teacher
    from rcm_core.config import DistillConfig
    from rcm_core.method.losses import dmd_direction, normalize_tangent, scm_target, t_lognormal
    from rcm_core.method.rng import SampleRNG
    from rcm_core.method.trigflow import noisy_sample
    from rcm_core.nets.denoiser import guided
    from rcm_core.nets.fp8 import check_fp8_device, quantize_fp8
    from rcm_core.trainer import RCMTrainer

    dev = torch.device("cpu" if a.tiny else "cuda")
    check_fp8_device(dev)
    if a.tiny:
        a.frames, a.height, a.width = 5, 64, 64
    teacher, text_dim = build_teacher(a.teacher, a.frames, a.height, a.width, dev, a.tiny)
    cfg = DistillConfig.preset(teacher.preset, method="rcm", batch_size=1, dtype="bfloat16", tangent_warmup_steps=0,
                               activation_checkpointing="full", fused_tangent=False)
    tr = RCMTrainer(teacher, cfg, device=dev)
    fp8 = copy.deepcopy(tr.teacher)
    n_fp8 = quantize_fp8(fp8.net)
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (1, *teacher.latent_shape)
    cond = torch.randn((1, 512, text_dim), generator=g, device=dev)
    uncond = torch.randn((1, 512, text_dim), generator=g, device=dev)
    rows = {k: [] for k in ("F_T", "g", "x0_real", "dmd_direction")}
    sizes = []
    c = tr.cfg
    data = torch.randn(shape, generator=g, device=dev, dtype=torch.float64)
    for k in range(a.critic_steps):              # odd steps are the critic's (student_update_freq 2)
        tr.step = 2 * k + 1
        tr.critic_step(data, cond, uncond)
    for i in range(a.samples):
        rng = SampleRNG(c.seed, i, [0], device=dev)
        x0 = torch.randn(shape, generator=g, device=dev, dtype=torch.float64)
        t = t_lognormal(rng.randn(), c.P_mean, c.P_std)
        x_t = noisy_sample(x0, rng.randn(shape[1:]), t)
        gs = {}
        for name, te in (("bf16", tr.teacher), ("fp8", fp8)):
            with torch.no_grad(), tr._amp():
                F_T = guided(te, x_t, t, cond, uncond, tr.guidance)
            F_minus, J = tr.tangent(x_t, t, F_T, cond)
            gs[name] = (F_T, normalize_tangent(scm_target(F_minus, F_T, J, x_t, t, 1.0), c.tangent_norm_c))
        rows["F_T"] += rel(gs["fp8"][0], gs["bf16"][0])
        rows["g"] += rel(gs["fp8"][1], gs["bf16"][1])
        with torch.no_grad(), tr._amp():
            G, _ = tr.rollout(cond, shape[1:], keep_graph=False, rng=rng, n=1)
            t_D = tr.sample_t_D(rng)
            x_D = noisy_sample(G, rng.randn(shape[1:]), t_D)
            x0_fake = tr.fake.x0(x_D, t_D, cond)
            real = {name: guided(te, x_D, t_D, cond, uncond, tr.guidance, want="x0")
                    for name, te in (("bf16", tr.teacher), ("fp8", fp8))}
        rows["x0_real"] += rel(real["fp8"], real["bf16"])
        d_bf16 = dmd_direction(G, x0_fake, real["bf16"])
        rows["dmd_direction"] += rel(dmd_direction(G, x0_fake, real["fp8"]), d_bf16)
        sizes += rel(x0_fake, real["bf16"])          # how far the fake score is from the teacher here
    out = {"teacher": a.teacher, "tokens": None, "samples": a.samples, "fp8_layers": n_fp8,
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (emulated FP8)",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "critic_steps": a.critic_steps, "fake_vs_teacher_x0_rel": sizes,
           "rel_l2": {k: {"mean": sum(v) / len(v), "max": max(v), "all": v} for k, v in rows.items()}}
    print(f"FP8 teacher ({n_fp8} linears) vs bf16, {a.samples} samples, after {a.critic_steps} critic updates "
          f"(fake vs teacher x0: {sum(sizes) / len(sizes):.4f} relative), relative L2:")
    for k, v in out["rel_l2"].items():
        print(f"  {k:14s} mean {v['mean']:.4f}  max {v['max']:.4f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()

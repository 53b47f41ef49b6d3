"""Wan2.2 A14B: distil a two-expert teacher into ONE network or TWO (switched at the same boundary), on the CPU.

The teacher is A14B-shaped but tiny: two Wan experts of one architecture (``tests/real_fixtures.tiny_expert_pair``:
the low-noise expert is the high-noise one with every weight perturbed by ``--delta`` relative), switched at
boundary 0.875 (TrigFlow t_b = arctan 7) exactly as WanPipeline switches, CFG 4.0 (high) / 3.0 (low), shift 12.
Its data are its own samples (Euler, ``--teacher-steps`` steps, CFG), as the pipeline's cache holds.

Students, all with the same seed, data, iterations and DistillConfig (the ``wan2.2-t2v-a14b`` preset with CPU
sizes), evaluated on their EMA networks at 1, 2 and 4 steps against the teacher's multi-step samples from the
same noise (held-out noise and prompts): latent RMSE relative to the teacher samples' RMS.

* ``two``: student and fake score are copies of the two-expert teacher (``TimestepExperts``)
* ``one-low`` / ``one-high``: student and fake score are one network, initialised from the low- / high-noise expert

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_wan22_moe.py          # -> bench/results/wan22_moe.json
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--delta", type=float, nargs="+", default=[0.3])
    ap.add_argument("--variants", nargs="+", default=["two", "one-low", "one-high"])
    ap.add_argument("--teacher-steps", type=int, default=24)
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-gain", type=float, default=4.0)
    ap.add_argument("--draws", type=int, default=8, help="noise draws per held-out prompt (distribution metric)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "wan22_moe.json"))
    a = ap.parse_args(argv)

    import diffusers
    from real_fixtures import TEXT_DIM, tiny_expert_pair

    from rcm_core.config import DistillConfig
    from rcm_core.denoiser import Parameterization, TimestepExperts
    from rcm_core.real.loading import diffusers_rf_call
    from rcm_core.real.attention import install_rcm_attention
    from rcm_core.sampling import sample_student, sample_teacher
    from rcm_core.teachers import Teacher
    from rcm_core.trainer import RCMTrainer

    torch.manual_seed(a.seed)
    shape = (4, 3, 4, 4)
    rows = []
    for delta in a.delta:
        high, low = tiny_expert_pair(delta=delta)
        for n in (high, low):
            install_rcm_attention(n)
            with torch.no_grad():          # a velocity of unit scale: the teacher transports noise along curved paths
                n.proj_out.weight.mul_(a.out_gain)
                n.proj_out.bias.mul_(a.out_gain)
        moe = TimestepExperts(high, low, boundary_timestep=875.0, expert_guidance=(4.0, 3.0)).eval()
        teacher = Teacher(name="tiny-a14b", version=f"delta{delta}", net=moe, param=Parameterization("rf", 1000.0),
                          latent_shape=shape, call=diffusers_rf_call, guidance=4.0, shift=12.0)
        g = torch.Generator().manual_seed(1)
        prompts = torch.randn(a.n_train + a.n_eval, 8, TEXT_DIM, generator=g)
        uncond = torch.zeros(1, 8, TEXT_DIM)
        noise = torch.randn(a.n_train + a.n_eval, *shape, generator=g, dtype=torch.float64)
        t0 = time.perf_counter()
        with torch.no_grad():
            data = sample_teacher(teacher.denoiser(), prompts, uncond, noise, guidance=4.0, shift=12.0,
                                  steps=a.teacher_steps, solver="euler").float()
        t_teacher = time.perf_counter() - t0
        scale = float(data.pow(2).mean().sqrt())
        # held-out prompts, `draws` noises each: the teacher's samples of each prompt's distribution
        ev_c = prompts[a.n_train:].repeat_interleave(a.draws, 0)
        ev_noise = torch.randn(ev_c.shape[0], *shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            ev_x = sample_teacher(teacher.denoiser(), ev_c, uncond, ev_noise, guidance=4.0, shift=12.0,
                                  steps=a.teacher_steps, solver="euler").float()
        ev_m = ev_x.view(a.n_eval, a.draws, -1)

        def dist(x):
            """Per prompt: relative error of the sample mean and of the per-element std over the draws."""
            m = x.float().view(a.n_eval, a.draws, -1)
            sd_t = ev_m.std(1)
            e_mean = ((m.mean(1) - ev_m.mean(1)).norm(dim=1) / sd_t.norm(dim=1)).mean()
            e_std = ((m.std(1) - sd_t).norm(dim=1) / sd_t.norm(dim=1)).mean()
            return float(e_mean), float(e_std)

        for variant in a.variants:
            cfg = DistillConfig.preset("wan2.2-t2v-a14b", dtype="float32", batch_size=a.batch,
                                       iterations=a.iterations, tangent_warmup_steps=a.iterations // 6,
                                       student_update_freq=2, lr_student=3e-4, lr_fake=3e-4, lr_warmup_steps=min(10, a.iterations),
                                       fsdp=False, activation_checkpointing="none", seed=a.seed)
            kw = {}
            if variant != "two":
                expert = low if variant == "one-low" else high
                kw = dict(student_net=copy.deepcopy(expert), fake_net=copy.deepcopy(expert))
            tr = RCMTrainer(teacher, cfg, **kw)
            n_params = sum(p.numel() for p in tr.student.parameters())

            def evaluate(den):
                out = {}
                for steps in (1, 2, 4):
                    x = sample_student(den, ev_c, ev_noise, steps=steps, sigma_max=cfg.sigma_max, mid_t=cfg.mid_t,
                                       generator=torch.Generator().manual_seed(7))
                    same = float((x.float() - ev_x).pow(2).mean().sqrt()) / scale   # same noise as the teacher
                    out[steps] = (same, *dist(x))
                return out

            init = evaluate(tr.ema_denoiser())
            gb = torch.Generator().manual_seed(a.seed + 3)
            t0 = time.perf_counter()
            for it in range(a.iterations):
                idx = torch.randint(0, a.n_train, (a.batch,), generator=gb)
                tr.train_step(dict(latents=data[idx], cond=prompts[idx], uncond=uncond))
            dt = time.perf_counter() - t0
            fin = evaluate(tr.ema_denoiser())
            row = dict(delta=delta, variant=variant, student_params=n_params, iterations=a.iterations,
                       sec_per_iter=dt / a.iterations, init={str(k): v for k, v in init.items()},
                       final={str(k): v for k, v in fin.items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, diffusers=diffusers.__version__,
                python=platform.python_version(), machine=platform.machine(), args=vars(a),
                teacher_sampling_sec=t_teacher, command="OMP_NUM_THREADS=1 .venv/bin/python bench/bench_wan22_moe.py "
                + " ".join(argv or sys.argv[1:]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    print("| delta | student | params | same-noise RMSE 1 / 2 / 4 steps | mean err 1 / 2 / 4 | std err 1 / 2 / 4 "
          "| at init (same-noise 1 / 4; mean err 4) | s/iter |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, i = r["final"], r["init"]
        cell = lambda d, j: " / ".join(f"{d[k][j]:.3f}" for k in ("1", "2", "4"))  # noqa: E731
        print(f"| {r['delta']} | {r['variant']} | {r['student_params']} | {cell(f, 0)} | {cell(f, 1)} | {cell(f, 2)} "
              f"| {i['1'][0]:.3f} / {i['4'][0]:.3f}; {i['4'][1]:.3f} | {r['sec_per_iter']:.3f} |")

if __name__ == "__main__":
    main()

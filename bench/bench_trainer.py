"""Trainer and sampling speed on the embedded teacher (CPU now; CUDA when available).

    python bench/bench_trainer.py [--batch 16] [--repeats 5] [--device cpu] [--out bench/results/trainer.json]

Times (median of repeats, after a warm-up): a plain fwd+bwd training step of the DiT
(the baseline), the sCM student step, the rCM student step (sCM + DMD), the critic step;
sampling: the 4-step student vs the teacher's 50-step x 2 (CFG) Euler sampler. Prints a
table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def _timeit(fn, repeats: int, sync) -> float:
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="bench/results/trainer.json")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from rcm_core.config import DistillConfig
    from rcm_core.sampling import sample_student, sample_teacher
    from rcm_core.teachers import get_teacher
    from rcm_core.trainer import RCMTrainer
    from rcm_core.embedded.data import embedded_prompts

    dev = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    teacher = get_teacher("embedded")
    teacher.net.to(dev)
    prompts = [embedded_prompts()[i % 80] for i in range(a.batch)]
    cond = teacher.encode_text(prompts).to(dev)
    uncond = teacher.negative_embedding().to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    latents = torch.randn((a.batch, *teacher.latent_shape), generator=g, device=dev)

    cfg = DistillConfig.preset("embedded", batch_size=a.batch, tangent_warmup_steps=0, student_update_freq=2)
    trainer = RCMTrainer(teacher, cfg, device=dev)
    scm = RCMTrainer(teacher, cfg.replace(method="scm"), device=dev)
    x0, c, u = latents.double(), cond, uncond

    # baseline: one plain denoising fwd+bwd step of the same network (RF loss)
    net = trainer.student.net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)

    def plain_step():
        s = torch.rand(a.batch, device=dev, generator=g)
        eps = torch.randn_like(latents)
        x_s = (1 - s.view(-1, 1, 1, 1, 1)) * latents + s.view(-1, 1, 1, 1, 1) * eps
        loss = ((net(x_s, 1000 * s, cond) - (eps - latents)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def fix_step(tr, step):
        def run():
            tr.step = step
            (tr.student_step if tr.is_student_step() else tr.critic_step)(x0, c, u)
        return run

    rows = {}
    rows["plain fwd+bwd step"] = _timeit(plain_step, a.repeats, sync)
    rows["sCM student step"] = _timeit(fix_step(scm, 10), a.repeats, sync)
    rows["rCM student step (sCM+DMD)"] = _timeit(fix_step(trainer, 10), a.repeats, sync)
    rows["critic step"] = _timeit(fix_step(trainer, 11), a.repeats, sync)
    noise = torch.randn((a.batch, *teacher.latent_shape), generator=g, device=dev, dtype=torch.float64)
    rows["student 4-step sampling"] = _timeit(lambda: sample_student(trainer.ema_denoiser(), cond, noise, 4), a.repeats, sync)
    rows["teacher 50x2 NFE sampling"] = _timeit(
        lambda: sample_teacher(trainer.teacher, cond, uncond, noise, steps=50, guidance=teacher.guidance,
                               shift=teacher.shift), max(1, a.repeats // 2), sync)
    base = rows["plain fwd+bwd step"]
    ratios = {k: v / base for k, v in rows.items() if "step" in k}
    ratios["sampling speed-up (teacher / student 4-step)"] = rows["teacher 50x2 NFE sampling"] / rows["student 4-step sampling"]
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "batch": a.batch, "latent_shape": list(teacher.latent_shape),
        "seconds": rows, "ratios": ratios, "date": time.strftime("%Y-%m-%d"),
    }
    print(f"embedded teacher, batch {a.batch}, latents {tuple(teacher.latent_shape)}, {result['device']}, torch {torch.__version__}")
    print(f"{'what':40s} {'ms':>10s} {'x plain step':>13s}")
    for k, v in rows.items():
        print(f"{k:40s} {v * 1e3:10.1f} {ratios.get(k, float('nan')):13.2f}")
    print(f"sampling speed-up (teacher 100 NFE / student 4 NFE): {ratios['sampling speed-up (teacher / student 4-step)']:.1f}x")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

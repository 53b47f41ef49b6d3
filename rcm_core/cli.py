"""Distil a teacher from the command line, without the pipeline (no services).

    python -m rcm_core.cli --teacher embedded --method rcm --iterations 400 --out runs/cli

Synthesises training latents with the teacher's CFG sampler (as the official
release trains on teacher-generated data), distils with :class:`RCMTrainer`,
writes the checkpoint, the EMA student (safetensors), metrics (JSON) and a
sample grid (teacher vs student at 1, 2, 4 steps).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .method.config import DistillConfig
from .method.sampling import sample_teacher
from .teachers import get_teacher, known_teachers
from .trainer import RCMTrainer


@torch.no_grad()
def synthesize_latents(teacher, cond, uncond, seed: int, steps: int, batch: int = 64, progress: bool = True):
    """Teacher samples (CFG, its own sampler) for each row of ``cond``."""
    den = teacher.denoiser()
    g = torch.Generator().manual_seed(seed)
    out = []
    chunks = range(0, cond.shape[0], batch)
    for i in tqdm(chunks, desc="teacher latents", disable=not progress):
        c = cond[i:i + batch]
        noise = torch.randn((c.shape[0], *teacher.latent_shape), generator=g, dtype=torch.float64)
        out.append(sample_teacher(den, c, uncond, noise, steps=steps, guidance=teacher.guidance,
                                  shift=teacher.shift, solver=teacher.solver).float())
    return torch.cat(out)


def distill_main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="embedded", help=f"one of {known_teachers()}")
    ap.add_argument("--method", default="rcm", choices=["rcm", "scm", "dmd", "dcm"])
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--num-latents", type=int, default=256, help="teacher samples to distil on")
    ap.add_argument("--teacher-steps", type=int, default=None, help="teacher sampler steps (default: teacher's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--out", default="runs/cli")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="DistillConfig overrides")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    teacher = get_teacher(a.teacher)
    overrides = {"method": a.method, "seed": a.seed}
    if a.iterations is not None:
        overrides["iterations"] = a.iterations
    if a.batch_size is not None:
        overrides["batch_size"] = a.batch_size
    for kv in a.set:
        k, _, v = kv.partition("=")
        overrides[k] = json.loads(v) if v[:1] in "[{0123456789-.tfn" else v
    cfg = DistillConfig.preset(teacher.preset, **overrides)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    from .teachers.embedded.data import embedded_prompts
    prompts = embedded_prompts() if teacher.name == "embedded" else [teacher.negative_prompt]
    prompts = [prompts[i % len(prompts)] for i in range(a.num_latents)]
    cond_all = teacher.encode_text(prompts)
    uncond = teacher.negative_embedding()
    t0 = time.perf_counter()
    latents = synthesize_latents(teacher, cond_all, uncond, a.seed, a.teacher_steps or teacher.sample_steps)
    t_cache = time.perf_counter() - t0

    trainer = RCMTrainer(teacher, cfg)
    g = torch.Generator().manual_seed(a.seed + 7)
    history = []
    bar = tqdm(range(cfg.iterations), desc=f"distill {cfg.method}")
    t0 = time.perf_counter()
    for _ in bar:
        idx = torch.randint(0, latents.shape[0], (cfg.batch_size,), generator=g)
        m = trainer.train_step({"latents": latents[idx], "cond": cond_all[idx], "uncond": uncond})
        history.append(m)
        bar.set_postfix(loss=f"{m['loss']:.3g}", kind=m["kind"][0])
    t_train = time.perf_counter() - t0
    trainer.save_checkpoint(str(out / "checkpoint.pt"))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in trainer.student_ema.state_dict().items()}, str(out / "student_ema.safetensors"))

    summary = {"teacher": teacher.name, "teacher_version": teacher.version, "config": cfg.to_dict(),
               "teacher_cache_s": t_cache, "train_s": t_train, "steps": trainer.step,
               "final": {k: v for k, v in history[-1].items()}}
    if teacher.name == "embedded":
        summary["grid"] = str(save_comparison_grid(teacher, trainer, out / "samples.png", seed=a.seed))
    (out / "metrics.json").write_text(json.dumps({"summary": summary, "history": history}, indent=1, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1, default=str))
    return summary


@torch.no_grad()
def save_comparison_grid(teacher, trainer, path, seed=0, n_prompts=6):
    """Rows: prompts; strips: teacher (its sampler), student 1, 2, 4 steps (same prompt)."""
    from .teachers.embedded.data import embedded_prompts
    from .teachers.embedded.preview import save_grid
    prompts = embedded_prompts()[::max(1, len(embedded_prompts()) // n_prompts)][:n_prompts]
    cond = teacher.encode_text(prompts)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *teacher.latent_shape), generator=g, dtype=torch.float64)
    rows = [teacher.decode(sample_teacher(teacher.denoiser(), cond, teacher.negative_embedding(), noise,
                                          steps=teacher.sample_steps, guidance=teacher.guidance, shift=teacher.shift))]
    titles = [f"teacher: {p}" for p in prompts]
    for steps in (1, 2, 4):
        rows.append(teacher.decode(trainer.generate(cond, steps=steps, seed=seed)))
        titles += [f"student {steps}-step: {p}" for p in prompts]
    clips = torch.cat(rows).float()
    order = [r * len(prompts) + i for i in range(len(prompts)) for r in range(4)]
    return save_grid(clips[order], path, ncol=4, titles=[titles[o] for o in order])


if __name__ == "__main__":
    distill_main()

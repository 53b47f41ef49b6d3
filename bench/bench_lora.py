"""LoRA vs full fine-tuning on one GPU: peak memory and rCM step time (student step + critic step).

    python bench/bench_lora.py                                   # Wan2.1-1.3B, 480p x 81 (latent 16x21x60x104)
    python bench/bench_lora.py --arch wan2.1-14b --configs lora64,lora128,full --iters 1 --json bench/results/lora_14b.json
    python bench/bench_lora.py --tiny                            # a tiny config on the CPU (checks the script)

Random weights (the diffusers ``WanTransformer3DModel`` built from the registered config, as
``bench/bench_real.py`` builds it: bf16 weights with diffusers' fp32 modules, the project attention and FP32
time embedding), bf16 autocast, full activation checkpointing, batch 1, one GPU, no FSDP. Configurations
(``--configs``): ``full`` (student and fake score are fp32 copies of the teacher, each with AdamW, plus the
EMA: today's default) and ``lora<R>`` (``DistillConfig.lora`` rank R, alpha R, default targets: every
linear layer of the transformer blocks; one bf16 base shared by teacher, student and fake score).

For each configuration: the trainer is built (the teacher network is made on the CPU so that the GPU holds
only the trainer's copy), one student step (sCM with the fused tangent + DMD through a rollout of
``--rollout`` steps) and one critic step are run as warm-up, then ``--iters`` of each are timed (medians).
Peak memory is ``torch.cuda.max_memory_allocated`` from before the trainer is built to the end (weights,
AdamW states, EMA, activations), reset between configurations. A configuration that runs out of memory is
reported as "does not fit" (the row keeps the phase it failed in); memory is freed before the next one.
The table is printed and the JSON written after every configuration.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30


def parse_configs(s: str) -> list[tuple[str, int | None]]:
    """'full,lora64,lora128' -> [('full', None), ('lora64', 64), ('lora128', 128)]."""
    out = []
    for c in filter(None, (x.strip() for x in s.split(","))):
        if c == "full":
            out.append((c, None))
        elif c.startswith("lora") and c[4:].isdigit() and int(c[4:]) > 0:
            out.append((c, int(c[4:])))
        else:
            raise ValueError(f"--configs: {c!r}; use full or lora<rank>, e.g. full,lora64,lora128")
    return out


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Wan2.1 VAE: 4x temporal (first frame alone), 8x spatial compression, 16 channels."""
    return 16, (frames - 1) // 4 + 1, height // 8, width // 8


def trainable_params(tr) -> dict:
    n_s = sum(p.numel() for p in tr.student.parameters())
    n_f = sum(p.numel() for p in tr.fake.parameters()) if tr.fake is not None else 0
    return {"student_trainable": n_s, "fake_trainable": n_f}


def distill_config(preset: str, rank: int | None, rollout: int):
    from rcm_core.config import DistillConfig
    lora = None if rank is None else {"rank": rank, "alpha": float(rank)}
    return DistillConfig.preset(preset, method="rcm", dtype="bfloat16", activation_checkpointing="full", fsdp=False,
                                batch_size=1, tangent_warmup_steps=0, lr_warmup_steps=0, student_update_freq=2,
                                rollout_max_steps=rollout, lora=lora)


def median_time(fn, iters: int, sync) -> tuple[float, list[float]]:
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def run_config(name: str, rank, teacher, x0, cond, uncond, a, dev) -> dict:
    """One configuration; never raises (an error or OOM is recorded in the row)."""
    from rcm_core.trainer import RCMTrainer
    row = {"config": name, "lora_rank": rank, "phase": "build"}
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    tr = None
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        t0 = time.perf_counter()
        tr = RCMTrainer(teacher, distill_config(teacher.preset, rank, a.rollout), device=dev)
        sync()
        row["build_s"] = time.perf_counter() - t0
        row.update(trainable_params(tr))
        if dev.type == "cuda":
            row["after_build_gib"] = torch.cuda.memory_allocated(dev) / GiB
        # student step: step 0 (H = 0, K = 2: student, rollout n = 1 + own count mod N_max); critic: step 1
        student = lambda: tr.student_step(x0, cond, uncond)
        critic = lambda: tr.critic_step(x0, cond, uncond)

        def at(step, fn):
            def go():
                tr.step = step
                return fn()
            return go
        assert tr.is_student_step(0) and not tr.is_student_step(1)
        row["phase"] = "warm-up student step"
        t0 = time.perf_counter()
        m = at(0, student)()
        sync()
        row["student_first_s"] = time.perf_counter() - t0
        row["phase"] = "warm-up critic step"
        t0 = time.perf_counter()
        at(1, critic)()
        sync()
        row["critic_first_s"] = time.perf_counter() - t0
        row["phase"] = "timed steps"
        if a.iters > 0:
            row["student_s"], row["student_all_s"] = median_time(at(0, student), a.iters, sync)
            row["critic_s"], row["critic_all_s"] = median_time(at(1, critic), a.iters, sync)
        else:   # --iters 0 (the largest architectures): the first steps, Triton autotuning included
            row["student_s"], row["critic_s"], row["timed"] = row["student_first_s"], row["critic_first_s"], "first step"

        row["rcm_step_s"] = row["student_s"] + row["critic_s"]
        row["loss_finite"] = bool(m["loss"] == m["loss"])
        row["phase"] = "done"
        row["fits"] = True
    except torch.OutOfMemoryError as e:
        row["fits"] = False
        row["error"] = "does not fit (out of memory in " + row["phase"] + "): " + str(e).split("\n")[0][:200]
    except Exception as e:  # noqa: BLE001 - recorded, the next configuration still runs
        row["fits"] = None
        row["error"] = f"{type(e).__name__} in {row['phase']}: {str(e)[:300]}"
        row["traceback"] = traceback.format_exc()[-2000:]
    if dev.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(dev) / GiB
    del tr
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def table(result: dict) -> str:
    lines = [f"{result['arch']} ({result['params'] / 1e9:.2f}B), latent {tuple(result['latent_shape'])}, "
             f"{result['tokens']} tokens, {result['device']}, bf16 autocast, full AC, batch 1",
             "| config | trainable (student + fake) | peak GiB | student step s | critic step s | rCM step s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        tp = r.get("student_trainable", 0) + r.get("fake_trainable", 0)
        tp = f"{tp / 1e6:.3g} M" if tp else "-"
        pk = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        if r.get("fits"):
            lines.append(f"| {r['config']} | {tp} | {pk} | {r['student_s']:.3f} | {r['critic_s']:.3f} | "
                         f"{r['rcm_step_s']:.3f} |")
        else:
            lines.append(f"| {r['config']} | {tp} | {pk} (at failure) | {r.get('error', '')[:70]} | | |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="wan2.1-1.3b", help="registered architecture (rcm_core.real.SPECS), e.g. "
                                                          "wan2.1-1.3b, wan2.1-14b")
    ap.add_argument("--configs", default="full,lora64,lora128", help="full and/or lora<rank>")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--iters", type=int, default=3, help="timed student and critic steps (after one warm-up each; 0: report the warm-up steps, autotuning included)")
    ap.add_argument("--rollout", type=int, default=1, help="rollout steps of the student/critic (N_max; 1-4)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "lora.json"))
    ap.add_argument("--tiny", action="store_true", help="a tiny Wan config on the CPU (checks the script)")
    ap.add_argument("--label", default="")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_real import build_teacher

    configs = parse_configs(a.configs)
    dev = torch.device("cpu" if a.tiny else "cuda")
    if a.tiny:
        a.frames, a.height, a.width, a.text_len, a.iters = 5, 32, 32, 8, 1
        configs = [(n, None if r is None else min(r, 4)) for n, r in configs]
    # the teacher's own network stays on the CPU: the trainer copies it to the GPU once
    t0 = time.perf_counter()
    teacher, text_dim = build_teacher(a.arch, a.frames, a.height, a.width, torch.device("cpu"), a.tiny)
    build_s = time.perf_counter() - t0
    C, T, H, W = teacher.latent_shape
    assert tuple(teacher.latent_shape) == latent_shape(a.frames, a.height, a.width)
    n_params = sum(p.numel() for p in teacher.net.parameters())
    result = {"arch": a.arch, "params": n_params, "latent_shape": [C, T, H, W], "tokens": T * (H // 2) * (W // 2),
              "pixels": [a.frames, a.height, a.width], "text_len": a.text_len, "batch": 1,
              "dtype": "bfloat16 autocast; bf16 base; fp32 trainable weights (full: student/fake copies; lora: adapters)",
              "activation_checkpointing": "full", "rollout": a.rollout, "iters": a.iters,
              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "gpu_total_gib": torch.cuda.get_device_properties(dev).total_memory / GiB if dev.type == "cuda" else None,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "label": a.label,
              "teacher_build_s": build_s, "rows": []}
    print(f"{a.arch}: {n_params / 1e9:.2f}B params (random), latent {(C, T, H, W)}, {result['tokens']} tokens, "
          f"{result['device']}, torch {torch.__version__}", flush=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((1, C, T, H, W), generator=g, dtype=torch.float64).to(dev)
    cond = torch.randn((1, a.text_len, text_dim), generator=g).to(dev)
    uncond = torch.randn((1, a.text_len, text_dim), generator=g).to(dev)
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, rank in configs:
        row = run_config(name, rank, teacher, x0, cond, uncond, a, dev)
        result["rows"].append(row)
        msg = (f"student {row['student_s']:.3f} s, critic {row['critic_s']:.3f} s" if row.get("fits")
               else row.get("error", ""))
        print(f"{name:10s} peak {row.get('peak_gib', float('nan')):7.2f} GiB  {msg}", flush=True)
        out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"-> {out}")
    return result


if __name__ == "__main__":
    main()

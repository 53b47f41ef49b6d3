"""Multi-GPU throughput of the rCM iteration: replicated data parallel vs FSDP2, 1/2/4 GPUs.

    torchrun --nproc_per_node N bench/bench_scale.py [--fsdp] [--teacher wan2.1-1.3b]
             [--frames 81 --height 480 --width 832] [--iterations 1] [--out bench/results/scale.json]

``--cp P``: Ulysses context parallelism, the world is dp x P (P consecutive ranks share a sample).
One rCM iteration = K steps of the schedule after the warm-up (H = 0): one student step
(sCM + DMD) and K - 1 critic steps, batch 1 per GPU, bf16 autocast, full activation
checkpointing, random weights of the registered architecture. Replicated: the fused sCM tangent
and an all-reduce of the gradients; FSDP: blocks and root sharded (bf16 params, fp32 reduce), the
tangent from a separate no-grad pass (FSDP cannot take the fused one). Reported: seconds per
iteration (median over ``--iterations`` after one warm-up iteration), samples/s = world * K / s,
and the peak memory of each rank. Rank 0 appends a row to ``--out`` (JSON list).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="wan2.1-1.3b")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--cp", type=int, default=1, help="context parallel degree (Ulysses; world = dp x cp)")
    ap.add_argument("--K", type=int, default=5, help="student update frequency (the 1.3B preset's 5)")
    ap.add_argument("--iterations", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (gloo; checks the script)")
    ap.add_argument("--out", default="bench/results/scale.json")
    a = ap.parse_args(argv)

    from bench_real import build_teacher
    from rcm_core.config import DistillConfig
    from rcm_core.trainer import RCMTrainer

    dev_type = "cpu" if a.tiny else "cuda"
    dist.init_process_group("gloo" if a.tiny else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not a.tiny:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = torch.device(dev_type, torch.cuda.current_device()) if not a.tiny else torch.device("cpu")
    teacher, text_dim = build_teacher(a.teacher, a.frames, a.height, a.width, dev, a.tiny)
    dp = world // a.cp
    cfg = DistillConfig.preset(teacher.preset, method="rcm", batch_size=dp, dtype="bfloat16", context_parallel=a.cp,
                               tangent_warmup_steps=0, lr_warmup_steps=0, student_update_freq=a.K,
                               activation_checkpointing="full", fsdp=a.fsdp, fused_tangent=not a.fsdp,
                               iterations=10_000)
    tr = RCMTrainer(teacher, cfg, device=dev)
    C, T, H, W = teacher.latent_shape
    g = torch.Generator(device=dev).manual_seed(rank // a.cp)      # cp peers share their sample
    batch = {"latents": torch.randn((1, C, T, H, W), generator=g, device=dev, dtype=torch.float64),
             "cond": torch.randn((1, 512, text_dim), generator=g, device=dev),
             "uncond": torch.randn((1, 512, text_dim), generator=g, device=dev)}

    def iteration() -> float:
        t0 = time.perf_counter()
        for _ in range(a.K):
            tr.train_step(batch)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dist.barrier()
        return time.perf_counter() - t0

    iteration()                                               # warm-up (kernels, allocator, AdamW states)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = [iteration() for _ in range(a.iterations)]
    peak = torch.tensor([torch.cuda.max_memory_allocated(dev) / GiB if dev.type == "cuda" else 0.0], device=dev)
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        s = statistics.median(times)
        row = {"gpus": world, "mode": ("fsdp" if a.fsdp else "replicated") + (f" x cp{a.cp}" if a.cp > 1 else ""),
               "cp": a.cp, "K": a.K, "s_per_iteration": s, "all_s": times, "samples_per_s": dp * a.K / s, "peak_gib_per_rank": [float(p) for p in peaks],
               "teacher": a.teacher, "latent_shape": [C, T, H, W], "tokens": T * (H // 2) * (W // 2),
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        out = Path(a.out)
        rows = json.loads(out.read_text()) if out.exists() else []
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows + [row], indent=1))
        print(f"{world} GPU {row['mode']:10s} {s:8.2f} s/iteration  {row['samples_per_s']:.3f} samples/s  "
              f"peak {max(row['peak_gib_per_rank']):.1f} GiB", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

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

Options for the large architectures (issue 11's Wan2.1-14B rows, issue 14's LoRA question):
``--method scm`` (sCM alone: no fake score), ``--lora R`` (student and fake score are rank-R adapters on one
frozen base), ``--fused`` (the fused sCM tangent under FSDP: every block checkpointed), ``--host-teacher``
(the random teacher is built in host memory, as the distill step loads a real one; FSDP2 then moves each
block's shard to its GPU, default for 14B). Each step is timed on its own (``step_s``: student and critic
medians), the memory after the trainer is built (``built_gib``: teacher, student, fake score, EMA, no AdamW
states yet) is recorded per rank, and a rank that runs out of memory writes what it had
(``<out>.oom.rank<R>.json``: the phase, allocated/reserved GiB) and exits 3.
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
    from bench_real import size_args
    size_args(ap)
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--cp", type=int, default=1, help="context parallel degree (Ulysses; world = dp x cp)")
    ap.add_argument("--K", type=int, default=5, help="student update frequency (the 1.3B preset's 5)")
    ap.add_argument("--iterations", type=int, default=1)
    ap.add_argument("--method", default="rcm", choices=["rcm", "scm"])
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank of student and fake score (0: full fine-tuning)")
    ap.add_argument("--fused", action="store_true", help="the fused sCM tangent under FSDP (replicated: always)")
    ap.add_argument("--host-teacher", action="store_true", help="build the teacher in host memory (default: 14B)")
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
    host = a.host_teacher or "14b" in a.teacher
    teacher, text_dim = build_teacher(a.teacher, a.frames, a.height, a.width, torch.device("cpu") if host else dev,
                                      a.tiny)
    dp = world // a.cp
    lora = None
    if a.lora:
        from rcm_core.config import LoRAConfig
        lora = LoRAConfig(rank=a.lora, alpha=float(a.lora))
    cfg = DistillConfig.preset(teacher.preset, method=a.method, batch_size=dp, dtype="bfloat16", context_parallel=a.cp,
                               tangent_warmup_steps=0, lr_warmup_steps=0, student_update_freq=a.K,
                               activation_checkpointing="full", fsdp=a.fsdp, fused_tangent=a.fused or not a.fsdp,
                               iterations=10_000, lora=lora)
    K = a.K if cfg.uses_dmd else 1
    mode = (("fsdp" if a.fsdp else "replicated") + (f" x cp{a.cp}" if a.cp > 1 else "")
            + (f" lora{a.lora}" if a.lora else "") + (" fused" if a.fsdp and a.fused else "")
            + (" scm" if a.method == "scm" else ""))
    phase = "build"

    def gib(f) -> float:
        return f(dev) / GiB if dev.type == "cuda" else 0.0

    def oom(e: BaseException) -> None:
        rec = {"rank": rank, "world": world, "mode": mode, "teacher": a.teacher, "phase": phase,
               "allocated_gib": gib(torch.cuda.memory_allocated), "reserved_gib": gib(torch.cuda.memory_reserved),
               "peak_gib": gib(torch.cuda.max_memory_allocated), "error": str(e).splitlines()[0][:300]}
        print(f"OOM rank {rank} in {phase}: {json.dumps(rec)}", flush=True)
        Path(f"{a.out}.oom.rank{rank}.json").write_text(json.dumps(rec, indent=1))
        os._exit(3)

    try:
        tr = RCMTrainer(teacher, cfg, device=dev)
    except torch.OutOfMemoryError as e:
        oom(e)
    del teacher
    built = gib(torch.cuda.memory_allocated)
    if rank == 0:
        print(f"built: {built:.1f} GiB allocated on rank 0", flush=True)
    C, T, H, W = tr.latent_shape
    g = torch.Generator(device=dev).manual_seed(rank // a.cp)      # cp peers share their sample
    batch = {"latents": torch.randn((1, C, T, H, W), generator=g, device=dev, dtype=torch.float64),
             "cond": torch.randn((1, 512, text_dim), generator=g, device=dev),
             "uncond": torch.randn((1, 512, text_dim), generator=g, device=dev)}
    step_s = {"student": [], "critic": []}

    def iteration() -> float:
        nonlocal phase
        t0 = time.perf_counter()
        for _ in range(K):
            kind = "student" if tr.is_student_step() else "critic"
            phase = f"{kind} step {tr.step}"
            t1 = time.perf_counter()
            try:
                tr.train_step(batch)
            except torch.OutOfMemoryError as e:
                oom(e)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            step_s[kind].append(time.perf_counter() - t1)
            if rank == 0:
                print(f"{kind} step: {step_s[kind][-1]:.2f} s, peak {gib(torch.cuda.max_memory_allocated):.1f} GiB",
                      flush=True)
        dist.barrier()
        return time.perf_counter() - t0

    iteration()                                               # warm-up (kernels, allocator, AdamW states)
    for v in step_s.values():
        v.clear()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = [iteration() for _ in range(a.iterations)]
    peak = torch.tensor([gib(torch.cuda.max_memory_allocated), built], device=dev)
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        s = statistics.median(times)
        row = {"gpus": world, "mode": mode, "method": a.method, "lora_rank": a.lora or None, "fused": cfg.fused_tangent,
               "cp": a.cp, "K": K, "s_per_iteration": s, "all_s": times, "samples_per_s": dp * K / s,
               "peak_gib_per_rank": [float(p[0]) for p in peaks], "built_gib_per_rank": [float(p[1]) for p in peaks],
               "step_s": {k: statistics.median(v) for k, v in step_s.items() if v},
               "teacher": a.teacher, "latent_shape": [C, T, H, W], "tokens": T * (H // 2) * (W // 2),
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        out = Path(a.out)
        rows = json.loads(out.read_text()) if out.exists() else []
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows + [row], indent=1))
        print(f"{world} GPU {a.teacher} {row['mode']:10s} {s:8.2f} s/iteration  {row['samples_per_s']:.3f} samples/s  "
              f"steps {row['step_s']}  built {max(row['built_gib_per_rank']):.1f} GiB  "
              f"peak {max(row['peak_gib_per_rank']):.1f} GiB", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

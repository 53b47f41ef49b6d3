"""Rough per-GPU memory estimate of rCM training on a real teacher; raises early when it won't fit.

Model (documented, deliberately simple; calibrate against GPU runs):

* weights: teacher (dtype) + student + fake score (fp32 master + grad + AdamW 2 states = 16 B/param)
  + EMA (fp32). Replicated data parallel (``sharded=False``) keeps all of it on every GPU;
  ``sharded=True`` (FSDP2, ``DistillConfig.fsdp``) shards it over ``gpus`` plus one unsharded
  block in flight;
* activations per GPU with block-level activation checkpointing: tokens on this GPU
  (``batch`` samples per context-parallel group, split over ``context_parallel`` GPUs) x hidden x
  bytes x (2 per layer for the checkpoints + ``_BLOCK_FACTOR`` for the block being recomputed);
  the sCM tangent pass of a checkpointed block keeps no activations (``rcm_core.parallel``);
* context parallel (Ulysses): + the full-sequence q, k, v, o and their tangents for H/cp heads
  (8 x tokens x hidden / cp);
* 5 % + 1.5 GiB overhead (allocator, CUDA context, NCCL buffers).

Calibration (BENCHMARKS.md, issue 4): Wan2.1-1.3B, 81 x 480 x 832 (32,760 tokens), batch 1,
one GPU, full activation checkpointing, the rCM trainer (teacher, student, fake score, EMA,
two AdamW): measured peak ``max_memory_allocated`` 60.0 GiB (critic step; student step 49.8);
this model says 64.0 GiB. Re-checked 2026-11-26 (bench_scale, rCM iteration incl. the fp32 time
embedding): replicated 1 GPU 62.1 GiB (model 63.6), FSDP2 over 2 GPUs 36.6 (37.1), over 4 GPUs
24.7 (24.5), FSDP2 x CP2 on 4 GPUs 21.4 (20.3), x CP4 19.7 (18.7).

``batch`` is the micro-batch of one data-parallel rank (one context-parallel group of
``context_parallel`` GPUs).
"""
from __future__ import annotations

import math

import torch

from .specs import SPECS, RealTeacherSpec

_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8,
          "float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
_BLOCK_FACTOR = 34          # activations of one transformer block, in units of tokens x hidden
GiB = 1024 ** 3


def _params(spec: RealTeacherSpec) -> int:
    import diffusers
    cls = getattr(diffusers, spec.transformer_class)
    with torch.device("meta"):
        m = cls.from_config(dict(spec.transformer_config))
    return sum(p.numel() for p in m.parameters())


def _need(n_params, layers, hidden, tokens, dtype_b, batch, gpus, cp, sharded=True):
    states = n_params * (dtype_b + 16 + 16 + 4)
    weights = states / gpus + n_params / layers * 4 * 3 if sharded else states
    tok_gpu = batch * math.ceil(tokens / cp)
    acts = tok_gpu * hidden * dtype_b * (2 * layers + _BLOCK_FACTOR)
    if cp > 1:
        acts += 8 * batch * tokens * hidden * dtype_b / cp
    return (weights + acts) * 1.05 + 1.5 * GiB


def estimate_memory(teacher_name_or_config, batch: int, frames: int, height: int, width: int,
                    dtype=torch.bfloat16, gpus: int = 1, context_parallel: int = 1,
                    gpu_memory_gib: float = 80.0, raise_if_too_big: bool = True, sharded: bool = False) -> dict:
    """Estimated bytes per GPU; raises MemoryError with settings that would fit when it exceeds ``gpu_memory_gib``.

    ``sharded=False`` (what the trainer does today): every GPU holds all training state, so
    more GPUs do not help; the error then names the batch / size that fits and, as advice,
    the GPU counts that FSDP sharding (+ context parallel) would need.
    """
    spec = SPECS[teacher_name_or_config] if isinstance(teacher_name_or_config, str) else teacher_name_or_config
    if isinstance(spec, dict):   # a transformer config
        from .specs import spec_for_config
        base = spec_for_config(spec)
        if base is None:
            raise ValueError(f"unknown transformer config class {spec.get('_class_name')!r}")
        cfg = {k: v for k, v in spec.items() if not k.startswith("_")}
        spec = RealTeacherSpec(**{**base.__dict__, "transformer_config": cfg})
    if gpus < 1 or context_parallel < 1 or gpus % context_parallel:
        raise ValueError(f"gpus ({gpus}) must be a multiple of context_parallel ({context_parallel})")
    cfg = spec.transformer_config
    p = cfg.get("patch_size", [1, 2, 2])

    def tokens_for(f, h, w):
        lat_t = (f - 1) // 4 + 1 if spec.is_video else 1
        return (lat_t // p[0]) * (h // 8 // p[1]) * (w // 8 // p[2])
    tokens = tokens_for(frames, height, width)
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    layers = cfg["num_layers"]
    n = _params(spec)
    db = _BYTES[dtype]
    limit = gpu_memory_gib * GiB

    def need_for(b=batch, g=gpus, c=context_parallel, tok=tokens, sh=sharded):
        return _need(n, layers, hidden, tok, db, b, g, c, sh)
    need = need_for()
    out = dict(teacher=spec.name, params=n, tokens_per_sample=tokens, bytes_per_gpu=int(need),
               gib_per_gpu=need / GiB, gpu_memory_gib=gpu_memory_gib, fits=need <= limit,
               batch=batch, gpus=gpus, context_parallel=context_parallel, sharded=sharded)
    if not out["fits"] and raise_if_too_big:
        fits = []
        if batch > 1 and need_for(b=1) <= limit:
            fits.append(f"batch=1 per GPU with gpus={gpus}, context_parallel={context_parallel} (keep the global "
                        "batch with gradient accumulation: DistillConfig.micro_batch=1)")
        if spec.is_video:
            for f in (61, 49, 33, 17):
                if f < frames and need_for(b=1, tok=tokens_for(f, height, width)) <= limit:
                    fits.append(f"frames={f} at {height}x{width}, batch=1")
                    break
        sharded_fits = []
        for g in sorted({gpus, 2 * gpus, 4 * gpus, 8, 16, 32, 64, 80, 128}):
            if g < gpus:
                continue
            for c in (1, 2, 4, 5, 8, 10, 16, 20, 32, 40):
                if g % c == 0 and need_for(b=1 if not sharded else batch, g=g, c=c, sh=True) <= limit:
                    sharded_fits.append(f"gpus={g}, context_parallel={c}")
                    break
            if len(sharded_fits) >= 3:
                break
        if sharded:
            fits += sharded_fits
        what = "" if sharded else (
            " Replicated data parallel keeps a full replica of the student, fake score, EMA and AdamW states on "
            "every GPU, so more GPUs do not lower this; shard with DistillConfig.fsdp=True (and "
            "context_parallel)" + (f": {'; '.join(sharded_fits)}" if sharded_fits else "") + ".")
        raise MemoryError(
            f"{spec.name}: estimated {need / GiB:.1f} GiB per GPU for batch {batch} of {frames}x{height}x{width} "
            f"({tokens} tokens/sample, {n / 1e9:.2f}B params, {str(dtype).replace('torch.', '')}) with gpus={gpus}, "
            f"context_parallel={context_parallel}; only {gpu_memory_gib:g} GiB per GPU.{what} Settings that would fit: "
            + ("; ".join(fits) if fits else "none of the tried ones: reduce resolution or frames"))
    return out


def pick_context_parallel(teacher_name_or_config, batch: int, frames: int, height: int, width: int,
                          dtype=torch.bfloat16, gpus: int = 1, gpu_memory_gib: float = 80.0,
                          sharded: bool = True, heads: int | None = None, tokens: int | None = None) -> dict:
    """The smallest context-parallel degree that fits: divides ``gpus`` (and ``heads``/``tokens`` when
    given). Returns :func:`estimate_memory`'s dict for it; raises its MemoryError when none fits."""
    cands = [c for c in range(1, gpus + 1) if gpus % c == 0 and (heads is None or heads % c == 0)
             and (tokens is None or tokens % c == 0)]
    for c in cands:
        est = estimate_memory(teacher_name_or_config, batch, frames, height, width, dtype, gpus=gpus,
                              context_parallel=c, gpu_memory_gib=gpu_memory_gib, raise_if_too_big=False,
                              sharded=sharded)
        if est["fits"]:
            return est
    return estimate_memory(teacher_name_or_config, batch, frames, height, width, dtype, gpus=gpus,
                           context_parallel=cands[-1], gpu_memory_gib=gpu_memory_gib, sharded=sharded)

"""Rough per-GPU memory estimate of rCM training on a real teacher; raises early when it won't fit.

Model (documented, deliberately simple; calibrate against GPU runs):

* weights: teacher (dtype) + student + fake score (fp32 master + grad + AdamW 2 states = 16 B/param)
  + EMA (fp32), all sharded over ``gpus`` (FSDP / ZeRO-3), plus one unsharded block in flight;
* activations per GPU with block-level activation checkpointing: tokens on this GPU
  (``batch`` samples per context-parallel group, split over ``context_parallel`` GPUs) x hidden x
  bytes x (2 per layer for the checkpoints + ``_BLOCK_FACTOR`` for the block being recomputed),
  doubled for the forward-mode tangent of the sCM JVP;
* 10 % + 2 GiB overhead (allocator, CUDA context, NCCL buffers).

``batch`` is the micro-batch of one data-parallel rank (one context-parallel group of
``context_parallel`` GPUs); the global batch is reached by gradient accumulation.
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


def _need(n_params, layers, hidden, tokens, dtype_b, batch, gpus, cp):
    weights = n_params * (dtype_b + 16 + 16 + 4) / gpus + n_params / layers * 4 * 3
    tok_gpu = batch * math.ceil(tokens / cp)
    acts = tok_gpu * hidden * dtype_b * (2 * layers + _BLOCK_FACTOR) * 2
    return (weights + acts) * 1.1 + 2 * GiB


def estimate_memory(teacher_name_or_config, batch: int, frames: int, height: int, width: int,
                    dtype=torch.bfloat16, gpus: int = 1, context_parallel: int = 1,
                    gpu_memory_gib: float = 80.0, raise_if_too_big: bool = True) -> dict:
    """Estimated bytes per GPU; raises MemoryError with settings that would fit when it exceeds ``gpu_memory_gib``."""
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
    lat_t = (frames - 1) // 4 + 1 if spec.is_video else 1
    tokens = (lat_t // p[0]) * (height // 8 // p[1]) * (width // 8 // p[2])
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    layers = cfg["num_layers"]
    n = _params(spec)
    db = _BYTES[dtype]
    need = _need(n, layers, hidden, tokens, db, batch, gpus, context_parallel)
    out = dict(teacher=spec.name, params=n, tokens_per_sample=tokens, bytes_per_gpu=int(need),
               gib_per_gpu=need / GiB, gpu_memory_gib=gpu_memory_gib, fits=need <= gpu_memory_gib * GiB,
               batch=batch, gpus=gpus, context_parallel=context_parallel)
    if not out["fits"] and raise_if_too_big:
        fits = []
        for g in sorted({gpus, 2 * gpus, 4 * gpus, 8, 16, 32, 64, 80, 128}):
            if g < gpus:
                continue
            for c in (1, 2, 4, 5, 8, 10, 16, 20, 32, 40):
                if g % c == 0 and _need(n, layers, hidden, tokens, db, batch, g, c) <= gpu_memory_gib * GiB:
                    fits.append(f"gpus={g}, context_parallel={c}")
                    break
            if len(fits) >= 3:
                break
        if batch > 1 and _need(n, layers, hidden, tokens, db, 1, gpus, context_parallel) <= gpu_memory_gib * GiB:
            fits.insert(0, f"batch=1 (gradient accumulation) with gpus={gpus}, context_parallel={context_parallel}")
        raise MemoryError(
            f"{spec.name}: estimated {need / GiB:.1f} GiB per GPU for batch {batch} of {frames}x{height}x{width} "
            f"({tokens} tokens/sample, {n / 1e9:.2f}B params, {str(dtype).replace('torch.', '')}) with gpus={gpus}, "
            f"context_parallel={context_parallel}; only {gpu_memory_gib:g} GiB per GPU. Settings that would fit: "
            + ("; ".join(fits) if fits else "none of the tried ones (gpus up to 128): reduce resolution or frames"))
    return out

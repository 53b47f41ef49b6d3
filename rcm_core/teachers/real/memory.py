"""Rough per-GPU memory estimate of rCM training on a real teacher; raises early when it won't fit.

Model (documented, deliberately simple; calibrate against GPU runs):

* weights: teacher (dtype) + student + fake score (fp32 master + grad + AdamW 2 states = 16 B/param)
  + EMA (fp32). A two-expert teacher (Wan2.2 A14B) holds both experts; its student one network
  (``moe_student="one"``) or both. LoRA (``DistillConfig.lora``): the one frozen base (the teacher, all its
  experts, in dtype) and per role (student, fake score: 16 B; EMA: 4 B) the adapter weights only, counted from
  the targeted layers' shapes (``rank x (in + out)`` per layer, :func:`lora_params`); Replicated data parallel (``sharded=False``) keeps all of it on every GPU;
  ``sharded=True`` (FSDP2, ``DistillConfig.fsdp``) shards it over ``gpus`` plus one unsharded
  block in flight;
* activations per GPU with block-level activation checkpointing: tokens on this GPU
  (``batch`` samples per context-parallel group, split over ``context_parallel`` GPUs) x hidden x
  bytes x (2 per layer for the checkpoints + ``_BLOCK_FACTOR`` for the block being recomputed);
  the sCM tangent pass of a checkpointed block keeps no activations (``rcm_core.parallel``);
* context parallel (Ulysses): + the full-sequence q, k, v, o and their tangents for H/cp heads
  (8 x tokens x hidden / cp);
* the optimiser step: CUDA's AdamW (``foreach``) computes ``sqrt(v)`` for a whole parameter group into
  one new fp32 list (``torch._foreach_sqrt``) before it updates in place, so the step of one role
  (student or fake score) adds its trainable parameters x 4 B (sharded: its shard);
* 5 % + 1.5 GiB overhead (allocator, CUDA context, NCCL buffers).

Calibration (``tests/test_memory_calibration.py`` holds every GPU measurement below and checks the
model against each): peak ``max_memory_allocated`` of one rCM iteration (student step + critic steps:
teacher, student, fake score, EMA, two AdamW), Wan2.1, 81 x 480 x 832 (32,760 tokens), batch 1, bf16
autocast, full activation checkpointing (BENCHMARKS.md):

| run | measured GiB | states / GPU | rest |
|---|---:|---:|---:|
| 1.3B, 1 GPU, replicated | 62.1 | 50.2 | 11.9 |
| 1.3B, LoRA 64, 1 GPU | 13.1 | 5.6 | 7.5 |
| 1.3B, LoRA 128, 1 GPU | 15.8 | 8.5 | 7.3 |
| 1.3B, FSDP2 over 2 / 4 GPUs (teacher replicated then) | 36.6 / 24.7 | | |
| 1.3B, FSDP2 x CP2 / CP4 on 4 GPUs (teacher replicated then) | 21.4 / 19.7 | | |
| 14B, LoRA 64, FSDP2 x CP4 on 4 GPUs | 17.6 | 9.2 | 8.4 |

The CP rows fix the activations: the rest falls 12.1 -> 8.8 -> 7.1 GiB at CP 1/2/4, i.e. 6.6 GiB at
32,760 tokens (70 units of tokens x hidden x 2 B for 30 layers: ``_BLOCK_FACTOR`` = 10; it was 34, which
over-estimated LoRA by 25 % and under-estimated CP4 by 10 %). Full fine-tuning's rest exceeds LoRA's
by 4.4-5.3 GiB at the same activations: AdamW's temporary (1.42B x 4 B = 5.3 GiB). With both terms
every measured run lies 4-15 % under the model, on the safe side.

``batch`` is the micro-batch of one data-parallel rank (one context-parallel group of
``context_parallel`` GPUs).
"""
from __future__ import annotations

import math

import torch

from .specs import SPECS, RealTeacherSpec

_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.float64: 8,
          "float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
_BLOCK_FACTOR = 10          # activations of the block being recomputed, in units of tokens x hidden x bytes
GiB = 1024 ** 3


def _meta_model(spec: RealTeacherSpec):
    import diffusers
    cls = getattr(diffusers, spec.transformer_class)
    with torch.device("meta"):
        return cls.from_config(dict(spec.transformer_config))


def _params(spec: RealTeacherSpec) -> int:
    return sum(p.numel() for p in _meta_model(spec).parameters())


def lora_params(spec_or_model, lora) -> int:
    """Adapter weights of ONE adapter (one role: student, fake score or EMA) on ONE network of ``spec``'s
    architecture: ``rank x (in + out)`` summed over the layers ``lora`` (:class:`rcm_core.config.LoRAConfig` or
    its dict) targets, found on a meta-device model exactly as the trainer finds them (``rcm_core.lora.find_targets``,
    with the FP32 time embedding installed as the loader installs it). Raises as the trainer would for targets that
    match nothing or a rank above a layer's min(in, out)."""
    from ...method.config import LoRAConfig
    from ...nets.lora import check_rank, find_targets

    cfg = LoRAConfig.from_dict(lora) if isinstance(lora, dict) else lora
    model = spec_or_model if isinstance(spec_or_model, torch.nn.Module) else _meta_model(spec_or_model)
    try:
        from .time_embedding import install_fp32_time_embedding
        install_fp32_time_embedding(model)
    except ValueError:          # a network without a diffusers time embedding: nothing to leave out
        pass
    targets = find_targets(model, tuple(cfg.target_modules))
    check_rank(targets, cfg.rank)
    return sum(cfg.rank * (m.in_features + m.out_features) for _, m in targets)


def state_params(n_params: int, experts: int = 1, moe_student: str = "one", lora_params_per_net: int = 0,
                 critic: bool = True) -> dict:
    """Parameter counts by role (one network has ``n_params``). The teacher holds ``experts`` networks (Wan2.2
    A14B: 2); a full fine-tuning student (and fake score, EMA) holds one network (``moe_student="one"``) or all
    experts (``"two"``). With LoRA (``lora_params_per_net`` > 0: the adapter weights on one network) the student
    and the fake score are adapters on the teacher's own network (all its experts), so nothing of the base is
    copied: trainable = adapters only, the EMA an adapter too."""
    if moe_student not in ("one", "two"):
        raise ValueError(f"moe_student={moe_student!r}; known: one, two")
    teacher = n_params * experts
    if lora_params_per_net:
        adapter = lora_params_per_net * experts           # adapters on every expert of the shared network
        return {"teacher": teacher, "student": adapter, "fake": adapter if critic else 0, "ema": adapter,
                "trainable_per_role": adapter, "lora": True}
    student = n_params * (experts if moe_student == "two" else 1)
    return {"teacher": teacher, "student": student, "fake": student if critic else 0, "ema": student,
            "trainable_per_role": student, "lora": False}


def state_bytes(counts: dict, dtype_b: int) -> int:
    """Bytes of the training state (replicated; divide by the GPUs for FSDP): the teacher (LoRA: the shared base)
    in the training dtype (a frozen bf16 network stays bf16); each trainable role fp32 master weights + fp32
    gradients + AdamW's two fp32 moments = 16 B/param; the EMA fp32 (4 B/param)."""
    return int(counts["teacher"] * dtype_b + (counts["student"] + counts["fake"]) * 16 + counts["ema"] * 4)


def optimizer_step_bytes(counts: dict, foreach=None) -> int:
    """Transient bytes of one AdamW step. ``foreach`` (None: torch's default, foreach on CUDA): ``sqrt(v)`` of the
    whole group as a new fp32 list; ``False`` (``DistillConfig.optimizer_foreach``): per tensor, counted as none
    (one tensor's worth). The student's and the fake score's steps run one after the other: one role counts."""
    return 0 if foreach is False else int(counts["trainable_per_role"] * 4)


def _need(n_params, layers, hidden, tokens, dtype_b, batch, gpus, cp, sharded=True, counts=None, foreach=None):
    counts = counts or state_params(n_params)
    states = state_bytes(counts, dtype_b)
    # FSDP: one unsharded block in flight per network (full: teacher, student, fake score in fp32; LoRA: the
    # shared base block in the training dtype and its adapters)
    block = (n_params / layers * 4 * 3 if not counts["lora"]
             else n_params / layers * dtype_b + counts["student"] / layers * 4 * 3)
    weights = states / gpus + block if sharded else states
    weights += optimizer_step_bytes(counts, foreach) / (gpus if sharded else 1)
    tok_gpu = batch * math.ceil(tokens / cp)
    acts = tok_gpu * hidden * dtype_b * (2 * layers + _BLOCK_FACTOR)
    if cp > 1:
        acts += 8 * batch * tokens * hidden * dtype_b / cp
    return (weights + acts) * 1.05 + 1.5 * GiB, states


def estimate_memory(teacher_name_or_config, batch: int, frames: int, height: int, width: int,
                    dtype=torch.bfloat16, gpus: int = 1, context_parallel: int = 1,
                    gpu_memory_gib: float = 80.0, raise_if_too_big: bool = True, sharded: bool = False,
                    lora=None, experts: int = 1, moe_student: str = "one", critic: bool = True,
                    optimizer_foreach=None) -> dict:
    """Estimated bytes per GPU; raises MemoryError with settings that would fit when it exceeds ``gpu_memory_gib``.

    ``sharded=False`` (what the trainer does today): every GPU holds all training state, so
    more GPUs do not help; the error then names the batch / size that fits and, as advice,
    the GPU counts that FSDP sharding (+ context parallel) would need.

    ``lora`` (``DistillConfig.lora``: a LoRAConfig or its dict): student and fake score are adapters on the one
    frozen base (:func:`lora_params`, :func:`state_params`). ``experts``: the teacher's networks (Wan2.2 A14B: 2,
    ``describe_teacher``'s ``experts``), ``moe_student``: ``DistillConfig.moe_student`` (a one-network student holds
    one expert, ``"two"`` both). ``critic``: a fake score is trained (``DistillConfig.uses_dmd``). Activations are
    one expert's (a sample passes through one expert); LoRA's rank-sized activations are left out.
    ``optimizer_foreach``: ``DistillConfig.optimizer_foreach`` (False: no group-sized AdamW temporary).
    The returned dict has the counts (``state_params``) and ``state_bytes`` (all GPUs together).
    """
    experts = int(experts or 1)
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
    model = _meta_model(spec)
    n = sum(p.numel() for p in model.parameters())
    n_lora = lora_params(model, lora) if lora is not None else 0
    counts = state_params(n, experts, moe_student if experts > 1 else "one", n_lora, critic)
    db = _BYTES[dtype]
    limit = gpu_memory_gib * GiB

    def need_for(b=batch, g=gpus, c=context_parallel, tok=tokens, sh=sharded):
        return _need(n, layers, hidden, tok, db, b, g, c, sh, counts, optimizer_foreach)[0]
    need = need_for()
    out = dict(teacher=spec.name, params=n, tokens_per_sample=tokens, bytes_per_gpu=int(need),
               gib_per_gpu=need / GiB, gpu_memory_gib=gpu_memory_gib, fits=need <= limit,
               batch=batch, gpus=gpus, context_parallel=context_parallel, sharded=sharded,
               experts=experts, moe_student=moe_student if experts > 1 else None,
               lora_rank=(lora["rank"] if isinstance(lora, dict) else lora.rank) if lora is not None else None,
               optimizer_foreach=optimizer_foreach,
               state_params=counts, state_bytes=state_bytes(counts, db))
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
            f"({tokens} tokens/sample, {n / 1e9:.2f}B params" + (f" x {experts} experts" if experts > 1 else "")
            + (f", LoRA rank {out['lora_rank']}: {counts['trainable_per_role'] / 1e6:.1f}M trainable per role"
               if lora is not None else "")
            + f", {str(dtype).replace('torch.', '')}) with gpus={gpus}, "
            f"context_parallel={context_parallel}; only {gpu_memory_gib:g} GiB per GPU.{what} Settings that would fit: "
            + ("; ".join(fits) if fits else "none of the tried ones: reduce resolution or frames"))
    return out


def pick_context_parallel(teacher_name_or_config, batch: int, frames: int, height: int, width: int,
                          dtype=torch.bfloat16, gpus: int = 1, gpu_memory_gib: float = 80.0,
                          sharded: bool = True, heads: int | None = None, tokens: int | None = None,
                          **kw) -> dict:
    """The smallest context-parallel degree that fits: divides ``gpus`` (and ``heads``/``tokens`` when
    given). Returns :func:`estimate_memory`'s dict for it; raises its MemoryError when none fits."""
    cands = [c for c in range(1, gpus + 1) if gpus % c == 0 and (heads is None or heads % c == 0)
             and (tokens is None or tokens % c == 0)]
    for c in cands:
        est = estimate_memory(teacher_name_or_config, batch, frames, height, width, dtype, gpus=gpus,
                              context_parallel=c, gpu_memory_gib=gpu_memory_gib, raise_if_too_big=False,
                              sharded=sharded, **kw)
        if est["fits"]:
            return est
    return estimate_memory(teacher_name_or_config, batch, frames, height, width, dtype, gpus=gpus,
                           context_parallel=cands[-1], gpu_memory_gib=gpu_memory_gib, sharded=sharded, **kw)

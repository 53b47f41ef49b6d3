"""Thin adapter over ``rcm_core.teachers``: resolve a teacher, encode, sample, decode.

Real teachers (Wan2.1 / Cosmos-Predict2 by name or as a diffusers directory) take
``options``: ``frames``, ``height``, ``width``, ``text_len`` (None = the teacher's default)
and ``dtype`` (None = bfloat16 on a GPU, float32 on the CPU). The pipeline passes the same
options to every step (cache, distill, evaluate, the registered model), so all of them see
the same latent shape.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional

import torch

__all__ = ["UnknownTeacherError", "TeacherDirectoryError", "known_teachers", "is_known_teacher", "is_real_teacher",
           "check_teacher_name", "load_teacher", "cpu_size_notice",
           "teacher_denoiser", "teacher_info", "describe_teacher", "teacher_options", "teacher_label",
           "check_memory", "memory_settings", "encode", "negative_embedding", "sampler_defaults", "pick_device", "REAL_OPTIONS"]

REAL_OPTIONS = ("frames", "height", "width", "text_len", "dtype")


class UnknownTeacherError(ValueError):
    pass


class TeacherDirectoryError(UnknownTeacherError):
    """``--teacher <path>``: the path is not a checkpoint in diffusers layout (missing, or no model_index.json)."""


def known_teachers() -> List[str]:
    from rcm_core.teachers import known_teachers as known

    return list(known())


def is_known_teacher(name: str) -> bool:
    """A registered name, a diffusers directory, or a ``module:factory`` spec."""
    from rcm_core.teachers import is_known_teacher as known

    return ":" in name or known(name)


def is_real_teacher(name: str) -> bool:
    """Wan2.1 / Cosmos-Predict2: a registered real name or a directory in diffusers layout."""
    from rcm_core.teachers import _is_diffusers_dir

    if _is_diffusers_dir(name):
        return True
    from rcm_core.real.specs import SPECS

    return name in SPECS


def _looks_like_path(name: str) -> bool:
    return isinstance(name, str) and ":" not in name and (
        os.path.exists(name) or "/" in name or os.sep in name or name.startswith(("~", ".")))


def check_teacher_name(name: str) -> None:
    """Raise a clear error unless ``name`` is a registered teacher, a diffusers directory or ``module:factory``.

    A path that is not a diffusers-layout directory (missing, or without model_index.json) raises
    :class:`TeacherDirectoryError` saying what the directory lacks and what to pass instead.
    """
    if is_known_teacher(name):
        return
    if _looks_like_path(name):
        from rcm_core.real.loading import missing_index_help

        raise TeacherDirectoryError(missing_index_help(os.path.expanduser(name)))
    raise UnknownTeacherError(f"unknown teacher {name!r}; known teachers: {', '.join(known_teachers())} "
                              "(or a directory in diffusers layout)")


def teacher_label(name: str) -> str:
    """Short name for experiment / model names: for ``--teacher <dir>``, ``_name_or_path`` of its
    model_index.json, the repository of a Hugging Face cache snapshot, else the folder name."""
    from rcm_core.teachers import _is_diffusers_dir

    if _is_diffusers_dir(name):
        from rcm_core.real.loading import teacher_dir_label

        return teacher_dir_label(name)
    return name


def teacher_options(name: str, frames: int = 0, height: int = 0, width: int = 0, text_len: int = 0,
                    dtype: str = "", device: Optional[str] = None) -> Dict[str, Any]:
    """Options of a real teacher from flow parameters (0 / "" = the teacher's default); {} if none.

    ``device``: where the run will compute ("auto": a GPU if this machine has one). On the CPU,
    a real teacher's frames/height/width that are not given become a small valid size
    (:func:`rcm_core.real.loading.small_size`) instead of the teacher's own (e.g. 81 x 480 x 832),
    with a notice; ``None`` keeps the teacher's defaults (when the computing machine is another one).
    Raises ValueError when options are given for a teacher that takes none (embedded, custom).
    """
    opts = {k: v for k, v in dict(frames=frames, height=height, width=width, text_len=text_len,
                                     dtype=dtype).items() if v not in (0, "", None, "auto")}
    if opts and not is_real_teacher(name):
        raise ValueError(f"teacher {name!r} has a fixed latent shape; {sorted(opts)} only apply to real teachers "
                         "(Wan2.1 / Cosmos-Predict2 by name or a diffusers directory)")
    if "dtype" in opts and opts["dtype"] not in ("float32", "bfloat16", "float16", "float64"):
        raise ValueError(f"teacher dtype {opts['dtype']!r}; known: float32, bfloat16, float16, float64")
    if device is not None and pick_device(device) == "cpu" and is_real_teacher(name):
        missing = [k for k in ("frames", "height", "width") if k not in opts]
        if missing:
            small = cpu_default_size_of(name)
            opts.update({k: small[k] for k in missing})
            print(cpu_size_notice(name, small, missing), flush=True)
    return opts


def cpu_default_size_of(name: str) -> Dict[str, Any]:
    from rcm_core.real.loading import cpu_default_size

    return cpu_default_size(os.path.expanduser(name))


def cpu_size_notice(name: str, small: Mapping[str, Any], defaulted) -> str:
    f, h, w = small["default"]
    return (f"notice: teacher {small.get('name', name)}: no {'/'.join('--' + k for k in defaulted)} given and no GPU "
            f"here: using the small CPU size {small['frames']} x {small['height']} x {small['width']} "
            f"(frames x height x width) instead of the teacher's default {f} x {h} x {w}; pass --frames/--height/"
            f"--width to choose")


def _real_kwargs(options: Optional[Mapping[str, Any]], device) -> Dict[str, Any]:
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(REAL_OPTIONS))
    if unknown:
        raise ValueError(f"unknown teacher options {unknown}; known: {list(REAL_OPTIONS)}")
    dt = opts.pop("dtype", None)
    if dt is None:
        dt = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    opts["dtype"] = getattr(torch, dt)
    return opts


def load_teacher(name: str, device: str = "cpu", options: Optional[Mapping[str, Any]] = None):
    """``rcm_core.teachers.get_teacher`` with an error that lists the known names.

    ``"package.module:factory"`` names a custom teacher factory (called with ``device``).
    ``options`` (real teachers only): see the module doc.
    """
    if is_real_teacher(name):
        from rcm_core.real.loading import load_real_teacher, load_teacher_from_path
        from rcm_core.teachers import _is_diffusers_dir

        kw = _real_kwargs(options, device)
        if _is_diffusers_dir(name):
            return load_teacher_from_path(name, device=device, **kw)
        return load_real_teacher(name, device=device, **kw)
    if not is_known_teacher(name) and _looks_like_path(name):
        check_teacher_name(name)                          # raises TeacherDirectoryError, saying what is missing
    if options:
        raise ValueError(f"teacher {name!r} takes no options, got {dict(options)}")
    if ":" in name:
        import importlib

        mod, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise UnknownTeacherError(f"cannot import teacher factory {name!r}: {e}") from e
        try:
            return factory(device=device)
        except TypeError:
            return factory()
    from rcm_core.teachers import get_teacher

    if not is_known_teacher(name):
        raise UnknownTeacherError(f"unknown teacher {name!r}; known teachers: {', '.join(known_teachers())} "
                                  "(or a directory in diffusers layout)")
    return get_teacher(name, device=device)


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def teacher_denoiser(teacher):
    den = getattr(teacher, "denoiser", None)
    if den is not None:
        return den() if callable(den) and not isinstance(den, torch.nn.Module) else den
    from rcm_core.denoiser import TrigFlowDenoiser

    return TrigFlowDenoiser(teacher.net, teacher.param, getattr(teacher, "call", None))


def sampler_defaults(teacher) -> Dict[str, Any]:
    d = {}
    src = getattr(teacher, "sampler", None) or getattr(teacher, "sampler_defaults", None) or {}
    if not isinstance(src, dict):
        src = vars(src) if hasattr(src, "__dict__") else {}
    d["steps"] = int(src.get("steps", getattr(teacher, "sample_steps", getattr(teacher, "steps", 50))))
    d["shift"] = float(src.get("shift", getattr(teacher, "shift", 5.0)))
    d["guidance"] = float(src.get("guidance", getattr(teacher, "guidance", 5.0)))
    d["solver"] = str(src.get("solver", getattr(teacher, "solver", "euler")))
    return d


def teacher_info(teacher) -> Dict[str, Any]:
    info = {"name": str(teacher.name), "version": str(getattr(teacher, "version", "unknown")),
            "latent_shape": [int(x) for x in teacher.latent_shape], **sampler_defaults(teacher)}
    meta = getattr(teacher, "meta", None) or {}
    if "text_len" in meta and "transformer_config" in meta:          # a real teacher: what else shapes its outputs
        info["text_len"] = int(meta["text_len"])
        info["dtype"] = str(next(teacher.net.parameters()).dtype).replace("torch.", "")
    return info


def describe_teacher(name: str, options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """:func:`teacher_info` plus, for a real teacher, its checkpoint description - without loading weights.

    A real teacher's checkpoint is checked (files, configs, transformer tensor shapes, resolution)
    exactly as the loader would, so a bad checkpoint fails here, naming the culprit. Other
    teachers are loaded (they are small).
    """
    if not is_real_teacher(name):
        return teacher_info(load_teacher(name, options=options))
    from rcm_core.real.loading import inspect_real_teacher, inspect_teacher_path
    from rcm_core.teachers import _is_diffusers_dir

    opts = dict(options or {})
    kw = {k: v for k, v in opts.items() if k != "dtype"}
    d = inspect_teacher_path(name, **kw) if _is_diffusers_dir(name) else inspect_real_teacher(name, **kw)
    keys = ("name", "version", "latent_shape", "steps", "shift", "guidance", "solver")
    return {**{k: d[k] for k in keys}, "real": True, "options": opts,
            **{k: d[k] for k in d if k not in keys}}


def check_memory(info: Mapping[str, Any], batch: int, gpus: int, gpu_memory_gib: float,
                 dtype: str = "bfloat16", context_parallel: int = 1, sharded: bool = False,
                 lora=None, moe_student: str = "one", critic: bool = True,
                 optimizer_foreach: Optional[bool] = None) -> Dict[str, Any]:
    """Estimated GPU memory of distilling the real teacher ``info`` (from :func:`describe_teacher`).

    ``lora`` / ``moe_student`` / ``critic``: ``DistillConfig.lora``, ``.moe_student``, ``.uses_dmd`` (LoRA adapters
    on the one frozen base; the teacher's experts, ``info["experts"]``, and the student's). Raises MemoryError
    (with the estimate and settings that would fit) when it does not fit.
    """
    from rcm_core.real.memory import estimate_memory

    if "transformer_config" not in info:
        raise ValueError(f"teacher {info.get('name')!r} is not a real teacher: no memory estimate")
    return estimate_memory(dict(info["transformer_config"]), batch=max(1, int(batch)), frames=int(info["frames"]),
                           height=int(info["height"]), width=int(info["width"]), dtype=dtype, gpus=int(gpus),
                           context_parallel=context_parallel, gpu_memory_gib=float(gpu_memory_gib),
                           sharded=sharded, lora=lora, experts=int(info.get("experts", 1) or 1),
                           moe_student=moe_student, critic=critic, optimizer_foreach=optimizer_foreach)


def memory_settings(cfg) -> Dict[str, Any]:
    """What the memory model needs of a :class:`rcm_core.config.DistillConfig` besides dtype and sharding: LoRA
    (adapters on the one frozen base), the A14B student's layout and whether a fake score trains."""
    return {"lora": cfg.lora, "moe_student": cfg.moe_student, "critic": cfg.uses_dmd,
            "optimizer_foreach": cfg.optimizer_foreach}


def plan_mesh(info: Mapping[str, Any], global_batch: int, gpus: int, gpu_memory_gib: float,
              dtype: str = "bfloat16", sharded: bool = False, micro_batch: int = 0,
              context_parallel: Optional[int] = None, **training) -> Dict[str, Any]:
    """The (data-parallel x context-parallel) mesh for a real teacher on ``gpus`` GPUs, from the memory model.

    ``context_parallel`` given: checked as it is. Else the smallest CP degree that fits, dividing the GPU
    count and the head count (replicated training takes cp = 1: CP only helps with sharded state). The
    per-rank batch is the micro-batch when gradient accumulation is on, else global_batch / (gpus / cp).
    Returns :func:`check_memory`'s estimate plus ``context_parallel`` and ``data_parallel``; raises
    MemoryError (naming settings that would fit) when nothing fits. ``training``: :func:`check_memory`'s ``lora``,
    ``moe_student``, ``critic``, ``optimizer_foreach``.

    ``optimizer_foreach`` left to torch (None) and no mesh fits: the plan is made again with the per-tensor AdamW
    (``optimizer_foreach=False``: no group-sized fp32 temporary at the step's peak); the returned dict says so
    (``optimizer_foreach``), the caller puts it in the config. Given as True or False, it is kept.
    """
    args = (info, global_batch, gpus, gpu_memory_gib, dtype, sharded, micro_batch, context_parallel)
    try:
        return _plan_mesh(*args, **training)
    except MemoryError as e:
        if training.get("optimizer_foreach") is not None:
            raise
        try:
            return _plan_mesh(*args, **{**training, "optimizer_foreach": False})
        except MemoryError:
            raise e from None


def _plan_mesh(info, global_batch, gpus, gpu_memory_gib, dtype, sharded, micro_batch, context_parallel, **training):
    import math
    heads = int(info["transformer_config"]["num_attention_heads"])
    if context_parallel is not None:
        cands = [int(context_parallel)]
    elif not sharded:
        cands = [1]
    else:
        cands = [c for c in range(1, gpus + 1) if gpus % c == 0 and heads % c == 0]
    for cp in cands:
        dp = max(1, gpus // cp)
        per_rank = micro_batch or max(1, math.ceil(global_batch / dp))
        last = cp == cands[-1]
        try:
            est = check_memory(info, per_rank, gpus, gpu_memory_gib, dtype=dtype, context_parallel=cp, sharded=sharded,
                               **training)
        except MemoryError:
            if last:
                raise
            continue
        if est["tokens_per_sample"] % cp:
            if last:
                raise ValueError(f"context_parallel={cp} does not divide the {est['tokens_per_sample']} tokens per "
                                 "sample; choose another size or CP degree")
            continue
        return {**est, "context_parallel": cp, "data_parallel": dp}
    raise MemoryError("no context-parallel degree fits")  # pragma: no cover - the loop raises first


def plan_run(info: Mapping[str, Any], cfg, config: Mapping[str, Any], gpus: int, gpu_memory_gib: float):
    """The flow's ``start`` for a real teacher on GPUs: the memory plan of the run's DistillConfig ``cfg`` (built
    from the teacher's preset and ``config``, the ``--distill_config`` overrides) on ``gpus`` GPUs of
    ``gpu_memory_gib``, for its global batch ``cfg.batch_size``.

    Returns ``(estimate, config, notes)``: ``config`` with what the plan chose and the user left open
    (``context_parallel`` above 1, ``optimizer_foreach=False`` when only the per-tensor AdamW fits), and the lines
    to print. Raises MemoryError (naming settings that would fit) when nothing fits.
    """
    given = config.get("context_parallel")
    est = plan_mesh(info, cfg.batch_size, gpus, gpu_memory_gib, dtype=cfg.dtype, sharded=cfg.fsdp,
                    micro_batch=cfg.micro_batch, context_parallel=given, **memory_settings(cfg))
    config, notes = dict(config), []
    if cfg.optimizer_foreach is None and est.get("optimizer_foreach") is False:
        config["optimizer_foreach"] = False
        notes.append("optimizer: per-tensor AdamW (optimizer_foreach=False): the foreach step's fp32 temporary "
                     "does not fit; set optimizer_foreach in --distill_config to choose")
    if given is None and est["context_parallel"] > 1:       # the mesh the memory model picked
        config["context_parallel"] = est["context_parallel"]
        notes.append(f"mesh: context_parallel={est['context_parallel']} x data_parallel={est['data_parallel']} "
                     "(the smallest CP degree that fits; set context_parallel in --distill_config to choose)")
    notes.append(f"memory check: {est['gib_per_gpu']:.1f} GiB per GPU of {gpu_memory_gib:.0f} (gpus={gpus}, "
                 f"context_parallel={est['context_parallel']})")
    return est, config, notes


@torch.no_grad()
def encode(teacher, prompts: List[str]) -> torch.Tensor:
    return teacher.encode_text(list(prompts)).float().cpu()


@torch.no_grad()
def negative_embedding(teacher) -> torch.Tensor:
    neg = getattr(teacher, "negative_prompt", "") or ""
    return teacher.encode_text([neg]).float().cpu()


@torch.no_grad()
def sample_teacher_latents(teacher, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor,
                           steps: Optional[int] = None, guidance: Optional[float] = None,
                           shift: Optional[float] = None, solver: Optional[str] = None,
                           callback=None) -> torch.Tensor:
    """The teacher's own sampler from ``noise``; ``callback()`` after every solver step (progress)."""
    from rcm_core.sampling import sample_teacher

    d = sampler_defaults(teacher)
    den = teacher_denoiser(teacher)
    dev = next(den.parameters()).device if any(True for _ in den.parameters()) else torch.device("cpu")
    return sample_teacher(den, cond.to(dev), uncond.to(dev), noise.to(dev),
                          steps=steps or d["steps"], guidance=d["guidance"] if guidance is None else guidance,
                          shift=shift or d["shift"], solver=solver or d["solver"], callback=callback).float().cpu()


@torch.no_grad()
def decode(teacher, latents: torch.Tensor) -> torch.Tensor:
    try:
        dev = next(teacher.net.parameters()).device
    except (StopIteration, AttributeError):
        dev = latents.device
    return teacher.decode(latents.to(dev)).float().cpu().clamp(0, 1)

"""Thin adapter over ``rcm_core.teachers``: resolve a teacher, encode, sample, decode."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

__all__ = ["UnknownTeacherError", "known_teachers", "is_known_teacher", "load_teacher", "teacher_denoiser", "teacher_info",
           "encode", "negative_embedding", "sampler_defaults", "pick_device"]


class UnknownTeacherError(ValueError):
    pass


def known_teachers() -> List[str]:
    from rcm_core.teachers import known_teachers as known

    return list(known())


def is_known_teacher(name: str) -> bool:
    """A registered name, a diffusers directory, or a ``module:factory`` spec."""
    from rcm_core.teachers import is_known_teacher as known

    return ":" in name or known(name)


def load_teacher(name: str, device: str = "cpu"):
    """``rcm_core.teachers.get_teacher`` with an error that lists the known names.

    ``"package.module:factory"`` names a custom teacher factory (called with ``device``).
    """
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
    return {"name": str(teacher.name), "version": str(getattr(teacher, "version", "unknown")),
            "latent_shape": [int(x) for x in teacher.latent_shape], **sampler_defaults(teacher)}


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
                           shift: Optional[float] = None, solver: Optional[str] = None) -> torch.Tensor:
    from rcm_core.sampling import sample_teacher

    d = sampler_defaults(teacher)
    den = teacher_denoiser(teacher)
    dev = next(den.parameters()).device if any(True for _ in den.parameters()) else torch.device("cpu")
    return sample_teacher(den, cond.to(dev), uncond.to(dev), noise.to(dev),
                          steps=steps or d["steps"], guidance=d["guidance"] if guidance is None else guidance,
                          shift=shift or d["shift"], solver=solver or d["solver"]).float().cpu()


@torch.no_grad()
def decode(teacher, latents: torch.Tensor) -> torch.Tensor:
    try:
        dev = next(teacher.net.parameters()).device
    except (StopIteration, AttributeError):
        dev = latents.device
    return teacher.decode(latents.to(dev)).float().cpu().clamp(0, 1)

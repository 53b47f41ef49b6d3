"""Teachers: a network, its declared parameterisation and call signature, text and decode.

Any teacher plugs in as a :class:`Teacher`; ``register_teacher`` adds a named
factory so the pipeline can find it (``--teacher NAME``)::

    from rcm_core.teachers import Teacher, register_teacher
    from rcm_core.denoiser import Parameterization

    def my_teacher(device="cpu"):
        net = MyDiT.from_pretrained("/models/mydit").to(device)
        return Teacher(name="mydit", version="v1", net=net,
                       param=Parameterization("rf", timestep_scale=1000.0),
                       call=lambda net, x, timestep, cond: net(x, timestep, cond),
                       encode_text=my_text_encoder, decode=my_vae_decode,
                       latent_shape=(16, 21, 60, 104), guidance=5.0, preset="wan2.1-1.3b")

    register_teacher("mydit", my_teacher, "my in-house DiT")
"""
from __future__ import annotations

import hashlib
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..nets.denoiser import Parameterization
from .base import Teacher


_REGISTRY: Dict[str, tuple] = {}


def register_teacher(name: str, factory: Callable[..., Teacher], description: str = "") -> None:
    _REGISTRY[name] = (factory, description)


def known_teachers() -> List[str]:
    return sorted(_REGISTRY)


def is_known_teacher(name: str) -> bool:
    """A registered name, or a directory in diffusers layout (with model_index.json)."""
    return name in _REGISTRY or _is_diffusers_dir(name)


def get_teacher(name: str, device: str | torch.device = "cpu") -> Teacher:
    if name not in _REGISTRY and _is_diffusers_dir(name):    # --teacher <dir in diffusers layout>
        from .real.loading import load_teacher_from_path
        return load_teacher_from_path(name, device=device)
    if name not in _REGISTRY:
        listing = ", ".join(f"{n} ({d})" if d else n for n, (_, d) in sorted(_REGISTRY.items()))
        raise ValueError(f"unknown teacher {name!r}; known teachers: {listing}")
    return _REGISTRY[name][0](device=device)


def _embedded(device="cpu") -> Teacher:
    from .embedded import ASSETS, load_teacher_net, load_text_encoder, teacher_meta
    from .embedded.data import from_latent

    meta = teacher_meta()
    dc = meta["data_config"]
    enc = load_text_encoder(device)
    version = hashlib.sha256((ASSETS / "teacher.safetensors").read_bytes()).hexdigest()[:12]
    return Teacher(
        name="embedded", version=version, net=load_teacher_net(device), param=Parameterization("rf", 1000.0),
        encode_text=lambda prompts: enc.encode(list(prompts)), decode=from_latent,
        latent_shape=(dc["channels"], dc["frames"], dc["height"], dc["width"]),
        negative_prompt="", guidance=4.0, sample_steps=50, shift=2.0, solver="euler", preset="embedded", meta=meta)


register_teacher("embedded", _embedded, "moving-digit video DiT shipped in the package, no download")


# ---- real teachers through diffusers (issue 4; needs the `real` extra, weights stay local) ----

def _is_diffusers_dir(name) -> bool:
    import os
    return isinstance(name, (str, os.PathLike)) and os.path.isfile(os.path.join(name, "model_index.json"))


def _real(name: str):
    def factory(device="cpu"):
        from .real.loading import load_real_teacher   # lazy: diffusers is imported only when used
        return load_real_teacher(name, device=device)
    return factory


register_teacher("wan2.1-1.3b", _real("wan2.1-1.3b"), "Wan2.1 T2V 1.3B, 480p x 81 frames, diffusers, local weights")
register_teacher("wan2.1-14b", _real("wan2.1-14b"), "Wan2.1 T2V 14B, 480p x 81 frames, diffusers, local weights")
register_teacher("wan2.2-ti2v-5b", _real("wan2.2-ti2v-5b"),
                 "Wan2.2 TI2V 5B (text-to-video), Wan2.2 VAE (16x spatial, z 48), 704 x 1280 x 121 frames, local weights")
register_teacher("wan2.2-t2v-a14b", _real("wan2.2-t2v-a14b"),
                 "Wan2.2 T2V A14B: two 14B experts (high / low noise) switched at boundary 0.875, 720p x 81 frames")
register_teacher("cosmos-predict2-2b", _real("cosmos-predict2-2b"), "Cosmos-Predict2 2B text-to-image, local weights")
register_teacher("cosmos-predict2-14b", _real("cosmos-predict2-14b"), "Cosmos-Predict2 14B text-to-image, local weights")


def expert_student(teacher: Teacher, expert: str = "transformer_2", copy: bool = True) -> nn.Module:
    """One network to start a one-network student (and fake score) of a two-expert teacher (Wan2.2 A14B).

    A two-expert teacher's ``net`` is a :class:`rcm_core.denoiser.TimestepExperts`; by default the trainer copies
    it, so the student is two experts switched at the teacher's boundary (what the flow trains, and what the
    diffusers export writes as ``transformer`` / ``transformer_2``). The alternative: one network, here a copy of
    one expert (default the low-noise ``transformer_2``, measured best of the one-network starts in
    BENCHMARKS.md "Wan2.2 A14B student: one network or two"), passed as
    ``RCMTrainer(teacher, cfg, student_net=expert_student(teacher), fake_net=expert_student(teacher))``; its
    export has no switch (``transformer_2`` null in model_index.json). ``copy=False``: the teacher's expert module
    itself (the trainer deep-copies ``student_net`` / ``fake_net`` anyway: no extra host copy of 14B weights).
    :func:`student_networks` picks it from ``DistillConfig.moe_student``.
    """
    import copy as _copy

    if not hasattr(teacher.net, "experts"):
        raise ValueError(f"teacher {teacher.name!r} is one network, not a mixture of experts")
    if expert not in ("transformer", "transformer_2"):
        raise ValueError(f"expert {expert!r}; known: transformer (high noise), transformer_2 (low noise)")
    net = getattr(teacher.net, expert)
    return _copy.deepcopy(net) if copy else net


STUDENT_LAYOUTS = {"one": "one network (from low-noise expert)", "two": "two experts (switched at the boundary)"}


def student_layout(teacher, config) -> Optional[str]:
    """What the student of ``teacher`` under ``config`` (a :class:`rcm_core.config.DistillConfig`) is: for a
    two-expert teacher (Wan2.2 A14B) :data:`STUDENT_LAYOUTS` of ``config.moe_student``; None for a one-network
    teacher. Raises for ``moe_student="one"`` with LoRA (the adapters sit on the teacher's own network, both
    experts: set ``moe_student="two"``)."""
    return check_student_layout(config, 2 if hasattr(getattr(teacher, "net", None), "experts") else 1)


def check_student_layout(config, experts: int) -> Optional[str]:
    """:func:`student_layout` from the teacher's expert count (``describe_teacher``'s ``experts``), without
    loading the teacher: the flow's ``start`` checks it before any work."""
    if int(experts or 1) < 2:
        return None
    if config.lora is not None and config.moe_student == "one":
        raise ValueError("DistillConfig.moe_student='one' (one student network from the low-noise expert) cannot be "
                         "combined with DistillConfig.lora for a two-expert teacher (Wan2.2 A14B): LoRA puts the "
                         "student's adapters on the teacher's own network, i.e. on both experts. Set "
                         "moe_student='two' (adapters on both experts) or train without lora")
    return STUDENT_LAYOUTS[config.moe_student]


def student_networks(teacher, config) -> tuple:
    """``(student_net, fake_net, layout)`` for :class:`rcm_core.trainer.RCMTrainer`: for a two-expert teacher with
    ``moe_student="one"`` the low-noise expert (the module itself; the trainer copies it) for both, else
    ``(None, None, layout)`` (copies of the teacher's network). ``layout``: :func:`student_layout`."""
    layout = student_layout(teacher, config)
    if layout is None or config.moe_student == "two":
        return None, None, layout
    net = expert_student(teacher, copy=False)
    return net, net, layout

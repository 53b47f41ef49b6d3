"""The teacher contract: :class:`Teacher`, a network with its declared parameterisation, call signature,
text encoder and decoder. The registry of named teachers is :mod:`rcm_core.teachers.registry`; the real
(diffusers) loaders build a Teacher from here, so they never import the registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..nets.denoiser import Parameterization, TrigFlowDenoiser

__all__ = ["Teacher"]


@dataclass
class Teacher:
    """A teacher network and how to use it.

    Required: ``name``, ``version``, ``net``, ``param`` and ``latent_shape``. The trainer needs only
    those (plus ``call`` and ``guidance``); ``encode_text`` and ``decode`` are used by the pipeline
    (caching prompts, decoding samples) and may be left out for library use.
    """
    name: str
    version: str
    net: nn.Module
    param: Parameterization
    latent_shape: tuple                                     # (C, T, H, W) or (C, H, W)
    encode_text: Optional[Callable[[Sequence[str]], torch.Tensor]] = None   # prompts -> (B, tokens, dim)
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None          # latents -> pixels in [0, 1]
    negative_prompt: str = ""
    guidance: float = 1.0                                   # CFG weight (1.0: none); Wan2.1 5.0, Cosmos 4.5
    sample_steps: int = 50
    shift: float = 5.0
    solver: str = "euler"
    preset: str = "embedded"                                # DistillConfig preset name
    call: Optional[Callable] = None                         # call(net, x, timestep, cond) -> output
    meta: dict = field(default_factory=dict)

    def denoiser(self) -> TrigFlowDenoiser:
        return TrigFlowDenoiser(self.net, self.param, self.call)

    @torch.no_grad()
    def negative_embedding(self) -> torch.Tensor:
        if self.encode_text is None:
            raise ValueError(f"teacher {self.name!r} has no encode_text: pass Teacher(encode_text=...) to "
                             "embed prompts (the trainer itself takes embeddings in its batches)")
        return self.encode_text([self.negative_prompt])

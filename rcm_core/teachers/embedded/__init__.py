"""The embedded teacher: a small Wan2.1-shaped video DiT trained on moving digits.

Everything ships with the package (weights in ``assets/``, data from sklearn, a
deterministic text encoder), so the project runs with no downloads.

    from rcm_core.teachers.embedded import load_teacher_net, load_text_encoder
    net = load_teacher_net()            # VideoDiT, eval mode, frozen
    enc = load_text_encoder()           # TextEncoder(dim=64, max_tokens=16)
    ctx = enc.encode(["a 3 drifting up-left"]); neg = enc.encode([""])
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Union

import torch

from rcm_core.teachers.embedded.dit import VideoDiT, VideoDiTConfig
from rcm_core.teachers.embedded.text import TextEncoder

__all__ = ["ASSETS", "VideoDiT", "VideoDiTConfig", "TextEncoder", "teacher_meta",
           "load_teacher_net", "load_text_encoder", "TEXT_ENCODER"]

ASSETS = Path(__file__).resolve().parent / "assets"


def teacher_meta(assets: Union[str, Path, None] = None) -> Dict[str, Any]:
    """The shipped ``teacher.json`` (model config, data config, training record)."""
    path = Path(assets or ASSETS) / "teacher.json"
    if not path.exists():
        raise FileNotFoundError(f"embedded teacher metadata missing: {path} "
                                "(train it with `python -m rcm_core.teachers.embedded.train`)")
    return json.loads(path.read_text())


def load_teacher_net(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                     assets: Union[str, Path, None] = None) -> VideoDiT:
    """The trained embedded teacher (EMA weights), frozen, in eval mode."""
    from safetensors.torch import load_file

    assets = Path(assets or ASSETS)
    cfg = VideoDiTConfig.from_dict(teacher_meta(assets)["model_config"])
    net = VideoDiT(cfg)
    net.load_state_dict(load_file(str(assets / "teacher.safetensors")), strict=True)
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_text_encoder(device: Union[str, torch.device] = "cpu", dim: int = 64,
                      max_tokens: int = 16) -> TextEncoder:
    """The project's frozen text encoder (deterministic; no download)."""
    return TextEncoder(dim=dim, max_tokens=max_tokens).to(device)


# factory alias, as named in the project brief
TEXT_ENCODER = load_text_encoder

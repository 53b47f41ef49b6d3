"""Samples over training: the EMA student's samples for a few fixed prompts and noises, at the start and at
every checkpoint of a distill run, for the distill card (a grid: rows prompts, columns steps).

The distill worker records them (:class:`PreviewRecorder`) into ``previews.safetensors`` next to
``result.json``: ``cond`` (the prompts' cached text embeddings, so a resumed run, on any number of ranks,
samples the same prompts), ``clips.<step>`` (uint8 thumbnails (P, C, T, H, W): at most 64 px high, 8 frames;
a large video latent is decoded from its first latent frame only, which keeps the decode cheap) and the
metadata ``prompts``, ``student_steps``, ``seed``. Sampling is done on every rank (FSDP-sharded and
context-parallel students sample collectively); rank 0 decodes and writes. A preview that fails is reported
and switches previews off; it never stops training.
"""
from __future__ import annotations

import json
import struct
from typing import Any, Dict, List, Optional

import torch

__all__ = ["FILE", "PreviewRecorder", "load_previews", "load_previews_url", "grid_png", "thumbnails"]

FILE = "previews.safetensors"
_FULL_DECODE_MAX = 1 << 16          # latent elements per sample decoded whole; larger: the first latent frame


def _metadata(data: bytes) -> Dict[str, str]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def load_previews(out, name: str = FILE) -> Optional[Dict[str, Any]]:
    """``{"prompts", "student_steps", "seed", "cond", "clips": {step: uint8 (P, C, T, H, W)}}`` from the
    :class:`rcm_steps.storage.Storage` ``out``; None when there is none."""
    from safetensors.torch import load

    if not out.exists(name):
        return None
    data = out.read_bytes(name)
    meta, t = _metadata(data), load(data)
    return {"prompts": json.loads(meta.get("prompts", "[]")), "student_steps": int(meta.get("student_steps", 0)),
            "seed": int(meta.get("seed", 0)), "cond": t.get("cond"),
            "clips": dict(sorted((int(k.split(".", 1)[1]), v) for k, v in t.items() if k.startswith("clips.")))}


def load_previews_url(url: Optional[str]) -> Optional[Dict[str, Any]]:
    """:func:`load_previews` of a file URL (result.json's ``previews_url``); None for None."""
    from .storage import Storage

    if not url:
        return None
    base, name = url.rsplit("/", 1)
    return load_previews(Storage(base), name)


def _pick(data, n: int) -> List[int]:
    """Indices of the first sample of up to ``n`` distinct prompts in the cache ``data``."""
    seen, idx = set(), []
    for i, p in enumerate(data.prompt_idx.tolist()):
        if p not in seen:
            seen.add(p)
            idx.append(i)
        if len(idx) == n:
            break
    return idx


class PreviewRecorder:
    """Records the EMA student's samples at given steps (call :meth:`record` on every rank).

    ``out``: the run's output Storage; ``data``: this rank's cache (prompts and embeddings); ``n``: prompts
    (0 = off); ``upto``: keep an earlier attempt's snapshots up to this step (the resumed step); ``write``:
    this rank decodes and writes (rank 0)."""

    def __init__(self, out, data, n: int, student_steps: int, seed: int, upto: int, write: bool):
        self.out, self.steps, self.seed, self.write = out, student_steps, seed, write
        self.enabled = n > 0
        prev = load_previews(out) if self.enabled else None
        if prev is not None and prev["cond"] is not None:
            self.prompts, self.cond = prev["prompts"], prev["cond"]
            self.clips = {s: c for s, c in prev["clips"].items() if s <= upto}
        else:
            idx = _pick(data, n) if self.enabled else []
            self.prompts = [data.prompts[data.prompt_idx[i]] for i in idx]
            self.cond = data.cond[idx].float() if idx else None
            self.clips = {}
        self.enabled = self.enabled and self.cond is not None and len(self.prompts) > 0

    def record(self, trainer, teacher, step: int) -> None:
        if not self.enabled or step in self.clips:
            return
        try:
            lat = trainer.generate(self.cond, steps=self.steps, seed=self.seed)
            if self.write:
                self.clips[step] = thumbnails(teacher, lat)
                self._save()
        except Exception as e:  # noqa: BLE001 - previews never stop training
            print(f"distill: previews off: step {step}: {type(e).__name__}: {e}", flush=True)
            self.enabled = False

    def _save(self) -> None:
        from safetensors.torch import save

        tensors = {"cond": self.cond.contiguous(), **{f"clips.{s}": c.contiguous() for s, c in self.clips.items()}}
        meta = {"prompts": json.dumps(self.prompts), "student_steps": str(self.steps), "seed": str(self.seed)}
        self.out.write_bytes(FILE, save(tensors, metadata=meta))


def thumbnails(teacher, latents: torch.Tensor) -> torch.Tensor:
    """Decoded samples as uint8 thumbnails (P, C, T, H, W); a large video latent from its first latent frame."""
    from .evaluate import _thumbs, as_clips
    from .teacher import decode

    lat = latents.detach().float()
    if lat.dim() == 5 and lat[0].numel() > _FULL_DECODE_MAX:
        lat = lat[:, :, :1]
    px = as_clips(decode(teacher, lat))
    small = _thumbs(px, max_side=64, max_frames=8)
    return (small.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def grid_png(previews: Dict[str, Any], max_columns: int = 8, max_prompts: int = 4) -> Optional[bytes]:
    """Rows: prompts; columns: training steps (at most ``max_columns``, evenly spaced, first and last kept)."""
    from .evaluate import clip_grid_png

    steps = sorted(previews.get("clips") or {})
    if not steps:
        return None
    if len(steps) > max_columns:
        pick = sorted({round(i * (len(steps) - 1) / (max_columns - 1)) for i in range(max_columns)})
        steps = [steps[i] for i in pick]
    clips = {f"step {s}": previews["clips"][s].float().div(255).unsqueeze(1) for s in steps}
    return clip_grid_png(clips, previews["prompts"], max_prompts=max_prompts)

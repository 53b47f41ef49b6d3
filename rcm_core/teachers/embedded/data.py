"""Embedded data: short "moving digit" clips built from sklearn's bundled digits.

Each clip is ``T = 4`` frames of ``16 x 16``, one channel, values in ``[0, 1]``: an
8x8 digit from :func:`sklearn.datasets.load_digits` (no download; shipped in the
wheel) upscaled bilinearly to ``DIGIT_SIZE x DIGIT_SIZE`` and drifting by an
integer ``speed`` (1 or 2 px/frame) in one of 8 directions. The prompt names the
digit and the direction, e.g. ``"a 3 drifting up-left"``.

Image coordinates: row index grows downwards, so "up" is ``dy = -1``.
Latents are the clips under a fixed affine map (``to_latent``) with roughly
zero mean and unit std (sigma_data = 1).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "T", "H", "W", "DIGIT_SIZE", "SPEEDS", "DIRECTIONS", "DIRECTION_NAMES",
    "LATENT_MEAN", "LATENT_STD", "DATA_CONFIG",
    "digit_images", "make_clips", "prompt_for", "embedded_prompts",
    "to_latent", "from_latent", "parse_prompt",
]

T, H, W = 4, 16, 16
DIGIT_SIZE = 10
SPEEDS = (1, 2)
# name -> (dy, dx) per frame, unit step (multiplied by speed)
DIRECTIONS: Dict[str, Tuple[int, int]] = {
    "up": (-1, 0),
    "down": (1, 0),
    "left": (0, -1),
    "right": (0, 1),
    "up-left": (-1, -1),
    "up-right": (-1, 1),
    "down-left": (1, -1),
    "down-right": (1, 1),
}
DIRECTION_NAMES: Tuple[str, ...] = tuple(DIRECTIONS)
# Fixed affine normalisation, measured once on make_clips(4096, seed=0) and frozen.
LATENT_MEAN = 0.12
LATENT_STD = 0.25
_SPLIT_SEED = 0
_EVAL_FRACTION = 0.2

DATA_CONFIG = {
    "source": "sklearn.datasets.load_digits",
    "frames": T, "height": H, "width": W, "channels": 1,
    "digit_size": DIGIT_SIZE, "speeds": list(SPEEDS), "directions": list(DIRECTION_NAMES),
    "latent_mean": LATENT_MEAN, "latent_std": LATENT_STD,
    "split_seed": _SPLIT_SEED, "eval_fraction": _EVAL_FRACTION,
}


@lru_cache(maxsize=None)
def _split() -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    imgs = (d.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    tr_x, ev_x, tr_y, ev_y = train_test_split(
        imgs, d.target.astype(np.int64), test_size=_EVAL_FRACTION,
        random_state=_SPLIT_SEED, stratify=d.target)
    return {"train": (tr_x, tr_y), "eval": (ev_x, ev_y)}


def digit_images(split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """The 8x8 digit images (float32 in [0, 1]) and labels of a split.

    ``"train"`` builds the training clips; ``"eval"`` is held out (e.g. for a
    digit classifier that scores generated samples).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"digit_images: split must be 'train' or 'eval', got {split!r}")
    x, y = _split()[split]
    return x.copy(), y.copy()


def prompt_for(digit: int, direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTION_NAMES}")
    return f"a {int(digit)} drifting {direction}"


def parse_prompt(prompt: str) -> Tuple[int, str]:
    """Inverse of :func:`prompt_for`: ``"a 3 drifting up-left"`` -> ``(3, "up-left")``."""
    parts = prompt.strip().split()
    if len(parts) != 4 or parts[0] != "a" or parts[2] != "drifting" or parts[3] not in DIRECTIONS:
        raise ValueError(f"not an embedded prompt: {prompt!r}")
    return int(parts[1]), parts[3]


def embedded_prompts() -> List[str]:
    """All 80 prompts: 10 digits x 8 directions (digit-major order)."""
    return [prompt_for(d, name) for d in range(10) for name in DIRECTION_NAMES]


def _upscale(imgs: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(imgs).float().unsqueeze(1)  # (n, 1, 8, 8)
    x = F.interpolate(x, size=(DIGIT_SIZE, DIGIT_SIZE), mode="bilinear", align_corners=False)
    return x.squeeze(1).clamp(0.0, 1.0)


def make_clips(n: int, seed: int, split: str = "train"):
    """Make ``n`` clips deterministically from ``seed``.

    Returns ``(clips, prompts, labels)``: ``clips`` float32 tensor ``(n, 1, T, H, W)``
    in ``[0, 1]``; ``prompts`` list of str; ``labels`` list of ``(digit, direction)``.
    The digit trajectory always stays fully inside the canvas.
    """
    if n < 0:
        raise ValueError(f"make_clips: n must be >= 0, got {n}")
    imgs, ys = digit_images(split)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(imgs), size=n)
    dirs = rng.integers(0, len(DIRECTION_NAMES), size=n)
    speeds = rng.choice(np.asarray(SPEEDS), size=n)
    u = rng.random((n, 2))
    digits = _upscale(imgs[idx]) if n else torch.zeros(0, DIGIT_SIZE, DIGIT_SIZE)
    clips = torch.zeros(n, 1, T, H, W, dtype=torch.float32)
    prompts: List[str] = []
    labels: List[Tuple[int, str]] = []
    free = H - DIGIT_SIZE  # same for both axes (H == W)
    for i in range(n):
        name = DIRECTION_NAMES[dirs[i]]
        dy, dx = DIRECTIONS[name]
        sp = int(speeds[i])
        starts = []
        for a, d in enumerate((dy, dx)):
            travel = abs(d) * sp * (T - 1)
            lo, hi = (travel, free) if d < 0 else (0, free - travel)
            starts.append(lo + int(u[i, a] * (hi - lo + 1)))
        y0, x0 = starts
        for f in range(T):
            y, x = y0 + dy * sp * f, x0 + dx * sp * f
            clips[i, 0, f, y:y + DIGIT_SIZE, x:x + DIGIT_SIZE] = digits[i]
        digit = int(ys[idx[i]])
        prompts.append(prompt_for(digit, name))
        labels.append((digit, name))
    return clips, prompts, labels


def to_latent(clips: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> latents with ~zero mean, ~unit std (fixed affine map)."""
    return (clips - LATENT_MEAN) / LATENT_STD


def from_latent(latents: torch.Tensor) -> torch.Tensor:
    """Latents -> pixels, clamped to [0, 1]."""
    return (latents * LATENT_STD + LATENT_MEAN).clamp(0.0, 1.0)

"""A tiny digit classifier that scores generated moving-digit clips.

Trained once on sklearn's ``load_digits`` (8x8, upscaled bilinearly to 10x10 like the
embedded data, pasted at every position of a 16x16 canvas, light noise) with a
two-layer MLP (256 -> 64 -> 10). The trained weights ship in
``assets/digit_classifier.safetensors``; if that file is missing, the classifier is
retrained deterministically (about 5 s on a CPU) and cached under
``~/.cache/rcm_steps``.

* :func:`classify_clips` - per-clip digit (frame-averaged probabilities).
* :func:`clip_features` - per-clip features (mean hidden activation over frames plus
  the centroid motion), used for the Frechet distance and the diversity measure.
* :func:`clip_directions` - the drift direction read from the centroid motion.
"""
from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["DigitMLP", "train_classifier", "load_classifier", "classify_clips", "clip_features",
           "clip_directions", "frechet_distance", "ASSET"]

ASSET = Path(__file__).resolve().parent / "assets" / "digit_classifier.safetensors"
CANVAS, DIGIT, HIDDEN = 16, 10, 64
TRAIN_SEED = 0
DIRECTIONS = {
    "up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1),
    "up-left": (-1, -1), "up-right": (-1, 1), "down-left": (1, -1), "down-right": (1, 1),
}


class DigitMLP(nn.Module):
    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        self.fc1 = nn.Linear(CANVAS * CANVAS, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 16, 16) in [0, 1]
        return torch.relu(self.fc1(x.reshape(x.shape[0], -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def _canvas_digits(imgs: np.ndarray, rng: np.random.Generator, noise: float) -> torch.Tensor:
    import torch.nn.functional as F

    x = torch.from_numpy(imgs).float().unsqueeze(1)
    x = F.interpolate(x, size=(DIGIT, DIGIT), mode="bilinear", align_corners=False).squeeze(1).clamp(0, 1)
    out = torch.zeros(len(imgs), CANVAS, CANVAS)
    pos = rng.integers(0, CANVAS - DIGIT + 1, size=(len(imgs), 2))
    for i, (y, xx) in enumerate(pos):
        out[i, y:y + DIGIT, xx:xx + DIGIT] = x[i]
    if noise > 0:
        out = (out + noise * torch.from_numpy(rng.standard_normal(out.shape)).float()).clamp(0, 1)
    return out


def train_classifier(epochs: int = 12, copies: int = 8, seed: int = TRAIN_SEED) -> Tuple[DigitMLP, dict]:
    """Train on the load_digits train split (placed at random positions); report eval accuracy."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    imgs = (d.images / 16.0).astype(np.float32)
    tr_x, ev_x, tr_y, ev_y = train_test_split(imgs, d.target, test_size=0.2, random_state=seed, stratify=d.target)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    X = torch.cat([_canvas_digits(tr_x, rng, noise=0.1 * (c % 2)) for c in range(copies)])
    Y = torch.from_numpy(np.tile(tr_y, copies)).long()
    Xe = _canvas_digits(ev_x, rng, noise=0.0)
    Ye = torch.from_numpy(ev_y).long()
    model = DigitMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), 256):
            idx = perm[i:i + 256]
            loss = nn.functional.cross_entropy(model(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(Xe).argmax(1) == Ye).float().mean())
    return model, {"eval_accuracy": acc, "epochs": epochs, "copies": copies, "seed": seed,
                   "train_size": int(len(X)), "eval_size": int(len(Xe))}


def save_classifier(model: DigitMLP, meta: dict, path: Path = ASSET) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"meta": json.dumps(meta)})


@lru_cache(maxsize=1)
def load_classifier() -> Tuple[DigitMLP, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rcm_steps" / ASSET.name
    for path in (ASSET, cache):
        if path.exists():
            model = DigitMLP()
            model.load_state_dict(load_file(str(path)))
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            return model.eval().requires_grad_(False), meta
    model, meta = train_classifier()
    try:
        save_classifier(model, meta, cache)
    except OSError:
        pass
    return model.eval().requires_grad_(False), meta


def _frames(clips: torch.Tensor) -> torch.Tensor:
    """(N, C, T, H, W) in [0, 1] -> (N, T, 16, 16) (channel mean; resized if needed)."""
    x = clips.detach().float().cpu()
    if x.dim() != 5:
        raise ValueError(f"clips must be (N, C, T, H, W), got shape {tuple(x.shape)}")
    x = x.mean(1)
    n, t, h, w = x.shape
    if (h, w) != (CANVAS, CANVAS):
        x = nn.functional.interpolate(x.reshape(n * t, 1, h, w), size=(CANVAS, CANVAS), mode="area")
        x = x.reshape(n, t, CANVAS, CANVAS)
    return x.clamp(0, 1)


@torch.no_grad()
def classify_clips(clips: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """Predicted digit per clip and its confidence (frame-averaged softmax)."""
    model, _ = load_classifier()
    f = _frames(clips)
    n, t = f.shape[:2]
    p = torch.softmax(model(f.reshape(n * t, CANVAS, CANVAS)), -1).reshape(n, t, 10).mean(1)
    conf, pred = p.max(1)
    return pred.numpy(), conf.numpy()


def _centroids(f: torch.Tensor) -> torch.Tensor:
    n, t = f.shape[:2]
    m = f.clamp_min(0) + 1e-8
    ys = torch.arange(CANVAS, dtype=torch.float32)
    tot = m.sum((-1, -2))
    cy = (m.sum(-1) * ys).sum(-1) / tot
    cx = (m.sum(-2) * ys).sum(-1) / tot
    return torch.stack([cy, cx], -1)  # (N, T, 2)


@torch.no_grad()
def clip_features(clips: torch.Tensor) -> np.ndarray:
    """(N, HIDDEN + 2): mean hidden features over frames + centroid velocity (px/frame)."""
    model, _ = load_classifier()
    f = _frames(clips)
    n, t = f.shape[:2]
    h = model.features(f.reshape(n * t, CANVAS, CANVAS)).reshape(n, t, -1).mean(1)
    c = _centroids(f)
    vel = (c[:, -1] - c[:, 0]) / max(t - 1, 1)
    return torch.cat([h, vel], 1).numpy().astype(np.float64)


@torch.no_grad()
def clip_directions(clips: torch.Tensor, min_speed: float = 0.4) -> List[str]:
    """Drift direction from the centroid motion (a dy/dx component counts if > min_speed)."""
    f = _frames(clips)
    c = _centroids(f)
    vel = (c[:, -1] - c[:, 0]) / max(f.shape[1] - 1, 1)
    inv = {v: k for k, v in DIRECTIONS.items()}
    out = []
    for dy, dx in vel.tolist():
        key = (int(math.copysign(1, dy)) if abs(dy) > min_speed else 0,
               int(math.copysign(1, dx)) if abs(dx) > min_speed else 0)
        out.append(inv.get(key, "still"))
    return out


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID's formula)."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = np.cov(a, rowvar=False) + eps * np.eye(a.shape[1])
    s2 = np.cov(b, rowvar=False) + eps * np.eye(b.shape[1])
    covmean = linalg.sqrtm(s1 @ s2)          # (scipy >= 1.16 dropped sqrtm's disp argument)
    covmean = covmean[0] if isinstance(covmean, tuple) else covmean
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def mean_pairwise_distance(feats: np.ndarray) -> float:
    n = len(feats)
    if n < 2:
        return 0.0
    d = np.sqrt(((feats[:, None, :] - feats[None, :, :]) ** 2).sum(-1))
    return float(d[np.triu_indices(n, 1)].mean())


if __name__ == "__main__":  # regenerate the shipped weights
    import time

    t0 = time.perf_counter()
    m, meta = train_classifier()
    save_classifier(m, meta)
    print(f"saved {ASSET} in {time.perf_counter() - t0:.1f}s: {meta}")

"""Look at embedded-teacher samples (or data): a grid of clips, frames left to right.

    python -m rcm_core.teachers.embedded.preview --out grid.png [--guidance 4] [--shift 2] [--steps 50]
    python -m rcm_core.teachers.embedded.preview --data --out data_grid.png     # real clips

Sampling uses the project's teacher sampler ``rcm_core.sampling.sample_teacher``
(Euler on the RF schedule with shift and CFG). ``main(classify_clips=...)`` (e.g.
``rcm_steps.digit_classifier.classify_clips``) adds how often a digit classifier agrees with the prompts.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from rcm_core.teachers.embedded import data as D

__all__ = ["save_grid", "sample_clips", "centroid_motion", "direction_of"]


def save_grid(clips: torch.Tensor, path, ncol: int = 1, titles: Optional[Sequence[str]] = None,
              scale: int = 8) -> Path:
    """Save clips ``(B, 1, T, H, W)`` in [0, 1] as a PNG: each clip is one strip of its T
    frames left to right; strips are laid out in ``ncol`` columns (``ncol=1``: one row per clip).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clips = torch.as_tensor(clips).detach().float().cpu()
    if clips.dim() != 5 or clips.shape[1] != 1:
        raise ValueError(f"save_grid: clips must be (B, 1, T, H, W), got {tuple(clips.shape)}")
    b, _, t, h, w = clips.shape
    ncol = max(1, min(int(ncol), b))
    nrow = math.ceil(b / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(ncol * t * w * scale / 100 + 0.3 * ncol,
                                                  nrow * (h * scale / 100 + 0.35)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= b:
            continue
        strip = np.ones((h, t * (w + 1) - 1), dtype=np.float32) * 0.5
        for f in range(t):
            strip[:, f * (w + 1):f * (w + 1) + w] = clips[i, 0, f].clamp(0, 1).numpy()
        ax.imshow(strip, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def sample_clips(prompts: List[str], *, guidance: float = 4.0, shift: float = 2.0, steps: int = 50,
                 seed: int = 0, net=None, encoder=None) -> torch.Tensor:
    """Sample the teacher for ``prompts``; returns pixel clips ``(B, 1, T, H, W)`` in [0, 1]."""
    from rcm_core.nets.denoiser import TrigFlowDenoiser
    from rcm_core.teachers.embedded import load_teacher_net, load_text_encoder
    from rcm_core.method.sampling import sample_teacher

    net = net if net is not None else load_teacher_net()
    enc = encoder if encoder is not None else load_text_encoder()
    cond = enc.encode(prompts)
    uncond = enc.encode([""]).expand(len(prompts), -1, -1).clone()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), 1, D.T, D.H, D.W, generator=g, dtype=torch.float64)
    x0 = sample_teacher(TrigFlowDenoiser(net, "rf"), cond, uncond, noise, steps=steps,
                        guidance=guidance, shift=shift, solver="euler")
    return D.from_latent(x0.float())


def centroid_motion(clips: torch.Tensor) -> torch.Tensor:
    """Mean per-frame displacement (dy, dx) of the intensity centroid, ``(B, 2)``."""
    c = clips[:, 0].float()  # (B, T, H, W)
    ys = torch.arange(c.shape[-2], dtype=torch.float32)
    xs = torch.arange(c.shape[-1], dtype=torch.float32)
    m = c.sum((-1, -2)).clamp_min(1e-6)
    cy = (c.sum(-1) * ys).sum(-1) / m
    cx = (c.sum(-2) * xs).sum(-1) / m
    tt = torch.arange(c.shape[1], dtype=torch.float32)
    tt = tt - tt.mean()
    slope = lambda v: (v * tt).sum(-1) / (tt * tt).sum()  # least-squares slope per frame
    return torch.stack([slope(cy), slope(cx)], dim=-1)


def direction_of(motion: torch.Tensor, thresh: float = 0.4) -> List[str]:
    """Name the direction of each (dy, dx) motion (components below ``thresh`` px/frame are 0)."""
    names = {v: k for k, v in D.DIRECTIONS.items()}
    out = []
    for dy, dx in motion.tolist():
        key = (int(np.sign(dy)) if abs(dy) > thresh else 0, int(np.sign(dx)) if abs(dx) > thresh else 0)
        out.append(names.get(key, "still"))
    return out


def main(argv=None, classify_clips=None) -> None:
    ap = argparse.ArgumentParser(description="Sample the embedded teacher into a grid PNG")
    ap.add_argument("--out", default="outputs/embedded_grid.png")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--shift", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=16, help="number of prompts (cycled over digits/directions)")
    ap.add_argument("--ncol", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", action="store_true", help="show real training clips instead of samples")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.data:
        clips, prompts, _ = D.make_clips(args.n, seed=args.seed)
    else:
        names = D.DIRECTION_NAMES
        prompts = [D.prompt_for(i % 10, names[(i * 3) % 8]) for i in range(args.n)]
        clips = sample_clips(prompts, guidance=args.guidance, shift=args.shift, steps=args.steps,
                             seed=args.seed)
    got = direction_of(centroid_motion(clips))
    want = [D.parse_prompt(p)[1] for p in prompts]
    titles = [f"{p} | moved: {g}" for p, g in zip(prompts, got)]
    save_grid(clips, args.out, ncol=args.ncol, titles=titles)
    ok = sum(a == b for a, b in zip(got, want))
    msg = f"saved {args.out}; centroid direction matches prompt for {ok}/{len(prompts)} clips"
    if classify_clips is not None:  # optional: a digit classifier passed in (rcm_steps.digit_classifier.classify_clips)
        pred = classify_clips(clips)[0]
        hit = sum(int(p) == D.parse_prompt(q)[0] for p, q in zip(pred, prompts))
        msg += f"; digit classifier agrees with the prompt for {hit}/{len(prompts)}"
    print(msg)


if __name__ == "__main__":
    main()

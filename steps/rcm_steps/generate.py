"""Generate clips from a registered student.

    python -m rcm_steps.generate --model models:/rcm-student-embedded@champion \
        --prompt "a 3 drifting up" --out x.mp4 [--steps 4] [--seed 0] [--seeds 4] [--fps 16]

Writes an MP4 (H.264 through ffmpeg: ``imageio-ffmpeg`` or ``ffmpeg`` on PATH; several seeds side
by side with --seeds); without ffmpeg it writes a GIF next to it (``x.gif``) and says so. A ``.gif``
out path writes the GIF, a ``.png`` a frame strip grid (for a text-to-image model, whose predict returns
(N, 3, H, W) images: ``--out x.png``). Uses MLFLOW_TRACKING_URI (or --tracking-uri).
The model runs on the GPU (bf16) when there is one, else on the CPU (``--device`` overrides).

A real teacher's model version carries its text encoder, tokenizer and VAE by sha256 reference
into the content store (or as copies); ``--component-store`` points at the store when it moved
(``RCM_COMPONENT_STORE``), ``--teacher-dir`` at a local copy of the teacher (``RCM_TEACHER_DIR``).
A component that cannot be found is named, with what to do (exit code 2).
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser("rcm_steps.generate")
    p.add_argument("--model", required=True, help="model URI, e.g. models:/rcm-student-embedded@champion")
    p.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    p.add_argument("--out", required=True, help=".mp4 (GIF when ffmpeg is absent), .gif or .png")
    p.add_argument("--fps", type=int, default=None, help="MP4 frame rate (default: the teacher's, else 16)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: the GPU when there is one; RCM_DEVICE)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="samples per prompt (seed, seed+1, ...)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--component-store", default=None,
                   help="URL of the teacher-component store, if it moved since registration (RCM_COMPONENT_STORE)")
    p.add_argument("--teacher-dir", default=None,
                   help="a local copy of the teacher directory to take components from (RCM_TEACHER_DIR)")
    a = p.parse_args(argv)
    import os

    import mlflow
    import pandas as pd
    import torch

    from .evaluate import clip_grid_png, clips_gif, clips_mp4
    from .register import MissingComponentError

    if a.device:
        os.environ["RCM_DEVICE"] = a.device

    if a.tracking_uri:
        mlflow.set_tracking_uri(a.tracking_uri)
    if a.component_store:
        os.environ["RCM_COMPONENT_STORE"] = a.component_store
    if a.teacher_dir:
        os.environ["RCM_TEACHER_DIR"] = a.teacher_dir
    try:
        model = mlflow.pyfunc.load_model(a.model)
    except MissingComponentError as e:
        print(f"rcm_steps.generate: {e}", file=sys.stderr)      # the message ends with the fix
        return 2
    rows = [{"prompt": pr, "seed": a.seed + s, **({"steps": a.steps} if a.steps else {})}
            for pr in a.prompt for s in range(a.seeds)]
    clips = torch.from_numpy(model.predict(pd.DataFrame(rows)))
    shape = tuple(clips.shape[1:])
    if clips.dim() == 4:        # a text-to-image model (Cosmos-Predict2): (N, 3, H, W) -> one-frame clips
        clips = clips[:, :, None]
    out, low = a.out, a.out.lower()
    rgb_video = clips.shape[1] == 3
    if low.endswith(".png"):
        data = clip_grid_png({"student": clips.reshape(len(a.prompt), a.seeds, *clips.shape[1:])},
                             a.prompt, max_prompts=len(a.prompt))
    elif low.endswith(".mp4"):
        fps = a.fps or _fps(model)
        data, note = clips_mp4(clips, fps=fps)
        if data is None:
            out = os.path.splitext(a.out)[0] + ".gif"
            print(f"rcm_steps.generate: {note}; writing {out} instead", file=sys.stderr)
            data = clips_gif(clips, scale=None if rgb_video else 6)
    else:
        data = clips_gif(clips, scale=None if rgb_video else 6)
    with open(out, "wb") as f:
        f.write(data)
    print(f"wrote {out}: {len(rows)} clip(s) of shape {shape}")
    return 0


def _fps(model) -> int:
    """The teacher's frame rate from the model version's meta (16 when it has none)."""
    try:
        return int(model.unwrap_python_model().meta.get("fps") or 16)
    except Exception:  # noqa: BLE001 - any pyfunc without our meta
        return 16


if __name__ == "__main__":
    sys.exit(main())

"""Generate clips from a registered student.

    python -m rcm_steps.generate --model models:/rcm-student-embedded@champion \
        --prompt "a 3 drifting up" --out x.gif [--steps 4] [--seed 0] [--seeds 4]

Writes an animated GIF (several seeds side by side with --seeds) or, for a .png
out path, a frame strip grid. Uses MLFLOW_TRACKING_URI (or --tracking-uri).

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
    p.add_argument("--out", required=True, help=".gif or .png")
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

    from .evaluate import clip_grid_png, clips_gif
    from .register import MissingComponentError

    if a.tracking_uri:
        mlflow.set_tracking_uri(a.tracking_uri)
    if a.component_store:
        os.environ["RCM_COMPONENT_STORE"] = a.component_store
    if a.teacher_dir:
        os.environ["RCM_TEACHER_DIR"] = a.teacher_dir
    try:
        model = mlflow.pyfunc.load_model(a.model)
    except MissingComponentError as e:
        print(f"rcm_steps.generate: {e}\nfix: {e.fix}", file=sys.stderr)
        return 2
    rows = [{"prompt": pr, "seed": a.seed + s, **({"steps": a.steps} if a.steps else {})}
            for pr in a.prompt for s in range(a.seeds)]
    clips = torch.from_numpy(model.predict(pd.DataFrame(rows)))
    if a.out.lower().endswith(".png"):
        data = clip_grid_png({"student": clips.reshape(len(a.prompt), a.seeds, *clips.shape[1:])},
                             a.prompt, max_prompts=len(a.prompt))
    else:
        data = clips_gif(clips)
    with open(a.out, "wb") as f:
        f.write(data)
    print(f"wrote {a.out}: {len(rows)} clip(s) of shape {tuple(clips.shape[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

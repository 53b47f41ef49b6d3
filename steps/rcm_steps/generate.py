"""Generate clips from a registered student.

    python -m rcm_steps.generate --model models:/rcm-student-embedded@champion \
        --prompt "a 3 drifting up" --out x.mp4 [--steps 4] [--seed 0] [--seeds 4] [--fps 16] \
        [--fp8 off|dynamic|static] [--compile off|default|max-autotune-no-cudagraphs|reduce-overhead]
        [--sparse off|sta:t<F>x<H>x<W>:w<F>x<H>x<W>] [--overlap off|on]

Writes an MP4 (H.264 through ffmpeg: ``imageio-ffmpeg`` or ``ffmpeg`` on PATH; several seeds side
by side with --seeds); without ffmpeg it writes a GIF next to it (``x.gif``) and says so. A ``.gif``
out path writes the GIF, a ``.png`` a frame strip grid (for a text-to-image model, whose predict returns
(N, 3, H, W) images: ``--out x.png``). Uses MLFLOW_TRACKING_URI (or --tracking-uri).
The model runs on the GPU (bf16) when there is one, else on the CPU (``--device`` overrides).

Serving options (default: the version's registered settings, see its card; ``RCM_FP8`` / ``RCM_COMPILE``):
``--fp8 dynamic`` (FP8 linears, per-token activation scales), ``--fp8 static`` (the scales stored with the
version, artifact ``fp8_scales``), ``--fp8 off``; ``--compile default`` (``torch.compile`` of each transformer
block, static shapes; the first clip pays the compile), ``max-autotune-no-cudagraphs``, ``reduce-overhead``
(CUDA graphs), ``off``; ``--sparse sta:t3x8x8:w3x3x5`` (sliding-tile self-attention: tiles of 3x8x8 tokens,
each attending the 3x3x5 tiles around it; opt-in, quality on real weights not yet measured), ``off``;
``--overlap on`` (with several clips, each clip decodes on a worker thread and CUDA stream while the next one
samples: the same clips; ``RCM_OVERLAP``). FP8
needs a GPU of compute capability 8.9 or newer: elsewhere (e.g. the CPU) the options are refused before anything
loads, naming the device (exit code 2, nothing written).

A real teacher's model version carries its text encoder, tokenizer and VAE by sha256 reference
into the content store (or as copies); ``--component-store`` points at the store when it moved
(``RCM_COMPONENT_STORE``), ``--teacher-dir`` at a local copy of the teacher (``RCM_TEACHER_DIR``).
A component that cannot be found is named, with what to do (exit code 2).

The model is looked up before anything loads: a ``models:/`` URI whose store does not exist (e.g. run
outside the folder of the flow's default ``mlflow.db``), whose name is not registered there (smoke runs
register ``<name>-smoke``) or whose alias is not set is named, with the tracking URI used and how to set
it (exit code 2), and nothing is written (no stray ``mlflow.db``). :func:`how_to_load` is what a flow
run prints at its end: the exact ``models:/<name>@<alias>`` URI and this command.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from typing import Optional, Sequence

# the distill flow's default store (flows/distill_flow.py: <repository>/mlflow.db)
FLOW_DEFAULT_DB = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "mlflow.db")


def main(argv=None) -> int:
    from rcm_core.nets.serving import COMPILE_MODES, ENV, FP8_MODES, OVERLAP_MODES

    p = argparse.ArgumentParser("rcm_steps.generate")
    p.add_argument("--model", required=True, help="model URI, e.g. models:/rcm-student-embedded@champion")
    p.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    p.add_argument("--out", required=True, help=".mp4 (GIF when ffmpeg is absent), .gif or .png")
    p.add_argument("--fps", type=int, default=None, help="MP4 frame rate (default: the teacher's, else 16)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: the GPU when there is one; RCM_DEVICE)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="samples per prompt (seed, seed+1, ...)")
    p.add_argument("--fp8", default=None, choices=FP8_MODES,
                   help="FP8 linear layers (default: the version's registered setting; RCM_FP8)")
    p.add_argument("--compile", default=None, choices=COMPILE_MODES,
                   help="torch.compile the transformer blocks (default: the registered setting; RCM_COMPILE)")
    p.add_argument("--sparse", default=None,
                   help="sliding-tile self-attention, sta:t<F>x<H>x<W>:w<F>x<H>x<W> (tile in tokens, window in tiles, "
                        "odd), or off (default: the registered setting; RCM_SPARSE)")
    p.add_argument("--overlap", default=None, choices=OVERLAP_MODES,
                   help="decode each clip while the next one samples (default: the registered setting; RCM_OVERLAP)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--component-store", default=None,
                   help="URL of the teacher-component store, if it moved since registration (RCM_COMPONENT_STORE)")
    p.add_argument("--teacher-dir", default=None,
                   help="a local copy of the teacher directory to take components from (RCM_TEACHER_DIR)")
    a = p.parse_args(argv)
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
    problem = model_uri_problem(a.model, explicit_uri=bool(a.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")))
    if problem:
        print(f"rcm_steps.generate: {problem}", file=sys.stderr)
        return 2
    config = {k: getattr(a, k) for k in ENV if getattr(a, k) is not None}      # the serving options' flags
    try:
        model = mlflow.pyfunc.load_model(a.model, model_config=config or None)
    except (MissingComponentError, ValueError) as e:     # ValueError: serving options (FP8 on the CPU...)
        print(f"rcm_steps.generate: {e}", file=sys.stderr)      # the message ends with the fix
        return 2
    except mlflow.exceptions.MlflowException as e:      # e.g. a version that does not exist
        print(f"rcm_steps.generate: cannot load {a.model}: {e.message}; {_uri_help(mlflow.get_registry_uri(), True)}",
              file=sys.stderr)
        return 2
    got = getattr(model.unwrap_python_model(), "serving", None)      # the options the model loaded with
    ignored = _ignored_options(got, config)
    if ignored:
        print(f"rcm_steps.generate: {a.model} was registered before its serving options could be set at load "
              f"time: {ignored} not applied (it loaded with {got.label if got else 'no serving options'}); "
              "set RCM_FP8 / RCM_COMPILE / RCM_SPARSE / RCM_OVERLAP instead, or register a new version (a new flow run)",
              file=sys.stderr)
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


def _safe(uri: str) -> str:
    return re.sub(r"//[^/@]+@", "//***@", uri)


def _uri_help(uri: str, explicit: bool) -> str:
    how = ("set with --tracking-uri / MLFLOW_TRACKING_URI" if explicit else
           "MLflow's default: mlflow.db in the current directory, as neither --tracking-uri nor MLFLOW_TRACKING_URI "
           "is set")
    flow_db = (f"; the flow's default store is `--tracking-uri sqlite:///{FLOW_DEFAULT_DB}`"
               if os.path.exists(FLOW_DEFAULT_DB) and uri != f"sqlite:///{FLOW_DEFAULT_DB}" else "")
    return (f"tracking URI {_safe(uri)} ({how}). Pass the flow's --mlflow_tracking_uri as --tracking-uri (or "
            f"MLFLOW_TRACKING_URI){flow_db}")


def model_uri_problem(model: str, explicit_uri: bool = True) -> Optional[str]:
    """What is wrong with a ``models:/<name>@<alias>`` (or ``models:/<name>/<version>``) URI in the current
    MLflow registry, or None. A sqlite store that does not exist is reported without creating it."""
    import mlflow

    m = re.match(r"models:/([^/@]+)(?:@([^/]+)|/([^/]+))?/?$", model)
    if not m:
        return None                                # runs:/..., a path: MLflow's own errors name them
    name, alias, _version = m.groups()
    uri = mlflow.get_registry_uri()
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        return (f"model {model} not found: there is no MLflow database at {uri[len('sqlite:///'):]} (nothing was "
                f"written there); {_uri_help(uri, explicit_uri)}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(registry_uri=uri)
    names = sorted(r.name for r in client.search_registered_models(max_results=1000))
    if name not in names:
        smoke = (f" (smoke runs register {name}-smoke)" if f"{name}-smoke" in names else "")
        return (f"no registered model {name!r} at {_safe(uri)}{smoke}; registered there: "
                f"{', '.join(names) or 'none'}; {_uri_help(uri, explicit_uri)}")
    if alias:
        aliases = sorted(client.get_registered_model(name).aliases or {})
        if alias not in aliases:
            return (f"registered model {name!r} at {_safe(uri)} has no alias {alias!r}; its aliases: "
                    f"{', '.join(aliases) or 'none'} (or use models:/{name}/<version>)")
    return None


def how_to_load(name: str, aliases: Sequence[str], tracking_uri: str, prompt: str = "a prompt") -> str:
    """The lines a flow run ends with: the exact model URI(s) and a generate command that works from anywhere."""
    alias = "champion" if "champion" in aliases else (list(aliases) or ["candidate"])[0]
    model = f"models:/{name}@{alias}"
    others = [f"models:/{name}@{a}" for a in aliases if a != alias]
    return (f"model: {model}" + (f" (also {', '.join(others)})" if others else "") + f" in MLflow {_safe(tracking_uri)}\n"
            f"load it: mlflow.pyfunc.load_model({model!r}) with MLFLOW_TRACKING_URI={_safe(tracking_uri)}\n"
            f"generate: python -m rcm_steps.generate --model {model} --tracking-uri {shlex.quote(_safe(tracking_uri))} "
            f"--prompt {shlex.quote(prompt)} --out sample.mp4")


def _ignored_options(got, asked) -> str:
    """The asked serving options that ``got`` (the loaded model's ServingOptions, None for a model without them)
    does not run with ('' when all apply): MLflow drops ``model_config`` keys a version did not declare when it
    was logged (versions registered before issue 23)."""
    return ", ".join(f"--{k} {v}" for k, v in asked.items() if got is None or getattr(got, k) != v)


def _fps(model) -> int:
    """The teacher's frame rate from the model version's meta (16 when it has none)."""
    try:
        return int(model.unwrap_python_model().meta.get("fps") or 16)
    except Exception:  # noqa: BLE001 - any pyfunc without our meta
        return 16


if __name__ == "__main__":
    sys.exit(main())

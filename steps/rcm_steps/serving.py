"""The registered pyfunc model (:class:`RCMStudentModel`: prompts -> clips) and loading a version for serving.

``mlflow.pyfunc.load_model`` runs on the GPU when there is one (bf16 weights) and on the CPU (float32)
otherwise (:func:`serving_device`; ``RCM_DEVICE`` / ``RCM_DTYPE`` override); FP8 linears and compiled blocks
as the version's registered ``serving`` settings say, overridden by ``RCM_FP8`` / ``RCM_COMPILE`` and by
``load_model(uri, model_config={"fp8": "static", "compile": "default"})`` (:func:`serving_options`, checked
before the weights load; FP8 static scales: the version's ``fp8_scales`` artifact); :func:`load_diffusers_pipeline`
assembles a real teacher's version as its diffusers pipeline, :func:`export_diffusers` writes it as a
self-contained folder (``python -m rcm_steps.register export``). :func:`model_signature` is what a version
declares: columns ``prompt`` (string), ``steps``, ``seed`` and, for real teachers, ``height``, ``width``
(``frames`` for video) -> float32 clips in [0, 1]: (N, 3, F, H, W) for text-to-video, (N, 3, H, W) for
text-to-image (Cosmos-Predict2), (N, 1, 4, 16, 16) for the embedded teacher. Versions registered before this module existed
pickled ``rcm_steps.register.RCMStudentModel``: :mod:`rcm_steps.register` re-exports it (and the other public
names here), so they still load.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, List, Optional

import mlflow.pyfunc
import pandas as pd

from .bundle import MissingComponentError, materialize_bundle


class RCMStudentModel(mlflow.pyfunc.PythonModel):
    """Few-step generator: prompt(s) -> clips, with the distilled EMA student."""

    # MLflow checks predict's type hints when this class is created (import, and every load): without hints it
    # warns "Add type hints to the `predict` method" (+ a stray `color_warning(` line); _rows checks the input
    _skip_type_hint_validation = True

    def load_context(self, context):
        import torch

        from rcm_steps import teacher as T
        from rcm_steps.evaluate import is_two_expert_state, student_denoiser

        with open(context.artifacts["meta"]) as f:
            self.meta = json.load(f)
        self.device, dtype = serving_device()
        # the serving options are checked before any weights load: FP8 on the CPU or an old GPU fails fast
        self.serving, scales = serving_options(self.meta, dict(context.artifacts),
                                               getattr(context, "model_config", None), self.device)
        ema = _student_weights(dict(context.artifacts))
        _check_layout(self.serving, is_two_expert_state(ema))      # before the teacher loads
        bundle = self.meta.get("teacher_bundle")
        if bundle:      # self-contained: components from the version (copy) or the content store (reference)
            from rcm_core.denoiser import TrigFlowDenoiser
            from rcm_core.real.loading import load_real_teacher
            from rcm_core.real.specs import spec_for_config

            root = materialize_bundle(bundle, dict(context.artifacts))
            with open(os.path.join(root, "transformer", "config.json")) as f:
                spec = spec_for_config(json.load(f), name=bundle["name"])
            kw = T._real_kwargs(self.meta.get("teacher_options"), self.device)
            kw["dtype"] = dtype         # serving precision: bf16 on a GPU, float32 on the CPU
            self.teacher = load_real_teacher(spec, self.device, weights=root, strict_config=False,
                                             transformer_state=ema, **kw)
            net = self.teacher.net.eval().requires_grad_(False)
            self.student = TrigFlowDenoiser(net if dtype != torch.float32 else net.float(), self.teacher.param,
                                            self.teacher.call)
        else:
            self.teacher = self._legacy_teacher(T)
            got = str(getattr(self.teacher, "version", "unknown"))
            if got != self.meta["teacher_version"]:
                import warnings

                warnings.warn(f"student was distilled from teacher {self.meta['teacher']} version "
                              f"{self.meta['teacher_version']}, loaded version {got}")
            self.student = student_denoiser(self.teacher, ema).to(self.device)
        _apply_serving(self.student, self.serving, scales)
        self._torch = torch

    def _legacy_teacher(self, T):
        """Embedded / custom teachers, and real-teacher versions registered before components were bundled."""
        name = self.meta["teacher"]
        real = T.is_real_teacher(name) or T._looks_like_path(name)
        if real and os.environ.get("RCM_TEACHER_DIR"):
            name = os.environ["RCM_TEACHER_DIR"]
        try:
            return T.load_teacher(name, device=self.device, options=self.meta.get("teacher_options"))
        except Exception as e:  # noqa: BLE001 - say what the version needs
            if not real:
                raise
            raise MissingComponentError(
                f"this model version carries no teacher components (registered before they were bundled) and "
                f"loads the teacher from {self.meta['teacher']!r}, which failed here: {e}",
                fix=f"copy the teacher directory to {self.meta['teacher']} on this machine, or set RCM_TEACHER_DIR to "
                    "where it is now; a new flow run registers a self-contained version") from e

    def _rows(self, model_input) -> List[Dict[str, Any]]:
        import pandas as pd

        if isinstance(model_input, str):
            model_input = [model_input]
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if isinstance(model_input, list):
            model_input = pd.DataFrame({"prompt": model_input})
        if "prompt" not in model_input.columns:
            raise ValueError(f"input needs a 'prompt' column, got {list(model_input.columns)}")
        return model_input.to_dict("records")

    # the type hint keeps MLflow from asking for one (its warning); the registered signature validates the input
    def predict(self, context, model_input: pd.DataFrame, params: Optional[Dict[str, Any]] = None):
        import numpy as np
        from rcm_core.nets.overlap import OverlappedDecode
        from rcm_core.sampling import sample_student

        from rcm_steps import teacher as T

        from rcm_steps.evaluate import decode_latents

        torch = self._torch
        params = params or {}
        dev = torch.device(getattr(self, "device", "cpu"))
        # the compile serving option compiles the decoder too (its one-off compile: 2-3 min on an H200)
        compile_decode = True if self.serving.compile != "off" else None       # None: RCM_COMPILE_DECODE decides

        def decode(lat):
            return decode_latents(self.teacher, lat, inplace=True, compile=compile_decode).numpy()

        # overlap=on: clip k decodes on a worker thread / CUDA stream while clip k+1 samples (rcm_core.nets.overlap)
        with OverlappedDecode(decode, dev, enabled=self.serving.overlap == "on") as decoder:
            for r in self._rows(model_input):
                steps = int(r["steps"] if _given(r.get("steps")) else params.get("steps") or self.meta["default_steps"])
                seed = int(r["seed"] if _given(r.get("seed")) else params.get("seed") or 0)
                cond = T.encode(self.teacher, [str(r["prompt"])]).to(dev)
                # the noise comes from a generator on the serving device: a seed gives other clips on a GPU
                g = torch.Generator(device=dev).manual_seed(seed)
                noise = torch.randn((1, *self._latent_shape(r)), generator=g, dtype=torch.float64, device=dev)
                lat = sample_student(self.student, cond, noise, steps=steps, sigma_max=self.meta["sigma_max"],
                                     mid_t=tuple(self.meta["mid_t"]), generator=g)
                decoder.submit(lat.float())
            outs = decoder.results()
        if len({o.shape for o in outs}) > 1:
            raise ValueError(f"the rows ask for clips of different sizes {sorted({o.shape[1:] for o in outs})}: "
                             "call predict once per size")
        return np.concatenate(outs).astype(np.float32)

    def _latent_shape(self, row: Dict[str, Any]) -> tuple:
        """The latent shape of one row: the registered size, or its ``frames``/``height``/``width`` (real teachers;
        sizes the VAE/patch factors do not divide are rejected, naming the nearest valid one)."""
        asked = {k: int(row[k]) for k in SIZE_COLUMNS if _given(row.get(k))}
        if not asked:
            return tuple(self.meta["latent_shape"])
        tm = getattr(self.teacher, "meta", None) or {}
        if "codec" not in tm:
            raise ValueError(f"{sorted(asked)}: the student of teacher {self.meta['teacher']!r} samples one size "
                             f"only (latents {tuple(self.meta['latent_shape'])}); leave those columns out")
        from rcm_core.real.loading import latent_shape_for

        size = {**{k: int(tm[k]) for k in SIZE_COLUMNS}, **asked}
        return latent_shape_for(size["frames"], size["height"], size["width"], vae_config=dict(tm["codec"].vae.config),
                                transformer_config=tm["transformer_config"], video=tm.get("task") != "t2i")


SIZE_COLUMNS = ("frames", "height", "width")


def serving_options(meta: Dict[str, Any], artifacts: Dict[str, str], model_config: Optional[Dict[str, Any]],
                    device) -> tuple:
    """(:class:`rcm_core.nets.serving.ServingOptions`, FP8 scales or None) a version loads with: its registered
    ``serving``, then ``RCM_FP8`` / ``RCM_COMPILE``, then the load call's ``model_config``; checked on ``device``
    before anything loads (``ValueError`` naming the option, the device or the missing ``fp8_scales``, and how to
    switch it off)."""
    from rcm_core.nets.serving import ServingOptions, check_serving_options

    opts = ServingOptions.resolve(meta.get("serving"), os.environ, model_config or {})
    scales = None
    if artifacts.get("fp8_scales"):
        with open(artifacts["fp8_scales"]) as f:
            scales = json.load(f)
    try:
        check_serving_options(opts, device, scales)
    except ValueError as e:
        raise ValueError(f"serving options {opts.label}: {e}. Switch them with model_config={{\"fp8\": \"off\", "
                         "\"compile\": \"off\"} in mlflow.pyfunc.load_model, RCM_FP8 / RCM_COMPILE, or "
                         "`python -m rcm_steps.generate --fp8 off --compile off`") from e
    return opts, scales


def _apply_serving(student, opts, scales) -> None:
    """FP8 linears / compiled blocks on the loaded student (nothing for options that leave the network alone; a
    two-expert student was refused by :func:`_check_layout` before it loaded)."""
    from rcm_core.nets.serving import apply_serving_options

    if opts.changes_network:
        apply_serving_options(student, opts, scales)


def _check_layout(opts, two_experts: bool) -> None:
    """``ValueError`` for FP8 / compile asked of a two-expert student (Wan2.2 A14B: ``transformer`` and
    ``transformer_2`` switched on the timestep, known from its weights' names before anything loads): its scales
    are not calibrated per expert and its blocks are not one list."""
    if two_experts and opts.changes_network:          # overlap changes the request loop only
        raise ValueError(f"serving options {opts.label}: the student is two experts (transformer and transformer_2, "
                         "switched at the boundary); FP8, compile and sparse serve one-network students only: load it "
                         "with model_config={\"fp8\": \"off\", \"compile\": \"off\", \"sparse\": \"off\"}")


def _given(v) -> bool:
    return v is not None and not (isinstance(v, float) and v != v)


def model_signature(meta: Dict[str, Any], task: Optional[str]):
    """(signature, input example) of a version: ``task`` t2v / t2i for a real teacher's student, None for others.

    Inputs: ``prompt`` (string), optional ``steps``, ``seed`` (long; also as params) and, for real teachers, optional
    ``height``, ``width`` (and ``frames`` for video). Output: float32 clips in [0, 1], (N, 3, F, H, W) for t2v,
    (N, 3, H, W) for t2i; the embedded teacher's (N, 1, 4, 16, 16) (its latents are its pixels); other teachers'
    is not declared (their decoder decides)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    sizes = {"t2v": SIZE_COLUMNS, "t2i": ("height", "width")}.get(task, ())
    cols = [ColSpec("string", "prompt"), ColSpec("long", "steps", required=False),
            ColSpec("long", "seed", required=False)] + [ColSpec("long", k, required=False) for k in sizes]
    if task == "t2v":
        out = (-1, 3, -1, -1, -1)
    elif task == "t2i":
        out = (-1, 3, -1, -1)
    else:
        out = (-1, *meta["latent_shape"]) if meta.get("teacher") == "embedded" else None
    steps = int(meta.get("default_steps", 4))
    sig = ModelSignature(inputs=Schema(cols),
                         outputs=Schema([TensorSpec(np.dtype("float32"), out)]) if out else None,
                         params=ParamSchema([ParamSpec("steps", "long", steps), ParamSpec("seed", "long", 0)]))
    size = {k: int(v) for k, v in (meta.get("size") or {}).items() if k in sizes and v}
    prompt = "a 3 drifting up" if meta.get("teacher") == "embedded" else "a red fox runs through snow"
    return sig, pd.DataFrame([{"prompt": prompt, "steps": steps, "seed": 0, **size}])


def serving_device() -> tuple:
    """(device, dtype) a loaded model serves on: the GPU in bf16 when there is one, else the CPU in float32
    (``RCM_DEVICE`` = cpu | cuda | cuda:N and ``RCM_DTYPE`` = bfloat16 | float16 | float32 override)."""
    import torch

    dev = os.environ.get("RCM_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    want = os.environ.get("RCM_DTYPE") or ("bfloat16" if torch.device(dev).type == "cuda" else "float32")
    if want not in ("bfloat16", "float16", "float32", "float64"):
        raise ValueError(f"RCM_DTYPE={want!r}; known: bfloat16, float16, float32, float64")
    return dev, getattr(torch, want)


def _student_weights(artifacts: Dict[str, str]) -> Dict[str, Any]:
    """The EMA student's state dict: the ``weights`` artifact, else (real teachers) the diffusers export's
    transformer (every safetensors shard of ``diffusers/transformer``); a two-expert student's export also has
    ``diffusers/transformer_2``: then ``transformer.*`` / ``transformer_2.*`` names, as the trainer's
    (a one-network student of a two-expert teacher has ``transformer`` only: its own names)."""
    from safetensors.torch import load_file

    if "weights" in artifacts:
        return load_file(artifacts["weights"])

    def read(sub):
        folder = os.path.join(artifacts.get("diffusers", ""), sub)
        files = sorted(f for f in (os.listdir(folder) if os.path.isdir(folder) else []) if f.endswith(".safetensors"))
        state: Dict[str, Any] = {}
        for f in files:
            state.update(load_file(os.path.join(folder, f)))
        return folder, state

    folder, state = read("transformer")
    if not state:
        raise MissingComponentError(f"the model version has no student weights: no 'weights' artifact and no "
                                    f"safetensors in {folder}",
                                    fix="download the model version again; if the artifact store lost them, "
                                        "run the flow again (a new version)")
    folder2, state2 = read("transformer_2")
    if state2:
        return {**{f"transformer.{k}": v for k, v in state.items()},
                **{f"transformer_2.{k}": v for k, v in state2.items()}}
    return state

def load_diffusers_pipeline(model_uri: str, device: Optional[str] = None, dtype=None, dst: Optional[str] = None):
    """A registered real-teacher version as its diffusers pipeline (with ``RCMScheduler``).

    Downloads the version's artifacts (into ``dst`` or a temporary folder), fetches its text encoder,
    tokenizer and VAE as the pyfunc does (content store / ``RCM_TEACHER_DIR`` / ``teacher/`` artifact,
    hash-checked) and loads the ``diffusers`` export with them. ``device``/``dtype``: default as
    :func:`serving_device` (GPU bf16 when there is one). Run it with ``guidance_scale=1.0``.
    """
    import mlflow
    from rcm_core.export import load_pipeline

    root = mlflow.artifacts.download_artifacts(model_uri, dst_path=dst or tempfile.mkdtemp(prefix="rcm-model-"))
    arts = os.path.join(root, "artifacts")
    export_dir = os.path.join(arts, "diffusers")
    with open(os.path.join(arts, "meta.json")) as f:
        meta = json.load(f)
    if not os.path.isdir(export_dir):
        _no_export(model_uri, meta)
    artifacts = {k: os.path.join(arts, k) for k in os.listdir(arts)}
    components = materialize_bundle(meta["teacher_bundle"], artifacts)
    dev, dt = serving_device()
    return load_pipeline(export_dir, components_dir=components, torch_dtype=dtype or dt, device=device or dev)


def _no_export(model_uri: str, meta: Dict[str, Any]):
    """Raise: the version has no diffusers export; the fix depends on why."""
    from rcm_steps.teacher import is_real_teacher

    if not is_real_teacher(meta.get("teacher", "")):
        raise MissingComponentError(
            f"{model_uri} has no diffusers export: its teacher {meta.get('teacher')!r} is not a diffusers pipeline "
            "(the embedded teacher and module:factory teachers have none), so no run of it exports one",
            fix=f"load it with mlflow.pyfunc.load_model({model_uri!r}) (prompts -> clips) or `python -m "
                f"rcm_steps.generate --model {model_uri} --prompt ... --out x.mp4`")
    raise MissingComponentError(f"{model_uri} has no diffusers export (artifact 'diffusers'): registered before "
                                "exports existed",
                                fix="run the flow again on this teacher: a new version carries the export")


def export_diffusers(model_uri: str, out_dir: str, overwrite: bool = False) -> str:
    """Write a registered real-teacher version as a self-contained diffusers folder: the export with the
    version's text encoder, tokenizer and VAE copied in (fetched and hash-checked as for serving), so that
    ``WanPipeline.from_pretrained(out_dir)`` (``Cosmos2TextToImagePipeline`` for Cosmos) loads it alone (with
    ``rcm_core`` installed for its ``RCMScheduler``). Returns ``out_dir``."""
    import shutil

    import mlflow
    from rcm_core.export import self_contained_export

    with tempfile.TemporaryDirectory(prefix="rcm-export-") as tmp:
        root = mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp)
        arts = os.path.join(root, "artifacts")
        with open(os.path.join(arts, "meta.json")) as f:
            meta = json.load(f)
        if not os.path.isdir(os.path.join(arts, "diffusers")):
            _no_export(model_uri, meta)
        components = materialize_bundle(meta["teacher_bundle"], {k: os.path.join(arts, k) for k in os.listdir(arts)})
        self_contained_export(os.path.join(arts, "diffusers"), components, out_dir, source=model_uri,
                              overwrite=overwrite, move=True)
        shutil.rmtree(root, ignore_errors=True)
    return out_dir

"""Register the EMA student as an MLflow pyfunc model that generates from prompts.

    model = mlflow.pyfunc.load_model("models:/rcm-student-embedded@champion")
    clips = model.predict(pd.DataFrame({"prompt": ["a 3 drifting up"], "seed": [0]}))
    # -> float32 array (N, C, T, H, W) in [0, 1]; optional columns "seed", "steps"

* One registered model per teacher (``rcm-student-<teacher>``); each flow run adds a
  version, created with its lineage tags in the same call (flow/run id, teacher
  name and version, data manifest hash, method, metrics).
* Alias ``candidate`` always; ``champion`` when the evaluation gates pass and the version
  beats the current champion under the teacher kind's declared policy (:data:`POLICIES`):

  - embedded teacher: higher ``digit_acc``, then lower ``fd_data``;
  - every other teacher (Wan2.1, Cosmos-Predict2, custom): lower ``fd_teacher``, then lower
    ``latent_rmse_teacher``, with ``diversity_rel >= min_diversity_rel`` as a gate;

  all at the registered number of student steps (``meta["default_steps"]``, the flow's
  ``--student_steps``). Versions are compared only when they were evaluated with the same
  settings (tag ``eval_settings``, a hash of :func:`rcm_steps.evaluate.eval_settings` plus the
  steps and the policy; ``eval_settings.json`` holds them): otherwise the decision says which
  settings differ, and :func:`set_champion` promotes explicitly. Every decision is the tag
  ``champion_decision``; promotions are appended to the registered model's tag
  ``champion.history``, which :func:`rollback_champion` walks back::

      python -m rcm_steps.register rollback --model rcm-student-embedded [--to 3] [--reason "..."]
      python -m rcm_steps.register promote --model rcm-student-embedded --version 5 [--force]

* Self-contained versions: besides the student's weights, a real teacher's version carries
  what sampling needs - ``model_index.json``, ``transformer/config.json``, the text encoder,
  tokenizer and VAE - either as references by sha256 into a content store (``components=
  "reference"``, the default: stored once under ``<storage root>/components``, fetched into
  ``$RCM_COMPONENT_CACHE`` (default ``~/.cache/rcm/components``) on load and verified) or as
  copies in the version's artifacts (``components="copy"``). Loading never reads the training
  machine's teacher directory; a missing component raises :class:`MissingComponentError`
  naming it, where it looked and what to do (``RCM_COMPONENT_STORE`` when the store moved,
  ``RCM_TEACHER_DIR`` to use a local copy of the teacher, or re-register with ``copy``).
  The embedded teacher ships inside the package code the version carries.
* Nothing half-registered: if anything fails after the version exists (tags,
  aliases), the version is deleted again and the error re-raised.
* Diffusers export: a real teacher's version also carries the student as a diffusers pipeline
  directory (artifact ``diffusers``, :func:`rcm_core.export.export_student`: the teacher's pipeline
  class, the distilled transformer, ``RCMScheduler``, a single-file bf16 transformer for
  ComfyUI-style loaders, README.md) whose text encoder, tokenizer and VAE are the version's
  components (by reference or in ``teacher/``); :func:`load_diffusers_pipeline` assembles it. The
  transformer weights live there only (the pyfunc reads them from it). The version's description is
  its model card: teacher lineage, steps, guidance, evaluation table, sample grid, how to load it.
  A teacher whose pipeline class the exporter does not know is refused before any version exists.
* Serving: ``mlflow.pyfunc.load_model`` runs on the GPU when there is one (bf16 weights, the
  project attention with its fused kernel, the fast VAE decode) and on the CPU (float32) otherwise;
  ``RCM_DEVICE`` / ``RCM_DTYPE`` override.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import mlflow.pyfunc

__all__ = ["RCMStudentModel", "model_name_for", "register_student", "RegistrationResult", "score_of",
           "ChampionPolicy", "POLICIES", "policy_for", "settings_hash", "set_champion", "rollback_champion",
           "ChampionError", "MissingComponentError", "bundle_teacher", "materialize_bundle", "COMPONENT_MODES",
           "check_components_mode", "load_diffusers_pipeline", "serving_device", "student_card"]

_HERE = os.path.dirname(os.path.abspath(__file__))


COMPONENT_MODES = ("reference", "copy")


class MissingComponentError(RuntimeError):
    """A model version cannot be loaded: a teacher component it needs is not available here."""

    fix = ("make the component store reachable (RCM_COMPONENT_STORE=<url> if it moved; S3 credentials and "
           "RCM_STORAGE_OPTIONS), or set RCM_TEACHER_DIR to a local copy of the teacher directory, or re-register "
           "the model with --model_components copy")

    def __init__(self, message: str, fix: Optional[str] = None):
        super().__init__(message)
        if fix:
            self.fix = fix


def check_components_mode(mode: str) -> None:
    if mode not in COMPONENT_MODES:
        raise ValueError(f"--model_components {mode!r}; known: reference (sha256 references into the content store "
                         f"under the storage root), copy (files in the model version's artifacts)")


def _component_files(root) -> Dict[str, str]:
    """Relative path -> local path of everything sampling needs besides the student's weights."""
    from pathlib import Path

    root = Path(root)
    files = {"model_index.json": root / "model_index.json",
             "transformer/config.json": root / "transformer" / "config.json"}
    if (root / "transformer_2" / "config.json").is_file():
        # a two-expert teacher (Wan2.2 A14B; model_index.json holds transformer_2 and boundary_ratio): the loader
        # checks the teacher's layout with it, and a one-network student is built from it
        files["transformer_2/config.json"] = root / "transformer_2" / "config.json"
    for sub in ("text_encoder", "tokenizer", "vae"):
        for f in sorted((root / sub).rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                files[f"{sub}/{f.relative_to(root / sub).as_posix()}"] = f
    return {k: str(v) for k, v in files.items()}


def _component_name(rel: str) -> str:
    return {"model_index.json": "pipeline index", "transformer/config.json": "transformer config",
            "transformer_2/config.json": "low-noise expert config"}.get(rel, rel.split("/", 1)[0])


def bundle_teacher(meta: Dict[str, Any], mode: str, store_url: Optional[str], workdir: str) -> tuple:
    """(extra pyfunc artifacts, bundle description for meta.json) of a real teacher; ({}, None) for others.

    ``reference``: every file goes into the content store at ``store_url`` (once; sha256-addressed);
    ``copy``: the files are copied under ``workdir/teacher`` for the version's artifacts.
    """
    import shutil

    from .storage import ContentStore, Storage, sha256_file
    from .teacher import is_real_teacher

    check_components_mode(mode)
    if not is_real_teacher(meta["teacher"]):
        return {}, None
    from rcm_core.real.loading import _locate, check_layout

    spec, root = _locate(os.path.expanduser(meta["teacher"]))
    check_layout(root)
    files = _component_files(root)
    entries = {rel: {"sha256": sha256_file(p), "bytes": os.path.getsize(p)} for rel, p in files.items()}
    bundle = {"format": "rcm-teacher-bundle/1", "mode": mode, "name": spec.name, "files": entries,
              "registered_from": str(root)}
    if mode == "copy":
        dst = os.path.join(workdir, "teacher")
        for rel, p in files.items():
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copyfile(p, os.path.join(dst, rel))
        return {"teacher": dst}, bundle
    if not store_url:
        raise ValueError("model components by reference need a content store URL (component_store, e.g. "
                         "<storage root>/components); or pass components='copy'")
    store = ContentStore(Storage(store_url))
    for rel, p in files.items():
        store.put(p, entries[rel]["sha256"])
    bundle["store"] = store.storage.url()
    return {}, bundle


def _cache_dir() -> str:
    return os.path.expanduser(os.environ.get("RCM_COMPONENT_CACHE") or "~/.cache/rcm/components")


def _link_or_copy(src: str, dst: str) -> None:
    import shutil

    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def materialize_bundle(bundle: Dict[str, Any], artifacts: Dict[str, str]) -> str:
    """A local teacher directory (diffusers layout, no transformer weights) for a version's bundle.

    ``copy``: the version's own artifact (each file checked). ``reference``: files from the local cache,
    else ``$RCM_TEACHER_DIR`` (a local copy of the teacher, hash-checked), else the content store
    (``$RCM_COMPONENT_STORE`` first, then the one recorded at registration), verified by sha256.
    Raises :class:`MissingComponentError` naming every missing component and where it looked.
    """
    from .storage import ContentStore, Storage, sha256_file

    files = bundle["files"]
    if bundle["mode"] == "copy":
        root = artifacts.get("teacher")
        bad = [rel for rel, e in files.items()
               if root is None or not os.path.isfile(os.path.join(root, rel))
               or os.path.getsize(os.path.join(root, rel)) != e["bytes"]]
        if bad:
            raise MissingComponentError(
                f"the model version's artifact 'teacher' lacks {len(bad)} file(s) it was registered with: "
                + ", ".join(f"{_component_name(r)} ({r})" for r in bad[:5]),
                fix="download the model version again (an interrupted download leaves files out); if the "
                    "artifact store lost them, re-register the model")
        return root
    cache = _cache_dir()
    bundle_id = settings_hash(files)
    broot = os.path.join(cache, "bundles", bundle_id)
    stores = list(dict.fromkeys(u for u in (os.environ.get("RCM_COMPONENT_STORE"), bundle.get("store")) if u))
    local = os.environ.get("RCM_TEACHER_DIR")
    missing = []
    for rel, e in files.items():
        obj = os.path.join(cache, "objects", e["sha256"])
        tried = []
        if not (os.path.isfile(obj) and os.path.getsize(obj) == e["bytes"]):
            cand = os.path.join(local, rel) if local else None
            if cand and os.path.isfile(cand) and sha256_file(cand) == e["sha256"]:
                _link_or_copy(cand, obj)
            else:
                if cand:
                    tried.append(f"RCM_TEACHER_DIR {cand}: " + ("other content" if os.path.isfile(cand) else "absent"))
                for url in stores:
                    try:
                        ContentStore(Storage(url)).get(e["sha256"], obj)
                        break
                    except Exception as ex:  # noqa: BLE001 - every store tried, each reason reported
                        tried.append(f"{url}: {type(ex).__name__}: {ex}")
                else:
                    missing.append((rel, e, tried))
                    continue
        dst = os.path.join(broot, rel)
        if not (os.path.isfile(dst) and os.path.getsize(dst) == e["bytes"]):
            _link_or_copy(obj, dst)
    if missing:
        lines = [f"  - {_component_name(rel)}: {rel} (sha256 {e['sha256'][:16]}..., {e['bytes']} bytes); tried "
                 + ("; ".join(t) if t else "no store (none recorded, RCM_COMPONENT_STORE unset)")
                 for rel, e, t in missing[:8]]
        more = f"\n  ... and {len(missing) - 8} more" if len(missing) > 8 else ""
        comps = sorted({_component_name(r) for r, _, _ in missing})
        raise MissingComponentError(
            f"cannot load the model: teacher component(s) {', '.join(comps)} not found (local cache "
            f"{os.path.join(cache, 'objects')}):\n" + "\n".join(lines) + more)
    return broot


def model_name_for(teacher: str) -> str:
    return "rcm-student-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", teacher).strip("-")


class RCMStudentModel(mlflow.pyfunc.PythonModel):
    """Few-step generator: prompt(s) -> clips, with the distilled EMA student."""

    def load_context(self, context):
        import torch

        from rcm_steps import teacher as T
        from rcm_steps.evaluate import student_denoiser

        with open(context.artifacts["meta"]) as f:
            self.meta = json.load(f)
        self.device, dtype = serving_device()
        ema = _student_weights(dict(context.artifacts))
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

    def predict(self, context, model_input, params: Optional[Dict[str, Any]] = None):
        import numpy as np
        from rcm_core.sampling import sample_student

        from rcm_steps import teacher as T

        from rcm_steps.evaluate import decode_latents

        torch = self._torch
        params = params or {}
        dev = torch.device(getattr(self, "device", "cpu"))
        outs = []
        for r in self._rows(model_input):
            steps = int(r.get("steps") or params.get("steps") or self.meta["default_steps"])
            seed = int(r.get("seed") if r.get("seed") is not None else params.get("seed", 0))
            cond = T.encode(self.teacher, [str(r["prompt"])]).to(dev)
            # the noise comes from a generator on the serving device: a seed gives other clips on a GPU
            g = torch.Generator(device=dev).manual_seed(seed)
            noise = torch.randn((1, *self.meta["latent_shape"]), generator=g, dtype=torch.float64, device=dev)
            lat = sample_student(self.student, cond, noise, steps=steps, sigma_max=self.meta["sigma_max"],
                                 mid_t=tuple(self.meta["mid_t"]), generator=g)
            outs.append(decode_latents(self.teacher, lat.float(), inplace=True).numpy())
        return np.concatenate(outs).astype(np.float32)


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
                                        "re-register the model")
    folder2, state2 = read("transformer_2")
    if state2:
        return {**{f"transformer.{k}": v for k, v in state.items()},
                **{f"transformer_2.{k}": v for k, v in state2.items()}}
    return state


def _guidance(meta: Dict[str, Any], run_id: Optional[str], spec) -> Optional[float]:
    """The CFG weight distilled into the student: meta's, the distill run's ``guidance`` param, else the teacher's."""
    if meta.get("guidance") is not None:
        return float(meta["guidance"])
    if run_id:
        try:
            from mlflow.tracking import MlflowClient

            v = MlflowClient().get_run(run_id).data.params.get("guidance")
            if v not in (None, "", "None"):
                return float(v)
        except Exception:  # noqa: BLE001 - no run params: fall back to the teacher's
            pass
    return float(spec.guidance) if spec is not None else None


def _run_grid(run_id: Optional[str]) -> Optional[bytes]:
    """The evaluate step's sample grid (run artifact ``eval/samples_grid.png``), if the run has one."""
    if not run_id:
        return None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        if not any(a.path == "eval/samples_grid.png" for a in client.list_artifacts(run_id, "eval")):
            return None
        with tempfile.TemporaryDirectory() as d:
            with open(client.download_artifacts(run_id, "eval/samples_grid.png", d), "rb") as f:
                return f.read()
    except Exception:  # noqa: BLE001 - the card goes without a grid
        return None


def _export_real(weights: bytes, meta: Dict[str, Any], bundle: Dict[str, Any], run_id: str, lineage: Dict[str, str],
                 metrics: Dict[str, float], workdir: str, grid: Optional[bytes]) -> tuple:
    """The diffusers export of a real teacher's student under ``workdir/diffusers`` (components by reference to
    the version's bundle); returns (export dir, export info, README card fields)."""
    import torch
    from rcm_core.export import export_student
    from rcm_core.real.loading import _locate

    spec, root = _locate(os.path.expanduser(meta["teacher"]))
    guidance = _guidance(meta, run_id, spec)
    out = os.path.join(workdir, "diffusers")
    lin = _card_lineage(meta, lineage, bundle)
    card = {"lineage": lin, "metrics": metrics, "grid": "samples_grid.png" if grid else None}
    where = ({"bundle": "teacher/ artifact of this model version"} if bundle["mode"] == "copy"
             else {"bundle": f"content store {bundle.get('store')} (sha256)"})
    res = export_student(weights, root, out, sigma_max=float(meta["sigma_max"]), mid_t=list(meta["mid_t"]),
                         steps=int(meta.get("default_steps", 4)), components="reference",
                         teacher_name=spec.name, guidance=guidance, single_file_dtype=torch.bfloat16,
                         name=meta.get("model_name") or model_name_for(meta["teacher"]),
                         card=card, component_source={**where, "mode": bundle["mode"],
                                                      "files": len(bundle["files"])})
    if grid:
        with open(os.path.join(out, "samples_grid.png"), "wb") as f:
            f.write(grid)
    return out, {**res.info, "fps": int(getattr(spec, "fps", 16))}, card


def _teacher_boundary(export_info: Dict[str, Any]) -> Optional[float]:
    """The teacher's boundary_ratio (its model_index.json, recorded by the export as the teacher's directory)."""
    try:
        with open(os.path.join(export_info["teacher"]["dir"], "model_index.json")) as f:
            v = json.load(f).get("boundary_ratio")
        return None if v is None else float(v)
    except (OSError, KeyError, ValueError, TypeError):
        return None


def check_export(teacher: str) -> str:
    """At ``start``: raise :class:`rcm_core.export.ExportError` (naming the teacher and what is missing) unless
    a real teacher's student can be exported for diffusers, so a run never trains for a registration that
    must fail. Returns the pipeline class."""
    from rcm_core.export import check_exportable
    from rcm_core.real.loading import _locate

    spec, root = _locate(os.path.expanduser(teacher))
    return check_exportable(root, spec.name).pipeline_class


def _card_lineage(meta: Dict[str, Any], lineage: Dict[str, str], bundle: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Lineage lines of the model card: the teacher's version and path first, then the run's lineage tags
    (the most telling first; the card drops lines from the end when it must fit 5000 characters)."""
    first = ("teacher_revision", "teacher_location", "metaflow.flow", "metaflow.run_id", "mlflow_run_id", "method",
             "data_hash", "prompts_hash", "profile")
    out = {"teacher version": meta.get("teacher_version"), "registered from": (bundle or {}).get("registered_from")}
    out.update({k: lineage[k] for k in first if lineage.get(k)})
    out.update({k: v for k, v in lineage.items() if k not in out and k not in ("teacher", "teacher_version") and v})
    return out


def student_card(name: str, version: str, info: Dict[str, Any], card: Dict[str, Any], max_chars: int = 5000) -> str:
    """The model version's description: :func:`rcm_core.export.model_card` with the registry's load code."""
    from rcm_core.export import model_card

    steps = info["scheduler"]["num_inference_steps"]
    out_attr = "frames" if info["pipeline_class"] == "WanPipeline" else "images"
    load = ["diffusers (the version's text encoder, tokenizer and VAE fetched and hash-checked):", "```python",
            "from rcm_steps.register import load_diffusers_pipeline",
            f"pipe = load_diffusers_pipeline(\"models:/{name}/{version}\")   # RCMScheduler; GPU bf16 when there is one",
            f"out = pipe(\"...\", num_inference_steps={steps}, guidance_scale=1.0).{out_attr}[0]", "```"]
    extra = ("Artifacts: `diffusers/` (this pipeline without text encoder/tokenizer/VAE, README.md, single file), "
             "`meta.json`" + (", `teacher/` (text encoder, tokenizer, VAE)"
                              if info.get("components", {}).get("registry", {}).get("mode") == "copy" else ""))
    return model_card(info, lineage=card.get("lineage"), metrics=card.get("metrics"),
                      grid="artifact:diffusers/samples_grid.png" if card.get("grid") else None,
                      model_uri=f"models:/{name}/{version}", export_path="<artifacts>/diffusers", version=version,
                      extra=extra, max_chars=max_chars, diffusers_load=load)


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
    if not os.path.isdir(export_dir):
        raise MissingComponentError(f"{model_uri} has no diffusers export (artifact 'diffusers'): registered "
                                    "before exports existed, or not a real teacher's student",
                                    fix="re-register the model (a new flow run exports it)")
    with open(os.path.join(arts, "meta.json")) as f:
        meta = json.load(f)
    artifacts = {k: os.path.join(arts, k) for k in os.listdir(arts)}
    components = materialize_bundle(meta["teacher_bundle"], artifacts)
    dev, dt = serving_device()
    return load_pipeline(export_dir, components_dir=components, torch_dtype=dtype or dt, device=device or dev)


@dataclass
class RegistrationResult:
    name: str
    version: str
    aliases: List[str]
    champion: bool
    reason: str
    model_uri: str
    card: Optional[str] = None          # the version's description (model card) when register_student wrote one


class ChampionError(ValueError):
    """A champion change that cannot be made (unknown version, gates failed, no earlier champion)."""


@dataclass(frozen=True)
class ChampionPolicy:
    """Which version is better, per teacher kind: metrics compared in order, then gates.

    ``keys``: (metric, "max" | "min") compared lexicographically at ``student_<steps>/``;
    ``gates``: (metric, gate name, default) meaning metric >= gates[gate name].
    """

    name: str
    keys: tuple
    gates: tuple = ()

    def describe(self, steps: int) -> str:
        order = ", then ".join(f"{'higher' if d == 'max' else 'lower'} student_{steps}/{k}" for k, d in self.keys)
        gates = "; ".join(f"gate student_{steps}/{k} >= {g}" for k, g, _ in self.gates)
        return f"{self.name}: {order}" + (f"; {gates}" if gates else "")


POLICIES = {
    "embedded": ChampionPolicy("embedded", (("digit_acc", "max"), ("fd_data", "min"))),
    "teacher-relative": ChampionPolicy("teacher-relative", (("fd_teacher", "min"), ("latent_rmse_teacher", "min")),
                                       (("diversity_rel", "min_diversity_rel", 0.05),)),
}


def policy_for(teacher: str) -> ChampionPolicy:
    """The embedded teacher's clips have a digit classifier; every other teacher is judged relative to itself."""
    return POLICIES["embedded" if teacher == "embedded" else "teacher-relative"]


def _as_tag(v: float) -> float:
    return float(f"{float(v):.6g}")          # what the version's metric tags hold: compare like with like


def score_of(metrics: Dict[str, Any], policy: Optional[ChampionPolicy] = None, steps: int = 4) -> tuple:
    """The policy's key metrics at ``student_<steps>/`` as a tuple where larger is better (NaN if missing)."""
    policy = policy or POLICIES["embedded"]
    out = []
    for k, d in policy.keys:
        v = metrics.get(f"student_{steps}/{k}")
        v = float("nan") if v is None else _as_tag(v)
        out.append(v if d == "max" else -v)
    return tuple(out)


def _beats(a: tuple, b: tuple) -> bool:
    for x, y in zip(a, b):
        if x != y:
            return x > y
    return False


def settings_hash(settings: Dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tag_metrics(tags: Dict[str, str]) -> Dict[str, float]:
    out = {}
    for k, v in (tags or {}).items():
        if k.startswith("metric."):
            try:
                out[k[len("metric."):]] = float(v)
            except ValueError:
                pass
    return out


def _champion(client, name: str):
    try:
        return client.get_model_version_by_alias(name, "champion")
    except Exception:  # noqa: BLE001 - no model / no alias yet
        return None


def _decide(policy: ChampionPolicy, steps: int, metrics: Dict[str, Any], gates_passed: bool,
            gates: Dict[str, float], settings: Dict[str, Any], current) -> tuple:
    """(promote?, reason) for a new version against the current champion model version (or None)."""
    if not gates_passed:
        return False, "evaluation gates failed"
    score = score_of(metrics, policy, steps)
    missing = [f"student_{steps}/{k}" for (k, _), v in zip(policy.keys, score) if math.isnan(v)]
    if missing:
        return False, f"not eligible under policy {policy.name}: {', '.join(missing)} missing or NaN"
    for k, gate, default in policy.gates:
        v, lim = metrics.get(f"student_{steps}/{k}"), float(gates.get(gate, default))
        if v is None or math.isnan(float(v)) or float(v) < lim:
            return False, f"gate failed under policy {policy.name}: student_{steps}/{k} {v} < {gate} {lim}"
    if current is None:
        return True, "first version that passes the gates"
    tags = current.tags or {}
    if tags.get("eval_settings") != settings_hash(settings):
        try:
            theirs = json.loads(tags.get("eval_settings.json", "null"))
        except ValueError:
            theirs = None
        from .storage import spec_diff

        return False, (f"not comparable with champion v{current.version}: evaluated with other settings ("
                       + spec_diff(_flat(theirs), _flat(settings), "champion", "this version")
                       + "); promote explicitly with `python -m rcm_steps.register promote` if it should win")
    theirs = score_of(_tag_metrics(tags), policy, steps)
    if _beats(score, theirs):
        return True, f"beats champion v{current.version} under {policy.describe(steps)}: {score} > {theirs}"
    return False, f"does not beat champion v{current.version} under {policy.describe(steps)}: {score} <= {theirs}"


def _flat(d: Any, prefix: str = "") -> Any:
    if not isinstance(d, dict):
        return {} if d is None else {"settings": d}
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _history(client, name: str) -> List[str]:
    tags = client.get_registered_model(name).tags or {}
    return [v for v in tags.get("champion.history", "").split(",") if v]


def _promote(client, name: str, version: str, reason: str, history: Optional[List[str]] = None) -> None:
    """Point ``champion`` at ``version``; the history gets it appended (or is replaced by ``history``)."""
    client.set_registered_model_alias(name, "champion", version)
    hist = (_history(client, name) + [str(version)]) if history is None else list(history)
    client.set_registered_model_tag(name, "champion.history", ",".join(hist[-200:]))
    client.set_model_version_tag(name, version, "champion_decision", reason)


def _version_or_error(client, name: str, version: str):
    try:
        return client.get_model_version(name, version)
    except Exception as e:  # noqa: BLE001
        raise ChampionError(f"model {name!r} has no version {version}: {e}") from None


def set_champion(name: str, version: str | int, reason: str = "", force: bool = False) -> str:
    """Point ``champion`` at ``version`` explicitly (recorded in its ``champion_decision`` and the history).

    Refuses a version whose evaluation gates failed unless ``force``. Returns the previous champion
    version ('' if none).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    version = str(version)
    mv = _version_or_error(client, name, version)
    if (mv.tags or {}).get("gates_passed") == "False" and not force:
        raise ChampionError(f"{name} v{version} failed its evaluation gates "
                            f"({(mv.tags or {}).get('champion_decision', '')}); pass force=True (--force) to make "
                            "it champion anyway")
    cur = _champion(client, name)
    prev = str(cur.version) if cur is not None else ""
    _promote(client, name, version, f"set explicitly (was v{prev or '-'})" + (f": {reason}" if reason else ""))
    return prev


def rollback_champion(name: str, to_version: str | int | None = None, reason: str = "") -> str:
    """Move ``champion`` back: to the champion before the current one (``champion.history``), or ``to_version``.

    The history is a stack: rolling back drops the entries after the version rolled back to, so a
    second rollback goes one further back. Versions deleted since are skipped. Returns the version
    that is champion now.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    cur = _champion(client, name)
    current = str(cur.version) if cur is not None else None
    hist = _history(client, name)
    while hist and hist[-1] == current:
        hist.pop()
    if to_version is None:
        existing = {str(v.version) for v in client.search_model_versions(f"name='{name}'")}
        while hist and hist[-1] not in existing:
            hist.pop()
        if not hist:
            raise ChampionError(f"{name}: no earlier champion to roll back to (history: "
                                f"{','.join(_history(client, name)) or 'empty'})")
        to_version = hist[-1]
    to_version = str(to_version)
    _version_or_error(client, name, to_version)
    new_hist = hist[: len(hist) - hist[::-1].index(to_version)] if to_version in hist else hist + [to_version]
    _promote(client, name, to_version, f"rollback from v{current or '-'}" + (f": {reason}" if reason else ""),
             history=new_hist)
    return to_version


def register_student(ema_weights_bytes: bytes, meta: Dict[str, Any], run_id: str, lineage: Dict[str, str],
                     metrics: Dict[str, float], gates_passed: bool, model_name: Optional[str] = None,
                     fail_after_version: bool = False, eval_settings: Optional[Dict[str, Any]] = None,
                     gates: Optional[Dict[str, float]] = None, components: str = "reference",
                     component_store: Optional[str] = None, sample_grid: Optional[bytes] = None,
                     lora_adapter: Optional[bytes] = None, lora_adapter_2: Optional[bytes] = None
                     ) -> RegistrationResult:
    """Log the pyfunc model into ``run_id`` and register it (see module doc).

    ``eval_settings``: what the metrics were computed with (:func:`rcm_steps.evaluate.eval_settings`);
    only versions with equal settings are compared for ``champion``. ``gates``: thresholds of the
    policy's gates (``min_diversity_rel``; defaults as :data:`rcm_steps.evaluate.DEFAULT_GATES`).
    ``components``: how a real teacher's text encoder, tokenizer, VAE and configs travel with the version
    (``reference``: sha256 references into the content store ``component_store``, e.g. ``<storage
    root>/components``; ``copy``: in the version's artifacts). ``fail_after_version`` injects a failure
    after the version exists (tests of rollback). ``sample_grid``: PNG for the model card (default: the
    run's ``eval/samples_grid.png``). A real teacher's student is exported for diffusers (artifact
    ``diffusers``; the description is its model card); :class:`rcm_core.export.ExportError` before any
    version exists when it cannot be. ``lora_adapter``: a LoRA run's EMA adapter in the peft/diffusers LoRA
    format (:func:`rcm_core.checkpoint.lora_safetensors`), registered as the extra artifact ``lora``
    (``student_lora.safetensors``, loadable with ``WanPipeline.load_lora_weights``) next to the merged weights.
    ``lora_adapter_2``: a two-expert (Wan2.2 A14B) student's second expert's adapter, the artifact ``lora_2``
    (``student_lora_2.safetensors``, ``load_lora_weights(..., load_into_transformer_2=True)``).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    if lora_adapter_2 is not None and lora_adapter is None:       # before anything is written
        raise ValueError("register_student: lora_adapter_2 (transformer_2's adapter) without lora_adapter")
    client = MlflowClient()
    name = model_name or model_name_for(meta["teacher"])
    steps = int(meta.get("default_steps", 4))
    policy = policy_for(meta["teacher"])
    settings = {**(eval_settings or {}), "student_steps": steps, "policy": policy.name}
    export_info = card = None
    with tempfile.TemporaryDirectory() as d:
        extra, bundle = bundle_teacher(meta, components, component_store, d)
        meta = {**meta, **({"teacher_bundle": bundle} if bundle else {})}
        wpath, mpath = os.path.join(d, "student_ema.safetensors"), os.path.join(d, "meta.json")
        if bundle:      # real teacher: the diffusers export holds the transformer (read by the pyfunc too)
            export_dir, export_info, card = _export_real(ema_weights_bytes, {**meta, "model_name": name}, bundle,
                                                         run_id, lineage, metrics,
                                                         d, sample_grid if sample_grid is not None
                                                         else _run_grid(run_id))
            meta["diffusers_export"] = {"artifact": "diffusers", "pipeline_class": export_info["pipeline_class"],
                                        "single_file": export_info["single_file"]}
            if bundle["files"].get("transformer_2/config.json"):      # a two-expert teacher (Wan2.2 A14B)
                meta["boundary_ratio"] = _teacher_boundary(export_info)
                meta.setdefault("student_layout", "two experts (switched at the boundary)"
                                if export_info.get("experts") else "one network")
            meta.setdefault("fps", export_info["fps"])
            extra = {**extra, "diffusers": export_dir}
            weights_art = {}
        else:
            with open(wpath, "wb") as f:
                f.write(ema_weights_bytes)
            weights_art = {"weights": wpath}
        for art, fname, data in (("lora", "student_lora.safetensors", lora_adapter),      # LoRA run: the adapter
                                 ("lora_2", "student_lora_2.safetensors", lora_adapter_2)):  # file(s) too
            if data is not None:                                                      # (the weights are merged)
                lpath = os.path.join(d, fname)
                with open(lpath, "wb") as f:
                    f.write(data)
                extra = {**extra, art: lpath}
                meta["lora_adapter" if art == "lora" else "lora_adapter_2"] = {
                    "artifact": art, "file": fname, "format": "peft/diffusers",
                    **({"load_into_transformer_2": True} if art == "lora_2" else {})}
        with open(mpath, "w") as f:
            json.dump(meta, f, indent=1)
        import rcm_core

        reqs = ["torch", "numpy", "pandas", "safetensors", "mlflow"] + (
            ["diffusers", "transformers", "accelerate", "sentencepiece"] if bundle else [])
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            info = mlflow.pyfunc.log_model(
                name="student", python_model=RCMStudentModel(),
                artifacts={**weights_art, "meta": mpath, **extra},
                code_paths=[_HERE, os.path.dirname(os.path.abspath(rcm_core.__file__))],
                pip_requirements=reqs)
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001
        try:
            client.create_registered_model(name, description=f"rCM students distilled from teacher {meta['teacher']}")
        except Exception as e:  # noqa: BLE001 - a concurrent run created it between the two calls
            from rcm_steps.mlflow_run import already_exists
            if not already_exists(e):
                raise
    tags = {**{k: str(v) for k, v in lineage.items()},
            **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items() if isinstance(v, (int, float))},
            "gates_passed": str(bool(gates_passed)), "student_steps": str(steps),
            "eval_settings": settings_hash(settings), "eval_settings.json": json.dumps(settings, sort_keys=True)[:4900],
            "champion_policy": policy.describe(steps),
            **({"lora_adapter": "artifact lora/student_lora.safetensors (peft/diffusers LoRA format)" + (
                "; transformer_2: artifact lora_2/student_lora_2.safetensors" if lora_adapter_2 is not None else "")}
               if lora_adapter is not None else {}),
            "teacher_components": (f"{bundle['mode']}: {len(bundle['files'])} files" + (
                f" in {bundle['store']}" if bundle.get("store") else " in the artifacts")) if bundle else "in code"}
    # model_id links the version to the logged model (an MLflow server rejects a models:/ source without it)
    mv = client.create_model_version(name, info.model_uri, run_id=run_id, tags=tags,
                                     model_id=getattr(info, "model_id", None))
    try:
        if fail_after_version:
            raise RuntimeError("injected failure after the model version was created")
        card_text = None
        client.set_registered_model_alias(name, "candidate", mv.version)
        aliases = ["candidate"]
        from .evaluate import DEFAULT_GATES

        champion, reason = _decide(policy, steps, metrics, gates_passed, {**DEFAULT_GATES, **(gates or {})},
                                   settings, _champion(client, name))
        if champion:
            _promote(client, name, str(mv.version), reason)
            aliases.append("champion")
        else:
            client.set_model_version_tag(name, mv.version, "champion_decision", reason)
        if export_info is not None:
            card = {**card, "lineage": {"registered as": f"{', '.join(aliases)} ({reason}); aliases move later: "
                                                         "see the champion.history tag", **card["lineage"]}}
            card_text = student_card(name, str(mv.version), export_info, card)
            client.update_model_version(name, mv.version, description=card_text)
    except BaseException:
        try:
            client.delete_model_version(name, mv.version)
        finally:
            raise
    return RegistrationResult(name=name, version=str(mv.version), aliases=aliases, champion=champion,
                              reason=reason, model_uri=f"models:/{name}/{mv.version}", card=card_text)


def main(argv=None) -> int:
    """``python -m rcm_steps.register promote|rollback --model NAME ...`` (uses MLFLOW_TRACKING_URI)."""
    import argparse

    p = argparse.ArgumentParser("rcm_steps.register", description="move the champion alias of a registered student")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("promote", help="make a version champion")
    pr.add_argument("--model", required=True)
    pr.add_argument("--version", required=True)
    pr.add_argument("--force", action="store_true", help="even if its evaluation gates failed")
    pr.add_argument("--reason", default="")
    rb = sub.add_parser("rollback", help="champion back to the previous one (or --to VERSION)")
    rb.add_argument("--model", required=True)
    rb.add_argument("--to", default=None)
    rb.add_argument("--reason", default="")
    for q in (pr, rb):
        q.add_argument("--tracking-uri", default=None)
    a = p.parse_args(argv)
    if a.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(a.tracking_uri)
    if a.cmd == "promote":
        prev = set_champion(a.model, a.version, reason=a.reason, force=a.force)
        print(f"{a.model}: champion v{a.version} (was v{prev or '-'})")
    else:
        now = rollback_champion(a.model, a.to, reason=a.reason)
        print(f"{a.model}: champion rolled back to v{now}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

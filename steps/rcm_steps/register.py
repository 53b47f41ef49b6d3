"""Register the EMA student as an MLflow pyfunc model that generates from prompts.

    model = mlflow.pyfunc.load_model("models:/rcm-student-embedded@champion")
    clips = model.predict(pd.DataFrame({"prompt": ["a 3 drifting up"], "seed": [0]}))
    # -> float32 array in [0, 1]: (N, 3, F, H, W) text-to-video, (N, 3, H, W) text-to-image (Cosmos-Predict2),
    #    (N, 1, 4, 16, 16) embedded; optional columns "seed", "steps" (real teachers: "height", "width", "frames")

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
  ``RCM_TEACHER_DIR`` to use a local copy of the teacher, or a new run with ``--model_components copy``).
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
  ``python -m rcm_steps.register export --model models:/<name>@champion --out DIR`` writes a self-contained
  folder (components copied in) that ``WanPipeline.from_pretrained(DIR)`` loads alone
  (:func:`export_diffusers`). Other teachers' versions (embedded) get a card too: lineage, metrics, load code,
  the sample grid (artifact ``samples_grid.png``).
* Signature: ``prompt`` (string), optional ``steps``, ``seed`` and, for real teachers, ``height``, ``width``
  (``frames`` for video) -> float32 clips in [0, 1]: (N, 3, F, H, W) text-to-video, (N, 3, H, W) text-to-image
  (Cosmos-Predict2), (N, 1, 4, 16, 16) embedded (:func:`model_signature`), with an input example.
* Serving: ``mlflow.pyfunc.load_model`` runs on the GPU when there is one (bf16 weights, the
  project attention with its fused kernel, the fast VAE decode) and on the CPU (float32) otherwise;
  ``RCM_DEVICE`` / ``RCM_DTYPE`` override. Serving options (issue 23, :mod:`rcm_core.nets.serving`): FP8
  linears (``fp8`` off | dynamic | static) and compiled blocks (``compile``), registered in ``meta.json``
  (``serving``, tag ``serving``) with the student's FP8 static scales (artifact ``fp8_scales``, calibrated in
  the evaluate step), switched by ``mlflow.pyfunc.load_model(uri, model_config={"fp8": "static"})``,
  ``RCM_FP8`` / ``RCM_COMPILE`` or generate's ``--fp8`` / ``--compile``.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

# the export bundle, the pyfunc model, the model card and the champion policy live in their own modules; the
# names are re-exported here (imports, ``python -m rcm_steps.register`` and versions whose pickled pyfunc names
# ``rcm_steps.register.RCMStudentModel`` use this module)
from .bundle import (COMPONENT_MODES, MissingComponentError, _export_real, _teacher_boundary,  # noqa: F401
                     bundle_teacher, check_components_mode, check_export, materialize_bundle)
from .champion import (POLICIES, ChampionError, ChampionPolicy, _champion, _decide, _promote,  # noqa: F401
                       policy_for, rollback_champion, score_of, set_champion, settings_hash)
from .model_card import _run_grid, plain_card, register_card, serving_note, student_card  # noqa: F401
from .serving import (RCMStudentModel, export_diffusers, load_diffusers_pipeline, model_signature,  # noqa: F401
                      serving_device)

__all__ = ["RCMStudentModel", "model_name_for", "register_student", "RegistrationResult", "score_of",
           "ChampionPolicy", "POLICIES", "policy_for", "settings_hash", "set_champion", "rollback_champion",
           "ChampionError", "MissingComponentError", "bundle_teacher", "materialize_bundle", "COMPONENT_MODES",
           "check_components_mode", "load_diffusers_pipeline", "export_diffusers", "model_signature",
           "serving_device", "student_card", "register_card", "serving_settings"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def _save_pyfunc(validate_serving_input: bool = True, **kw):
    import mlflow.pyfunc

    return mlflow.pyfunc.save_model(**kw)


# mlflow.pyfunc as the flavor of Model.log, which then skips its serving check of the input example: that check
# loads the model and generates from the example at log time (a real teacher's components fetched and a clip
# sampled on the registering machine); Model.log hands validate_serving_input on to save_model, which takes none
_PYFUNC = SimpleNamespace(__name__="mlflow.pyfunc", save_model=_save_pyfunc)


# the keys a load call may set (mlflow.pyfunc.load_model(uri, model_config={...}) drops keys the logged model does
# not declare); None: not given, so the registered setting and RCM_FP8 / RCM_COMPILE apply (ServingOptions.resolve)
LOAD_CONFIG = {"fp8": None, "compile": None, "sparse": None, "overlap": None}


def model_name_for(teacher: str) -> str:
    return "rcm-student-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", teacher).strip("-")

@dataclass
class RegistrationResult:
    name: str
    version: str
    aliases: List[str]
    champion: bool
    reason: str
    model_uri: str
    card: Optional[str] = None          # the version's description (model card)
    meta: Optional[Dict[str, Any]] = None   # the version's meta.json (teacher, components bundle, sizes...)
    task: Optional[str] = None          # t2v | t2i for a real teacher's student (its diffusers export), else None

def serving_settings(serving: Optional[Dict[str, str]], fp8_scales: Optional[Dict[str, float]]):
    """(:class:`ServingOptions`, checked scales or None) of a version to register; ``ValueError`` naming the
    option or the layer: a bad setting, or a quantised model (``fp8=static``) without its scales, is refused
    before anything is written."""
    from rcm_core.nets.serving import ServingOptions, check_scales

    opts = ServingOptions.from_dict(serving)
    if opts.fp8 == "static" and not fp8_scales:
        raise ValueError("register_student: serving fp8=static without fp8_scales: a quantised model registered "
                         "without its scales is refused before anything is written; pass the evaluate step's "
                         "EvalResult.fp8_scales, or register with fp8=dynamic / off")
    return opts, (check_scales(fp8_scales) if fp8_scales else None)


def serving_tag(opts, fp8_scales: Optional[Dict[str, float]]) -> str:
    """The version's ``serving`` tag: its settings and whether it carries FP8 scales."""
    return opts.label + (f"; FP8 scales: {len(fp8_scales)} layers" if fp8_scales else "; no FP8 scales")


def register_student(ema_weights_bytes: bytes, meta: Dict[str, Any], run_id: str, lineage: Dict[str, str],
                     metrics: Dict[str, float], gates_passed: bool, model_name: Optional[str] = None,
                     fail_after_version: bool = False, eval_settings: Optional[Dict[str, Any]] = None,
                     gates: Optional[Dict[str, float]] = None, components: str = "reference",
                     component_store: Optional[str] = None, sample_grid: Optional[bytes] = None,
                     lora_adapter: Optional[bytes] = None, lora_adapter_2: Optional[bytes] = None,
                     fp8_scales: Optional[Dict[str, float]] = None, serving: Optional[Dict[str, str]] = None
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
    ``fp8_scales``: the student's FP8 static activation scales {layer: amax / 448} (the evaluate step's
    ``EvalResult.fp8_scales``), the artifact ``fp8_scales`` (``fp8_scales.json``); ``serving``: the version's
    serving settings (:class:`rcm_core.nets.serving.ServingOptions`, default FP8 and compile off) in
    ``meta.json``, which the load call, ``RCM_FP8`` / ``RCM_COMPILE`` and generate's ``--fp8`` / ``--compile``
    override. Both are checked before anything is written (:func:`serving_settings`).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    if lora_adapter_2 is not None and lora_adapter is None:       # before anything is written
        raise ValueError("register_student: lora_adapter_2 (transformer_2's adapter) without lora_adapter")
    opts, fp8_scales = serving_settings(serving, fp8_scales)      # before anything is written too
    client = MlflowClient()
    name = model_name or model_name_for(meta["teacher"])
    steps = int(meta.get("default_steps", 4))
    policy = policy_for(meta["teacher"])
    settings = {**(eval_settings or {}), "student_steps": steps, "policy": policy.name}
    export_info = card = None
    grid = sample_grid if sample_grid is not None else _run_grid(run_id)
    with tempfile.TemporaryDirectory() as d:
        extra, bundle = bundle_teacher(meta, components, component_store, d)
        meta = {**meta, **({"teacher_bundle": bundle} if bundle else {})}
        wpath, mpath = os.path.join(d, "student_ema.safetensors"), os.path.join(d, "meta.json")
        if bundle:      # real teacher: the diffusers export holds the transformer (read by the pyfunc too)
            export_dir, export_info, card = _export_real(ema_weights_bytes, {**meta, "model_name": name}, bundle,
                                                         run_id, lineage, metrics,
                                                         d, grid)
            meta["diffusers_export"] = {"artifact": "diffusers", "pipeline_class": export_info["pipeline_class"],
                                        "single_file": export_info["single_file"]}
            if bundle["files"].get("transformer_2/config.json"):      # a two-expert teacher (Wan2.2 A14B)
                meta["boundary_ratio"] = _teacher_boundary(export_info)
                meta.setdefault("student_layout", "two experts (switched at the boundary)"
                                if export_info.get("experts") else "one network")
            meta.setdefault("fps", export_info["fps"])
            meta.setdefault("size", export_info["size"])
            extra = {**extra, "diffusers": export_dir}
            weights_art = {}
        else:
            with open(wpath, "wb") as f:
                f.write(ema_weights_bytes)
            weights_art = {"weights": wpath}
            if grid:                    # the card's sample grid (a real teacher's is in diffusers/)
                with open(os.path.join(d, "samples_grid.png"), "wb") as f:
                    f.write(grid)
                extra = {**extra, "samples_grid": os.path.join(d, "samples_grid.png")}
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
        meta["serving"] = opts.to_dict()
        if fp8_scales:                  # static FP8 scales travel with the weights they were measured on
            spath = os.path.join(d, "fp8_scales.json")
            with open(spath, "w") as f:
                json.dump(fp8_scales, f, indent=1, sort_keys=True)
            extra = {**extra, "fp8_scales": spath}
            meta["fp8_calibration"] = {"artifact": "fp8_scales", "layers": len(fp8_scales),
                                       "source": "the student's own activations while sampling the eval prompts"}
        with open(mpath, "w") as f:
            json.dump(meta, f, indent=1)
        import rcm_core

        reqs = ["torch", "numpy", "pandas", "safetensors", "mlflow"] + (
            ["diffusers", "transformers", "accelerate", "sentencepiece"] if bundle else [])
        signature, example = model_signature(meta, export_info["task"] if export_info else None)
        from .quiet import logging_model      # quiet, and leaves the run RUNNING (start_run's exit ends it)
        with logging_model(run_id):
            # mlflow.pyfunc.log_model, less its serving check of the input example (_PYFUNC)
            info = mlflow.models.Model.log(
                None, name="student", flavor=_PYFUNC, flavor_name="pyfunc.CustomPythonModel",
                validate_serving_input=False,
                python_model=RCMStudentModel(), artifacts={**weights_art, "meta": mpath, **extra},
                code_paths=[_HERE, os.path.dirname(os.path.abspath(rcm_core.__file__))],
                pip_requirements=reqs, signature=signature, input_example=example, model_config=LOAD_CONFIG)
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
            "champion_policy": policy.describe(steps), "serving": serving_tag(opts, fp8_scales),
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
            card = {**card, "serving": serving_note(meta, f"models:/{name}/{mv.version}", metrics),
                    "lineage": {"registered as": f"{', '.join(aliases)} ({reason}); aliases move later: "
                                                         "see the champion.history tag", **card["lineage"]}}
            card_text = student_card(name, str(mv.version), export_info, card)
        else:           # the embedded teacher and module:factory teachers: no diffusers export
            card_text = plain_card(name, str(mv.version), meta, lineage, metrics, aliases, reason, bool(grid))
        client.update_model_version(name, mv.version, description=card_text)
    except BaseException:
        try:
            client.delete_model_version(name, mv.version)
        finally:
            raise
    return RegistrationResult(name=name, version=str(mv.version), aliases=aliases, champion=champion,
                              reason=reason, model_uri=f"models:/{name}/{mv.version}", card=card_text, meta=meta,
                              task=export_info["task"] if export_info else None)


def main(argv=None) -> int:
    """``python -m rcm_steps.register promote|rollback --model NAME ...`` and ``export --model URI --out DIR``
    (uses MLFLOW_TRACKING_URI)."""
    import argparse

    p = argparse.ArgumentParser("rcm_steps.register", description="move the champion alias of a registered student; "
                                "export a version as a self-contained diffusers folder")
    sub = p.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write a real teacher's version as a folder that diffusers loads alone")
    ex.add_argument("--model", required=True, help="model URI, e.g. models:/rcm-student-my-wan@champion")
    ex.add_argument("--out", required=True, help="a new (or empty) folder")
    ex.add_argument("--overwrite", action="store_true", help="replace a folder that is not empty")
    ex.add_argument("--component-store", default=None,
                    help="URL of the teacher-component store, if it moved since registration (RCM_COMPONENT_STORE)")
    ex.add_argument("--teacher-dir", default=None,
                    help="a local copy of the teacher directory to take components from (RCM_TEACHER_DIR)")
    pr = sub.add_parser("promote", help="make a version champion")
    pr.add_argument("--model", required=True)
    pr.add_argument("--version", required=True)
    pr.add_argument("--force", action="store_true", help="even if its evaluation gates failed")
    pr.add_argument("--reason", default="")
    rb = sub.add_parser("rollback", help="champion back to the previous one (or --to VERSION)")
    rb.add_argument("--model", required=True)
    rb.add_argument("--to", default=None)
    rb.add_argument("--reason", default="")
    for q in (pr, rb, ex):
        q.add_argument("--tracking-uri", default=None)
    a = p.parse_args(argv)
    if a.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(a.tracking_uri)
    if a.cmd == "export":
        return _export_cli(a)
    if a.cmd == "promote":
        prev = set_champion(a.model, a.version, reason=a.reason, force=a.force)
        print(f"{a.model}: champion v{a.version} (was v{prev or '-'})")
    else:
        now = rollback_champion(a.model, a.to, reason=a.reason)
        print(f"{a.model}: champion rolled back to v{now}")
    return 0


def _export_cli(a) -> int:
    import sys

    from rcm_core.export import ExportError

    for flag, var in ((a.component_store, "RCM_COMPONENT_STORE"), (a.teacher_dir, "RCM_TEACHER_DIR")):
        if flag:
            os.environ[var] = flag
    try:
        out = export_diffusers(a.model, a.out, overwrite=a.overwrite)
    except (MissingComponentError, ExportError) as e:
        print(f"rcm_steps.register export: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(out, "rcm_export.json")) as f:
        cls = json.load(f)["pipeline_class"]
    print(f"wrote {out}: diffusers.{cls}.from_pretrained({out!r}) loads it alone (rcm_core installed, for its "
          "RCMScheduler); sample with guidance_scale=1.0")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
"""Export a distilled real-teacher student as a diffusers pipeline directory and a single-file transformer.

    from rcm_core.export import export_student
    export_student("runs/x/student_ema.safetensors", "/models/Wan2.1-T2V-1.3B-Diffusers", "exports/wan-rcm",
                   sigma_max=80.0, mid_t=(1.3, 1.0, 0.6), steps=4, components="copy")

writes, for a teacher whose ``model_index.json`` names a known pipeline class (:data:`PIPELINES`)::

    exports/wan-rcm/model_index.json            the teacher's pipeline class; scheduler ["rcm_core.scheduler", "RCMScheduler"]
    exports/wan-rcm/transformer/                the distilled (EMA) transformer, diffusers format
    exports/wan-rcm/scheduler/                  RCMScheduler config: sigma_max, mid_t, num_inference_steps
    exports/wan-rcm/text_encoder/ tokenizer/ vae/   the teacher's, copied (hard links where possible) with
                                                ``components="copy"``; left out with ``components="reference"``
                                                (rcm_export.json names where they are; :func:`load_pipeline`)
    exports/wan-rcm/<name>.safetensors          the transformer as one file for ComfyUI-style loaders (Wan2.1: the
                                                original release's tensor names, which ``from_single_file`` reads)
    exports/wan-rcm/README.md, rcm_export.json  model card; sampler, teacher, components, files

:func:`self_contained_export` turns an export by reference (a model version's ``diffusers`` artifact) into one
that ``from_pretrained`` loads alone, copying the components in.

Load it (``guidance_scale=1``: the student is CFG-distilled, so the pipeline must not apply CFG again)::

    import torch, rcm_core.scheduler                     # diffusers resolves RCMScheduler from the imported module
    from diffusers import WanPipeline
    pipe = WanPipeline.from_pretrained("exports/wan-rcm", torch_dtype=torch.bfloat16).to("cuda")
    video = pipe("a cat surfing", num_inference_steps=4, guidance_scale=1.0).frames[0]

No stock diffusers scheduler reproduces the sampler (see :mod:`rcm_core.scheduler`), hence
``RCMScheduler``. For the exact sampler of ``sample_student`` pass ``latents=initial_latents(pipe, noise)``
and ``pipe.scheduler.set_noise_generator(g)`` (see :func:`initial_latents`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from .card import model_card

__all__ = ["ExportError", "PipelineKind", "PIPELINES", "pipeline_kind", "check_exportable", "export_student",
           "ExportResult", "load_pipeline", "initial_latents", "read_export_info", "self_contained_export",
           "wan_original_state_dict", "wan_original_key", "EXPORT_FORMAT", "COMPONENT_MODES"]

EXPORT_FORMAT = "rcm-diffusers-export/1"
COMPONENT_MODES = ("copy", "reference")
SCHEDULER_ENTRY = ["rcm_core.scheduler", "RCMScheduler"]


class ExportError(ValueError):
    """A student cannot be exported (or an export cannot be loaded): names the teacher and what is missing."""


@dataclass(frozen=True)
class PipelineKind:
    """How a teacher's diffusers pipeline calls its transformer and scheduler."""

    pipeline_class: str
    family: str
    transformer_class: str
    prediction_type: str             # RCMScheduler space: "flow" (latents x_s, velocity) | "edm" (x0 + sigma eps)
    timestep_scale: float
    task: str                        # "t2v" | "t2i"
    single_file_format: str          # "wan-original" | "diffusers"
    required: tuple = ("text_encoder", "tokenizer", "vae")


PIPELINES: Dict[str, PipelineKind] = {
    "WanPipeline": PipelineKind("WanPipeline", "wan", "WanTransformer3DModel", "flow", 1000.0, "t2v",
                                "wan-original"),
    "Cosmos2TextToImagePipeline": PipelineKind("Cosmos2TextToImagePipeline", "cosmos", "CosmosTransformer3DModel",
                                               "edm", 1.0, "t2i", "diffusers"),
}


def _read_json(path: Path, what: str, teacher: str) -> dict:
    if not path.is_file():
        raise ExportError(f"cannot export the student of teacher {teacher!r}: {path} is missing ({what})")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"cannot export the student of teacher {teacher!r}: {path} ({what}) is not valid JSON: "
                          f"{e}") from None


def pipeline_kind(teacher_dir, teacher_name: Optional[str] = None) -> tuple:
    """(PipelineKind, model_index, transformer config) of a teacher directory, or :class:`ExportError`
    naming the teacher and what is missing (no diffusers layout, no pipeline class, an unknown one)."""
    name = teacher_name or str(teacher_dir)
    if teacher_dir is None or not Path(teacher_dir).is_dir():
        raise ExportError(
            f"cannot export the student of teacher {name!r}: it has no diffusers pipeline directory "
            f"({'no directory given' if teacher_dir is None else f'{teacher_dir} is not a directory'}); a diffusers "
            f"export needs the teacher's model_index.json (its pipeline class: one of {sorted(PIPELINES)}) and "
            "transformer/config.json. The embedded teacher and module:factory teachers have none.")
    root = Path(teacher_dir)
    index = _read_json(root / "model_index.json", "the pipeline index, naming the teacher's diffusers pipeline "
                       "class", name)
    cls = index.get("_class_name")
    if not cls:
        raise ExportError(f"cannot export the student of teacher {name!r}: {root / 'model_index.json'} has no "
                          f"_class_name, so the teacher's pipeline class is unknown (known: {sorted(PIPELINES)})")
    kind = PIPELINES.get(cls)
    if kind is None:
        raise ExportError(
            f"cannot export the student of teacher {name!r}: its pipeline class {cls!r} ({root / 'model_index.json'}) "
            f"is unknown to the exporter; known: {sorted(PIPELINES)}. Missing: how {cls} calls its transformer and "
            "scheduler (latent space, timestep scale) - add a PipelineKind to rcm_core.export.PIPELINES")
    import diffusers

    if not hasattr(diffusers, cls):
        raise ExportError(f"cannot export the student of teacher {name!r}: diffusers {diffusers.__version__} has no "
                          f"pipeline class {cls} (upgrade diffusers)")
    tcfg = _read_json(root / "transformer" / "config.json", "the transformer config", name)
    if tcfg.get("_class_name") != kind.transformer_class:
        raise ExportError(f"cannot export the student of teacher {name!r}: {cls} expects a "
                          f"{kind.transformer_class}, {root / 'transformer' / 'config.json'} names "
                          f"{tcfg.get('_class_name')!r}")
    return kind, index, tcfg


def check_exportable(teacher_dir, teacher_name: Optional[str] = None) -> PipelineKind:
    """Raise :class:`ExportError` early (before training) unless the teacher's student can be exported."""
    return pipeline_kind(teacher_dir, teacher_name)[0]


# ---- Wan2.1: diffusers names -> the original release's (what ComfyUI and from_single_file read) ---------

_WAN_TOP = (("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
            ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
            ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
            ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
            ("condition_embedder.time_proj.", "time_projection.1."),
            ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
            ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
            ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
            ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
            ("proj_out.", "head.head."))
_WAN_BLOCK = ((".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_out.0.", ".o."), (".to_q.", ".q."),
              (".to_k.", ".k."), (".to_v.", ".v."), (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."),
              (".norm_added_k.", ".norm_k_img."), (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."))


def wan_original_key(key: str) -> str:
    """The original Wan2.1 release's name of a diffusers ``WanTransformer3DModel`` tensor (inverse of
    diffusers' ``convert_wan_transformer_to_diffusers``)."""
    if key == "scale_shift_table":
        return "head.modulation"
    for a, b in _WAN_TOP:
        if key.startswith(a):
            return b + key[len(a):]
    if key.startswith("blocks."):
        k = key
        for a, b in _WAN_BLOCK:
            k = k.replace(a, b)
        if k.endswith(".scale_shift_table"):
            k = k[: -len("scale_shift_table")] + "modulation"
        # diffusers swapped norm2 (cross-attention norm) and norm3
        return re.sub(r"\.norm([23])\.", lambda m: ".norm3." if m.group(1) == "2" else ".norm2.", k)
    return key


def wan_original_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` under the original release's names, checked to convert back with diffusers' own converter."""
    out = {wan_original_key(k): v for k, v in state.items()}
    if len(out) != len(state):
        raise ExportError("Wan single-file export: two tensors map to one original name")
    try:
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    except ImportError:  # pragma: no cover - older diffusers: no check possible
        return out
    back = convert_wan_transformer_to_diffusers({k: k for k in out})
    wrong = sorted(k for k, orig in back.items() if k not in state or wan_original_key(k) != orig) + sorted(
        set(state) - set(back))
    if wrong:
        raise ExportError(f"Wan single-file export: names diffusers would not convert back: {wrong[:5]}")
    return out


# ---- files -----------------------------------------------------------------------------------

def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _component_names(index: dict, kind: PipelineKind) -> list:
    """Components of the pipeline besides the transformer and the scheduler (text encoder, tokenizer, VAE...)."""
    return [k for k, v in index.items() if not k.startswith("_") and k not in ("transformer", "transformer_2", "scheduler")
            and isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is not None]


def _experts_of(index: dict) -> bool:
    """The teacher is a Wan2.2 A14B mixture: model_index lists transformer_2 and a boundary_ratio."""
    v = index.get("transformer_2")
    return isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is not None and index.get("boundary_ratio") is not None


def split_expert_state(state: Mapping[str, torch.Tensor]) -> Optional[Dict[str, Dict[str, torch.Tensor]]]:
    """``{"transformer": ..., "transformer_2": ...}`` of a two-expert student's state dict
    (:class:`rcm_core.denoiser.TimestepExperts`: ``transformer.*`` / ``transformer_2.*``); None for one network."""
    subs = ("transformer", "transformer_2")
    if not any(k.startswith("transformer_2.") for k in state):
        return None
    out = {sub: {k[len(sub) + 1:]: v for k, v in state.items() if k.startswith(sub + ".")} for sub in subs}
    stray = [k for k in state if not k.startswith(("transformer.", "transformer_2."))]
    if stray:
        raise ExportError(f"a two-expert student's weights are transformer.* and transformer_2.*; got {stray[:3]}")
    return out


def _variant_of(index: dict, root: Path) -> str:
    if _experts_of(index):
        return "wan2.2-a14b"
    try:
        vae = json.loads((root / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        vae = {}
    return "wan2.2-ti2v" if vae.get("patch_size") is not None else None


def _files_of(folder: Path) -> Dict[str, int]:
    return {f.relative_to(folder).as_posix(): f.stat().st_size for f in sorted(folder.rglob("*"))
            if f.is_file() and not f.name.startswith(".")}


def _load_state(student_state) -> Dict[str, torch.Tensor]:
    if isinstance(student_state, (str, os.PathLike)):
        from safetensors.torch import load_file

        return load_file(str(student_state))
    if isinstance(student_state, (bytes, bytearray)):
        from safetensors.torch import load

        return load(bytes(student_state))
    return dict(student_state)


def _build_transformer(kind: PipelineKind, tcfg: dict, state: Dict[str, torch.Tensor], dtype, teacher: str):
    import diffusers

    cls = getattr(diffusers, kind.transformer_class)
    conf = {k: v for k, v in tcfg.items() if not k.startswith("_")}
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover
        init_empty_weights = None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in cls.from_config(conf).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = [f"{k}: student {tuple(state[k].shape)} vs config {expected[k]}" for k in sorted(set(expected) & set(state))
              if tuple(state[k].shape) != expected[k]]
    if missing or extra or shapes:
        raise ExportError(
            f"cannot export the student of teacher {teacher!r}: its weights do not match the teacher's "
            f"transformer/config.json ({kind.transformer_class}): "
            + "; ".join(p for p in (f"{len(missing)} missing, e.g. {missing[:3]}" if missing else "",
                                    f"{len(extra)} unexpected, e.g. {extra[:3]}" if extra else "",
                                    f"{len(shapes)} of another shape, e.g. {shapes[:2]}" if shapes else "") if p))
    if init_empty_weights is not None:
        with init_empty_weights(include_buffers=False):
            net = cls.from_config(conf)
        net.load_state_dict(state, strict=True, assign=True)
    else:  # pragma: no cover
        net = cls.from_config(conf)
        net.load_state_dict(state, strict=True)
    from ..nets.library_logs import cast_quietly      # a deliberate cast: no "kept in float32" warning
    return cast_quietly(net, dtype) if dtype is not None else net


@dataclass
class ExportResult:
    path: str
    pipeline_class: str
    single_file: Optional[str]
    components: str
    info: Dict[str, Any]


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "rcm-student"


def export_student(student_state, teacher_dir, out_dir, *, sigma_max: float = 80.0,
                   mid_t: Sequence[float] = (1.3, 1.0, 0.6), steps: int = 4, components: str = "copy",
                   teacher_name: Optional[str] = None, guidance: Optional[float] = None,
                   dtype: Optional[torch.dtype] = None, single_file: bool = True,
                   single_file_dtype: Optional[torch.dtype] = None, name: Optional[str] = None,
                   card: Optional[Mapping[str, Any]] = None, component_source: Optional[Mapping[str, Any]] = None,
                   overwrite: bool = False) -> ExportResult:
    """Write the diffusers pipeline directory of a distilled student (see the module doc).

    ``student_state``: the EMA student's state dict, a safetensors path or bytes. ``teacher_dir``: the
    teacher's diffusers directory (its ``model_index.json`` names the pipeline class; its
    ``transformer/config.json`` is the student's architecture). ``components``: ``copy`` (text encoder,
    tokenizer, VAE... into the export, hard links where possible: ``from_pretrained`` loads it as is) or
    ``reference`` (left out; ``rcm_export.json`` records where they are and ``component_source``, e.g. a
    model registry's sha256 bundle; :func:`load_pipeline` takes them from a directory). ``guidance``: the
    CFG weight distilled into the student (for the model card; the pipeline runs with guidance_scale=1).
    ``dtype`` / ``single_file_dtype``: cast the exported weights (default: as given). ``card``: extra model
    card fields (:func:`model_card`: ``lineage``, ``metrics``, ``grid``, ``model_uri``...).
    """
    if components not in COMPONENT_MODES:
        raise ValueError(f"components {components!r}; known: {COMPONENT_MODES}")
    teacher = teacher_name or (str(teacher_dir) if teacher_dir is not None else "?")
    kind, index, tcfg = pipeline_kind(teacher_dir, teacher)
    from .scheduler import RCMScheduler, check_sampler

    try:
        check_sampler(sigma_max, mid_t, steps, kind.prediction_type, kind.timestep_scale)
    except ValueError as e:
        raise ExportError(f"cannot export the student of teacher {teacher!r}: {e}") from None
    root, out = Path(teacher_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"export directory {out} is not empty (pass overwrite=True to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    comps = _component_names(index, kind)
    missing = [c for c in kind.required if not (root / c).is_dir()]
    if missing:
        raise ExportError(f"cannot export the student of teacher {teacher!r}: {root} lacks the component folder(s) "
                          f"{missing} that {kind.pipeline_class} needs")

    state = _load_state(student_state)
    experts = split_expert_state(state)
    if experts is not None and not _experts_of(index):
        raise ExportError(f"cannot export the student of teacher {teacher!r}: the student has two experts "
                          f"(transformer.*, transformer_2.*) but {root / 'model_index.json'} names no transformer_2 with "
                          "a boundary_ratio")
    nets = {sub: _build_transformer(kind, tcfg, st, dtype, teacher) for sub, st in
            (experts or {"transformer": state}).items()}
    for sub, n in nets.items():
        n.save_pretrained(out / sub, safe_serialization=True)
    net = nets["transformer"]
    sched = RCMScheduler(sigma_max=float(sigma_max), mid_t=[float(t) for t in mid_t], num_inference_steps=int(steps),
                         prediction_type=kind.prediction_type, timestep_scale=kind.timestep_scale)
    sched.save_pretrained(out / "scheduler")

    from ..teachers.real.loading import teacher_dir_label

    label = teacher_dir_label(root)
    name = _sanitize(name or f"rcm-student-{label}")
    new_index = {**index, "scheduler": list(SCHEDULER_ENTRY), "_name_or_path": name}
    if _experts_of(index) and experts is None:
        # a one-network student of a two-expert teacher: the pipeline must not switch to a transformer_2
        new_index.update(transformer_2=[None, None], boundary_ratio=None)
    (out / "model_index.json").write_text(json.dumps(new_index, indent=2) + "\n")

    comp_info: Dict[str, Any] = {"mode": components, "source": str(root.resolve())}
    present = [c for c in comps if (root / c).is_dir()]
    if components == "copy":
        for c in present:
            for rel in _files_of(root / c):
                _link_or_copy(root / c / rel, out / c / rel)
        comp_info["copied"] = present
    else:
        comp_info["referenced"] = {c: _files_of(root / c) for c in present}
        if component_source:
            comp_info["registry"] = dict(component_source)
    absent = [c for c in comps if c not in present]
    if absent:
        comp_info["absent_in_teacher"] = absent

    sf_name, sf_names = None, {}
    if single_file:
        from safetensors.torch import save_file

        for sub, n in nets.items():
            sd = {k: v.detach().to(single_file_dtype or v.dtype).contiguous() for k, v in n.state_dict().items()}
            if kind.single_file_format == "wan-original":
                sd = wan_original_state_dict(sd)
            # two experts: one file each, named as the Wan2.2 release names them (high / low noise model)
            fname = f"{name}.safetensors" if len(nets) == 1 else \
                f"{name}-{'high' if sub == 'transformer' else 'low'}-noise.safetensors"
            meta = {"format": "pt", "rcm.format": kind.single_file_format, "rcm.teacher": teacher,
                    "rcm.pipeline_class": kind.pipeline_class, "rcm.component": sub,
                    "rcm.sampler": json.dumps({"sigma_max": float(sigma_max), "mid_t": [float(t) for t in mid_t],
                                               "steps": int(steps)}),
                    "rcm.guidance_scale": "1.0"}
            if len(nets) > 1:
                meta["rcm.boundary_ratio"] = str(index["boundary_ratio"])
            save_file(sd, str(out / fname), metadata=meta)
            sf_names[sub] = fname
            del sd
        sf_name = sf_names["transformer"]

    from ..teachers.real.specs import matching_spec

    spec = matching_spec(tcfg, _variant_of(index, root))
    info = {"format": EXPORT_FORMAT, "name": name, "pipeline_class": kind.pipeline_class,
            "transformer_class": kind.transformer_class,
            "scheduler": {"class": "RCMScheduler", "module": SCHEDULER_ENTRY[0], "sigma_max": float(sigma_max),
                          "mid_t": [float(t) for t in mid_t], "num_inference_steps": int(steps),
                          "prediction_type": kind.prediction_type, "timestep_scale": kind.timestep_scale,
                          "init_noise_sigma": sched.init_noise_sigma,
                          # the pipeline's own start (WanPipeline: randn; Cosmos2: randn * 80, its fixed sigma_max)
                          # relative to the sampler's
                          "pipeline_start_ratio": (1.0 if kind.prediction_type == "flow" else 80.0)
                          / sched.init_noise_sigma},
            "guidance_scale": 1.0, "distilled_guidance": None if guidance is None else float(guidance),
            "teacher": {"name": teacher, "label": label, "dir": str(root.resolve()),
                        "hf_id": spec.hf_id if spec is not None else None, "pipeline_class": kind.pipeline_class},
            "task": kind.task, "components": comp_info, "dtype": str(next(iter(net.state_dict().values())).dtype
                                                                   ).replace("torch.", ""),
            "single_file": sf_name, "single_file_format": kind.single_file_format if sf_name else None,
            **({"single_file_2": sf_names.get("transformer_2"), "experts": list(nets),
                "boundary_ratio": new_index.get("boundary_ratio")} if len(nets) > 1 else {}),
            "single_file_dtype": (str(single_file_dtype).replace("torch.", "") if single_file_dtype else None),
            "card": dict(card or {})}            # the card's fields, so that a copy of the export rewrites it
    _write_info_and_card(out, info)
    return ExportResult(path=str(out), pipeline_class=kind.pipeline_class,
                        single_file=str(out / sf_name) if sf_name else None, components=components, info=info)


def _write_info_and_card(out: Path, info: Dict[str, Any]) -> None:
    """rcm_export.json and README.md (front matter + :func:`model_card`) of an export."""
    (out / "rcm_export.json").write_text(json.dumps(info, indent=1) + "\n")
    hf_id = info["teacher"].get("hf_id")
    front = ["---", "library_name: diffusers",
             f"pipeline_tag: {'text-to-video' if info['task'] == 't2v' else 'text-to-image'}",
             "tags: [rcm, consistency-distillation, few-step]"] + ([f"base_model: {hf_id}"] if hf_id else [])
    front += ["---", ""]
    card = {k: v for k, v in (info.get("card") or {}).items() if k != "export_path"}
    text = model_card(info, export_path=f"path/to/{out.name}", **card)
    (out / "README.md").write_text("\n".join(front) + text + "\n")


def self_contained_export(export_dir, components_dir, out_dir, *, source: Optional[str] = None,
                          overwrite: bool = False, move: bool = False) -> ExportResult:
    """A copy of an export whose components are by reference that ``<pipeline class>.from_pretrained(out_dir)``
    loads alone: the export's files plus the components it left out, copied from ``components_dir`` (the
    teacher's directory, or a model version's materialised bundle; hard links where possible). Its
    rcm_export.json and README.md then say ``copy``. ``move``: move the export's own files (a temporary copy)."""
    src, out, comp_root = Path(export_dir), Path(out_dir), Path(components_dir)
    info = read_export_info(src)
    index = json.loads((src / "model_index.json").read_text())
    kind = PIPELINES.get(index.get("_class_name"))
    if kind is None:
        raise ExportError(f"{src}: pipeline class {index.get('_class_name')!r} is unknown; known: {sorted(PIPELINES)}")
    absent = [c for c in _component_names(index, kind) if not (src / c).is_dir()]
    lacking = [c for c in absent if c in kind.required and not (comp_root / c).is_dir()]
    if lacking:
        raise ExportError(f"{comp_root} lacks the component folder(s) {lacking} that {kind.pipeline_class} needs "
                          f"(the export {src} refers to them)")
    if out.resolve() == src.resolve():
        raise ExportError(f"{out} is the export itself: pass another folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"export directory {out} is not empty (pass overwrite=True to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in [f for f in sorted(src.rglob("*")) if f.is_file()]:
        dst = out / f.relative_to(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), str(dst)) if move else _link_or_copy(f, dst)
    copied = [c for c in absent if (comp_root / c).is_dir()]
    for c in copied:
        for rel in _files_of(comp_root / c):
            _link_or_copy(comp_root / c / rel, out / c / rel)
    was = info.get("components", {})
    info = {**info, "components": {"mode": "copy", "copied": sorted({*was.get("copied", []), *copied}),
                                   "source": source or was.get("source"),
                                   **({"registry": was["registry"]} if was.get("registry") else {})}}
    _write_info_and_card(out, info)
    sf = info.get("single_file")
    return ExportResult(path=str(out), pipeline_class=kind.pipeline_class, single_file=str(out / sf) if sf else None,
                        components="copy", info=info)


def read_export_info(export_dir) -> Dict[str, Any]:
    p = Path(export_dir) / "rcm_export.json"
    if not p.is_file():
        raise ExportError(f"{export_dir} is not an rCM export (no rcm_export.json)")
    return json.loads(p.read_text())


def load_pipeline(export_dir, components_dir=None, torch_dtype: Optional[torch.dtype] = None, device=None, **kw):
    """The export's diffusers pipeline with its RCMScheduler.

    Components the export left out (``components="reference"``) come from ``components_dir`` (the teacher's
    directory, or a model version's materialised bundle); missing ones raise :class:`ExportError` naming them.
    """
    import importlib

    import diffusers

    from .scheduler import RCMScheduler

    root = Path(export_dir)
    index = json.loads((root / "model_index.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    kind = PIPELINES.get(index["_class_name"])
    extra = {}
    absent = [c for c in _component_names(index, kind) if not (root / c).is_dir()] if kind else []
    for c in absent:
        src = Path(components_dir) / c if components_dir is not None else None
        if src is None or not src.is_dir():
            if kind is not None and c not in kind.required:
                continue
            where = read_export_info(root).get("components", {}) if (root / "rcm_export.json").is_file() else {}
            raise ExportError(f"{root}: component {c!r} is not in the export (components by reference) and "
                              + (f"not in {components_dir}" if components_dir else "no components_dir was given")
                              + f"; pass components_dir= the teacher's directory (registered from "
                              f"{where.get('source', '?')})")
        lib, cname = index[c]
        ccls = getattr(importlib.import_module(lib), cname)
        kwc = {_dtype_kw(lib): torch_dtype} if torch_dtype is not None and c != "tokenizer" else {}
        extra[c] = ccls.from_pretrained(str(src), **kwc)
    scheduler = RCMScheduler.from_pretrained(str(root), subfolder="scheduler")
    kwargs = {"scheduler": scheduler, **extra, **kw}
    if torch_dtype is not None:
        kwargs[_dtype_kw("diffusers")] = torch_dtype
    pipe = cls.from_pretrained(str(root), **kwargs)
    return pipe.to(device) if device is not None else pipe


def _dtype_kw(library: str) -> str:
    """``dtype`` where the library takes it (diffusers >= 0.42, transformers >= 5), else ``torch_dtype``."""
    import importlib

    try:
        major, minor = (int(x) for x in importlib.import_module(library).__version__.split(".")[:2])
    except (ImportError, ValueError, AttributeError):
        return "torch_dtype"
    new = (major, minor) >= ((0, 42) if library == "diffusers" else (5, 0) if library == "transformers" else (99, 0))
    return "dtype" if new else "torch_dtype"


def initial_latents(pipe, noise: torch.Tensor) -> torch.Tensor:
    """What to pass as ``latents=`` so the pipeline starts where ``sample_student`` does from ``noise``.

    The sampler starts from ``x_t0 = noise``; in the pipeline's space that is ``noise *
    scheduler.init_noise_sigma``. ``WanPipeline`` feeds ``latents`` to the transformer as they are;
    ``Cosmos2TextToImagePipeline`` multiplies them by its ``scheduler.config.sigma_max`` first.
    """
    sched = pipe.scheduler
    x = noise.to(torch.float64) * sched.init_noise_sigma
    if type(pipe).__name__ == "Cosmos2TextToImagePipeline":
        x = x / float(sched.config.sigma_max)
    return x

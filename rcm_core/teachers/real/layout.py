"""A real teacher's weights on disk: where they are (``weights=``, ``$RCM_WEIGHTS_<NAME>``,
``$RCM_WEIGHTS_ROOT``, the Hugging Face cache), the diffusers layout, the variant a checkpoint is, and the
safetensors headers checked against the config before anything loads. :mod:`rcm_core.teachers.real.loading`
builds the :class:`~rcm_core.teachers.base.Teacher` from them (and re-exports these names).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Optional

import torch

from .specs import CHECKED_KEYS, FAMILY_OF_CLASS, PIPELINE_CLASSES, SPECS, RealTeacherSpec

__all__ = ["LAYOUT_HELP", "RealTeacherError", "UnsupportedTeacherError", "check_pipeline_class", "resolve_weights", "is_diffusers_dir", "check_layout", "vae_factors", "detect_variant", "read_safetensors_header", "check_weights"]

LAYOUT_HELP = ("model_index.json; transformer/{config.json, diffusion_pytorch_model.safetensors (or sharded "
               "*.safetensors + .index.json)}; text_encoder/{config.json, model.safetensors (or sharded)}; "
               "tokenizer/{tokenizer_config.json, tokenizer.json or spiece.model}; "
               "vae/{config.json, diffusion_pytorch_model.safetensors}")


class RealTeacherError(RuntimeError):
    """A real teacher's weights are missing or do not match what is expected."""


class UnsupportedTeacherError(RealTeacherError):
    """A diffusers directory of a model the project cannot distil (Stable Diffusion, Flux, ...): nothing to fix in
    its files, and nothing to download."""

    fix = (f"pass --teacher a supported teacher: a name ({', '.join(SPECS)}, embedded) or a Wan2.1 / Wan2.2 / "
           "Cosmos-Predict2 directory in diffusers layout; another model needs a Teacher written for it (README, "
           "Plugging in a teacher)")


# ---- locating weights -----------------------------------------------------------------

def _env_name(name: str) -> str:
    return "RCM_WEIGHTS_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def _download_help(spec: RealTeacherSpec) -> str:
    base = spec.hf_id.split("/")[-1]
    return (f"on a machine with network run\n    huggingface-cli download {spec.hf_id} --local-dir /models/{base}\n"
            f"copy /models/{base} here and set RCM_WEIGHTS_ROOT=/models (or {_env_name(spec.name)}=/models/{base}, "
            f"or pass the directory as --teacher); or run `huggingface-cli download {spec.hf_id}` without "
            f"--local-dir to fill the Hugging Face cache (HF_HOME) and copy that cache.")


def resolve_weights(spec: RealTeacherSpec, weights: Optional[str | os.PathLike] = None) -> Path:
    tried = []
    cands = []
    if weights is not None:
        cands.append(("weights argument", Path(weights)))
    if os.environ.get(_env_name(spec.name)):
        cands.append((_env_name(spec.name), Path(os.environ[_env_name(spec.name)])))
    if os.environ.get("RCM_WEIGHTS_ROOT"):
        cands.append(("RCM_WEIGHTS_ROOT", Path(os.environ["RCM_WEIGHTS_ROOT"]) / spec.hf_id.split("/")[-1]))
    for label, p in cands:
        if (p / "model_index.json").is_file():
            return p
        tried.append(f"{p} ({label}): " + ("no model_index.json" if p.is_dir() else "no such directory"))
    try:
        from huggingface_hub import snapshot_download
        # cache_dir read at call time (huggingface_hub reads HF_HOME only when imported)
        p = Path(snapshot_download(spec.hf_id, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE")))
        if (p / "model_index.json").is_file():
            return p
        tried.append(f"Hugging Face cache {p}: no model_index.json")
    except Exception as e:  # LocalEntryNotFoundError, offline errors, missing hub
        tried.append(f"Hugging Face cache ({spec.hf_id}, local_files_only): {type(e).__name__}")
    raise RealTeacherError(
        f"teacher {spec.name!r}: weights not found (nothing is downloaded). Looked in:\n  - " + "\n  - ".join(tried)
        + f"\nExpected a directory in diffusers layout: {LAYOUT_HELP}.\nTo get them, {_download_help(spec)}")


def check_pipeline_class(root: Path, index: dict) -> None:
    """Raise :class:`UnsupportedTeacherError` naming the pipeline class of ``root`` (model_index.json
    ``_class_name``), its components and the supported pipelines, when neither the pipeline is one of
    :data:`PIPELINE_CLASSES` nor its transformer/config.json a supported transformer (Stable Diffusion's
    ``unet/``, Flux's transformer). A supported transformer under another pipeline class goes on to the
    checks that name what else is missing (e.g. the exporter's)."""
    cls = index.get("_class_name")
    if cls in PIPELINE_CLASSES:
        return
    tcfg, tclass = Path(root) / "transformer" / "config.json", None
    if tcfg.is_file():
        try:
            tclass = json.loads(tcfg.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            return                                   # the transformer config's own check names the broken file
    if tclass in FAMILY_OF_CLASS:
        return
    parts = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list))
    supported = "; ".join(f"{k} ({v})" for k, v in PIPELINE_CLASSES.items())
    raise UnsupportedTeacherError(
        f"{Path(root) / 'model_index.json'}: pipeline {cls or '(no _class_name)'} (components: "
        f"{', '.join(parts) or 'none'}" + (f"; transformer/config.json: {tclass}" if tclass else "")
        + f") is not a teacher the project can distil; supported pipelines: {supported}")


def is_diffusers_dir(path) -> bool:
    try:
        return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()
    except (TypeError, OSError):
        return False


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise RealTeacherError(f"missing {path} ({what}); expected layout: {LAYOUT_HELP}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RealTeacherError(f"{path} ({what}) is not valid JSON: {e}") from e


def _has_weights(folder: Path, stem: str) -> bool:
    return any(folder.glob(f"{stem}*.safetensors")) or any(folder.glob(f"{stem}*.bin"))


def check_layout(root: Path, transformer_weights: bool = True) -> dict:
    """Check files and configs of a diffusers-layout directory; returns the configs.

    ``transformer_weights=False``: the transformer folder needs only its config.json (a model
    version's sampling bundle, whose transformer weights are the student's).
    """
    root = Path(root)
    index = _read_json(root / "model_index.json", "pipeline index")
    cfg = {"model_index": index}
    for sub, stem in (("transformer", "diffusion_pytorch_model"), ("text_encoder", "model"),
                      ("vae", "diffusion_pytorch_model")):
        cfg[sub] = _read_json(root / sub / "config.json", f"{sub} config")
        if (sub != "transformer" or transformer_weights) and not _has_weights(root / sub, stem):
            raise RealTeacherError(f"missing weights in {root / sub}: expected {stem}.safetensors (or sharded "
                                   f"{stem}-0000x-of-0000y.safetensors with {stem}.safetensors.index.json)")
    if _lists_component(index, "transformer_2") or (root / "transformer_2").is_dir():
        cfg["transformer_2"] = _read_json(root / "transformer_2" / "config.json", "transformer_2 config (the "
                                          "low-noise expert of a Wan2.2 A14B checkpoint)")
        if transformer_weights and not _has_weights(root / "transformer_2", "diffusion_pytorch_model"):
            raise RealTeacherError(f"missing weights in {root / 'transformer_2'}: expected diffusion_pytorch_model"
                                   ".safetensors (or sharded diffusion_pytorch_model-0000x-of-0000y.safetensors "
                                   "with diffusion_pytorch_model.safetensors.index.json)")
    tok = root / "tokenizer"
    if not ((tok / "tokenizer.json").is_file() or (tok / "spiece.model").is_file()):
        raise RealTeacherError(f"missing tokenizer in {tok}: expected tokenizer.json or spiece.model "
                               "(plus tokenizer_config.json)")
    cls = cfg["transformer"].get("_class_name")
    if cls not in FAMILY_OF_CLASS:
        raise RealTeacherError(f"{root / 'transformer' / 'config.json'}: _class_name {cls!r} is not a supported "
                               f"teacher architecture; supported: {sorted(FAMILY_OF_CLASS)}")
    return cfg


def _lists_component(index: dict, name: str) -> bool:
    v = index.get(name)
    return isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is not None


def vae_factors(vae_config: dict) -> tuple[int, int]:
    """(temporal, spatial) compression of a Wan VAE from its architecture: one 2x spatial step per
    down block but the last (``len(dim_mult) - 1``; the Wan2.1 layout also has ``len(temperal_downsample)``
    of them), 2x in time where ``temperal_downsample`` says so, times the patchify ``patch_size`` in
    space (the Wan2.2 VAE: 2 -> 16x). Wan2.1: (4, 8); Wan2.2: (4, 16)."""
    td = list(vae_config.get("temperal_downsample", [False, True, True]))
    dm = vae_config.get("dim_mult")
    n = len(dm) - 1 if dm else len(td)
    patch = int(vae_config.get("patch_size") or 1)
    return 2 ** sum(bool(x) for x in td[:n]), 2 ** n * patch


def detect_variant(root: Path, cfg: dict) -> str:
    """The Wan generation of a checkpoint from its configs (``"wan2.1"``, ``"wan2.2-ti2v"``, ``"wan2.2-a14b"``;
    ``""`` for Cosmos), checking that they agree; a mismatch raises :class:`RealTeacherError` naming the
    file and field.

    * Wan2.2 A14B: ``model_index.json`` lists ``transformer_2`` (the low-noise expert) and sets
      ``boundary_ratio``; both experts share one architecture.
    * Wan2.2 TI2V: the Wan2.2 VAE (``vae/config.json`` ``patch_size`` set: patchified, z_dim 48 for the 5B);
      ``expand_timesteps`` in ``model_index.json`` is the diffusers pipeline's marker of it.
    * otherwise Wan2.1.
    Always: the VAE's ``z_dim`` equals the transformer's ``in_channels`` and ``out_channels``.
    """
    root = Path(root)
    index, tcfg, vcfg = cfg["model_index"], cfg["transformer"], cfg["vae"]
    family = FAMILY_OF_CLASS.get(tcfg.get("_class_name"), "")
    z = vcfg.get("z_dim", 16)
    for key in ("in_channels", "out_channels"):
        if key in tcfg and tcfg[key] != z:
            raise RealTeacherError(
                f"{root / 'vae' / 'config.json'}: z_dim {z} does not match {root / 'transformer' / 'config.json'} "
                f"{key} {tcfg[key]}: the transformer denoises the VAE's latents, so they must be equal (a VAE of "
                f"another model? Wan2.1's VAE has z_dim 16, Wan2.2's 48)")
    if family != "wan":
        return ""
    moe = "transformer_2" in cfg
    ratio = index.get("boundary_ratio")
    if moe:
        if ratio is None:
            raise RealTeacherError(f"{root / 'model_index.json'}: transformer_2 (a second expert) is present but "
                                   "boundary_ratio is null: WanPipeline would never call transformer_2; set "
                                   "boundary_ratio (Wan2.2 T2V-A14B: 0.875) or remove transformer_2")
        try:
            ok = 0.0 < float(ratio) < 1.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise RealTeacherError(f"{root / 'model_index.json'}: boundary_ratio {ratio!r} must be a number in (0, 1)")
        t2 = cfg["transformer_2"]
        bad = [f"{k} {t2.get(k)!r} (transformer: {tcfg.get(k)!r})" for k in ("_class_name", *CHECKED_KEYS["wan"])
               if _norm(t2.get(k)) != _norm(tcfg.get(k))]
        if bad:
            raise RealTeacherError(f"{root / 'transformer_2' / 'config.json'} does not match transformer/config.json: "
                                   + ", ".join(bad) + "; both experts must share one architecture")
        return "wan2.2-a14b"
    if ratio is not None:
        raise RealTeacherError(f"{root / 'model_index.json'}: boundary_ratio {ratio!r} is set but there is no "
                               f"transformer_2 (no {root / 'transformer_2'} / model_index entry): a Wan2.2 A14B "
                               "checkpoint needs both experts")
    wan22_vae = vcfg.get("patch_size") is not None
    if index.get("expand_timesteps") and not wan22_vae:
        raise RealTeacherError(f"{root / 'model_index.json'}: expand_timesteps is true (the Wan2.2 TI2V pipeline) but "
                               f"{root / 'vae' / 'config.json'} is a Wan2.1 VAE (no patch_size); a TI2V checkpoint "
                               "needs the Wan2.2 VAE (z_dim 48, patch_size 2)")
    if wan22_vae:
        t_arch, s_arch = vae_factors(vcfg)
        for key, arch in (("scale_factor_temporal", t_arch), ("scale_factor_spatial", s_arch)):
            if key in vcfg and vcfg[key] is not None and int(vcfg[key]) != arch:
                raise RealTeacherError(
                    f"{root / 'vae' / 'config.json'}: {key} {vcfg[key]} does not match the VAE's architecture "
                    f"(dim_mult, temperal_downsample, patch_size give {arch}); WanPipeline sizes its latents with "
                    f"{key}, so the two would disagree")
        return "wan2.2-ti2v"
    return "wan2.1"


def _check_spec_config(spec: RealTeacherSpec, cfg: dict, root: Path) -> None:
    tcfg = cfg["transformer"]
    if tcfg.get("_class_name") != spec.transformer_class:
        raise RealTeacherError(f"{root}: transformer is {tcfg.get('_class_name')!r}, teacher {spec.name!r} "
                               f"expects {spec.transformer_class!r} (wrong checkpoint for this teacher?)")
    bad = [f"{k}={tcfg.get(k)!r} (expected {spec.transformer_config[k]!r})" for k in CHECKED_KEYS[spec.family]
           if k in spec.transformer_config and _norm(tcfg.get(k)) != _norm(spec.transformer_config[k])]
    if bad:
        raise RealTeacherError(f"{root / 'transformer' / 'config.json'} does not match teacher {spec.name!r}: "
                               + ", ".join(bad) + f". Is this {spec.hf_id}?")
    vbad = [f"{k}={cfg['vae'].get(k)!r} (expected {v!r})" for k, v in spec.vae_config.items()
            if _norm(cfg["vae"].get(k)) != _norm(v)]
    if vbad:
        raise RealTeacherError(f"{root / 'vae' / 'config.json'} does not match teacher {spec.name!r}: "
                               + ", ".join(vbad) + f". Is this {spec.hf_id}?")
    te = cfg["text_encoder"].get("architectures") or []
    if te and spec.text_encoder_class not in te:
        raise RealTeacherError(f"{root / 'text_encoder' / 'config.json'}: architectures {te}, teacher {spec.name!r} "
                               f"expects {spec.text_encoder_class}")


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


# ---- weights: safetensors headers of every component, names and shapes against the configs -----

# bytes per element of the safetensors dtypes (sub-byte / unknown dtypes are not size-checked)
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
             "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
_RECOPY = "copy the file again (an interrupted download or copy leaves a truncated file)"

# (folder, weight-file stem) of every component whose weights are read
_COMPONENTS = (("transformer", "diffusion_pytorch_model"), ("text_encoder", "model"),
               ("vae", "diffusion_pytorch_model"))


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """``{tensor name: (dtype, shape)}`` from a safetensors file's header, reading only the header.

    Checks what the format fixes - header length, JSON, dtypes, offsets contiguous and matching
    each tensor's size, the file exactly as long as the header says - and raises
    :class:`RealTeacherError` naming the file and the problem (a truncated copy, most often).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0:
                raise RealTeacherError(f"{path}: {size} bytes, too short for a safetensors file (truncated or "
                                       f"empty): {_RECOPY}")
            if n > size - 8:
                raise RealTeacherError(f"{path}: truncated: the header alone should be {n} bytes, the file has "
                                       f"{size}: {_RECOPY}")
            if n > 100 * 2 ** 20:
                raise RealTeacherError(f"{path}: not a safetensors file (header length field {n})")
            raw = f.read(n)
    except OSError as e:
        raise RealTeacherError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise RealTeacherError(f"{path}: corrupt safetensors header (not valid JSON: {e}); {_RECOPY}") from None
    out, spans = {}, []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = e["dtype"], [int(x) for x in e["shape"]], e["data_offsets"]
            lo, hi = int(lo), int(hi)
        except (KeyError, TypeError, ValueError):
            raise RealTeacherError(f"{path}: corrupt safetensors header: entry {name!r} is {e!r}") from None
        numel = math.prod(shape)
        if dtype in _ST_BYTES and hi - lo != numel * _ST_BYTES[dtype]:
            raise RealTeacherError(f"{path}: corrupt safetensors header: tensor {name!r} {dtype} {shape} needs "
                                   f"{numel * _ST_BYTES[dtype]} bytes, its offsets span {hi - lo}")
        out[name] = (dtype, tuple(shape))
        spans.append((lo, hi, name))
    spans.sort()
    pos = 0
    for lo, hi, name in spans:
        if lo != pos:
            raise RealTeacherError(f"{path}: corrupt safetensors header: tensor {name!r} starts at data byte {lo}, "
                                   f"expected {pos} (gap or overlap)")
        pos = hi
    expected = 8 + n + pos
    if size < expected:
        raise RealTeacherError(f"{path}: truncated: {size} bytes, its header says the tensor data ends at byte "
                               f"{expected} ({expected - size} bytes missing): {_RECOPY}")
    if size > expected:
        raise RealTeacherError(f"{path}: {size - expected} unexpected bytes after the last tensor (the header says "
                               f"the file ends at byte {expected}): corrupt or not what the header describes; "
                               f"{_RECOPY}")
    return out


def _weight_files(folder: Path, stem: str) -> list:
    """The safetensors files of a component: those its ``<stem>.safetensors.index.json`` lists, else all."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        wm = _read_json(index, "sharded checkpoint index").get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise RealTeacherError(f"{index}: no weight_map (a sharded checkpoint index lists tensor -> file)")
        files = sorted({folder / f for f in wm.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise RealTeacherError(f"{index} lists {len(missing)} shard(s) missing from {folder}: "
                                   f"{', '.join(missing[:5])}; copy them too")
        return files
    return sorted(folder.glob(f"{stem}*.safetensors"))


def _expected_state(component: str, spec: RealTeacherSpec, cfg: dict, root: Path):
    """Tensor names -> shapes of the component built from its config on the meta device, and tied-name groups."""
    import diffusers
    import transformers

    conf = {k: v for k, v in cfg[component].items() if not k.startswith("_")}
    with torch.device("meta"):
        if component == "text_encoder":
            ecls = getattr(transformers, spec.text_encoder_class)
            model = ecls(ecls.config_class.from_dict(cfg[component]))
        else:
            cls = getattr(diffusers, spec.transformer_class if component.startswith("transformer") else spec.vae_class)
            model = cls.from_config(conf)
    shapes, groups = {}, {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(
            remove_duplicate=False)):
        groups.setdefault(id(t), []).append(name)
    persistent = model.state_dict()
    for name, t in persistent.items():
        shapes[name] = tuple(t.shape)
    alias = {n: g for g in groups.values() for n in g}
    return shapes, alias


def check_weights(spec: RealTeacherSpec, root: Path, cfg: dict) -> dict:
    """Read every safetensors header of the transformer, text encoder and VAE; compare names and shapes.

    Nothing but headers is read. Any failure raises :class:`RealTeacherError` naming the file
    (truncated, corrupt header, missing shard) or the component folder (tensor missing or of
    another shape than its ``config.json`` says). Returns ``{component: number of tensors}``.
    """
    out = {}
    comps = _COMPONENTS + ((("transformer_2", "diffusion_pytorch_model"),) if "transformer_2" in cfg else ())
    for sub, stem in comps:
        folder = root / sub
        files = _weight_files(folder, stem)
        if not files:      # .bin checkpoints: diffusers / transformers check them when loading
            continue
        found = {}
        for f in files:
            found.update({k: v[1] for k, v in read_safetensors_header(f).items()})
        try:
            expected, alias = _expected_state(sub, spec, cfg, root)
        except Exception as e:  # noqa: BLE001 - a config the class cannot build from
            raise RealTeacherError(f"{folder / 'config.json'}: cannot build the {sub} from this config: "
                                   f"{type(e).__name__}: {e}") from e
        missing = sorted(k for k in expected if k not in found and not any(a in found for a in alias.get(k, [k])))
        mism = [f"{k}: checkpoint {found[k]} vs config {expected[k]}" for k in sorted(set(expected) & set(found))
                if found[k] != expected[k]]
        if missing or mism:
            msg = [f"{folder}: weights do not match {sub}/config.json"]
            if mism:
                msg.append(f"{len(mism)} shape mismatches, e.g. " + "; ".join(mism[:3]))
            if missing:
                msg.append(f"{len(missing)} tensors missing, e.g. " + ", ".join(missing[:3]))
            raise RealTeacherError(". ".join(msg) + f" (files: {', '.join(f.name for f in files)})")
        out[sub] = len(found)
    return out


# ---- calling the transformers --------------------------------------------------------

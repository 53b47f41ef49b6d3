"""What a registered version carries besides the pyfunc: the teacher's components and the diffusers export.

* :func:`bundle_teacher` puts a real teacher's text encoder, tokenizer, VAE and configs either into the
  content store (``reference``, sha256-addressed) or into the version's artifacts (``copy``);
  :func:`materialize_bundle` turns a version's bundle back into a local teacher directory (cache,
  ``$RCM_TEACHER_DIR``, content store), raising :class:`MissingComponentError` naming what is missing.
* :func:`_export_real` writes the student as a diffusers pipeline directory with its model card;
  :func:`check_export` refuses at ``start`` a teacher whose student cannot be exported.

Part of :mod:`rcm_steps.register` (which re-exports the public names); see its module doc.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from .champion import settings_hash
from .model_card import _card_lineage, _guidance


COMPONENT_MODES = ("reference", "copy")


class MissingComponentError(RuntimeError):
    """A model version cannot be loaded: a teacher component it needs is not available here.

    The message ends with the fix (``fix: ...``, also the ``fix`` attribute); ``missing`` lists every missing
    file with its sha256, size and what each place said."""

    fix = ("if the component store moved, set RCM_COMPONENT_STORE=<its URL now> (`rcm_steps.generate "
           "--component-store`; s3:// needs credentials, and RCM_STORAGE_OPTIONS for another endpoint); or set "
           "RCM_TEACHER_DIR=<a local copy of the teacher directory> (`--teacher-dir`; files are hash-checked); or "
           "run the flow again with --model_components copy (the version then carries the files itself)")

    def __init__(self, message: str, fix: Optional[str] = None, missing: Optional[List[Dict[str, Any]]] = None):
        if fix:
            self.fix = fix
        self.missing = list(missing or [])
        super().__init__(f"{message}\nfix: {self.fix}")


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
    opts = portable_storage_options(store.storage.storage_options)
    if opts:
        bundle["store_options"] = opts
    return {}, bundle


# storage options that say where a store is, not who reads it: recorded with a bundle so that any machine with
# credentials reaches the store (an S3 endpoint other than AWS's); keys, secrets, tokens and profiles are not
_PORTABLE_OPTIONS = ("endpoint_url", "anon", "use_ssl", "requester_pays")


def portable_storage_options(opts: Dict[str, Any]) -> Dict[str, Any]:
    """The part of fsspec storage options that locates a store (no credentials)."""
    out = {k: opts[k] for k in _PORTABLE_OPTIONS if k in opts}
    ck = {k: v for k, v in (opts.get("client_kwargs") or {}).items() if k in ("endpoint_url", "region_name")}
    return {**out, **({"client_kwargs": ck} if ck else {})}


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
    (``$RCM_COMPONENT_STORE`` first, then the one recorded at registration, with its recorded endpoint unless
    ``RCM_STORAGE_OPTIONS`` says otherwise), verified by sha256.
    Raises :class:`MissingComponentError` naming every missing file, where it looked and the fix.
    """
    files = bundle["files"]
    if bundle["mode"] == "copy":
        root = artifacts.get("teacher")
        bad = [rel for rel, e in files.items()
               if root is None or not os.path.isfile(os.path.join(root, rel))
               or os.path.getsize(os.path.join(root, rel)) != e["bytes"]]
        if bad:
            raise MissingComponentError(
                f"the model version's artifact 'teacher' lacks {len(bad)} file(s) it was registered with: "
                + _file_list(bad),
                fix="download the model version again (an interrupted download leaves files out); if the "
                    "artifact store lost them, run the flow again (a new version)")
        return root
    cache = _cache_dir()
    broot = os.path.join(cache, "bundles", settings_hash(files))
    stores = _stores(bundle)
    local = os.environ.get("RCM_TEACHER_DIR")
    missing = []
    for rel, e in files.items():
        obj = os.path.join(cache, "objects", e["sha256"])
        if not (os.path.isfile(obj) and os.path.getsize(obj) == e["bytes"]):
            tried = _fetch(rel, e, obj, local, stores)
            if tried is not None:
                missing.append({"file": rel, "sha256": e["sha256"], "bytes": e["bytes"], "tried": tried})
                continue
        dst = os.path.join(broot, rel)
        if not (os.path.isfile(dst) and os.path.getsize(dst) == e["bytes"]):
            _link_or_copy(obj, dst)
    if missing:
        raise MissingComponentError(_missing_message(missing, os.path.join(cache, "objects"), local, stores),
                                    missing=missing)
    return broot


def _stores(bundle: Dict[str, Any]) -> Dict[str, tuple]:
    """Content stores to try, in order: URL -> (label, storage options). ``$RCM_COMPONENT_STORE`` first; the
    recorded store with its recorded (non-secret) options under ``$RCM_STORAGE_OPTIONS``."""
    from .storage import storage_options_from_env

    env, rec = os.environ.get("RCM_COMPONENT_STORE"), bundle.get("store")
    out: Dict[str, tuple] = {}
    if env:
        out[env] = ("RCM_COMPONENT_STORE", {})
    if rec:
        label = "RCM_COMPONENT_STORE, as registered" if rec == env else "recorded at registration"
        out[rec] = (label, {**bundle.get("store_options", {}), **storage_options_from_env()})
    return out


def _fetch(rel: str, e: Dict[str, Any], obj: str, local: Optional[str], stores: Dict[str, tuple]
           ) -> Optional[Dict[str, str]]:
    """Put one file into the cache (``obj``) from ``$RCM_TEACHER_DIR`` or a store; None when done, else what
    each place said (place -> reason)."""
    from .storage import ContentStore, Storage, sha256_file

    tried: Dict[str, str] = {}
    if local:
        cand = os.path.join(local, rel)
        if os.path.isfile(cand) and sha256_file(cand) == e["sha256"]:
            _link_or_copy(cand, obj)
            return None
        tried[f"RCM_TEACHER_DIR {local}"] = "other content" if os.path.isfile(cand) else "absent"
    for url, (label, opts) in stores.items():
        try:
            ContentStore(Storage(url, opts)).get(e["sha256"], obj)
            return None
        except FileNotFoundError:
            tried[f"content store {url} ({label})"] = "absent"
        except Exception as ex:  # noqa: BLE001 - every store tried, each reason reported
            # the object's own key left out, so that one cause (credentials, endpoint) reads as one reason
            tried[f"content store {url} ({label})"] = f"{type(ex).__name__}: {ex}".replace(
                ContentStore.key(e["sha256"]), "sha256/<aa>/<sha256>")
    return tried


def _file_list(rels) -> str:
    """``model_index.json, text_encoder/{config.json, model.safetensors}, vae/x.safetensors``."""
    groups: Dict[str, List[str]] = {}
    for r in rels:
        top, _, rest = r.partition("/")
        groups.setdefault(top if rest else "", []).append(rest or top)
    parts = list(groups.get("", []))
    for top, names in groups.items():
        if top:
            parts.append(f"{top}/{names[0]}" if len(names) == 1 else f"{top}/{{{', '.join(names)}}}")
    return ", ".join(parts)


def _missing_message(missing: List[Dict[str, Any]], cache: str, local: Optional[str],
                     stores: Dict[str, tuple]) -> str:
    """Which files are missing (compactly; sha256 when few), and what each place said about them."""
    comps = sorted({_component_name(m["file"]) for m in missing})
    what = _file_list(m["file"] for m in missing)
    if len(missing) <= 2:
        what = "; ".join(f"{m['file']} (sha256 {m['sha256'][:16]}..., {m['bytes']} bytes)" for m in missing)
    places: Dict[str, Dict[str, List[str]]] = {}
    for m in missing:
        for place, reason in m["tried"].items():
            places.setdefault(place, {}).setdefault(reason, []).append(m["file"])
    looked = [f"local cache {cache}"] + ([] if local else ["RCM_TEACHER_DIR (unset)"])
    looked += [f"{place}: " + "; ".join(
        f"{reason} ({'all ' + str(len(fs)) if len(fs) == len(missing) > 1 else _file_list(fs)})"
        for reason, fs in reasons.items()) for place, reasons in places.items()]
    if not stores:
        looked.append("no content store (none recorded, RCM_COMPONENT_STORE unset)")
    return (f"cannot load the model: {len(missing)} teacher file(s) of {', '.join(comps)} not found here: {what}\n"
            "looked in: " + "; ".join(looked))


def _export_real(weights: bytes, meta: Dict[str, Any], bundle: Dict[str, Any], run_id: str, lineage: Dict[str, str],
                 metrics: Dict[str, float], workdir: str, grid: Optional[bytes]) -> tuple:
    """The diffusers export of a real teacher's student under ``workdir/diffusers`` (components by reference to
    the version's bundle); returns (export dir, export info, README card fields)."""
    import torch
    from rcm_core.export import export_student
    from rcm_core.real.loading import _locate

    from .register import model_name_for

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
    opts = meta.get("teacher_options") or {}
    size = {k: int(opts.get(k) or getattr(spec, k)) for k in ("frames", "height", "width")}   # the registered size
    return out, {**res.info, "fps": int(getattr(spec, "fps", 16)), "size": size}, card


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

"""Retraining on new teachers: find teacher versions not yet distilled, and the event that starts a run.

    cands = scan("/models")                       # diffusers dirs (and HF cache snapshots) under a folder
    cands = scan("s3://bucket/teachers/")         # every prefix holding a model_index.json
    cands = scan("mlflow:my-wan-teachers")        # versions of an MLflow registered teacher model
    new, seen = new_teachers(cands, client)       # not yet distilled = no student version, no live run
    for c in new:
        publish(event_payload(c))                 # Argo Events -> the distill flow's @trigger

A teacher version is named by its **revision**: a content hash of its files (``sha256:...``; for big
weight files the hash covers the size, the safetensors header and the first and last MiB, so a 28 GB
checkpoint is fingerprinted in milliseconds), the ETags of an S3 prefix (``s3etag:...``), the commit
of a Hugging Face cache snapshot (``hf:<commit>``) or the registered version (``mlflow:<name>/<v>``).
The distill flow records it on its MLflow run and on the registered student (tags ``teacher_revision``,
``teacher_location``, ``teacher_source``), and that is what "already distilled" is looked up by, so
the registry answers "which student came from which teacher"::

    client.search_model_versions("tags.teacher_revision = 'sha256:...'")

The event (name :data:`EVENT_NAME`) carries ``{"teacher": <location>, "teacher_revision": ...,
"teacher_source": ...}``; :func:`event_parameters` turns it into the flow's parameters and rejects
a payload without a teacher location before anything runs (the flow's ``start`` checks the Argo
event payload the same way: :func:`check_event_env`).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from .errors import RCMError

__all__ = ["EVENT_NAME", "EVENT_PARAMETERS", "EventError", "TeacherCandidate", "teacher_revision", "scan",
           "distilled", "new_teachers", "event_payload", "event_parameters", "check_event_env", "publish"]

EVENT_NAME = "rcm.new_teacher"
# event payload field -> distill flow parameter (the flow's @trigger uses the same mapping)
EVENT_PARAMETERS = {"teacher": "teacher", "teacher_revision": "teacher_revision", "teacher_source": "teacher_source"}
_BIG = 64 * 1024 * 1024
_EDGE = 1024 * 1024


class EventError(RCMError, ValueError):
    """A new-teacher event that cannot start a run (no teacher location, unknown fields)."""

    fix = ('publish the event with the teacher\'s location: {"teacher": "/models/<dir>" | "s3://..." | '
           '"models:/<name>/<version>", "teacher_revision": "...", "teacher_source": "..."} '
           "(python -m rcm_steps.watch publish builds it)")


@dataclass
class TeacherCandidate:
    location: str          # what the distill flow gets as --teacher
    revision: str          # content hash / ETag digest / snapshot commit / registered version
    source: str            # the watched source it was found in
    name: str = ""

    def to_dict(self) -> Dict[str, str]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- revisions
def _file_digest(path: str) -> str:
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _BIG:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return "full:" + h.hexdigest()
        h.update(str(size).encode())
        head = f.read(_EDGE)
        h.update(head)
        if path.endswith(".safetensors") and len(head) >= 8:      # header: every tensor's name, dtype, shape, offsets
            n = int.from_bytes(head[:8], "little")
            f.seek(8)
            h.update(f.read(min(n, 100 * 1024 * 1024)))
        f.seek(max(0, size - _EDGE))
        h.update(f.read(_EDGE))
    return "edge:" + h.hexdigest()


def _local_revision(root: str) -> str:
    snap = _hf_snapshot_commit(root)
    if snap:
        return f"hf:{snap}"
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            p = os.path.join(dirpath, fn)
            rel = os.path.relpath(p, root).replace(os.sep, "/")
            h.update(f"{rel}\0{os.path.getsize(p)}\0{_file_digest(p)}\n".encode())
    return "sha256:" + h.hexdigest()[:32]


def _hf_snapshot_commit(root: str) -> Optional[str]:
    """``.../models--org--name/snapshots/<commit>``: the commit is the revision."""
    parts = os.path.normpath(os.path.abspath(root)).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-1]
    return None


def _s3_fs(url: str):
    """The filesystem of an s3:// source; made anew when the credentials in the environment were rotated."""
    from rcm_core.io.files import url_to_fs

    from .storage import storage_options_from_env

    return url_to_fs(url, storage_options_from_env())


def _s3_revision(url: str) -> str:
    fs, path = _s3_fs(url)
    h = hashlib.sha256()
    for key, info in sorted(fs.find(path, detail=True).items()):
        rel = posixpath.relpath(key, path)
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        h.update(f"{rel}\0{info.get('size')}\0{etag}\n".encode())
    return "s3etag:" + h.hexdigest()[:32]


def teacher_revision(location: str) -> str:
    """The revision of the teacher at ``location`` (a directory, an s3:// prefix or ``models:/name/version``)."""
    if location.startswith("models:/"):
        name, _, version = location[len("models:/"):].partition("/")
        return f"mlflow:{name}/{version}"
    if location.startswith(("s3://", "s3a://")):
        return _s3_revision(location)
    path = os.path.abspath(os.path.expanduser(location))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"teacher location {location!r} is not a directory")
    return _local_revision(path)


# ------------------------------------------------------------------------------------------------- scan
def _local_candidates(root: str, source: str) -> List[TeacherCandidate]:
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"teacher source {source!r}: {root} is not a directory")
    if os.path.isfile(os.path.join(root, "model_index.json")):
        dirs = [root]
    else:
        dirs = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if "model_index.json" in filenames:
                dirs.append(dirpath)
                dirnames[:] = []            # components below a checkpoint are not checkpoints
            elif os.path.relpath(dirpath, root).count(os.sep) >= 4:
                dirnames[:] = []
    out = []
    for d in dirs:
        name = os.path.basename(d)
        if _hf_snapshot_commit(d):
            name = os.path.basename(os.path.dirname(os.path.dirname(d)))[len("models--"):].replace("--", "/")
        out.append(TeacherCandidate(location=d, revision=_local_revision(d), source=source, name=name))
    return out


def _s3_candidates(url: str) -> List[TeacherCandidate]:
    fs, path = _s3_fs(url)
    proto = url.split("://", 1)[0]
    out = []
    for idx in sorted(fs.glob(posixpath.join(path.rstrip("/"), "**", "model_index.json"))):
        d = posixpath.dirname(idx)
        loc = f"{proto}://{d}"
        out.append(TeacherCandidate(location=loc, revision=_s3_revision(loc), source=url, name=posixpath.basename(d)))
    return out


def _mlflow_candidates(spec: str, client) -> List[TeacherCandidate]:
    """``mlflow:<registered model name>``, or ``mlflow:`` for every registered model tagged rcm.role=teacher."""
    names = [spec] if spec else [m.name for m in client.search_registered_models("tags.`rcm.role` = 'teacher'")]
    out = []
    for name in names:
        for mv in client.search_model_versions(f"name='{name}'"):
            out.append(TeacherCandidate(location=f"models:/{name}/{mv.version}", revision=f"mlflow:{name}/{mv.version}",
                                        source=f"mlflow:{spec}", name=name))
    return out


def scan(source: str, client=None) -> List[TeacherCandidate]:
    """Teacher versions found in ``source``: a folder, an ``s3://`` prefix or ``mlflow:<model name>``."""
    if source.startswith("mlflow:"):
        from mlflow.tracking import MlflowClient

        return _mlflow_candidates(source[len("mlflow:"):], client or MlflowClient())
    if source.startswith(("s3://", "s3a://")):
        return _s3_candidates(source)
    return _local_candidates(source, source)


# --------------------------------------------------------------------------------------- already done?
def _quote(v: str) -> str:
    return v.replace("'", "\\'")


def distilled(client, revision: str) -> Tuple[Optional[str], str]:
    """(what, detail) if ``revision`` was distilled (a student version has it) or a run for it is live;
    (None, "") otherwise."""
    versions = client.search_model_versions(f"tags.teacher_revision = '{_quote(revision)}'")
    if versions:
        mv = sorted(versions, key=lambda v: int(v.version))[-1]
        return "distilled", f"{mv.name} v{mv.version}"
    exps = [e.experiment_id for e in client.search_experiments(filter_string="name LIKE 'rcm-distill-%'")]
    if exps:
        runs = client.search_runs(exps, f"tags.teacher_revision = '{_quote(revision)}' and "
                                        "attributes.status = 'RUNNING'", max_results=1)
        if runs:
            return "running", f"MLflow run {runs[0].info.run_id}"
    return None, ""


def new_teachers(candidates: Iterable[TeacherCandidate], client) -> Tuple[List[TeacherCandidate], List[Dict]]:
    """Split into (not yet distilled, [skipped with the reason])."""
    new, skipped, seen = [], [], set()
    for c in candidates:
        if c.revision in seen:
            skipped.append({**c.to_dict(), "reason": "duplicate of another candidate"})
            continue
        seen.add(c.revision)
        what, detail = distilled(client, c.revision)
        if what:
            skipped.append({**c.to_dict(), "reason": f"{what}: {detail}"})
        else:
            new.append(c)
    return new, skipped


# ------------------------------------------------------------------------------------------------ events
def event_payload(c: TeacherCandidate) -> Dict[str, str]:
    return {"teacher": c.location, "teacher_revision": c.revision, "teacher_source": c.source}


def event_parameters(payload: Mapping[str, Any]) -> Dict[str, str]:
    """The distill flow's parameters for a new-teacher event payload; :class:`EventError` if it names no teacher."""
    if not isinstance(payload, Mapping):
        raise EventError(f"new-teacher event payload must be a JSON object, got {type(payload).__name__}")
    loc = payload.get("teacher")
    if not isinstance(loc, str) or not loc.strip():
        raise EventError(f"new-teacher event without a teacher location (payload field 'teacher'); got fields "
                         f"{sorted(payload)}: nothing was run")
    return {param: str(payload[field]).strip() for field, param in EVENT_PARAMETERS.items()
            if payload.get(field) not in (None, "")}


def check_event_env(environ: Mapping[str, str]) -> Optional[Dict[str, str]]:
    """In a run that Argo Events started: the new-teacher event's parameters, checked; None when not triggered.

    Metaflow passes each trigger's whole event as ``METAFLOW_ARGO_EVENT_PAYLOAD_<type>_<name>``. The
    sensor falls back to a parameter's default when the payload lacks its field, so without this check
    an event with no teacher would silently distil the default teacher.
    """
    for key, raw in environ.items():
        if not key.startswith("METAFLOW_ARGO_EVENT_PAYLOAD_") or raw in ("", "null"):
            continue
        try:
            event = json.loads(raw)
        except ValueError:
            raise EventError(f"{key} is not JSON: the event that triggered this run cannot be read") from None
        if not isinstance(event, dict) or event.get("name") != EVENT_NAME:
            continue
        body = event.get("payload") if isinstance(event.get("payload"), dict) else event
        return event_parameters(body)
    return None


def publish(payload: Mapping[str, Any], how: str = "argo") -> Dict[str, Any]:
    """Send the event. ``argo``: Metaflow's ArgoEvent to the Argo Events webhook (in-cluster:
    METAFLOW_ARGO_EVENTS_WEBHOOK_URL); ``print``: print the JSON only (dry run)."""
    params = event_parameters(payload)            # never publish an event that cannot start a run
    if how == "print":
        print(json.dumps({"name": EVENT_NAME, "payload": dict(payload)}))
        return {"published": False, "parameters": params}
    if how != "argo":
        raise ValueError(f"publish how={how!r}; known: argo, print")
    from metaflow.integrations import ArgoEvent

    ev = ArgoEvent(name=EVENT_NAME)
    for k, v in payload.items():
        ev.add_to_payload(k, v)
    event_id = ev.publish(ignore_errors=False)
    return {"published": True, "event_id": event_id, "parameters": params}


def main(argv=None) -> int:
    """``python -m rcm_steps.watch scan SOURCE...`` lists new teachers; ``publish --teacher LOC`` sends one event."""
    import argparse
    import sys

    p = argparse.ArgumentParser("rcm_steps.watch")
    sub = p.add_subparsers(dest="cmd", required=True)
    sc = sub.add_parser("scan")
    sc.add_argument("sources", nargs="+")
    sc.add_argument("--tracking-uri", default=None)
    pb = sub.add_parser("publish")
    pb.add_argument("--teacher", required=True)
    pb.add_argument("--revision", default="")
    pb.add_argument("--source", default="manual")
    pb.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "publish":
        rev = a.revision or teacher_revision(a.teacher)
        print(json.dumps(publish({"teacher": a.teacher, "teacher_revision": rev, "teacher_source": a.source},
                                 "print" if a.dry_run else "argo")))
        return 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=a.tracking_uri)
    cands = [c for s in a.sources for c in scan(s, client)]
    new, skipped = new_teachers(cands, client)
    json.dump({"new": [c.to_dict() for c in new], "skipped": skipped}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

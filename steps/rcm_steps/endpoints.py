"""Where a run's storage root and MLflow tracking server come from, read when the run starts.

``--storage_root`` / ``--mlflow_tracking_uri`` win when given. Left empty (their default, and what the
compiled Argo WorkflowTemplate, CronWorkflow and Sensor carry) they are read in ``start`` from the
environment of the process that runs it: ``RCM_STORAGE_ROOT`` and ``MLFLOW_TRACKING_URI``. On Kubernetes
that is the ConfigMap ``rcm-endpoints``, which ``workflowDefaults`` (infra/k8s/base/argo.yaml) maps into
every step pod of the flows when the pod starts: a scheduled or event-triggered run uses the cluster's
values of that moment, never those of the shell that compiled the templates. Local runs with neither
fall back to ``<repo>/runs/storage`` and ``sqlite:///<repo>/mlflow.db``; a Kubernetes run with neither,
or with a local path / sqlite file, stops in ``start`` naming the variable and the ConfigMap.

The distill step's pods (a JobSet, which Argo's pod defaults do not reach) get the endpoint settings
``start`` saw (:func:`forwarded_env`, never a credential) as an artifact, applied by :func:`apply_env`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, MutableMapping, Optional, Tuple

from .errors import ConfigError

__all__ = ["STORAGE_ENV", "TRACKING_ENV", "SOURCES_ENV", "CONFIGMAP", "FORWARDED", "Endpoints", "resolve",
           "check_for_target", "start_checks", "watch_checks", "forwarded_env", "apply_env"]

STORAGE_ENV, TRACKING_ENV, SOURCES_ENV = "RCM_STORAGE_ROOT", "MLFLOW_TRACKING_URI", "RCM_TEACHER_SOURCES"
CONFIGMAP = "rcm-endpoints"
# endpoint settings (no credential) that the JobSet pods of distill receive from start
FORWARDED = ("RCM_STORAGE_OPTIONS", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
             "MLFLOW_S3_ENDPOINT_URL")
_CREDENTIAL_WORDS = ("key", "secret", "token", "password", "credential", "profile")


@dataclass(frozen=True)
class Endpoints:
    """A run's storage root and tracking URI, and where each came from (``--storage_root``, ``$RCM_STORAGE_ROOT``,
    ``local default``)."""

    storage_root: str
    tracking_uri: str
    storage_from: str
    tracking_from: str
    event: Optional[Dict[str, str]] = None      # the new-teacher event's parameters, when an event started the run


def resolve(value: str, option: str, env_name: str, environ: Mapping[str, str], local_default: str,
            target: str = "local") -> Tuple[str, str]:
    """(value, where it came from): the option when set, else ``environ[env_name]``, else (local target only)
    ``local_default``. A Kubernetes run with neither raises :class:`ConfigError` naming both."""
    if (value or "").strip():
        return value.strip(), option
    if (environ.get(env_name) or "").strip():
        return environ[env_name].strip(), f"${env_name}"
    if target != "kubernetes":
        return local_default, "local default"
    raise ConfigError(f"{option} is empty and ${env_name} is not set in the pod: a Kubernetes run reads it from "
                      f"ConfigMap {CONFIGMAP}",
                      fix=f"set {env_name} in ConfigMap {CONFIGMAP} (infra/k8s/base/metaflow-config.yaml; "
                          f"workflowDefaults in infra/k8s/base/argo.yaml maps it into the pods), or pass {option}")


def check_for_target(ep: Endpoints, target: str) -> None:
    """A Kubernetes run needs a shared storage root and an MLflow server: a local path or a sqlite file is
    refused, naming where the value came from."""
    if target != "kubernetes":
        return
    if "://" not in ep.storage_root or ep.storage_root.startswith("file://"):
        raise ConfigError(f"storage_root {ep.storage_root!r} (from {ep.storage_from}) is a local path, but execution "
                          "target is kubernetes: pass a shared URL such as s3://bucket/rcm",
                          fix=f"pass --storage_root s3://bucket/rcm, or set {STORAGE_ENV} in ConfigMap {CONFIGMAP}")
    _check_tracking_for_target(ep.tracking_uri, ep.tracking_from, target)


def _check_tracking_for_target(uri: str, origin: str, target: str) -> None:
    if target == "kubernetes" and uri.startswith(("sqlite:", "file:", "/", ".", "~")):
        raise ConfigError(f"mlflow_tracking_uri {uri!r} (from {origin}) is a local store, but execution target is "
                          "kubernetes: pass an MLflow server URL",
                          fix=f"pass --mlflow_tracking_uri http://mlflow:5000, or set {TRACKING_ENV} in ConfigMap "
                              f"{CONFIGMAP}")


def start_checks(storage_root: str, tracking_uri: str, environ: Mapping[str, str], target: str,
                 local_storage: str, local_tracking: str) -> Endpoints:
    """What ``start`` checks before any service is contacted: the trigger event (if any; one without a teacher
    stops here, rcm_steps.watch.check_event_env), the storage root and tracking URI (:func:`resolve`), and that
    they suit the execution target (:func:`check_for_target`)."""
    from .watch import check_event_env

    event = check_event_env(environ)
    root, root_from = resolve(storage_root, "--storage_root", STORAGE_ENV, environ, local_storage, target)
    uri, uri_from = resolve(tracking_uri, "--mlflow_tracking_uri", TRACKING_ENV, environ, local_tracking, target)
    ep = Endpoints(root, uri, root_from, uri_from, event)
    check_for_target(ep, target)
    return ep


def watch_checks(sources: str, tracking_uri: str, environ: Mapping[str, str], target: str,
                 local_tracking: str) -> Tuple[List[str], str]:
    """The teacher_watch flow's ``start``: (sources, tracking URI), from the parameters, else the environment
    (``RCM_TEACHER_SOURCES``, ``MLFLOW_TRACKING_URI``); no source at all, or a local store on Kubernetes, is refused."""
    raw = (sources or "").strip() or (environ.get(SOURCES_ENV) or "").strip()
    srcs = [s.strip() for s in raw.split(",") if s.strip()]
    if not srcs:
        raise ConfigError(f"no teacher sources: --sources is empty and ${SOURCES_ENV} is not set",
                          fix=f"pass --sources (folders, s3:// prefixes, mlflow:<model name>), or set {SOURCES_ENV} "
                              f"(Kubernetes: in ConfigMap {CONFIGMAP})")
    uri, origin = resolve(tracking_uri, "--mlflow_tracking_uri", TRACKING_ENV, environ, local_tracking, target)
    _check_tracking_for_target(uri, origin, target)
    return srcs, uri


def _no_credentials(opts):
    """Storage options without any credential-like field, nested ones too (credentials travel only in Secrets)."""
    if isinstance(opts, dict):
        return {k: _no_credentials(v) for k, v in opts.items() if not any(w in k.lower() for w in _CREDENTIAL_WORDS)}
    return opts


def forwarded_env(environ: Mapping[str, str]) -> Dict[str, str]:
    """The endpoint settings (``FORWARDED``) set in ``environ``; RCM_STORAGE_OPTIONS without credential fields (left
    out when it is not a JSON object: Storage names the problem where the variable is set)."""
    out = {k: environ[k] for k in FORWARDED if environ.get(k)}
    if "RCM_STORAGE_OPTIONS" in out:
        try:
            opts = json.loads(out["RCM_STORAGE_OPTIONS"])
        except ValueError:
            opts = None
        if isinstance(opts, dict):
            out["RCM_STORAGE_OPTIONS"] = json.dumps(_no_credentials(opts))
        else:
            del out["RCM_STORAGE_OPTIONS"]
    return out


def apply_env(env: Mapping[str, str], environ: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """Set the forwarded settings that this process lacks (its own values win); returns those it set."""
    environ = os.environ if environ is None else environ
    added = {k: v for k, v in (env or {}).items() if not environ.get(k)}
    environ.update(added)
    return added

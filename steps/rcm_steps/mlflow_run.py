"""Lifecycle of the MLflow run that belongs to a flow run (plain functions over ``MlflowClient``).

One MLflow run per chain of ``resume``s: ``start`` creates it, the flow's resumed runs carry its
id forward (a cloned artifact) and keep logging to it. The run is never left RUNNING without a
live step:

* :func:`begin_step` — every step, when it starts: a run that a failed/killed attempt closed is
  reopened (RUNNING; the error tags move to the ``rcm.history`` tag), and a resumed flow run
  re-links it (``metaflow.run_id`` = the resumed run, ``metaflow.origin_run_id`` = the run it
  resumed, ``metaflow.run_ids`` = the whole chain), so its tags agree with the registered
  model version's. A run that an uncatchable kill (SIGKILL, OOM) left RUNNING is resumed
  RUNNING: the history says so.
* :func:`end_failed` — a step raised: FAILED, with the error (``error``, ``error.where``, ...) as
  tags. Every failed attempt ends the run FAILED, even when Metaflow will retry the step
  (``error.retry_pending`` says so); the retry reopens it. A run is thus only RUNNING while a
  step is alive, and a flow that dies between attempts leaves it FAILED, not RUNNING.
* :func:`end_killed` — SIGTERM/SIGINT: KILLED, with ``killed_by``.
* :func:`finish` — the ``end`` step: FINISHED.
"""
from __future__ import annotations

import time
from typing import Dict, Optional

__all__ = ["client_for", "already_exists", "experiment_id", "begin_step", "end_failed", "end_killed", "finish", "ERROR_TAGS",
           "HISTORY_TAG", "run_name", "source_tags", "param_value", "SIGNIFICANT"]

ERROR_TAGS = ("error", "error.type", "error.where", "error.retry_pending", "killed_by", "killed.where")
HISTORY_TAG = "rcm.history"
_MAX_TAG = 4000          # MLflow's limit is 8000 (5000 on older servers); the history keeps its tail


def client_for(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def already_exists(err: BaseException) -> bool:
    """``err`` is MLflow's RESOURCE_ALREADY_EXISTS (REST or store; sqlite, Postgres)."""
    return "RESOURCE_ALREADY_EXISTS" in str(getattr(err, "error_code", "")) + str(err)


def experiment_id(client, name: str, artifact_location: Optional[str] = None) -> str:
    """The id of experiment ``name``, created if missing.

    Flow runs that start together against one tracking server race here: both see no
    experiment, both create it, the database's unique constraint refuses the second. The
    loser takes the winner's experiment instead of failing its ``start`` step.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception as e:  # noqa: BLE001 - only the lost race is expected
        if not already_exists(e):
            raise
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


SIGNIFICANT = 6          # significant digits of a float in a param or tag (1.5707963267948966 -> 1.5708)


def run_name(teacher: str, method: str, profile: str, flow_run_id: str) -> str:
    """The MLflow run's name: what was distilled how, findable by its Metaflow run id
    (``rcm-embedded-rcm-smoke-1733...``)."""
    return f"rcm-{teacher}-{method}-{profile}-{flow_run_id}"


def source_tags(user: str, flow_file: str, target: str) -> Dict[str, str]:
    """MLflow's own tags for who ran what: ``mlflow.user`` (the Metaflow user), ``mlflow.source.name`` (the
    flow file), ``mlflow.source.type`` (JOB on a cluster, LOCAL otherwise)."""
    return {"mlflow.user": user, "mlflow.source.name": flow_file,
            "mlflow.source.type": "JOB" if target == "kubernetes" else "LOCAL"}


def _rounded(v):
    if isinstance(v, float):
        return float(f"{v:.{SIGNIFICANT}g}")
    if isinstance(v, dict):
        return {str(k): _rounded(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_rounded(x) for x in v]
    return v


def param_value(v, limit: int = 500) -> str:
    """A param's (or tag's) text: floats at :data:`SIGNIFICANT` significant digits, containers as JSON (floats
    rounded the same way), everything else as ``str``; at most ``limit`` characters."""
    import json

    if isinstance(v, bool) or v is None:
        text = str(v)
    elif isinstance(v, float):
        text = f"{v:.{SIGNIFICANT}g}"
    elif isinstance(v, (dict, list, tuple)):
        text = json.dumps(_rounded(v), default=str)
    else:
        text = str(v)
    return text[:limit]


def _history(tags: Dict[str, str], entry: str) -> str:
    h = tags.get(HISTORY_TAG, "")
    h = f"{h}; {entry}" if h else entry
    return h[-_MAX_TAG:]


def _set_tags(client, run_id: str, tags: Dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)[:_MAX_TAG]) for k, v in tags.items()])


def begin_step(client, run_id: str, *, flow_run_id: str, origin_run_id: Optional[str], where: str) -> Dict[str, str]:
    """A step (``where`` = ``run/step/attempt``) of flow run ``flow_run_id`` starts: reopen, re-link.

    Returns the tags it changed ({} for the common case: the run is RUNNING and ours).
    """
    run = client.get_run(run_id)
    tags = run.data.tags
    new: Dict[str, str] = {}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    prev = tags.get("metaflow.run_id")
    if prev != str(flow_run_id):                       # a resumed flow run continues this MLflow run
        chain = tags.get("metaflow.run_ids") or prev or ""
        new["metaflow.run_id"] = str(flow_run_id)
        new["metaflow.origin_run_id"] = str(origin_run_id or prev or "")
        new["metaflow.run_ids"] = ",".join(x for x in (chain, str(flow_run_id)) if x)
        left = (f"; run {prev} had left it RUNNING (its process was killed without closing it: SIGKILL, OOM "
                f"kill or a lost node)" if run.info.status == "RUNNING" and prev else "")
        tags = {**tags, HISTORY_TAG: _history(tags, f"{stamp} resumed as {flow_run_id} (origin {origin_run_id or prev})"
                                                    + left)}
        new[HISTORY_TAG] = tags[HISTORY_TAG]
    if run.info.status != "RUNNING":
        err = tags.get("error") or tags.get("killed_by") or ""
        new[HISTORY_TAG] = _history(tags, f"{stamp} reopened at {where} after {run.info.status}"
                                          + (f" ({tags.get('error.where') or tags.get('killed.where')}: {err})"
                                             if err else ""))
    if new:
        _set_tags(client, run_id, new)
    if run.info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
        for k in ERROR_TAGS:
            if k in tags:
                client.delete_tag(run_id, k)
    return new


def end_failed(client, run_id: str, error: str, *, error_type: str, where: str, retry_pending: bool) -> None:
    """End FAILED with the error as tags (``retry_pending``: Metaflow will retry the step and reopen it)."""
    tags = client.get_run(run_id).data.tags
    _set_tags(client, run_id, {
        "error": error, "error.type": error_type, "error.where": where,
        "error.retry_pending": "true" if retry_pending else "false",
        HISTORY_TAG: _history(tags, f"{time.strftime('%Y-%m-%dT%H:%M:%S')} FAILED at {where}: {error[:300]}")})
    client.set_terminated(run_id, "FAILED")


def end_killed(client, run_id: str, *, signal_name: str, where: str) -> None:
    """End KILLED (the flow was interrupted by ``signal_name``)."""
    tags = client.get_run(run_id).data.tags
    _set_tags(client, run_id, {"killed_by": signal_name, "killed.where": where,
                               HISTORY_TAG: _history(tags, f"{time.strftime('%Y-%m-%dT%H:%M:%S')} KILLED at {where} "
                                                           f"by {signal_name}")})
    client.set_terminated(run_id, "KILLED")


def finish(client, run_id: str) -> None:
    client.set_terminated(run_id, "FINISHED")

"""The champion policy of registered students: which version is better (:data:`POLICIES`, per teacher kind),
the decision for a new version (:func:`_decide`), and moving the ``champion`` alias explicitly
(:func:`set_champion`) or back (:func:`rollback_champion`, walking the ``champion.history`` tag).

Part of :mod:`rcm_steps.register` (which re-exports the public names and holds the CLI); see its module doc.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional


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

"""Run profiles: named sets of pipeline settings (sizes of the data, the cache, training and evaluation).

The flow reads the table as the Metaflow ``Config`` ``profiles`` (default :data:`PROFILES`) and picks one
with ``--profile``. A file of your own adds profiles (or replaces the built-in ones of the same name)::

    python flows/distill_flow.py --config profiles my_profiles.json run --profile big

``my_profiles.json``: ``{"big": {<every key of PROFILE_KEYS>, "gates": {...}, "config": {...}}}``. Every
value can still be overridden by the matching flow parameter (``--iterations``, ``--batch_size``; 0 = the
profile's). :func:`profile_settings` checks the table and returns the chosen profile's settings.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from .errors import ConfigError

__all__ = ["PROFILES", "PROFILE_KEYS", "OPTIONAL_KEYS", "profile_settings", "parse_profiles", "json_object_option"]

# Per-profile settings; every value can be overridden by the matching Parameter (0 / "" = profile value).
PROFILES: Dict[str, Dict[str, Any]] = {
    "smoke": dict(max_train=4, max_eval=2, min_prompts=4, samples_per_prompt=1, teacher_steps=2, shard_size=2,
                  iterations=2, batch_size=2, ckpt_every=1, eval_seeds=2, eval_teacher_steps=2, real_clips=32,
                  gates={"min_digit_acc": 0.0, "min_diversity_rel": 0.0},
                  # warm-ups must fit the run (DistillConfig checks it): a 2-step run warms up for 1 step
                  config={"tangent_warmup_steps": 1, "lr_warmup_steps": 1}),
    "default": dict(max_train=None, max_eval=8, min_prompts=16, samples_per_prompt=1, teacher_steps=12,
                    shard_size=64, iterations=150, batch_size=16, ckpt_every=50, eval_seeds=3,
                    eval_teacher_steps=12, real_clips=256, gates={}),
}

# key -> what it is (every profile has all of them; max_train may be null: no limit)
PROFILE_KEYS = {
    "max_train": "training prompts at most (null: all)", "max_eval": "eval prompts at most",
    "min_prompts": "fewest prompts the curate gate accepts", "samples_per_prompt": "cached teacher samples per prompt",
    "teacher_steps": "teacher sampler steps for the cache", "shard_size": "samples per cache shard",
    "iterations": "training iterations", "batch_size": "global batch", "ckpt_every": "checkpoint every N steps",
    "eval_seeds": "seeds per eval prompt", "eval_teacher_steps": "teacher sampler steps in evaluation",
    "real_clips": "real clips for fd_data (embedded teacher)", "gates": "evaluation gates (JSON object)",
}
OPTIONAL_KEYS = {"config": "DistillConfig overrides (JSON object)"}


def _check_profile(name: str, prof: Any) -> Optional[str]:
    """What is wrong with one profile (None: nothing)."""
    if not isinstance(prof, Mapping):
        return f"profile {name!r} is {type(prof).__name__}, not an object of settings"
    missing = sorted(set(PROFILE_KEYS) - set(prof))
    unknown = sorted(set(prof) - set(PROFILE_KEYS) - set(OPTIONAL_KEYS))
    bad = [k for k, v in prof.items() if k in PROFILE_KEYS and k not in ("gates", "max_train")
           and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1)]
    if prof.get("max_train") is not None and not (isinstance(prof["max_train"], int) and prof["max_train"] >= 1):
        bad.append("max_train")
    bad += [k for k in ("gates", "config") if k in prof and not isinstance(prof[k], Mapping)]
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
               ([f"unknown {', '.join(unknown)}"] if unknown else []) + \
               ([f"invalid {', '.join(f'{k}={prof[k]!r}' for k in bad)} (counts are integers >= 1, gates/config "
                 f"JSON objects)"] if bad else [])
    return f"profile {name!r}: {'; '.join(problems)}" if problems else None


def _plain(v: Any) -> Any:
    """A Metaflow ConfigValue (or any mapping) as plain dicts, so artifacts and JSON hold no Metaflow types."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def parse_profiles(text: str) -> Dict[str, Any]:
    """The ``profiles`` Config's parser: a file given with ``--config profiles <file>`` is checked as it is
    read, before any run starts; a bad one stops the command with a usage error (Metaflow's click) that names
    the profiles and keys and says the fix, without a traceback."""
    import json

    from metaflow._vendor.click import UsageError

    try:
        table = json.loads(text)
        _check_table(table)
    except ValueError as e:
        fix = getattr(e, "fix", _FIX)
        raise UsageError(f"rCM: {e if isinstance(e, ConfigError) else f'the profiles config is not JSON: {e}'}\n"
                         f"rCM: fix: {fix}") from None
    return table


def _check_table(table: Any) -> Dict[str, Any]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"the profiles config is {type(table).__name__}, not an object of profiles", fix=_FIX)
    merged = {**PROFILES, **_plain(table)}
    problems = [p for p in (_check_profile(n, merged[n]) for n in sorted(merged)) if p]
    if problems:
        raise ConfigError("the profiles config (--config profiles <file>) is invalid: " + "; ".join(problems)
                          + f". Each profile needs {', '.join(PROFILE_KEYS)}; optional: {', '.join(OPTIONAL_KEYS)}",
                          fix=_FIX)
    return merged


def profile_settings(table: Optional[Mapping[str, Any]], name: str) -> Dict[str, Any]:
    """The settings of profile ``name`` from the built-in profiles updated by ``table`` (the ``profiles``
    Config: a file of your own adds or replaces profiles). Raises :class:`ConfigError` naming an unknown
    profile or the profiles with missing, unknown or invalid keys."""
    merged = _check_table(table if table is not None else {})
    if name not in merged:
        raise ConfigError(f"unknown profile {name!r} (--profile); known: {', '.join(sorted(merged))}",
                          fix="pass --profile with a known name, or add the profile with --config profiles <file>")
    return _plain(merged[name])


_FIX = ("correct the profile file given with --config profiles <file> (JSON: {\"<name>\": {<settings>}}; "
        "see rcm_steps/profiles.py for the keys) or leave it out to use the built-in smoke/default profiles")


def json_object_option(option: str, value: Any) -> Dict[str, Any]:
    """The value of a JSON flow option (``--gates``, ``--distill_config``; Metaflow's JSONType has parsed it)
    as a dict; anything but a JSON object raises :class:`ConfigError` naming ``--<option>``."""
    if value is None or value == "":
        return {}
    if isinstance(value, (str, bytes)):
        import json

        try:
            value = json.loads(value)
        except ValueError as e:
            raise ConfigError(f"--{option} is not valid JSON ({e}): {value!r}",
                              fix=f"pass --{option} a JSON object, e.g. --{option} '{{\"key\": 1}}'") from None
    if not isinstance(value, Mapping):
        raise ConfigError(f"--{option} must be a JSON object ({{...}}), got {type(value).__name__} {value!r}",
                          fix=f"pass --{option} a JSON object, e.g. --{option} '{{\"key\": 1}}'")
    return _plain(value)

"""Prompt curation: load, normalise, deduplicate, length-filter, split, validate.

Sources: ``"embedded"`` (the embedded teacher's prompt set), a local path or any
fsspec URL to a text file (one prompt per line), a ``.parquet`` or ``.csv`` file
(``column``, default ``"prompt"``, else the only/first string column).

The split is deterministic and independent of input order: prompts are ranked by
``sha256(seed|prompt)`` and the first ``ceil(eval_fraction * n)`` are the eval set.
The Great Expectations gate (non-null, unique, length bounds, expected counts,
split labels) then runs on the curated table; a failure raises
:class:`~rcm_steps.validation.DataValidationError` naming the failed expectations.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from .validation import DataValidationError, GateReport, run_gate

__all__ = ["PromptSourceError", "CurateConfig", "CurateResult", "load_prompts", "normalise",
           "curate_prompts", "split_prompts", "prompt_expectations", "validate_prompts",
           "DataValidationError"]


class PromptSourceError(ValueError):
    """The prompt source cannot be read, or holds no prompts."""


@dataclass
class CurateConfig:
    min_chars: int = 3
    max_chars: int = 200
    eval_fraction: float = 0.2
    seed: int = 0
    min_prompts: int = 8          # after curation (train + eval)
    max_prompts: int = 1_000_000
    min_eval: int = 2
    max_train: Optional[int] = None  # cap (smoke runs); applied after the split
    max_eval: Optional[int] = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CurateConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"CurateConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


@dataclass
class CurateResult:
    train: List[str]
    eval: List[str]
    stats: Dict[str, int] = field(default_factory=dict)
    report: Optional[GateReport] = None
    source: str = ""

    @property
    def prompts_hash(self) -> str:
        h = hashlib.sha256()
        for tag, ps in (("train", self.train), ("eval", self.eval)):
            for p in ps:
                h.update(f"{tag}\t{p}\n".encode())
        return h.hexdigest()


def _embedded_prompts() -> List[str]:
    from rcm_core.embedded.data import embedded_prompts

    return list(embedded_prompts())


def load_prompts(source: str, column: Optional[str] = None,
                 storage_options: Optional[Mapping[str, Any]] = None) -> List[Any]:
    """Raw prompts (unnormalised; may contain None/empties) from ``source``."""
    if not isinstance(source, str) or not source.strip():
        raise PromptSourceError(f"prompt source must be 'embedded', a path or a URL, got {source!r}")
    source = source.strip()
    if source == "embedded":
        return _embedded_prompts()
    import fsspec

    from .storage import storage_options_from_env

    opts = dict(storage_options_from_env())
    opts.update(storage_options or {})
    if "://" not in source or source.startswith("file://"):
        opts = {}
    lower = source.lower().split("?", 1)[0]
    try:
        if lower.endswith((".parquet", ".pq", ".csv", ".tsv")):
            import pandas as pd

            so = opts or None
            if lower.endswith((".parquet", ".pq")):
                df = pd.read_parquet(source, storage_options=so)
            else:
                df = pd.read_csv(source, sep="\t" if lower.endswith(".tsv") else ",",
                                 storage_options=so, keep_default_na=False)
            if column is None:
                if "prompt" in df.columns:
                    column = "prompt"
                else:
                    obj = [c for c in df.columns if df[c].dtype == object or str(df[c].dtype).startswith("str")]
                    if not obj:
                        raise PromptSourceError(f"prompt source {source!r} has no string column "
                                                f"(columns: {list(df.columns)})")
                    column = obj[0]
            if column not in df.columns:
                raise PromptSourceError(f"prompt source {source!r} has no column {column!r} "
                                        f"(columns: {list(df.columns)})")
            raw = [None if v is None or (isinstance(v, float) and math.isnan(v)) else v
                   for v in df[column].tolist()]
        else:
            with fsspec.open(source, "rt", encoding="utf-8", **opts) as fh:
                raw = fh.read().splitlines()
    except PromptSourceError:
        raise
    except FileNotFoundError:
        raise PromptSourceError(f"prompt source {source!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise PromptSourceError(f"prompt source {source!r} is not UTF-8 text: {e}") from None
    except Exception as e:  # noqa: BLE001 - name the source
        raise PromptSourceError(f"cannot read prompt source {source!r}: {type(e).__name__}: {e}") from e
    if not raw:
        raise PromptSourceError(f"prompt source {source!r} is empty")
    return raw


def normalise(p: Any) -> str:
    if p is None:
        return ""
    return " ".join(str(p).split())


def split_prompts(prompts: List[str], eval_fraction: float, seed: int):
    ranked = sorted(prompts, key=lambda p: hashlib.sha256(f"{seed}|{p}".encode()).hexdigest())
    n_eval = min(len(prompts), math.ceil(eval_fraction * len(prompts))) if eval_fraction > 0 else 0
    eval_set = set(ranked[:n_eval])
    # keep the input order inside each split (readable, still deterministic)
    return [p for p in prompts if p not in eval_set], [p for p in prompts if p in eval_set]


def curate_prompts(raw: List[Any], cfg: CurateConfig) -> CurateResult:
    stats = {"raw": len(raw), "empty": 0, "duplicate": 0, "too_short": 0, "too_long": 0}
    seen, kept = set(), []
    for p in raw:
        q = normalise(p)
        if not q:
            stats["empty"] += 1
            continue
        if len(q) < cfg.min_chars:
            stats["too_short"] += 1
            continue
        if len(q) > cfg.max_chars:
            stats["too_long"] += 1
            continue
        key = q.casefold()
        if key in seen:
            stats["duplicate"] += 1
            continue
        seen.add(key)
        kept.append(q)
    train, ev = split_prompts(kept, cfg.eval_fraction, cfg.seed)
    if cfg.max_train is not None:
        train = train[: cfg.max_train]
    if cfg.max_eval is not None:
        ev = ev[: cfg.max_eval]
    stats.update(kept=len(kept), train=len(train), eval=len(ev))
    return CurateResult(train=train, eval=ev, stats=stats)


def prompt_expectations(cfg: CurateConfig):
    return [
        ("ExpectColumnValuesToNotBeNull", {"column": "prompt"}),
        ("ExpectColumnValuesToBeUnique", {"column": "prompt"}),
        ("ExpectColumnValueLengthsToBeBetween", {"column": "prompt", "min_value": cfg.min_chars,
                                                 "max_value": cfg.max_chars}),
        ("ExpectTableRowCountToBeBetween", {"min_value": cfg.min_prompts, "max_value": cfg.max_prompts}),
        ("ExpectColumnValuesToBeInSet", {"column": "split", "value_set": ["train", "eval"]}),
        ("ExpectColumnDistinctValuesToEqualSet", {"column": "split", "value_set": ["train", "eval"]}),
        ("ExpectColumnValuesToBeBetween", {"column": "eval_count", "min_value": cfg.min_eval}),
    ]


def prompt_table(train: List[Any], ev: List[Any]):
    import pandas as pd

    rows = [(p, "train") for p in train] + [(p, "eval") for p in ev]
    df = pd.DataFrame(rows, columns=["prompt", "split"]).astype({"prompt": object})
    df["eval_count"] = len(ev)
    return df


def validate_prompts(train: List[Any], ev: List[Any], cfg: CurateConfig,
                     docs_dir: Optional[str] = None, raise_on_failure: bool = True) -> GateReport:
    return run_gate("prompts", prompt_table(train, ev), prompt_expectations(cfg), docs_dir=docs_dir,
                    raise_on_failure=raise_on_failure)


def curate(source: str, cfg: CurateConfig, column: Optional[str] = None,
           docs_dir: Optional[str] = None) -> CurateResult:
    """Load, clean, split and gate. Raises PromptSourceError / DataValidationError."""
    raw = load_prompts(source, column=column)
    res = curate_prompts(raw, cfg)
    res.source = source
    res.report = validate_prompts(res.train, res.eval, cfg, docs_dir=docs_dir)
    return res


def config_dict(cfg: CurateConfig) -> Dict[str, Any]:
    return asdict(cfg)

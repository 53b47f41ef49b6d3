"""Prompt curation: load, normalise, deduplicate, length-filter, split, validate.

Sources: ``"embedded"`` (the embedded teacher's prompt set), a local path or any
fsspec URL to a text file (one prompt per line), a ``.parquet`` or ``.csv`` file
(``column``, default ``"prompt"``, else the only/first string column).

Length limits: ``max_chars`` characters (default 200; 0/None: none) and, for real teachers,
``max_tokens`` tokens of the teacher's own tokenizer (the text encoder's limit, ``text_len``).
A longer prompt is truncated (``long_prompts="truncate"``, the default: at a word boundary for
characters, at the last whole token for tokens) or dropped (``"drop"``); the counts of each are
in the stats (``truncated``, ``too_long``, ``too_many_tokens``). Duplicates are removed after
truncation (two prompts that only differed past the limit are the same prompt to the teacher).

The split is deterministic and independent of input order: prompts are ranked by
``sha256(seed|prompt)`` and the first ``ceil(eval_fraction * n)`` are the eval set.
The Great Expectations gate (non-null, unique, length bounds, expected counts,
split labels) then runs on the curated table; a failure raises
:class:`~rcm_steps.validation.DataValidationError` naming the failed expectations and, for
count failures, why prompts were removed, with the count per reason (e.g. "kept 1 of 9 raw
prompts; removed: 6 duplicate, 2 too long (over 200 characters)").
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from rcm_core.nets.library_logs import count_tokens

from .progress import Progress, say
from .validation import DataValidationError, GateReport, run_gate

__all__ = ["PromptSourceError", "CurateConfig", "CurateResult", "load_prompts", "normalise",
           "curate_prompts", "split_prompts", "prompt_expectations", "validate_prompts",
           "DataValidationError", "TokenLimiter", "removal_summary", "prompt_limits", "LONG_PROMPTS"]

LONG_PROMPTS = ("truncate", "drop")


class PromptSourceError(ValueError):
    """The prompt source cannot be read, or holds no prompts."""


@dataclass
class CurateConfig:
    min_chars: int = 3
    max_chars: Optional[int] = 200    # 0 / None: no character limit
    max_tokens: Optional[int] = None  # needs a TokenLimiter (real teachers: the text encoder's limit)
    long_prompts: str = "truncate"    # over a limit: "truncate" | "drop"
    eval_fraction: float = 0.2
    seed: int = 0
    min_prompts: int = 8          # after curation (train + eval)
    max_prompts: int = 1_000_000
    min_eval: int = 2
    max_train: Optional[int] = None  # cap (smoke runs); applied after the split
    max_eval: Optional[int] = None

    def __post_init__(self):
        if self.long_prompts not in LONG_PROMPTS:
            raise ValueError(f"long_prompts={self.long_prompts!r}; known: {', '.join(LONG_PROMPTS)}")
        for k in ("max_chars", "max_tokens"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"CurateConfig.{k} must be a whole number >= 0 (0: no limit), got {v!r}")
        if self.max_chars and self.max_chars < self.min_chars:
            raise ValueError(f"CurateConfig.max_chars={self.max_chars} is below min_chars={self.min_chars}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CurateConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"CurateConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


class TokenLimiter:
    """Counts and truncates prompts with a Hugging Face tokenizer, as the text encoder will see them.

    ``count`` includes the special tokens the encoder adds (e.g. ``</s>``); ``truncate`` keeps
    the longest prefix of whole tokens that fits, cut in the original text (offsets), so the
    kept prompt reads as written.
    """

    def __init__(self, tokenizer, name: str = "tokenizer"):
        self.tokenizer, self.name = tokenizer, name

    def count(self, text: str) -> int:
        # verbose=False: no "Token indices sequence length is longer than ..." (counting long prompts is the point)
        return count_tokens(self.tokenizer, text)

    def truncate(self, text: str, max_tokens: int) -> str:
        specials = self.count(text) - count_tokens(self.tokenizer, text, add_special_tokens=False)
        keep = max(0, max_tokens - specials)
        while keep > 0:
            try:
                enc = self.tokenizer(text, add_special_tokens=False, truncation=False, return_offsets_mapping=True,
                                     verbose=False)
                cut = text[: enc["offset_mapping"][keep - 1][1]].rstrip()
            except (NotImplementedError, KeyError, TypeError, ValueError):   # slow tokenizers: no offsets
                ids = self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
                cut = self.tokenizer.decode(ids[:keep], skip_special_tokens=True).strip()
            if self.count(cut) <= max_tokens:
                return cut
            keep -= 1                                   # re-tokenising the cut text gave more tokens
        return ""


def prompt_limits(teacher_info: Mapping[str, Any], max_prompt_chars: int = 0,
                  long_prompts: str = "truncate") -> tuple:
    """CurateConfig length settings and the TokenLimiter (or None) for a teacher (:func:`describe_teacher`).

    Real teachers: ``max_tokens`` is the text encoder's limit (``text_len``), counted with the teacher's
    own tokenizer, and no character limit unless ``max_prompt_chars`` > 0. Others: ``max_prompt_chars``
    or 200 characters. ``long_prompts``: ``truncate`` (default) or ``drop``.
    """
    if long_prompts not in LONG_PROMPTS:
        raise ValueError(f"--long_prompts {long_prompts!r}; known: {', '.join(LONG_PROMPTS)}")
    if isinstance(max_prompt_chars, bool) or not isinstance(max_prompt_chars, int) or max_prompt_chars < 0:
        raise ValueError(f"--max_prompt_chars must be a whole number >= 0 (0: the teacher's default), "
                         f"got {max_prompt_chars!r}")
    real = bool(teacher_info.get("real"))
    limits = {"long_prompts": long_prompts,
              "max_chars": max_prompt_chars or (None if real else CurateConfig.max_chars)}
    if not real:
        return limits, None
    import os

    from transformers import AutoTokenizer

    path = os.path.join(str(teacher_info["root"]), "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - name the folder (start already loaded it once)
        raise PromptSourceError(f"cannot load the teacher's tokenizer from {path}: {type(e).__name__}: {e}") from e
    limits["max_tokens"] = int(teacher_info["text_len"])
    return limits, TokenLimiter(tok, name=path)


def _truncate_chars(q: str, n: int) -> str:
    cut = q[:n]
    if len(q) > n and not q[n].isspace() and " " in cut:
        cut = cut[: cut.rindex(" ")]                    # end at a word boundary
    return cut.rstrip()


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


def curate_prompts(raw: List[Any], cfg: CurateConfig, tokenizer: Optional[TokenLimiter] = None) -> CurateResult:
    """Normalise, apply the length limits (truncate or drop), deduplicate, split. See the module doc."""
    if cfg.max_tokens and tokenizer is None:
        raise ValueError("CurateConfig.max_tokens needs a tokenizer (rcm_steps.curate.TokenLimiter)")
    stats = {"raw": len(raw), "empty": 0, "too_short": 0, "too_long": 0, "too_many_tokens": 0, "truncated": 0,
             "duplicate": 0}
    drop = cfg.long_prompts == "drop"
    seen, kept = set(), []
    # counting tokens is the slow part (real teachers): progress lines then
    bar = Progress(f"curate: counting tokens ({tokenizer.name if tokenizer else ''})", len(raw), unit="prompts",
                   enabled=bool(cfg.max_tokens))
    for p in raw:
        bar.update(1)
        q = normalise(p)
        if not q:
            stats["empty"] += 1
            continue
        if len(q) < cfg.min_chars:
            stats["too_short"] += 1
            continue
        cut = False
        if cfg.max_chars and len(q) > cfg.max_chars:
            if drop:
                stats["too_long"] += 1
                continue
            q, cut = _truncate_chars(q, cfg.max_chars), True
        if cfg.max_tokens and tokenizer.count(q) > cfg.max_tokens:
            if drop:
                stats["too_many_tokens"] += 1
                continue
            q, cut = tokenizer.truncate(q, cfg.max_tokens), True
        if cut and len(q) < cfg.min_chars:
            stats["too_short"] += 1
            continue
        key = q.casefold()
        if key in seen:
            stats["duplicate"] += 1
            continue
        stats["truncated"] += cut
        seen.add(key)
        kept.append(q)
    bar.close()
    train, ev = split_prompts(kept, cfg.eval_fraction, cfg.seed)
    if cfg.max_train is not None:
        train = train[: cfg.max_train]
    if cfg.max_eval is not None:
        ev = ev[: cfg.max_eval]
    stats.update(kept=len(kept), train=len(train), eval=len(ev))
    # the one line that says how many prompts were truncated
    say(f"curate: {removal_summary(stats, cfg)}" + ("; --long_prompts drop removes such prompts instead"
                                                    if stats["truncated"] else ""))
    return CurateResult(train=train, eval=ev, stats=stats)


_REASONS = (("empty", "empty"), ("too_short", "too short (under {min_chars} characters)"),
            ("too_long", "too long (over {max_chars} characters)"),
            ("too_many_tokens", "too long (over {max_tokens} tokens)"), ("duplicate", "duplicate"))


def removal_summary(stats: Mapping[str, int], cfg: CurateConfig) -> str:
    """``kept 1 of 9 raw prompts; removed: 6 duplicate, 2 too long (over 200 characters)`` (+ truncations)."""
    if "raw" not in stats:
        return ""
    removed = [f"{stats[k]} {text.format(**vars(cfg))}" for k, text in _REASONS if stats.get(k)]
    out = f"kept {stats.get('kept', 0)} of {stats['raw']} raw prompts; " + (
        f"removed: {', '.join(removed)}" if removed else "none removed")
    if stats.get("truncated"):
        lim = [f"{cfg.max_chars} characters" if cfg.max_chars else "", f"{cfg.max_tokens} tokens" if cfg.max_tokens
               else ""]
        out += f"; {stats['truncated']} truncated to the limit ({' / '.join(x for x in lim if x)})"
    if "train" in stats:
        out += f"; split: {stats['train']} train, {stats['eval']} eval"
    return out


def prompt_expectations(cfg: CurateConfig):
    return [
        ("ExpectColumnValuesToNotBeNull", {"column": "prompt"}),
        ("ExpectColumnValuesToBeUnique", {"column": "prompt"}),
        ("ExpectColumnValueLengthsToBeBetween", {"column": "prompt", "min_value": cfg.min_chars,
                                                 **({"max_value": cfg.max_chars} if cfg.max_chars else {})}),
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
                     docs_dir: Optional[str] = None, raise_on_failure: bool = True,
                     stats: Optional[Mapping[str, int]] = None) -> GateReport:
    """The prompt gate; with the curation ``stats``, count failures say why prompts were removed."""
    return run_gate("prompts", prompt_table(train, ev), prompt_expectations(cfg), docs_dir=docs_dir,
                    raise_on_failure=raise_on_failure,
                    context=removal_summary(stats, cfg) if stats else None)


def curate(source: str, cfg: CurateConfig, column: Optional[str] = None,
           docs_dir: Optional[str] = None, tokenizer: Optional[TokenLimiter] = None) -> CurateResult:
    """Load, clean, split and gate. Raises PromptSourceError / DataValidationError."""
    raw = load_prompts(source, column=column)
    res = curate_prompts(raw, cfg, tokenizer=tokenizer)
    res.source = source
    res.report = validate_prompts(res.train, res.eval, cfg, docs_dir=docs_dir, stats=res.stats)
    return res


def config_dict(cfg: CurateConfig) -> Dict[str, Any]:
    return asdict(cfg)

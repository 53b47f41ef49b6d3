"""The pipeline's own errors and the short message users see first.

Every stage raises errors that name the culprit (a file, a URL, a field). When a step of the
flow (or a distill worker) fails, :func:`report` prints a short block to stderr *before*
Metaflow's traceback::

    rCM: curate failed: PromptSourceError: prompt file 'bad.txt' holds no prompts
    rCM: fix: check --prompts (a readable path/URL: .txt one prompt per line, .csv/.parquet with --prompt_column)
    rCM: then rerun, or `python flows/distill_flow.py resume --origin-run-id 1732` to keep the finished steps

so the first lines of a failure say what went wrong and what to do; the traceback stays below
for the details.

:class:`RCMError` is the base class of new project errors (a ``fix`` attribute carries the
advice). Older project errors (``ShardError``, ``PromptSourceError``, ...) predate it: they are
recognised by class name (:data:`FIXES`), so this module imports none of the stages. A
``ValueError`` raised by the project's own code (rcm_core, rcm_steps, the flow) is how the
library rejects a setting (e.g. ``DistillConfig``): it counts as a project error too.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, TextIO

__all__ = ["RCMError", "ConfigError", "FIXES", "is_project_error", "fix_for", "headline", "report",
           "PREFIX"]

PREFIX = "rCM:"


class RCMError(Exception):
    """Base of the pipeline's own errors; ``fix`` says what the user should do about it."""

    fix: str = ""

    def __init__(self, message: str = "", *, fix: Optional[str] = None):
        super().__init__(message)
        if fix is not None:
            self.fix = fix


class ConfigError(RCMError, ValueError):
    """A flow parameter is invalid (still a ValueError, as before)."""

    fix = "correct that parameter on the command line (`python flows/distill_flow.py run --help` lists them)"


# Project error classes (by name, anywhere in the MRO) -> what to do. A ``fix`` attribute wins.
FIXES = {
    "UnknownTeacherError": "pass --teacher with one of the known names, or a directory in diffusers layout",
    "RealTeacherError": "put the teacher's files where the message says (or pass the directory as --teacher); "
                        "the message lists the missing/mismatched files and the download command",
    "PromptSourceError": "check --prompts (a readable path/URL: .txt one prompt per line, .csv/.parquet with "
                         "--prompt_column naming the text column)",
    "DataValidationError": "correct the prompts the failed expectations name (the Data Docs page lists each one) or "
                           "point --prompts at another source",
    "StorageError": "check --storage_root and its credentials (AWS_* / RCM_STORAGE_OPTIONS for s3:// URLs)",
    "ShardError": "the teacher cache is damaged: delete the cache folder the message names; the next run "
                  "recomputes the missing shards",
    "TorchrunError": "read the distill worker's output above; once fixed, "
                     "`python flows/distill_flow.py resume` continues from the last checkpoint",
    "MemoryError": "use one of the settings the message lists (fewer frames/pixels, smaller --batch_size, "
                   "more --nodes with a sharding preset)",
}


VALUE_FIX = ("correct the value the message names (a flow parameter, --distill_config / DistillConfig "
             "field, or a teacher option)")
_PROJECT_DIRS = (f"{os.sep}rcm_core{os.sep}", f"{os.sep}rcm_steps{os.sep}", f"{os.sep}flows{os.sep}")


def _names(exc: BaseException):
    return [c.__name__ for c in type(exc).__mro__]


def _raised_by_project(exc: BaseException) -> bool:
    """A ValueError the project itself raised (innermost frame in rcm_core/, rcm_steps/ or flows/): the
    library's way of rejecting a setting, with a message that names it."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return any(d in tb.tb_frame.f_code.co_filename for d in _PROJECT_DIRS)


def is_project_error(exc: BaseException) -> bool:
    """One of the pipeline's own errors (its message names the culprit)."""
    return (isinstance(exc, RCMError) or any(n in FIXES for n in _names(exc))
            or (isinstance(exc, ValueError) and _raised_by_project(exc)))


def fix_for(exc: BaseException) -> str:
    fix = getattr(exc, "fix", None)
    if fix:
        return str(fix)
    for n in _names(exc):
        if n in FIXES:
            return FIXES[n]
    return VALUE_FIX if isinstance(exc, ValueError) and _raised_by_project(exc) else ""


def headline(exc: BaseException, limit: int = 400) -> str:
    """``Type: first line of the message`` (shortened): the culprit, in one line."""
    summary = getattr(exc, "summary", None)       # TorchrunError: the worker's own rCM line
    if summary:
        return str(summary).strip().splitlines()[0][:limit]
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if len(first) > limit:
        first = first[:limit - 3] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def report(exc: BaseException, where: str, resume_hint: Optional[str] = None,
           file: Optional[TextIO] = None) -> str:
    """Print the short ``rCM:`` block for ``exc`` (failed in ``where``) to stderr; returns it.

    Project errors get their fix; anything else is labelled unexpected (a bug: the traceback below
    has the details). Never raises (stderr may be gone when the run is being torn down).
    """
    lines = [f"{PREFIX} {where} failed: {headline(exc)}"]
    if is_project_error(exc):
        fix = fix_for(exc)
        if fix:
            lines.append(f"{PREFIX} fix: {fix}")
    else:
        lines.append(f"{PREFIX} unexpected error (likely a bug): the traceback below shows where")
    if resume_hint:
        lines.append(f"{PREFIX} {resume_hint}")
    text = "\n".join(lines)
    try:
        out = file or sys.stderr
        out.write(text + "\n")
        out.flush()
    except Exception:  # noqa: BLE001 - a closed pipe must not hide the original error
        pass
    return text

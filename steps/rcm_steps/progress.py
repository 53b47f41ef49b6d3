"""Progress of a long stage (curate, cache_teacher, evaluate) that shows under Metaflow too.

Metaflow logs a task's output line by line: a tqdm bar, which redraws one line with ``\\r``, shows
nothing until it ends (then its first and last states on one line). So, unless the output is a
terminal, :class:`Progress` prints discrete lines::

    teacher cache embedded: 0/72 sampler steps (0%)
    teacher cache embedded: 31/72 sampler steps (43%), 10 s, ~13 s left
    teacher cache embedded: 72/72 sampler steps (100%), 23 s

one at the start, then at most one every ``every_s`` seconds (``RCM_PROGRESS_EVERY``, default 10),
and one at the end. On a terminal it is a tqdm bar (``TQDM_DISABLE=1`` hides it). ``RCM_PROGRESS=0``
turns both off.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress", "say"]


def _enabled() -> bool:
    return os.environ.get("RCM_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def say(line: str, file: Optional[TextIO] = None) -> None:
    """One status line of a stage (flushed, so it reaches Metaflow's log at once)."""
    if _enabled():
        print(line, file=file or sys.stdout, flush=True)


class Progress:
    """``total`` units of work in ``desc``; :meth:`update` as they finish; :meth:`close` (or ``with``) at the end."""

    def __init__(self, desc: str, total: int, unit: str = "steps", initial: int = 0,
                 every_s: Optional[float] = None, file: Optional[TextIO] = None, enabled: bool = True):
        self.desc, self.total, self.unit, self.n, self.initial = desc, max(0, int(total)), unit, int(initial), int(initial)
        self.file = file or sys.stdout
        self.every_s = float(os.environ.get("RCM_PROGRESS_EVERY", "10") if every_s is None else every_s)
        self.t0 = self._last = time.perf_counter()
        self._closed, self._bar = False, None
        if not (enabled and _enabled()):
            self._closed = True
        elif _isatty(self.file):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, file=self.file,
                             disable=os.environ.get("TQDM_DISABLE") == "1")
        else:
            self._line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        if self._closed:
            return
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.perf_counter() - self._last >= self.every_s and self.n < self.total:
            self._line()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        else:
            self._line()

    def _line(self) -> None:
        now = time.perf_counter()
        self._last = now
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}"
        secs = now - self.t0
        if secs >= 1:
            text += f", {secs:.0f} s"
            done = self.n - self.initial
            if done > 0 and self.n < self.total:
                text += f", ~{secs * (self.total - self.n) / done:.0f} s left"
        try:
            print(text, file=self.file, flush=True)
        except (OSError, ValueError):      # a closed pipe must not stop the work
            pass


def _isatty(f) -> bool:
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError):
        return False

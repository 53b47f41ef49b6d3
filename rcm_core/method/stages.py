"""The staged schedule (issue 20): phases run one after another, each a method and its length.

NVlabs/rcm's README (Causal-rCM) recommends warming up with discrete-time CM, then sCM, then
sCM + DMD, because "sCM + DMD joint training may be unstable for some models". A phase is
``(method, student_updates)``:

* ``dcm`` / ``scm``: every iteration is a student update (no critic);
* ``rcm`` / ``dmd``: ``K`` iterations per student update, the critic first: ``K - 1`` critic
  updates, then one student update (the fake score starts as a copy of the teacher and has to
  catch up with a student that the earlier phases have already moved).

The student-every-step tangent warm-up of the joint schedule does not apply (the consistency
phases take its place); the tangent warm-up ratio r follows the student's own update count.
Everything here is plain integer arithmetic on the global iteration index, so a resumed run is
in the same phase at the same step.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

STAGE_METHODS = ("dcm", "scm", "rcm", "dmd")
CRITIC_METHODS = ("rcm", "dmd")


@dataclass(frozen=True)
class Stage:
    method: str
    updates: int          # student updates in this phase

    def iterations(self, K: int) -> int:
        return self.updates * K if self.method in CRITIC_METHODS else self.updates


@dataclass(frozen=True)
class StagePosition:
    index: int                     # which phase
    method: str
    student_step: bool             # this iteration updates the student (else the critic)
    student_updates_before: int    # the student's updates before this iteration (all phases)
    critic_updates_before: int     # the critic's updates before this iteration (all phases)


def parse_stages(stages, where: str = "DistillConfig.stages") -> tuple:
    """``[("dcm", 100), {"method": "rcm", "updates": 600}, ...]`` -> tuple of :class:`Stage`; clear errors."""
    out = []
    for i, s in enumerate(stages or ()):
        if isinstance(s, Stage):
            method, updates = s.method, s.updates
        elif isinstance(s, dict):
            unknown = sorted(set(s) - {"method", "updates"})
            if unknown or "method" not in s or "updates" not in s:
                raise ValueError(f"{where}[{i}] = {s!r}: a phase is {{'method': ..., 'updates': ...}}")
            method, updates = s["method"], s["updates"]
        elif isinstance(s, (list, tuple)) and len(s) == 2:
            method, updates = s
        else:
            raise ValueError(f"{where}[{i}] = {s!r}: a phase is (method, student_updates), e.g. ('scm', 300)")
        if method not in STAGE_METHODS:
            raise ValueError(f"{where}[{i}]: method {method!r} does not exist as a phase; known: {STAGE_METHODS}")
        if isinstance(updates, bool) or not isinstance(updates, numbers.Integral) or updates < 1:
            raise ValueError(f"{where}[{i}] ({method}): updates must be an integer >= 1, got {updates!r}")
        out.append(Stage(str(method), int(updates)))
    return tuple(out)


def stage_iterations(stages: Sequence[Stage], K: int) -> int:
    """Iterations the phases take together."""
    return sum(s.iterations(K) for s in stages)


def describe(stages: Sequence[Stage], K: int) -> str:
    return " + ".join(f"{s.method} {s.updates}" + (f" x K={K}" if s.method in CRITIC_METHODS else "")
                      for s in stages)


def locate(step: int, stages: Sequence[Stage], K: int) -> StagePosition:
    """The phase of global iteration ``step`` and each network's update count before it.

    Past the last phase the last phase continues (a run may be extended).
    """
    students = critics = start = 0
    for i, s in enumerate(stages):
        n = s.iterations(K)
        last = i == len(stages) - 1
        if step < start + n or last:
            p = step - start
            if s.method in CRITIC_METHODS:
                # positions K-1, 2K-1, ... update the student; the K-1 before each update the critic
                return StagePosition(i, s.method, p % K == K - 1, students + p // K, critics + p - p // K)
            return StagePosition(i, s.method, True, students + p, critics)
        students += s.updates
        if s.method in CRITIC_METHODS:
            critics += n - s.updates
        start += n
    raise ValueError("no stages")

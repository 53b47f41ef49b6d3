"""``@step_guard``: what every step of the flow does around its body (a Metaflow user step decorator).

    @card
    @step_guard
    @step
    def curate(self): ...

* Before the body: the flow's MLflow run (artifact ``mlflow_run_id``, found on the flow or, in a
  join, on its inputs) is reopened / re-linked for this attempt (:func:`rcm_steps.mlflow_run.begin_step`),
  and SIGTERM/SIGINT handlers are installed.
* The body raises: the short ``rCM: <step> failed: <culprit>`` / ``rCM: fix: ...`` block goes to
  stderr first (above Metaflow's traceback), then the MLflow run ends FAILED with the error as
  tags, then the exception goes on (Metaflow retries or fails the step as usual). Every failed
  attempt ends the run FAILED (``error.retry_pending`` says whether Metaflow retries); the next
  attempt, or a ``resume``, reopens it.
* SIGTERM/SIGINT (the flow is being killed): the MLflow run ends KILLED, a line says how to
  resume, and :class:`StepInterrupted` (a ``KeyboardInterrupt``) unwinds the step, so the
  torchrun gang is terminated too (:func:`rcm_steps.launcher.run_torchrun`).

In an ``@parallel`` step only node 0 touches MLflow. SIGKILL cannot be caught: such a run stays
RUNNING until a ``resume`` reopens it (README, Troubleshooting).
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Optional

from metaflow import current, user_step_decorator

from . import mlflow_run as M
from .errors import headline, report

__all__ = ["step_guard", "StepInterrupted", "sigterm_as_interrupt"]


class StepInterrupted(KeyboardInterrupt):
    """Raised in a step by SIGTERM/SIGINT, once the MLflow run is marked KILLED."""


def _warn(msg: str) -> None:
    try:
        print(f"rCM: warning: {msg}", file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - stderr may be gone while the run is torn down
        pass


def _user_retries(flow, step_name: str) -> int:
    """How many times Metaflow retries this step's user code (@retry, --with retry)."""
    try:
        counts = [d.step_task_retry_count()[0] for d in getattr(flow, step_name).decorators]
        return max([0] + [int(c) for c in counts if c is not None])
    except Exception:  # noqa: BLE001
        return 0


def _mlflow_run_id(flow, inputs, name="mlflow_run_id") -> Optional[str]:
    for obj in [flow, *(inputs or [])]:
        try:
            rid = getattr(obj, name, None)
        except Exception:  # noqa: BLE001 - a join's own artifacts are not merged yet
            rid = None
        if rid:
            return str(rid)
    return None


def _flow_cmd() -> str:
    try:
        rel = os.path.relpath(sys.argv[0])
        return f"python {os.path.abspath(sys.argv[0]) if rel.startswith('..') else rel}"
    except Exception:  # noqa: BLE001
        return "python flows/distill_flow.py"


def _children(pid: int):
    """Direct child processes of ``pid`` (Linux /proc; empty elsewhere)."""
    kids = []
    try:
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                    kids.append(int(d))
    except OSError:
        pass
    return kids


def sigterm_as_interrupt() -> None:
    """In the flow's processes: SIGTERM acts like Ctrl-C.

    Metaflow's runtime then stops its tasks and flushes their logs (by default a SIGTERM kills
    it on the spot: the tasks' last words are lost, and tasks not in its process group run on as
    orphans), and the SIGTERM goes on to its direct children (a ``kill <pid>`` of the runtime
    reaches only the runtime; a Ctrl-C reaches the whole process group). Inside a step,
    :func:`step_guard`'s handler takes over. Later SIGTERMs are ignored while shutting down.
    """
    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for pid in _children(os.getpid()):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        raise KeyboardInterrupt(f"{signal.Signals(signum).name}")

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:   # not the main thread
        pass


@user_step_decorator
def step_guard(step_name, flow, inputs):
    where = f"{current.run_id}/{step_name}/{current.task_id} attempt {current.retry_count}"
    node0 = os.environ.get("MF_PARALLEL_NODE_INDEX", "0") == "0"
    # the tracking URI start resolved (rcm_steps.endpoints), else the parameter (start itself, older runs)
    uri = _mlflow_run_id(flow, inputs, "run_tracking_uri") or getattr(flow, "mlflow_tracking_uri", None)
    client = None
    if uri and node0:
        try:
            client = M.client_for(uri)
            rid = _mlflow_run_id(flow, inputs)
            if rid:
                changed = M.begin_step(client, rid, flow_run_id=current.run_id,
                                       origin_run_id=current.origin_run_id, where=where)
                if changed:
                    print(f"MLflow run {rid}: reopened/re-linked for {where}", flush=True)
        except Exception as e:  # noqa: BLE001 - the step itself reports an unreachable MLflow
            _warn(f"MLflow run not reopened at {where}: {type(e).__name__}: {e}")
    resume_cmd = f"{_flow_cmd()} resume --origin-run-id {current.run_id}"

    def _client_now():      # start resolves the tracking URI in its body: a client made then
        late = _mlflow_run_id(flow, inputs, "run_tracking_uri")
        if client is not None or not (late and node0):
            return client
        try:
            return M.client_for(late)
        except Exception:  # noqa: BLE001
            return None
    state = {"killed": False}

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if state["killed"]:      # a second signal (group kill + forwarded): let the first one finish
            return
        state["killed"] = True
        rid = _mlflow_run_id(flow, inputs)
        client = _client_now()
        if client is not None and rid:
            try:
                M.end_killed(client, rid, signal_name=name, where=where)
            except Exception as e:  # noqa: BLE001
                _warn(f"could not mark MLflow run {rid} KILLED: {e}")
        try:
            print(f"rCM: {step_name} interrupted by {name}" + (f"; MLflow run {rid} marked KILLED" if rid else "")
                  + f". `{resume_cmd}` continues from the last checkpoint", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001
            pass
        raise StepInterrupted(f"{step_name} interrupted by {name}")

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:   # not the main thread: leave the handlers alone
            pass
    try:
        yield
    except Exception as e:
        if state["killed"]:      # e.g. a broken pipe after the kill: KILLED is already recorded
            raise
        retries = _user_retries(flow, step_name)
        pending = current.retry_count < retries
        hint = (f"Metaflow retries this step (attempt {current.retry_count + 2} of {retries + 1})" if pending else
                "then rerun" if step_name == "start" else
                f"then rerun; or, once the input itself is fixed, `{resume_cmd}` reruns from this step with the "
                "same parameters, keeping the finished steps")
        report(e, step_name, resume_hint=hint)
        rid = _mlflow_run_id(flow, inputs)
        client = _client_now()
        if client is not None and rid:
            try:
                M.end_failed(client, rid, headline(e), error_type=type(e).__name__, where=where,
                             retry_pending=pending)
            except Exception as e2:  # noqa: BLE001 - never hide the step's own error
                _warn(f"could not mark MLflow run {rid} FAILED: {e2}")
        raise
    finally:
        for sig, h in previous.items():
            try:
                signal.signal(sig, h)
            except Exception:  # noqa: BLE001
                pass

"""Logging a model into the flow's MLflow run, without MLflow's noise and without ending the run.

``with logging_model(run_id): mlflow.pyfunc.log_model(...)`` (rcm_steps.register):

* MLflow's warnings at ``log_model`` are about choices made on purpose and hide the step's own lines:
  "Add type hints to the `predict` method ..." (a ``UserWarning`` that Python prints with its source line,
  a stray ``color_warning(``), "Any type hint is inferred as AnyType ...", and "Passing a Python object as
  `python_model` causes it to be serialized using CloudPickle ..." (the ``mlflow.pyfunc`` logger). They
  are filtered inside the block only (``warnings.catch_warnings`` and a filter on that one logger);
  every other warning still shows.
* ``mlflow.start_run(run_id=...)`` as a context manager ends the run FINISHED when the block exits, so
  the next step (``end``) found it closed and "reopened" it, an ``rcm.history`` entry a clean run should
  not have. Here the run's status before the block is restored after it (RUNNING, while a step is alive).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

from rcm_core.nets.library_logs import dropping

__all__ = ["logging_model", "quiet_model_logging", "MLFLOW_WARNINGS", "MLFLOW_LOG_LINES"]

# (message regex, category) of the warnings filtered while a model is logged
MLFLOW_WARNINGS = ((r"(?s).*Add type hints to the `predict` method", UserWarning),
                   (r"(?s).*Any type hint is inferred as AnyType", UserWarning))
# (logger, message fragment) of the log lines dropped meanwhile
MLFLOW_LOG_LINES = (("mlflow.pyfunc", "serialized using CloudPickle"),)


@contextlib.contextmanager
def quiet_model_logging() -> Iterator[None]:
    """Filter :data:`MLFLOW_WARNINGS` and :data:`MLFLOW_LOG_LINES` inside the block (no global change)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        for pattern, category in MLFLOW_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        for logger, fragment in MLFLOW_LOG_LINES:
            stack.enter_context(dropping(logger, fragment))
        yield


@contextlib.contextmanager
def logging_model(run_id: str) -> Iterator[None]:
    """Make ``run_id`` MLflow's active run for the block (``log_model`` logs into it), quietly; its status
    afterwards is what it was before (``start_run``'s own exit would end it FINISHED)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    status = client.get_run(run_id).info.status
    with quiet_model_logging(), mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        yield
    if status == "RUNNING" and client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")

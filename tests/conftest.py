"""Shared test hygiene."""
import os
import sys

# Under pytest-xdist (README: -n 2 on a 2-core machine) each worker computes on one thread, and so do
# the processes it starts (flows, torchrun ranks): two workers with two threads each oversubscribe.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest


@pytest.fixture(autouse=True)
def _reset_mlflow_uris():
    """Tests point MLflow at their own sqlite store with ``mlflow.set_tracking_uri``: a process-global
    that outlives the test. Reset it after each test, so the next one follows its environment again
    (a leaked URI once made a services test look up teachers in another test's registry)."""
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        from mlflow.tracking import _tracking_service, _model_registry

        _tracking_service.utils._tracking_uri = None
        _model_registry.utils._registry_uri = None


@pytest.fixture(autouse=True)
def _reset_default_aws_sessions():
    """``boto3.client(...)`` signs with boto3's default session, whose credentials are read once, at its first use,
    and kept for the process; fsspec's S3 filesystems are cached on their arguments with the credentials of their
    first use too. A test that changes AWS_* (another moto server, a rotated key) then signed with an earlier test's
    key (InvalidAccessKeyId in a grouped -k run). Drop both after each test."""
    yield
    boto3 = sys.modules.get("boto3")
    if boto3 is not None:
        boto3.DEFAULT_SESSION = None
    s3fs = sys.modules.get("s3fs")
    if s3fs is not None:
        s3fs.S3FileSystem.clear_instance_cache()

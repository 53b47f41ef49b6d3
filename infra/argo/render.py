"""Render a flow's Argo objects (WorkflowTemplate, CronWorkflow, Sensor) to files, with no cluster.

    python infra/argo/render.py --out build/argo -- flows/distill_flow.py \\
        --config execution infra/k8s/overlays/gpu-cluster/execution.json

runs ``<flow> <flow options> argo-workflows create`` in this process with the Kubernetes API replaced
by a recorder: every object Metaflow would create is written to ``<out>/<kind>-<name>.json``
(review them, commit them for GitOps, or ``kubectl apply -f``). ``argo-workflows create
--only-json`` prints only the WorkflowTemplate; this also gives the CronWorkflow of ``@schedule``
and the Argo Events Sensor of ``@trigger``.

Like ``--only-json`` it uploads the code package, so it needs Metaflow's S3 datastore configured
(``METAFLOW_DEFAULT_DATASTORE=s3``, ``METAFLOW_DATASTORE_SYSROOT_S3``, ``METAFLOW_S3_ENDPOINT_URL``
for MinIO) and, for ``@trigger``, ``METAFLOW_ARGO_EVENTS_EVENT``, ``..._EVENT_SOURCE``,
``..._SERVICE_ACCOUNT`` (infra/k8s/base/metaflow-config.yaml has the in-cluster values).
"""
from __future__ import annotations

import json
import os
import runpy
import sys

KINDS = {"workflowtemplates": "WorkflowTemplate", "cronworkflows": "CronWorkflow", "sensors": "Sensor",
         "workflows": "Workflow"}


class _Recorder:
    def __init__(self, out):
        self.out = out
        self.written = []

    def _notfound(self):
        from kubernetes.client.rest import ApiException

        return ApiException(status=404, reason="Not Found (render.py: no cluster)")

    def get_namespaced_custom_object(self, **kw):
        raise self._notfound()

    def delete_namespaced_custom_object(self, **kw):
        raise self._notfound()

    def list_namespaced_custom_object(self, **kw):
        return {"items": [], "metadata": {}}

    def patch_namespaced_custom_object(self, **kw):
        raise self._notfound()

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kw):
        body = json.loads(json.dumps(body, default=str))
        body.setdefault("apiVersion", f"{group}/{version}")
        body.setdefault("kind", KINDS.get(plural, plural))
        body.setdefault("metadata", {}).setdefault("namespace", namespace)
        body["metadata"].pop("resourceVersion", None)
        name = body["metadata"].get("name") or body["metadata"].get("generateName", "x")
        path = os.path.join(self.out, f"{body['kind']}-{name}.json")
        with open(path, "w") as f:
            json.dump(body, f, indent=1, sort_keys=True)
        self.written.append(path)
        return body

    replace_namespaced_custom_object = create_namespaced_custom_object


def render(flow_file, flow_args, out):
    """Run ``flow_file flow_args argo-workflows create`` against a recorder; returns the written files."""
    import kubernetes

    from metaflow.plugins.argo import argo_client

    os.makedirs(out, exist_ok=True)
    rec = _Recorder(out)

    class _FakeK8s:
        rest = kubernetes.client.rest

        def CustomObjectsApi(self):  # noqa: N802 - kubernetes' name
            return rec

    class _Provider:
        def get(self):
            return _FakeK8s()

    def _init(self, namespace=None):
        self._client = _Provider()
        self._namespace = namespace or "default"
        self._group = "argoproj.io"
        self._version = "v1alpha1"

    argo_client.ArgoClient.__init__ = _init
    sys.argv = [flow_file, *flow_args, "argo-workflows", "create"]
    sys.path.insert(0, os.path.dirname(os.path.abspath(flow_file)))
    try:
        runpy.run_path(flow_file, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    return rec.written


def main(argv=None):
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print(__doc__)
        return 2
    i = argv.index("--")
    p = argparse.ArgumentParser("infra/argo/render.py")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv[:i])
    rest = argv[i + 1:]
    files = render(rest[0], rest[1:], a.out)
    print(json.dumps({"written": files}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

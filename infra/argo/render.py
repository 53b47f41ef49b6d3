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
``..._SERVICE_ACCOUNT`` (infra/k8s/base/metaflow-config.yaml has the in-cluster values). For a dry run
with no S3 at hand, a local moto server does (README, "Operate it").

Nothing is deployed and no cluster is asked: Metaflow's "deployed to Argo Workflows successfully" and its
production-token lines (a token made up on the spot, since no earlier deployment is found) are replaced by
one "rendered, not deployed" line. The storage root and MLflow URI are not in the objects: deployed runs
read them when they start (rcm_steps/endpoints.py).
"""
from __future__ import annotations

import io
import json
import os
import re
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


# Metaflow's lines about a deployment and a production token that a render does not make (they start with these)
_DROP = ("It seems this is the first time you are deploying", "A new production token generated",
         "The namespace of this production flow is", "production:", "To analyze results of this production flow",
         'namespace("production:', "If you want to authorize other people", "argo-workflows create --authorize",
         "when deploying this flow to Argo Workflows for the first time", 'See "Organizing Results"')
_DEPLOYED = re.compile(r"Workflow \*?(\S+?)\*? for flow \*?(\S+?)\*? deployed to Argo Workflows successfully\.")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def rewrite_line(line, out):
    """One line of Metaflow's ``argo-workflows create`` output as render.py prints it; None drops it."""
    text = _ANSI.sub("", line).strip()
    if text.startswith(_DROP):
        return None
    m = _DEPLOYED.search(text)
    if m:
        return (f"Workflow {m.group(1)} for flow {m.group(2)} rendered, not deployed: the objects are written to "
                f"{out} (apply them with `kubectl apply -f {out}`, or deploy with `argo-workflows create`)")
    if text.startswith("Deploying ") and text.endswith(" to Argo Workflows..."):
        return f"Compiling {text[len('Deploying '):-len(' to Argo Workflows...')]} for Argo Workflows (render.py: " \
               "nothing is deployed)..."
    return line.replace("was deployed with a modified name", "was rendered with a modified name")


class _LineFilter(io.TextIOBase):
    """A text stream that passes each complete line through ``rewrite`` on to ``target``."""

    encoding, errors = "utf-8", "strict"

    def __init__(self, target, rewrite):
        super().__init__()
        self.target, self.rewrite, self.buf, self.blank = target, rewrite, "", False

    def writable(self):
        return True

    def isatty(self):
        return False

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError("text stream")
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            new = self.rewrite(line)
            blank = new is not None and not _ANSI.sub("", new).strip()
            if new is not None and not (blank and self.blank):      # one blank line where lines were dropped
                self.target.write(new + "\n")
                self.blank = blank
        return len(s)

    def flush(self):
        self.target.flush()

    def close_lines(self):
        if self.buf:
            self.write("\n")


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
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (_LineFilter(s, lambda line: rewrite_line(line, out)) for s in streams)
    try:
        runpy.run_path(flow_file, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        for f in (sys.stdout, sys.stderr):
            f.close_lines()
        sys.stdout, sys.stderr = streams
    return rec.written


def datastore_problem(flow_args, environ=None):
    """Why Metaflow cannot compile for Argo here (it uploads the code package to its S3 datastore); None if it can."""
    environ = os.environ if environ is None else environ
    args = " ".join(flow_args)
    ds = re.search(r"--datastore[= ](\S+)", args)
    kind = ds.group(1) if ds else environ.get("METAFLOW_DEFAULT_DATASTORE", "")
    if not kind:
        from metaflow.metaflow_config import DEFAULT_DATASTORE   # also reads ~/.metaflowconfig

        kind = DEFAULT_DATASTORE
    if kind != "s3":
        return (f"Metaflow's datastore is {kind!r}; compiling for Argo uploads the code package to an S3 datastore: "
                "set METAFLOW_DEFAULT_DATASTORE=s3, METAFLOW_DATASTORE_SYSROOT_S3=s3://<bucket>/metaflow (and "
                "METAFLOW_S3_ENDPOINT_URL for MinIO); for a dry run, a local moto server: README, \"Operate it\"")
    return None


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
    problem = datastore_problem(rest[1:])
    if problem:
        print(f"render.py: {problem}", file=sys.stderr)
        return 2
    files = render(rest[0], rest[1:], a.out)
    print(json.dumps({"written": files}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

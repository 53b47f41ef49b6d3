"""The flows compile to Argo objects offline: the distill flow with the gpu-cluster overlay's execution
config gives a WorkflowTemplate (8-GPU JobSet with /dev/shm, node selector, tolerations, Secrets), a
CronWorkflow (@schedule) and an Argo Events Sensor (@trigger on rcm.new_teacher); the teacher watcher
an hourly CronWorkflow. The rendered objects carry no credential of the deploying environment, and no storage
root or tracking URI: a cron or event run reads them from ConfigMap rcm-endpoints when it starts."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from pipeline_fixtures import *  # noqa: F401,F403

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "infra", "k8s"))
import validate as V  # noqa: E402

SECRET_KEY, SECRET_ID = "argo-test-Secret-55013", "AKIAARGOTEST0042"


def _manifests(path):
    import yaml

    return [o for o in yaml.safe_load_all(open(os.path.join(ROOT, path))) if o]


def _configmaps():
    """The base's ConfigMaps by name (data only): what the cluster holds."""
    objs = _manifests("infra/k8s/base/metaflow-config.yaml") + _manifests("infra/k8s/base/argo.yaml")
    return {o["metadata"]["name"]: dict(o.get("data") or {}) for o in objs if o["kind"] == "ConfigMap"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, moto_server):
    import boto3

    tmp = tmp_path_factory.mktemp("argo")
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket="mfargo")
    cms = _configmaps()
    # the deploy-flows Job's environment: both ConfigMaps (rcm-endpoints too) and the S3 Secret
    env = {**os.environ, **cms["rcm-metaflow-config"], **cms["rcm-endpoints"]}
    env.update(METAFLOW_USER="tester", METAFLOW_DEFAULT_METADATA="local",
               METAFLOW_DATASTORE_SYSROOT_S3="s3://mfargo/metaflow", METAFLOW_S3_ENDPOINT_URL=moto_server,
               METAFLOW_HOME=str(tmp), AWS_ACCESS_KEY_ID=SECRET_ID, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
               MLFLOW_TRACKING_PASSWORD=SECRET_KEY)
    out = {}
    for name, flow, ex in [("distill", "flows/distill_flow.py", "infra/k8s/overlays/gpu-cluster/execution.json"),
                           ("watch", "flows/teacher_watch_flow.py", "infra/k8s/overlays/gpu-cluster/watch.json")]:
        d = tmp / name
        r = subprocess.run([sys.executable, os.path.join(ROOT, "infra/argo/render.py"), "--out", str(d), "--",
                            os.path.join(ROOT, flow), "--config", "execution", os.path.join(ROOT, ex)],
                           env=env, capture_output=True, text=True, cwd=str(tmp), timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        out[name] = {json.load(open(f))["kind"]: json.load(open(f)) for f in glob.glob(str(d / "*.json"))}
        out[name + "_log"] = r.stdout + r.stderr
    return out


def test_distill_compiles_to_template_cron_and_sensor(rendered):
    objs = rendered["distill"]
    assert set(objs) == {"WorkflowTemplate", "CronWorkflow", "Sensor"}
    for o in objs.values():
        assert not V.validate_schema(o), V.validate_schema(o)
    cron = objs["CronWorkflow"]["spec"]
    assert (cron.get("schedule") or cron["schedules"][0]) == "0 3 * * 0" and cron["timezone"] == "UTC"
    assert cron["workflowSpec"]["workflowTemplateRef"]["name"] == objs["WorkflowTemplate"]["metadata"]["name"]
    sensor = objs["Sensor"]["spec"]
    dep = sensor["dependencies"][0]
    assert dep["eventSourceName"] == "rcm-events" and dep["eventName"] == "metaflow-event"
    assert "rcm.new_teacher" in json.dumps(dep["filters"])
    dests = [p["dest"] for p in sensor["triggers"][0]["template"]["k8s"]["parameters"]]
    for param in ("teacher", "teacher_revision", "teacher_source"):
        assert f"spec.arguments.parameters.#(name={param}).value" in dests
    assert sensor["template"]["serviceAccountName"] == "rcm-sensor"


def test_distill_pods_ask_for_8_gpus_shm_and_gpu_nodes(rendered):
    wt = rendered["distill"]["WorkflowTemplate"]
    templates = {t["name"]: t for t in wt["spec"]["templates"]}
    m = templates["distill"]["resource"]["manifest"]
    assert "JobSet" in m and m.count("nvidia.com/gpu: '8'") == 2          # control + worker replicas
    assert "medium: Memory" in m and "sizeLimit: 65536Mi" in m              # /dev/shm for NCCL
    assert "nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3" in m and "tolerations:" in m
    assert m.count("name: rcm-s3") >= 2 and "name: rcm-mlflow-client" in m   # credentials from Secrets
    others = json.dumps({k: v for k, v in templates.items() if k != "distill"})
    assert "nvidia.com/gpu" not in others and "rcm-s3" in json.dumps(templates["start"])
    assert wt["metadata"]["annotations"].get("metaflow/project_name") == "rcm" or "rcm" in wt["metadata"]["name"]


def test_watcher_compiles_hourly(rendered):
    objs = rendered["watch"]
    assert set(objs) == {"WorkflowTemplate", "CronWorkflow"}
    cron = objs["CronWorkflow"]["spec"]
    assert (cron.get("schedule") or cron["schedules"][0]) == "0 * * * *"


def test_rendered_objects_hold_no_credential(rendered):
    for name in ("distill", "watch"):
        text = json.dumps(rendered[name]) + rendered[name + "_log"]
        assert SECRET_KEY not in text and SECRET_ID not in text


# ---------------------------------------------------------------- what a deployed run starts with
def _pod_env(template, params, cms, secrets):
    """The environment of a step pod made from ``template`` in a workflow with ``params``, as Kubernetes builds it:
    envFrom (the Secrets), then the container's env (Argo substitutes workflow parameters), then the env that
    workflowDefaults' podSpecPatch merges in by name (from ConfigMaps)."""
    import re

    c = template["container"]
    env = {}
    for ef in c.get("envFrom") or []:
        if ef.get("secretRef"):
            env.update(secrets[ef["secretRef"]["name"]])
    for e in c["env"]:
        if e.get("value") is not None:
            env[e["name"]] = re.sub(r"\{\{workflow\.parameters\.([\w-]+)\}\}", lambda m: params[m.group(1)], e["value"])
    objs = [{"kind": "ConfigMap", "metadata": {"name": n}, "data": d} for n, d in cms.items()]
    for e in V.workflow_pod_env(objs):
        ref = e["valueFrom"]["configMapKeyRef"]
        if ref["key"] in cms.get(ref["name"], {}):
            env[e["name"]] = cms[ref["name"]][ref["key"]]
        else:
            assert ref.get("optional"), e
    return env


def _sensor_params(sensor, payload):
    """The parameters of the Workflow the Sensor creates for an event with this payload (Argo Events: a
    dataTemplate that fails with use-default-instead leaves the parameter's value as given)."""
    trig = sensor["spec"]["triggers"][0]["template"]["k8s"]
    wf = trig["source"]["resource"]
    params = {p["name"]: p.get("value") for p in wf["spec"]["arguments"]["parameters"]}
    for p in trig["parameters"]:
        name = p["dest"].split("#(name=")[1].split(")")[0]
        src = p["src"]
        if src.get("dataKey") == "body.payload":
            params[name] = json.dumps(payload)
        else:
            field = src["dataTemplate"].split('hasKey $.Input.body.payload "')[1].split('"')[0]
            params[name] = json.dumps(payload[field]) if field in payload else src["value"]
    return params, wf["spec"]["workflowTemplateRef"]["name"]


def _start_of(objs, params, cms):
    """(flow parameters, pod env) of the start step of a workflow with ``params``."""
    start = next(t for t in objs["WorkflowTemplate"]["spec"]["templates"] if t["name"] == "start")
    secrets = {"rcm-s3": {"AWS_ACCESS_KEY_ID": SECRET_ID, "AWS_SECRET_ACCESS_KEY": SECRET_KEY},
               "rcm-mlflow-client": {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": SECRET_KEY}}
    env = _pod_env(start, params, cms, secrets)
    return {k: json.loads(v) for k, v in params.items()}, env


def test_cron_and_sensor_runs_pass_start_checks_with_the_clusters_endpoints(rendered):
    """The compiled templates carry no storage root or tracking URI; a CronWorkflow run and a Sensor run of the
    distill flow get them from ConfigMap rcm-endpoints in the pod, and pass start's checks for target kubernetes
    (rcm_steps.endpoints.start_checks, as start calls it). A ConfigMap changed after deployment applies to the
    next run; the distill JobSet's pods get the endpoint settings, never a credential."""
    from rcm_steps.endpoints import forwarded_env, start_checks

    objs = rendered["distill"]
    target = json.load(open(os.path.join(ROOT, "infra/k8s/overlays/gpu-cluster/execution.json")))["target"]
    assert target == "kubernetes"
    defaults = {p["name"]: p.get("value") for p in objs["WorkflowTemplate"]["spec"]["arguments"]["parameters"]}
    assert json.loads(defaults["storage_root"]) == "" and json.loads(defaults["mlflow_tracking_uri"]) == ""
    cms = _configmaps()
    local = ("/checkout/runs/storage", "sqlite:////checkout/mlflow.db")     # what a local run would fall back to

    # cron: the CronWorkflow passes no arguments; the template's defaults apply
    cron = objs["CronWorkflow"]["spec"]["workflowSpec"]
    params = {**defaults, **{p["name"]: p["value"] for p in (cron.get("arguments") or {}).get("parameters", [])}}
    p, env = _start_of(objs, params, cms)
    ep = start_checks(p["storage_root"], p["mlflow_tracking_uri"], env, target, *local)
    assert (ep.storage_root, ep.tracking_uri) == ("s3://rcm-storage/rcm", "http://mlflow:5000")
    assert ep.storage_from == "$RCM_STORAGE_ROOT" and ep.event is None and p["teacher"] == "embedded"
    fwd = forwarded_env(env)
    assert json.loads(fwd["RCM_STORAGE_OPTIONS"]) == {"endpoint_url": "http://minio:9000"}
    assert fwd["AWS_ENDPOINT_URL_S3"] == "http://minio:9000" and SECRET_KEY not in json.dumps(fwd)

    # the operator moves the storage root after deploying: the next run follows, no redeploy
    moved = {**cms, "rcm-endpoints": {**cms["rcm-endpoints"], "RCM_STORAGE_ROOT": "s3://rcm-storage-2/rcm"}}
    p, env = _start_of(objs, params, moved)
    assert start_checks(p["storage_root"], p["mlflow_tracking_uri"], env, target, *local).storage_root == \
        "s3://rcm-storage-2/rcm"

    # sensor: an rcm.new_teacher event as rcm_steps.watch.publish sends it (Metaflow's ArgoEvent payload)
    payload = {"name": "rcm.new_teacher", "id": "e1", "timestamp": 1, "generated-by-metaflow": True,
               "teacher": "/models/wan-v2", "teacher_revision": "sha256:ab12", "teacher_source": "/models"}
    sp, ref = _sensor_params(objs["Sensor"], payload)
    assert ref == objs["WorkflowTemplate"]["metadata"]["name"]
    p, env = _start_of(objs, sp, cms)
    ep = start_checks(p["storage_root"], p["mlflow_tracking_uri"], env, target, *local)
    assert (ep.storage_root, ep.tracking_uri) == ("s3://rcm-storage/rcm", "http://mlflow:5000")
    assert ep.event == {"teacher": "/models/wan-v2", "teacher_revision": "sha256:ab12", "teacher_source": "/models"}
    assert (p["teacher"], p["teacher_revision"], p["teacher_source"]) == ("/models/wan-v2", "sha256:ab12", "/models")

    # without the ConfigMap's keys the pod cannot know: start stops, naming the variable and the ConfigMap
    bare = {**cms, "rcm-endpoints": {}}
    p, env = _start_of(objs, params, bare)
    with pytest.raises(ValueError, match=r"RCM_STORAGE_ROOT is not set in the pod.*rcm-endpoints"):
        start_checks(p["storage_root"], p["mlflow_tracking_uri"], env, target, *local)


def test_watcher_cron_run_reads_sources_and_tracking_from_the_cluster(rendered):
    from rcm_steps.endpoints import watch_checks

    objs = rendered["watch"]
    defaults = {p["name"]: p.get("value") for p in objs["WorkflowTemplate"]["spec"]["arguments"]["parameters"]}
    assert json.loads(defaults["sources"]) == "" and json.loads(defaults["mlflow_tracking_uri"]) == ""
    cms = _configmaps()
    p, env = _start_of(objs, defaults, cms)
    srcs, uri = watch_checks(p["sources"], p["mlflow_tracking_uri"], env, "kubernetes", "sqlite:////checkout/mlflow.db")
    assert srcs == ["mlflow:", "s3://rcm-storage/teachers/"] and uri == "http://mlflow:5000"


def test_render_says_rendered_not_deployed(rendered):
    for name in ("distill", "watch"):
        log = rendered[name + "_log"]
        assert "deployed to Argo Workflows successfully" not in log and "production token" not in log, log[-2000:]
        m = re.search(r"rendered, not deployed: the objects are written to (\S+) ", log)
        assert m and m.group(1).endswith(os.sep + name), log[-2000:]


def test_render_needs_an_s3_datastore():
    sys.path.insert(0, os.path.join(ROOT, "infra", "argo"))
    import render

    msg = render.datastore_problem([], {"METAFLOW_DEFAULT_DATASTORE": "local"})
    assert "'local'" in msg and "METAFLOW_DATASTORE_SYSROOT_S3" in msg and "moto" in msg
    assert render.datastore_problem([], {"METAFLOW_DEFAULT_DATASTORE": "s3"}) is None
    assert render.datastore_problem(["--datastore=s3"], {"METAFLOW_DEFAULT_DATASTORE": "local"}) is None


def test_hygiene_flags_a_pod_default_from_a_missing_configmap_key():
    patch = "containers:\n  - name: main\n    env:\n      - name: RCM_STORAGE_ROOT\n        valueFrom: " \
            "{configMapKeyRef: {name: rcm-endpoints, key: RCM_STORAGE_ROOT, optional: true}}\n"
    wc = {"kind": "ConfigMap", "metadata": {"name": "workflow-controller-configmap"},
          "data": {"workflowDefaults": "spec:\n  podSpecPatch: |\n" + "".join("    " + ln + "\n"
                                                                              for ln in patch.splitlines())}}
    ok = {"kind": "ConfigMap", "metadata": {"name": "rcm-endpoints"}, "data": {"RCM_STORAGE_ROOT": "s3://b/r"}}
    bad = {"kind": "ConfigMap", "metadata": {"name": "rcm-endpoints"}, "data": {}}
    flag = "podSpecPatch env RCM_STORAGE_ROOT from missing ConfigMap key rcm-endpoints/RCM_STORAGE_ROOT"
    assert [e["name"] for e in V.workflow_pod_env([wc, ok])] == ["RCM_STORAGE_ROOT"]
    assert not any(flag in p for p in V.hygiene([wc, ok])) and any(flag in p for p in V.hygiene([wc, bad]))


def test_endpoints_precedence_and_what_reaches_the_distill_pods():
    """A parameter beats the environment, the environment beats the local default (local runs only); what start
    forwards to the distill JobSet holds the endpoint settings and no credential field."""
    from rcm_steps.endpoints import apply_env, forwarded_env, start_checks, watch_checks

    env = {"RCM_STORAGE_ROOT": "s3://env/rcm", "MLFLOW_TRACKING_URI": "http://env:5000"}
    ep = start_checks("s3://param/rcm", "", env, "kubernetes", "/local", "sqlite:///local.db")
    assert (ep.storage_root, ep.storage_from, ep.tracking_uri, ep.tracking_from) == \
        ("s3://param/rcm", "--storage_root", "http://env:5000", "$MLFLOW_TRACKING_URI")
    ep = start_checks("", "", {}, "local", "/local", "sqlite:///local.db")
    assert (ep.storage_root, ep.tracking_uri, ep.storage_from) == ("/local", "sqlite:///local.db", "local default")
    with pytest.raises(ValueError, match=r"storage_root '/data/rcm' \(from \$RCM_STORAGE_ROOT\) is a local path"):
        start_checks("", "", {**env, "RCM_STORAGE_ROOT": "/data/rcm"}, "kubernetes", "/local", "sqlite:///l.db")
    with pytest.raises(ValueError, match=r"'sqlite:///x.db' \(from --mlflow_tracking_uri\) is a local store"):
        start_checks("", "sqlite:///x.db", env, "kubernetes", "/local", "sqlite:///l.db")
    with pytest.raises(ValueError, match=r"no teacher sources.*RCM_TEACHER_SOURCES"):
        watch_checks("", "", env, "kubernetes", "sqlite:///l.db")
    opts = {"endpoint_url": "http://minio:9000", "key": SECRET_ID, "secret": SECRET_KEY,
            "client_kwargs": {"region_name": "us-east-1", "aws_secret_access_key": SECRET_KEY}}
    fwd = forwarded_env({"RCM_STORAGE_OPTIONS": json.dumps(opts), "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                         "AWS_ENDPOINT_URL_S3": "http://minio:9000"})
    assert json.loads(fwd["RCM_STORAGE_OPTIONS"]) == {"endpoint_url": "http://minio:9000",
                                                      "client_kwargs": {"region_name": "us-east-1"}}
    assert SECRET_KEY not in json.dumps(fwd) and SECRET_ID not in json.dumps(fwd)
    pod = {"AWS_ENDPOINT_URL_S3": "http://own:9000"}
    assert apply_env(fwd, pod) == {"RCM_STORAGE_OPTIONS": fwd["RCM_STORAGE_OPTIONS"]}
    assert pod["AWS_ENDPOINT_URL_S3"] == "http://own:9000"          # the pod's own value wins

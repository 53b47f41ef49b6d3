"""The flows compile to Argo objects offline: the distill flow with the gpu-cluster overlay's execution
config gives a WorkflowTemplate (8-GPU JobSet with /dev/shm, node selector, tolerations, Secrets), a
CronWorkflow (@schedule) and an Argo Events Sensor (@trigger on rcm.new_teacher); the teacher watcher
an hourly CronWorkflow. The rendered objects carry no credential of the deploying environment."""
import glob
import json
import os
import subprocess
import sys

import pytest

from pipeline_fixtures import *  # noqa: F401,F403

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "infra", "k8s"))
import validate as V  # noqa: E402

SECRET_KEY, SECRET_ID = "argo-test-Secret-55013", "AKIAARGOTEST0042"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, moto_server):
    import boto3

    tmp = tmp_path_factory.mktemp("argo")
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket="mfargo")
    cfg = {}
    for line in open(os.path.join(ROOT, "infra/k8s/base/metaflow-config.yaml")).read().split("name: rcm-metaflow-config")[1].splitlines():
        if line.startswith("  METAFLOW_"):
            k, v = line.strip().split(": ", 1)
            cfg[k] = v
    env = {**os.environ, **cfg}
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

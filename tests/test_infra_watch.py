"""Teacher revisions, the watcher's scan against the registry (a folder, an S3 prefix on moto's server, MLflow
registered teachers), the new-teacher event, and bad input at start: an unreachable tracking server or S3
endpoint fails `start` within seconds naming the URL; a wrong S3 credential names the service (moto's server
with IAM authentication on); an event payload without a teacher location is rejected before anything runs."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest

from pipeline_fixtures import FLOW, flow_env

from rcm_steps.errors import ConfigError
from rcm_steps.services import (ServiceCredentialError, ServiceUnreachable, _wait_port, check_storage, check_tracking,
                                free_port)
from rcm_steps.watch import (EVENT_NAME, EventError, TeacherCandidate, check_event_env, event_parameters,
                             event_payload, new_teachers, publish, scan, teacher_revision)


def _ckpt(root, weights=b"\0" * 64):
    for sub in ("transformer", "vae", "text_encoder", "tokenizer"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "config.json").write_text("{}")
    (root / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return root


def test_revision_is_a_content_hash(tmp_path):
    a = _ckpt(tmp_path / "a")
    b = _ckpt(tmp_path / "b")
    assert teacher_revision(str(a)) == teacher_revision(str(b)) and teacher_revision(str(a)).startswith("sha256:")
    (b / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\1" * 64)
    assert teacher_revision(str(a)) != teacher_revision(str(b))
    snap = _ckpt(tmp_path / "hub" / "models--org--wan" / "snapshots" / "abc123")
    assert teacher_revision(str(snap)) == "hf:abc123"
    assert teacher_revision("models:/teachers/3") == "mlflow:teachers/3"


def test_scan_finds_checkpoints_and_skips_distilled(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    root = tmp_path / "teachers"
    _ckpt(root / "wan-v1")
    _ckpt(root / "wan-v2", weights=b"\2" * 64)
    _ckpt(root / "copy-of-v1")                       # same content as wan-v1: one revision
    cands = scan(str(root), client)
    assert sorted(c.name for c in cands) == ["copy-of-v1", "wan-v1", "wan-v2"]
    v1 = teacher_revision(str(root / "wan-v1"))
    client.create_registered_model("rcm-student-wan")
    client.create_model_version("rcm-student-wan", str(tmp_path), tags={"teacher_revision": v1})
    new, skipped = new_teachers(cands, client)
    assert [c.name for c in new] == ["wan-v2"]
    assert sorted(s["reason"].split(":")[0] for s in skipped) == ["distilled", "duplicate of another candidate"]
    # a run in progress for a revision also counts (no second run while one is training)
    exp = client.create_experiment("rcm-distill-wan")
    client.create_run(exp, tags={"teacher_revision": new[0].revision})
    assert new_teachers(cands, client)[0] == []
    # MLflow registered teacher models as a source
    client.create_registered_model("wan-teachers", tags={"rcm.role": "teacher"})
    client.create_model_version("wan-teachers", str(tmp_path))
    got = scan("mlflow:", client)
    assert [(c.location, c.revision) for c in got] == [("models:/wan-teachers/1", "mlflow:wan-teachers/1")]


@pytest.fixture(scope="module")
def s3_auth(tmp_path_factory):
    """moto's S3 server (a subprocess, so its auth switch is its own) on 127.0.0.1 with IAM authentication on:
    an IAM user with an s3:* and iam:* policy (tests make users and rotate keys with it) and its access key, a
    bucket; then every request must be signed by a known key (POST /moto-api/reset-auth 0), so a wrong key or
    secret gets HTTP 403 as from real S3."""
    import boto3
    import requests

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_", "INITIAL_NO_AUTH"))}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, 60, proc, "moto server")
        url = f"http://127.0.0.1:{port}"
        setup = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup",
                     aws_secret_access_key="setup")
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="rcm-test")
        iam.put_user_policy(UserName="rcm-test", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:*", "iam:*"],
                                                     "Resource": "*"}]}))
        key = iam.create_access_key(UserName="rcm-test")["AccessKey"]
        boto3.client("s3", **setup).create_bucket(Bucket="rcm-teachers")
        r = requests.post(f"{url}/moto-api/reset-auth", data=b"0", timeout=10)
        assert r.ok and r.json()["status"] == "ok", r.text
        with pytest.raises(Exception, match="InvalidAccessKeyId|403|Forbidden"):    # auth is really on
            boto3.client("s3", **setup).head_bucket(Bucket="rcm-teachers")
        yield {"url": url, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"], "bucket": "rcm-teachers"}
    finally:
        proc.kill()                                   # a throw-away in-memory server: nothing to shut down cleanly
        proc.wait(10)
        log.close()


def _s3_env(monkeypatch, s3, key=None, secret=None):
    monkeypatch.setenv("RCM_STORAGE_OPTIONS", json.dumps({"endpoint_url": s3["url"]}))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key or s3["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret or s3["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)


def test_scan_s3_prefix_finds_new_teacher_and_skips_distilled(s3_auth, tmp_path, monkeypatch):
    """An s3:// teacher source: every prefix holding a model_index.json is a candidate, its revision the digest
    of its objects' ETags; the one whose revision a registered student carries is skipped."""
    import boto3
    import mlflow
    from mlflow.tracking import MlflowClient

    _s3_env(monkeypatch, s3_auth)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    # a new session reads the credentials now; boto3.client() would reuse the default session's, cached by the
    # first test that made one (the grouped -k run failed with InvalidAccessKeyId here)
    s3 = boto3.session.Session().client("s3", endpoint_url=s3_auth["url"], region_name="us-east-1")
    b = s3_auth["bucket"]

    def put_teacher(prefix, weights):
        s3.put_object(Bucket=b, Key=f"{prefix}/model_index.json", Body=json.dumps({"_class_name": "WanPipeline"}))
        for sub in ("transformer", "vae", "text_encoder"):
            s3.put_object(Bucket=b, Key=f"{prefix}/{sub}/config.json", Body=b"{}")
        s3.put_object(Bucket=b, Key=f"{prefix}/transformer/diffusion_pytorch_model.safetensors", Body=weights)

    put_teacher("wan/wan-v1", b"\1" * 64)
    put_teacher("wan/wan-v2", b"\2" * 64)
    s3.put_object(Bucket=b, Key="wan/notes.txt", Body=b"not a teacher")
    s3.put_object(Bucket=b, Key="other/wan-x/model_index.json", Body=b"{}")     # outside the watched prefix

    source = f"s3://{b}/wan/"
    cands = scan(source)
    by_name = {c.name: c for c in cands}
    assert sorted(by_name) == ["wan-v1", "wan-v2"], cands
    v1, v2 = by_name["wan-v1"], by_name["wan-v2"]
    assert v1.location == f"s3://{b}/wan/wan-v1" and v1.source == source
    assert v1.revision.startswith("s3etag:") and v1.revision != v2.revision
    assert teacher_revision(v1.location) == v1.revision            # stable: what the distill run records

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    client.create_registered_model("rcm-student-wan")              # wan-v1 was distilled: its student carries it
    client.create_model_version("rcm-student-wan", str(tmp_path), tags={
        "teacher_revision": v1.revision, "teacher_location": v1.location, "teacher_source": source})
    new, skipped = new_teachers(cands, client)
    assert [c.location for c in new] == [v2.location]
    assert [(s["location"], s["reason"]) for s in skipped] == [(v1.location, "distilled: rcm-student-wan v1")]

    # new weights under the distilled prefix: new ETags, a new revision, a new teacher again
    s3.put_object(Bucket=b, Key="wan/wan-v1/transformer/diffusion_pytorch_model.safetensors", Body=b"\3" * 64)
    again = {c.name: c for c in scan(source)}
    assert again["wan-v1"].revision != v1.revision and again["wan-v2"].revision == v2.revision
    assert sorted(c.name for c in new_teachers(again.values(), client)[0]) == ["wan-v1", "wan-v2"]


def test_scan_after_a_key_rotation_signs_with_the_new_key(s3_auth, monkeypatch):
    """A long-lived watcher scans an s3:// source, the access key is rotated (a new key in the environment, the
    old one deleted), and the next scan signs with the new key: no filesystem made with the old key is reused."""
    import boto3
    from botocore.exceptions import ClientError

    _s3_env(monkeypatch, s3_auth)
    admin = dict(endpoint_url=s3_auth["url"], region_name="us-east-1")
    iam = boto3.session.Session().client("iam", **admin)            # a new session: today's environment
    user = f"rotator-{os.getpid()}-{time.monotonic_ns()}"          # its own user: the module's key stays valid
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    old = iam.create_access_key(UserName=user)["AccessKey"]
    b = s3_auth["bucket"]
    iam_s3 = boto3.session.Session().client("s3", **admin)
    iam_s3.put_object(Bucket=b, Key="rot/wan-r/model_index.json", Body=b"{}")
    _s3_env(monkeypatch, s3_auth, old["AccessKeyId"], old["SecretAccessKey"])
    first = scan(f"s3://{b}/rot/")
    new = iam.create_access_key(UserName=user)["AccessKey"]          # rotation: new key out, old key deleted
    iam.delete_access_key(UserName=user, AccessKeyId=old["AccessKeyId"])
    with pytest.raises(ClientError, match="InvalidAccessKeyId"):     # the old key is refused from now on
        boto3.session.Session().client("s3", aws_access_key_id=old["AccessKeyId"],
                                       aws_secret_access_key=old["SecretAccessKey"],
                                       **admin).list_objects_v2(Bucket=b, Prefix="rot/")
    _s3_env(monkeypatch, s3_auth, new["AccessKeyId"], new["SecretAccessKey"])
    second = scan(f"s3://{b}/rot/")
    assert [(c.location, c.revision) for c in second] == [(c.location, c.revision) for c in first]
    assert [c.location for c in first] == [f"s3://{b}/rot/wan-r"]


def test_wrong_s3_credential_names_the_service(s3_auth, monkeypatch):
    """check_storage (what `start` runs) against S3 with authentication on: the right key passes; a wrong secret
    or an unknown key is a ServiceCredentialError naming the S3 endpoint and the bucket, never the secret."""
    root = f"s3://{s3_auth['bucket']}/rcm"
    _s3_env(monkeypatch, s3_auth)
    assert check_storage(root) == {"service": "s3", "url": root, "endpoint": s3_auth["url"]}
    for key, secret in ((s3_auth["key"], "wrong-Secret-5521"), ("AKIAUNKNOWNKEY000001", "wrong-Secret-5521")):
        _s3_env(monkeypatch, s3_auth, key, secret)
        t0 = time.perf_counter()
        with pytest.raises(ServiceCredentialError) as e:
            check_storage(root)
        msg = str(e.value)
        assert f"S3 endpoint {s3_auth['url']} rejected the credentials for bucket '{s3_auth['bucket']}' (HTTP 403)" \
            in msg, msg
        assert "AWS_ACCESS_KEY_ID" in e.value.fix and "wrong-Secret" not in msg + e.value.fix
        assert time.perf_counter() - t0 < 15


def test_event_payload_round_trip_and_rejection(capsys):
    c = TeacherCandidate(location="/models/wan", revision="sha256:ab", source="/models", name="wan")
    payload = event_payload(c)
    assert event_parameters(payload) == {"teacher": "/models/wan", "teacher_revision": "sha256:ab",
                                         "teacher_source": "/models"}
    for bad in ({}, {"teacher": ""}, {"teacher_revision": "sha256:ab"}, ["x"]):
        with pytest.raises(EventError, match="teacher location|JSON object"):
            event_parameters(bad)
    with pytest.raises(EventError):
        publish({"teacher_revision": "x"}, "print")              # never published
    publish(payload, "print")
    assert json.loads(capsys.readouterr().out)["name"] == EVENT_NAME
    env = {"METAFLOW_ARGO_EVENT_PAYLOAD_event_x": json.dumps({"name": EVENT_NAME, "payload": payload})}
    assert check_event_env(env)["teacher"] == "/models/wan"
    assert check_event_env({"METAFLOW_ARGO_EVENT_PAYLOAD_event_x": "null"}) is None
    assert check_event_env({"METAFLOW_ARGO_EVENT_PAYLOAD_event_x": json.dumps({"name": "other"})}) is None
    with pytest.raises(EventError):
        check_event_env({"METAFLOW_ARGO_EVENT_PAYLOAD_event_x": json.dumps({"name": EVENT_NAME, "payload": {}})})
    assert issubclass(EventError, ValueError) and not issubclass(EventError, ConfigError)


class _Silent:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a hung service)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns, self.stop = [], False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                pass

    def close(self):
        self.stop = True
        self.thread.join(5)
        for c in self.conns + [self.sock]:
            c.close()


def test_service_checks_fail_fast_naming_the_url(monkeypatch):
    """Nothing listening (connection refused) and a server that accepts but never answers: each check fails
    within seconds (its timeout, no retries) with the URL it tried."""
    port = free_port()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")

    def timed(fn, *a, **kw):
        t0 = time.perf_counter()
        try:
            fn(*a, **kw)
        finally:
            took.append(time.perf_counter() - t0)

    took = []
    with pytest.raises(ServiceUnreachable, match=f"MLflow tracking server http://127.0.0.1:{port} is not reachable"):
        timed(check_tracking, f"http://127.0.0.1:{port}")
    monkeypatch.setenv("RCM_STORAGE_OPTIONS", json.dumps({"endpoint_url": f"http://127.0.0.1:{port}"}))
    with pytest.raises(ServiceUnreachable, match=f"S3 endpoint http://127.0.0.1:{port} is not reachable"):
        timed(check_storage, "s3://bucket/rcm")
    assert max(took) < 15, took                     # refused: immediate, whatever the load
    silent = _Silent()
    try:
        hung = f"http://127.0.0.1:{silent.port}"
        took = []
        with pytest.raises(ServiceUnreachable, match=f"MLflow tracking server {hung} is not reachable: no answer"):
            timed(check_tracking, hung, timeout=2.0)
        monkeypatch.setenv("RCM_STORAGE_OPTIONS", json.dumps({"endpoint_url": hung}))
        with pytest.raises(ServiceUnreachable, match=f"S3 endpoint {hung} is not reachable .*ReadTimeoutError"):
            timed(check_storage, "s3://bucket/rcm", timeout=2.0)
        assert max(took) < 15, took                 # a hung server: the timeout (2 s here, 5 s in start), no hang
    finally:
        silent.close()
    assert check_tracking("sqlite:///x.db")["auth"] == "local store" and check_storage("/tmp/x")["service"] == "file"


def _stamp(line: str) -> datetime:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f")


def test_bad_input_stops_start(tmp_path):
    """Three flow runs at once: unreachable MLflow, unreachable S3, an event without a teacher. Each fails in
    `start`, within seconds of its checks beginning (Metaflow's own timestamps on the lines `start` prints; the
    process start-up before them depends on the machine's load), and names the culprit; nothing after start runs."""
    port = free_port()
    cases = {
        "tracking": ([f"--mlflow_tracking_uri", f"http://127.0.0.1:{port}"], {},
                     f"MLflow tracking server http://127.0.0.1:{port} is not reachable"),
        "s3": (["--storage_root", "s3://rcm-bucket/root"],
               {"RCM_STORAGE_OPTIONS": json.dumps({"endpoint_url": f"http://127.0.0.1:{port}"}),
                "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
               f"S3 endpoint http://127.0.0.1:{port} is not reachable for storage root 's3://rcm-bucket/root'"),
        "event": ([], {"METAFLOW_ARGO_EVENT_PAYLOAD_event_rcmnew_teacher": json.dumps(
            {"name": EVENT_NAME, "payload": {"teacher_revision": "sha256:ab"}})},
                  "new-teacher event without a teacher location"),
    }
    procs = {}
    for name, (args, extra, _) in cases.items():
        d = tmp_path / name
        d.mkdir()
        env = {**os.environ, **flow_env(d), **extra}
        if name != "tracking":
            args = args + ["--mlflow_tracking_uri", env["MLFLOW_TRACKING_URI"]]
        if name != "s3":
            args = args + ["--storage_root", str(d / "store")]
        procs[name] = (time.perf_counter(), subprocess.Popen(
            [sys.executable, FLOW, "run", "--profile", "smoke", *args], env=env, cwd=str(d),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for name, (t0, p) in procs.items():
        out = p.communicate(timeout=300)[0]
        assert p.returncode != 0, out[-3000:]
        assert cases[name][2] in out, (name, out[-3000:])
        assert "rCM: start failed" in out and "/curate/" not in out
        began = [ln for ln in out.splitlines() if "rCM: start: checking" in ln]
        failed = [ln for ln in out.splitlines() if "rCM: start failed" in ln]
        assert began and failed, out[-3000:]
        checks_s = (_stamp(failed[0]) - _stamp(began[0])).total_seconds()
        # Metaflow stamps each line as it reads it from the step's stdout or stderr (two pipes): the two lines can
        # come out of order by a few ms (seen: -0.001 s on CI-like load)
        assert -1 < checks_s < 15, (name, checks_s, began[0], failed[0])
        # no MLflow run was created (the checks come before it)
        db = tmp_path / name / "mlflow.db"
        if db.exists():
            import sqlite3

            with sqlite3.connect(str(db)) as c:
                tables = {r[0] for r in c.execute("select name from sqlite_master where type='table'")}
                assert "runs" not in tables or c.execute("select count(*) from runs").fetchone()[0] == 0
        print(f"{name}: failed {checks_s:.1f}s after start began its checks, {time.perf_counter() - t0:.0f}s "
              "after launch (Metaflow start-up included)")

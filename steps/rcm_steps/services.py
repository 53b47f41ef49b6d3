"""The services a run talks to: checked at ``start`` within seconds, and started locally for tests and dev.

Connectivity (used by the flow's ``start`` before any work; each raises :class:`ServiceError` naming
the service and the URL it tried, never a credential)::

    check_tracking("http://mlflow:5000")            # MLflow: /health, then an authenticated call
    check_storage("s3://bucket/rcm")                # S3: HeadBucket against the configured endpoint
    check_services(tracking_uri, storage_root)      # both, with a short timeout each

Credentials come only from the environment (``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``
or ``MLFLOW_TRACKING_TOKEN``; ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, an AWS profile or an
instance role), on Kubernetes from Secrets mapped into the pods' environment (``infra/k8s``).

A local stack (real PostgreSQL, ``mlflow server`` with basic auth on PostgreSQL, a moto S3 server),
used by ``tests/test_infra_services.py`` and for trying the deployment on one machine::

    python -m rcm_steps.services up --dir /tmp/rcm-stack      # prints the env to export; Ctrl-C stops it
"""
from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, Mapping, Optional

from .errors import RCMError

__all__ = ["ServiceError", "ServiceUnreachable", "ServiceCredentialError", "check_tracking", "check_storage",
           "check_services", "s3_endpoint", "free_port", "postgres_binaries", "LocalPostgres", "LocalS3",
           "LocalMlflowServer", "LocalStack"]


class ServiceError(RCMError):
    """A service the run needs (MLflow tracking server, S3) cannot be used; the message names it and its URL."""

    fix = ("check the URL and that the service runs (--mlflow_tracking_uri, --storage_root, RCM_STORAGE_OPTIONS "
           "endpoint_url) and the credentials in the environment (MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_*)")


class ServiceUnreachable(ServiceError):
    fix = ("start the service or correct its URL (--mlflow_tracking_uri for MLflow; --storage_root and the "
           "endpoint_url in RCM_STORAGE_OPTIONS / AWS_ENDPOINT_URL for S3); on Kubernetes check the Service "
           "name and namespace (kubectl -n rcm get svc)")


class ServiceCredentialError(ServiceError):
    fix = ("set the credentials in the environment (MLflow: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; "
           "S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY); on Kubernetes they come from the Secrets "
           "rcm-mlflow-client and rcm-s3 (infra/k8s)")


# ----------------------------------------------------------------------------------------------- checks
def _http_error_text(e: Exception) -> str:
    import requests

    if isinstance(e, requests.exceptions.ConnectTimeout):
        return "connection timed out"
    if isinstance(e, requests.exceptions.ReadTimeout):
        return "no answer (read timed out)"
    if isinstance(e, requests.exceptions.ConnectionError):
        txt = str(e)
        for key in ("Connection refused", "Name or service not known", "Temporary failure in name resolution",
                    "No route to host", "Network is unreachable", "nodename nor servname"):
            if key in txt:
                return key.lower()
        return "connection failed"
    return f"{type(e).__name__}"


def check_tracking(uri: str, timeout: float = 5.0) -> Dict[str, str]:
    """Fail within ~``timeout`` s unless the MLflow tracking server at ``uri`` answers and accepts our credentials.

    Only http(s) URIs are contacted (sqlite/file stores are local; databricks is left to MLflow).
    Returns {"service", "url", "auth"} on success.
    """
    if not uri.startswith(("http://", "https://")):
        return {"service": "mlflow", "url": uri, "auth": "local store"}
    import requests

    base = uri.rstrip("/")
    try:
        r = requests.get(f"{base}/health", timeout=(timeout, timeout))
    except requests.exceptions.RequestException as e:
        raise ServiceUnreachable(f"MLflow tracking server {base} is not reachable: {_http_error_text(e)} "
                                 f"(tried GET {base}/health with a {timeout:g} s timeout)") from None
    if r.status_code >= 500 or (r.status_code == 404 and "mlflow" not in r.text.lower()):
        raise ServiceUnreachable(f"MLflow tracking server {base}: GET /health answered HTTP {r.status_code}; "
                                 "is this an MLflow server?")
    user, pw, token = (os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD"),
                       os.environ.get("MLFLOW_TRACKING_TOKEN"))
    auth, headers, how = None, {}, "no credentials"
    if token:
        headers["Authorization"], how = f"Bearer {token}", "MLFLOW_TRACKING_TOKEN"
    elif user or pw:
        auth, how = (user or "", pw or ""), f"user {user!r} (MLFLOW_TRACKING_USERNAME/PASSWORD)"
    try:
        r = requests.get(f"{base}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                         auth=auth, headers=headers, timeout=(timeout, max(30.0, 4 * timeout)))
    except requests.exceptions.RequestException as e:
        raise ServiceUnreachable(f"MLflow tracking server {base}: {_http_error_text(e)} on its REST API") from None
    if r.status_code == 401:
        raise ServiceCredentialError(
            f"MLflow tracking server {base} rejected the credentials (HTTP 401, {how}): "
            + ("none are set; this server has authentication on" if how == "no credentials" else
               "wrong user name or password"))
    if r.status_code == 403:
        raise ServiceCredentialError(f"MLflow tracking server {base}: {how} may not read experiments (HTTP 403)")
    if r.status_code >= 400:
        raise ServiceError(f"MLflow tracking server {base}: REST API answered HTTP {r.status_code}: {r.text[:200]}")
    return {"service": "mlflow", "url": base, "auth": how}


def s3_endpoint(storage_options: Optional[Mapping] = None) -> Optional[str]:
    """The S3 endpoint a storage URL goes to: RCM_STORAGE_OPTIONS endpoint_url, else AWS_ENDPOINT_URL(_S3)."""
    opts = dict(storage_options or {})
    ep = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    return ep or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def check_storage(url: str, timeout: float = 5.0, storage_options: Optional[Mapping] = None) -> Dict[str, str]:
    """Fail within ~``timeout`` s unless the object store behind ``url`` answers and accepts our credentials.

    s3:// URLs: one HeadBucket with short timeouts and no retries. Other URLs are left to
    :meth:`rcm_steps.storage.Storage.check_writable`.
    """
    proto = url.split("://", 1)[0].lower() if "://" in url else "file"
    if proto not in ("s3", "s3a"):
        return {"service": proto, "url": url}
    import boto3
    import botocore.exceptions as bex
    from botocore.config import Config

    from .storage import storage_options_from_env

    opts = {**storage_options_from_env(), **(storage_options or {})}
    endpoint = s3_endpoint(opts)
    where = f"S3 endpoint {endpoint}" if endpoint else "AWS S3"
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    kw = {}
    if opts.get("key") and opts.get("secret"):
        kw = {"aws_access_key_id": opts["key"], "aws_secret_access_key": opts["secret"]}
    cfg = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1, "mode": "standard"})
    try:
        s3 = boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg,
                                             region_name=opts.get("region_name") or os.environ.get(
                                                 "AWS_DEFAULT_REGION") or "us-east-1", **kw)
        s3.head_bucket(Bucket=bucket)
    except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError) as e:
        raise ServiceUnreachable(f"{where} is not reachable for storage root {url!r}: {type(e).__name__} "
                                 f"(timeout {timeout:g} s, no retries)") from None
    except bex.NoCredentialsError:
        raise ServiceCredentialError(f"{where}: no S3 credentials for storage root {url!r} (AWS_ACCESS_KEY_ID/"
                                     "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)") from None
    except bex.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden") \
                or status == 403:
            what = f"HTTP {status}" + (f" {code}" if code and code != str(status) else "")   # HEAD: no error body
            raise ServiceCredentialError(f"{where} rejected the credentials for bucket {bucket!r} ({what}): "
                                         "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None
        if code in ("404", "NoSuchBucket") or status == 404:
            raise ServiceError(f"{where}: bucket {bucket!r} of storage root {url!r} does not exist",
                               fix="create the bucket (infra/k8s creates rcm-storage and mlflow-artifacts in "
                                   "MinIO) or correct --storage_root") from None
        raise ServiceError(f"{where}: HeadBucket {bucket!r} failed: HTTP {status} {code}") from None
    except bex.BotoCoreError as e:
        raise ServiceUnreachable(f"{where} for storage root {url!r}: {type(e).__name__}: {e}") from None
    return {"service": "s3", "url": url, "endpoint": endpoint or "aws"}


def check_services(tracking_uri: str, storage_root: str, timeout: float = 5.0) -> Dict[str, Dict[str, str]]:
    """Both checks (the flow's ``start``): an unreachable server or a wrong credential fails in seconds."""
    return {"tracking": check_tracking(tracking_uri, timeout), "storage": check_storage(storage_root, timeout)}


# ------------------------------------------------------------------------------------------- local stack
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, proc: Optional[subprocess.Popen] = None, what: str = "") -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def postgres_binaries() -> Optional[str]:
    """A folder with initdb/pg_ctl/postgres: $RCM_PG_BIN, Debian's /usr/lib/postgresql/*/bin, PATH, or the
    ``pgserver`` wheel (PyPI) as a fallback. None if there is none."""
    cands = [os.environ.get("RCM_PG_BIN")] + sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        cands.append(os.path.dirname(os.path.realpath(initdb)))
    try:
        import pgserver

        cands.append(os.path.join(os.path.dirname(pgserver.__file__), "pginstall", "bin"))
    except ImportError:
        pass
    for c in cands:
        if c and all(os.access(os.path.join(c, b), os.X_OK) for b in ("initdb", "postgres")):
            return c
    return None


def _demote():
    """preexec_fn: PostgreSQL refuses to run as root; run it as 'nobody' then."""
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("nobody")
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)


class LocalPostgres:
    """A throw-away PostgreSQL server on 127.0.0.1 (password auth) in its own data folder.

    ``databases``: created at start, owned by ``user``. ``uri(db)`` gives the SQLAlchemy URI.
    """

    def __init__(self, password: str, user: str = "rcm", databases=("mlflow",), bin_dir: Optional[str] = None):
        self.bin = bin_dir or postgres_binaries()
        if not self.bin:
            raise RuntimeError("no PostgreSQL binaries (Debian's postgresql package, or `pip install pgserver`)")
        self.user, self.password, self.databases = user, password, tuple(databases)
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="rcm-pg-")
        self.proc: Optional[subprocess.Popen] = None

    def _run_as_pg(self, args, **kw):
        return subprocess.run(args, preexec_fn=_demote, capture_output=True, text=True, **kw)

    def start(self) -> "LocalPostgres":
        os.chmod(self.dir, 0o777)
        data, pwfile = os.path.join(self.dir, "data"), os.path.join(self.dir, "pw")
        with open(pwfile, "w") as f:
            f.write(self.password)
        os.chmod(pwfile, 0o644)
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("nobody")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        r = self._run_as_pg([os.path.join(self.bin, "initdb"), "-D", data, "-U", self.user, "--pwfile", pwfile,
                             "--auth", "scram-sha-256", "-E", "UTF8", "--no-sync"], timeout=120)
        os.remove(pwfile)
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr[-2000:]}")
        log = open(os.path.join(self.dir, "postgres.log"), "w")
        self.proc = subprocess.Popen(
            [os.path.join(self.bin, "postgres"), "-D", data, "-h", "127.0.0.1", "-p", str(self.port),
             "-k", self.dir, "-c", "fsync=off", "-c", "max_connections=100"],
            preexec_fn=_demote, stdout=log, stderr=subprocess.STDOUT)
        _wait_port(self.port, 60, self.proc, "postgres")
        self._create_databases()
        return self

    def _create_databases(self):
        import psycopg

        conn = None
        for _ in range(50):
            try:
                conn = psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                       dbname="postgres", autocommit=True)
                break
            except psycopg.OperationalError:
                time.sleep(0.2)
        if conn is None:
            raise RuntimeError("postgres did not accept connections")
        with conn.cursor() as c:
            for db in self.databases:
                c.execute(f'CREATE DATABASE "{db}"')
        conn.close()

    def uri(self, db: str = "mlflow") -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)          # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class LocalS3:
    """moto's S3 server on 127.0.0.1 (threaded, in this process)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.url = ""

    def start(self) -> "LocalS3":
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        return self

    def create_bucket(self, name: str) -> None:
        import boto3

        # a new session: boto3.client() would sign with the default session's credentials, cached at its first use
        boto3.session.Session().client("s3", endpoint_url=self.url, region_name="us-east-1").create_bucket(Bucket=name)

    def stop(self) -> None:
        self.server.stop()


class LocalMlflowServer:
    """``mlflow server`` as a subprocess: PostgreSQL backend store, S3 artifacts (proxied), basic auth.

    Every credential reaches it through the environment (``MLFLOW_BACKEND_STORE_URI``,
    ``MLFLOW_AUTH_ADMIN_PASSWORD``, ``AWS_*``) or the auth config file, as the Kubernetes deployment
    does (infra/k8s/base/mlflow.yaml); none is on its command line.
    """

    def __init__(self, backend_uri: str, artifacts_destination: str, s3_endpoint_url: Optional[str],
                 admin_password: Optional[str], auth_db_uri: Optional[str] = None, workdir: Optional[str] = None,
                 aws_env: Optional[Mapping[str, str]] = None, workers: int = 2, flask_secret: Optional[str] = None):
        self.backend_uri, self.dest, self.s3 = backend_uri, artifacts_destination, s3_endpoint_url
        self.admin_password, self.auth_db_uri = admin_password, auth_db_uri
        self.flask_secret = flask_secret or secrets.token_hex(16)      # CSRF key of the basic-auth app
        self.dir = workdir or tempfile.mkdtemp(prefix="rcm-mlflow-")
        self.aws_env = dict(aws_env or {})
        self.port, self.workers = free_port(), workers
        self.proc: Optional[subprocess.Popen] = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.dir, "mlflow-server.log")

    def start(self, timeout: float = 120) -> "LocalMlflowServer":
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "AWS_"))}
        env.update(self.aws_env)
        env.update(MLFLOW_BACKEND_STORE_URI=self.backend_uri, MLFLOW_ARTIFACTS_DESTINATION=self.dest,
                   MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
        if self.s3:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3
        args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(self.workers), "--serve-artifacts"]
        if self.admin_password:
            ini = os.path.join(self.dir, "basic_auth.ini")
            with open(ini, "w") as f:
                f.write("[mlflow]\ndefault_permission = READ\n"
                        f"database_uri = {self.auth_db_uri or 'sqlite:///' + os.path.join(self.dir, 'auth.db')}\n"
                        "admin_username = admin\n"
                        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
            os.chmod(ini, 0o600)
            env.update(MLFLOW_AUTH_CONFIG_PATH=ini, MLFLOW_AUTH_ADMIN_PASSWORD=self.admin_password,
                       MLFLOW_FLASK_SERVER_SECRET_KEY=self.flask_secret)
            args += ["--app-name", "basic-auth"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.dir)
        import requests

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.exceptions.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"mlflow server at {self.url} not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


class LocalStack:
    """PostgreSQL + moto S3 + MLflow server (basic auth), with fresh random credentials.

    ``env()``: what a client (the flow, ``mlflow`` CLI) exports to use it; ``secrets()``: every
    credential value (tests grep outputs for them).
    """

    def __init__(self, workdir: Optional[str] = None, storage_bucket: str = "rcm-storage",
                 artifact_bucket: str = "mlflow-artifacts", workers: int = 2):
        self.dir = workdir or tempfile.mkdtemp(prefix="rcm-stack-")
        os.makedirs(self.dir, exist_ok=True)
        self.pg_password = "pg-" + secrets.token_hex(12)
        self.admin_password = "adm-" + secrets.token_hex(12)
        self.flask_secret = "csrf-" + secrets.token_hex(12)
        self.aws_key, self.aws_secret = "AKIA" + secrets.token_hex(8).upper(), "s3-" + secrets.token_hex(16)
        self.storage_bucket, self.artifact_bucket, self.workers = storage_bucket, artifact_bucket, workers
        self.pg = self.s3 = self.mlflow = None

    def start(self) -> "LocalStack":
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        self.pg = LocalPostgres(self.pg_password, databases=("mlflow", "mlflow_auth")).start()
        self.s3 = LocalS3().start()
        aws = {"AWS_ACCESS_KEY_ID": self.aws_key, "AWS_SECRET_ACCESS_KEY": self.aws_secret,
               "AWS_DEFAULT_REGION": "us-east-1"}
        import boto3

        c = boto3.client("s3", endpoint_url=self.s3.url, region_name="us-east-1", aws_access_key_id=self.aws_key,
                         aws_secret_access_key=self.aws_secret)
        for b in (self.storage_bucket, self.artifact_bucket):
            c.create_bucket(Bucket=b)
        self.mlflow = LocalMlflowServer(self.pg.uri("mlflow"), f"s3://{self.artifact_bucket}/mlartifacts",
                                        self.s3.url, self.admin_password, auth_db_uri=self.pg.uri("mlflow_auth"),
                                        workdir=self.dir, aws_env=aws, workers=self.workers,
                                        flask_secret=self.flask_secret).start()
        return self

    def env(self) -> Dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.mlflow.url, "MLFLOW_TRACKING_USERNAME": "admin",
                "MLFLOW_TRACKING_PASSWORD": self.admin_password, "AWS_ACCESS_KEY_ID": self.aws_key,
                "AWS_SECRET_ACCESS_KEY": self.aws_secret, "AWS_DEFAULT_REGION": "us-east-1",
                "MLFLOW_S3_ENDPOINT_URL": self.s3.url, "AWS_ENDPOINT_URL_S3": self.s3.url,
                "RCM_STORAGE_OPTIONS": json.dumps({"endpoint_url": self.s3.url})}

    def secrets(self) -> Dict[str, str]:
        return {"postgres password": self.pg_password, "mlflow admin password": self.admin_password,
                "aws secret key": self.aws_secret, "aws access key": self.aws_key,
                "mlflow flask secret key": self.flask_secret}

    def storage_root(self, prefix: str = "rcm") -> str:
        return f"s3://{self.storage_bucket}/{prefix}"

    def stop(self) -> None:
        for s in (self.mlflow, self.s3, self.pg):
            if s is not None:
                try:
                    s.stop()
                except Exception:  # noqa: BLE001 - stop the others too
                    pass


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser("rcm_steps.services")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start PostgreSQL + S3 (moto) + MLflow (basic auth) locally until Ctrl-C")
    up.add_argument("--dir", default=None)
    ck = sub.add_parser("check", help="check an MLflow URI and a storage root as the flow's start does")
    ck.add_argument("--mlflow-tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""))
    ck.add_argument("--storage-root", default="")
    a = p.parse_args(argv)
    if a.cmd == "check":
        print(json.dumps(check_services(a.mlflow_tracking_uri, a.storage_root or "."), indent=1))
        return 0
    stack = LocalStack(a.dir).start()
    try:
        print("# local stack up; export these (credentials: fresh, random):")
        for k, v in stack.env().items():
            print(f"export {k}='{v}'")
        print(f"# storage root: {stack.storage_root()}   MLflow UI: {stack.mlflow.url} (user admin)")
        sys.stdout.flush()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

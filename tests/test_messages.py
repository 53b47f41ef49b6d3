"""Messages name the right thing (issue 24, part 3): fix texts against the real CLIs, unsupported teacher
directories, the generate CLI outside the repository, a worker killed by a signal, the MLflow run history."""
from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_fixtures import *  # noqa: F401,F403

ROOT = Path(__file__).resolve().parents[1]
OPTION = re.compile(r"(?<![\w-])--([a-z][a-z0-9_-]*)")
# a command named in a message: the options after it (up to a backtick or the line's end) are that command's
COMMAND = re.compile(r"(flows/distill_flow\.py|flows/teacher_watch_flow\.py|rcm_steps\.[a-z_]+|huggingface-cli"
                     r"|torch\.distributed\.run)")
EXTERNAL = {"huggingface-cli", "torch.distributed.run"}       # not ours: their options are not checked here


def _help_options(argv, cwd=ROOT) -> set:
    """Options a CLI's --help lists (the CLI itself, run as users run it)."""
    env = {**os.environ, "METAFLOW_USER": "tester",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "steps"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return set(OPTION.findall(r.stdout))


def _argparse_options(main, *sub) -> set:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*sub, "--help"])
    return set(OPTION.findall(out.getvalue()))


@pytest.fixture(scope="module")
def clis():
    from rcm_steps import generate, register, services, watch

    from metaflow.cli_components.run_cmds import resume        # `resume --help` needs a previous run

    run = _help_options(["flows/distill_flow.py", "run"]) | {o[2:] for p in resume.params for o in p.opts
                                                              if o.startswith("--")}
    return {
        # a message's bare `--x` is a run option (a flow Parameter, or resume's); Metaflow's top-level options
        # (--config NAME FILE, --with, ...) only in a command line that names the flow
        "run": run,
        "flows/distill_flow.py": run | _help_options(["flows/distill_flow.py"]),
        "flows/teacher_watch_flow.py": _help_options(["flows/teacher_watch_flow.py", "run"]),
        "rcm_steps.generate": _argparse_options(generate.main),
        "rcm_steps.register": _argparse_options(register.main, "promote") | _argparse_options(register.main,
                                                                                                "rollback")
        | _argparse_options(register.main, "export"),
        "rcm_steps.watch": _argparse_options(watch.main, "scan") | _argparse_options(watch.main, "publish"),
        "rcm_steps.services": _argparse_options(services.main, "check") | _argparse_options(services.main, "up"),
    }


# Which CLI a file's messages speak of, besides the distill flow (its options, `run` and `resume`): user-facing
# CLIs only; the distill worker's own options (rcm_steps.distill: --config, --batch-size...) are internal.
OWN = {"generate.py": ["rcm_steps.generate"], "champion.py": ["rcm_steps.register"],
       "register.py": ["rcm_steps.register"], "watch.py": ["rcm_steps.watch", "flows/teacher_watch_flow.py"],
       "teacher_watch_flow.py": ["flows/teacher_watch_flow.py"], "services.py": ["rcm_steps.services"],
       # a registered version's loading texts: the generate CLI and `rcm_steps.register export`
       "bundle.py": ["rcm_steps.generate", "rcm_steps.register"],
       "model_card.py": ["rcm_steps.generate", "rcm_steps.register"],
       # the run-time endpoints of both flows (the watcher's --sources)
       "endpoints.py": ["flows/teacher_watch_flow.py"]}
SOURCES = (sorted((ROOT / "steps" / "rcm_steps").glob("*.py")) + sorted((ROOT / "flows").glob("*.py"))
           + sorted((ROOT / "rcm_core" / "teachers" / "real").glob("*.py"))
           + sorted((ROOT / "rcm_core" / "export").glob("*.py")))


def _message_texts(path: Path):
    """(line, text) of every string a user may read: string constants and f-strings (their literal parts),
    without docstrings, argparse definitions and bare option tokens that build a command line."""
    tree = ast.parse(path.read_text())
    skip = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body \
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant):
            skip.add(id(n.body[0].value))
        if isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", "")) in (
                "add_argument", "add_parser", "ArgumentParser"):
            skip.update(id(m) for m in ast.walk(n))
        if isinstance(n, ast.JoinedStr):
            skip.update(id(v) for v in n.values)
    for n in ast.walk(tree):
        if id(n) in skip:
            continue
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            text = n.value
        elif isinstance(n, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in n.values)
        else:
            continue
        if re.fullmatch(r"\s*--[\w-]+(=\{\})?\s*", text):
            continue                                  # an argv element, not a message
        yield n.lineno, text


def _options_by_command(text: str, default: str):
    """(command, option) for each option in ``text``: the command named before it in the same span, else
    ``default``."""
    spans = [(m.start(), m.group(1)) for m in COMMAND.finditer(text)]
    for m in OPTION.finditer(text):
        cmd = default
        for start, name in spans:
            between = text[start:m.start()]
            if start < m.start() and "`" not in between and "\n" not in between:
                cmd = name
        yield cmd, m.group(1)


def test_every_option_a_message_names_is_an_option_of_that_cli(clis):
    wrong = []
    seen = 0
    for path in SOURCES:
        own = OWN.get(path.name, [])
        allowed_default = set(clis["run"]).union(*(clis[c] for c in own))
        for line, text in _message_texts(path):
            for cmd, opt in _options_by_command(text, "default"):
                if cmd in EXTERNAL:
                    continue
                seen += 1
                allowed = allowed_default if cmd == "default" else clis.get(cmd, set())
                # "run `huggingface-cli download X` without --local-dir": an option of the external command
                if opt not in allowed and not any(x in text for x in EXTERNAL):
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: --{opt} ({cmd}) in {text[:100]!r}")
    assert seen > 30                                  # the scan does read the messages
    assert not wrong, "\n".join(wrong)


def test_fix_texts_of_the_errors_module_name_real_flow_options(clis):
    from rcm_steps import errors

    texts = [*errors.FIXES.values(), errors.VALUE_FIX, errors.ConfigError.fix]
    opts = {o for t in texts for o in OPTION.findall(t)}
    assert {"teacher", "prompts", "storage_root", "distill_config"} <= opts
    assert opts <= clis["run"] | {"help"}, opts - clis["run"]


# ---- a diffusers directory of another model -------------------------------------------------------------------

def _pipeline_dir(root: Path, index: dict, configs: dict) -> Path:
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(index))
    for sub, cfg in configs.items():
        (root / sub).mkdir()
        (root / sub / "config.json").write_text(json.dumps(cfg))
    return root


@pytest.mark.parametrize("kind", ["stable-diffusion", "flux"])
def test_another_models_directory_is_named_by_its_pipeline_class(kind, tmp_path):
    from rcm_steps.errors import report
    from rcm_steps.teacher import check_teacher_name, describe_teacher, teacher_options

    if kind == "stable-diffusion":
        cls, d = "StableDiffusionPipeline", _pipeline_dir(tmp_path / "sd15", {
            "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]},
            {"unet": {"_class_name": "UNet2DConditionModel"}, "vae": {"_class_name": "AutoencoderKL"}})
    else:
        cls, d = "FluxPipeline", _pipeline_dir(tmp_path / "flux", {
            "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"]},
            {"transformer": {"_class_name": "FluxTransformer2DModel"}, "vae": {"_class_name": "AutoencoderKL"}})
    check_teacher_name(str(d))                         # a diffusers directory: the real checks come next
    with pytest.raises(Exception) as ei:               # what start runs next
        describe_teacher(str(d), teacher_options(str(d), device="auto"))
    text = report(ei.value, "start", file=io.StringIO())
    first = text.splitlines()[0]
    assert f"pipeline {cls}" in first and "WanPipeline" in first and "Cosmos2TextToImagePipeline" in first, text
    assert "missing" not in first and "transformer config" not in first
    fix = text.splitlines()[1]
    assert fix.startswith("rCM: fix: ") and "download" not in fix and "--teacher" in fix, fix


# ---- the generate CLI, run where there is no store -------------------------------------------------------------

def test_generate_outside_the_repository_names_the_tracking_uri_and_writes_nothing(tmp_path, monkeypatch,
                                                                                      capsys):
    from rcm_steps.generate import main

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    rc = main(["--model", "models:/rcm-student-embedded@champion", "--prompt", "a 3 drifting up",
               "--out", str(elsewhere / "x.gif")])
    err = capsys.readouterr().err
    assert rc == 2 and os.listdir(elsewhere) == [], os.listdir(elsewhere)     # no stray mlflow.db, no clip
    assert f"sqlite:///{elsewhere / 'mlflow.db'}" in err and "--tracking-uri" in err and "MLFLOW_TRACKING_URI" in err
    assert "Traceback" not in err


def test_generate_names_the_registered_models_when_the_name_is_wrong(tmp_path, monkeypatch, capsys):
    import mlflow

    from rcm_steps.generate import main

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).create_registered_model("rcm-student-embedded-smoke")
    monkeypatch.chdir(tmp_path)
    rc = main(["--model", "models:/rcm-student-embedded@champion", "--prompt", "a 3", "--out", "x.gif",
               "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "x.gif").exists()
    assert "no registered model 'rcm-student-embedded'" in err and "rcm-student-embedded-smoke" in err
    assert "smoke runs register rcm-student-embedded-smoke" in err and uri in err


# ---- a distill worker killed by a signal -----------------------------------------------------------------------

def test_a_worker_killed_by_sigkill_is_named_with_the_likely_cause(tmp_path):
    from rcm_steps.errors import report
    from rcm_steps.launcher import TorchrunError, run_torchrun

    (tmp_path / "oom_worker.py").write_text("import os, signal\nprint('worker up', flush=True)\n"
                                            "os.kill(os.getpid(), signal.SIGKILL)\n")
    with pytest.raises(TorchrunError) as ei:
        run_torchrun("oom_worker", [], env={"PYTHONPATH": str(tmp_path)})
    text = report(ei.value, "distill", file=io.StringIO())
    first, fix = text.splitlines()[:2]
    assert "worker (rank 0) was killed by SIGKILL (signal 9)" in first and "out of host memory" in first, text
    assert "OOM" in first and "dmesg" in first and not first.rstrip().endswith(":")   # the cause, not a dangling ':'
    assert "worker up" in str(ei.value)                                                # the output stays below
    assert "more memory" in fix and "resume" in fix


def test_signals_from_return_codes():
    from rcm_steps.launcher import killed_by, signal_text

    assert killed_by(-int(signal.SIGKILL))[1] == signal.SIGKILL          # torchrun itself killed
    assert killed_by(128 + int(signal.SIGKILL))[1] == signal.SIGKILL     # through a shell
    assert killed_by(1, "exitcode  : 17 (pid: 5)") is None              # a plain failure is not a signal
    assert signal_text(int(signal.SIGTERM)).startswith("SIGTERM (signal 15): stopped from outside")


# ---- the MLflow run's history -----------------------------------------------------------------------------------

def test_history_says_a_run_was_left_running_and_a_clean_register_leaves_it_running(tmp_path, capfd):
    import mlflow

    from rcm_steps.mlflow_run import HISTORY_TAG, begin_step
    from rcm_steps.register import register_student

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    client = mlflow.MlflowClient()
    exp = client.create_experiment("e", artifact_location=f"file://{tmp_path / 'art'}")
    run_id = client.create_run(exp, tags={"metaflow.run_id": "11"}).info.run_id
    # flow run 11 steps on cleanly, then registers: no history, and the run is still RUNNING for `end`
    assert begin_step(client, run_id, flow_run_id="11", origin_run_id=None, where="11/curate/2 attempt 0") == {}
    capfd.readouterr()
    meta = {"teacher": "embedded", "teacher_version": "x", "latent_shape": [1, 4, 16, 16], "default_steps": 4,
            "sigma_max": 80.0, "mid_t": [1.3, 1.0, 0.6], "method": "rcm"}
    register_student(b"weights", meta, run_id, {"metaflow.run_id": "11"}, {"student_4/digit_acc": 0.5}, True,
                     model_name="m")
    out, err = capfd.readouterr()
    for noise in ("color_warning(", "CloudPickle", "Add type hints"):     # MLflow's warnings at log_model
        assert noise not in out + err, (noise, err[-2000:])
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and HISTORY_TAG not in run.data.tags
    assert begin_step(client, run_id, flow_run_id="11", origin_run_id=None, where="11/end/9 attempt 0") == {}
    # flow run 11 was SIGKILLed (the run stayed RUNNING); `resume` as run 12 says so
    new = begin_step(client, run_id, flow_run_id="12", origin_run_id="11", where="12/distill/3 attempt 0")
    assert "resumed as 12 (origin 11)" in new[HISTORY_TAG] and "run 11 had left it RUNNING" in new[HISTORY_TAG]
    assert "reopened" not in new[HISTORY_TAG]

"""Metaflow and MLflow conventions of the flows (issue 24, points 6 and 7): every step described in ``show``,
one option style, JSON options parsed by Metaflow's JSONType, the profiles as a Config (validated), the fault
hook out of the options, rounded params. The flow runs themselves are checked in test_flow_distill.py."""
import json
import os
import re
import subprocess
import sys

import pytest

from pipeline_fixtures import FLOW, flow_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WATCH = os.path.join(ROOT, "flows", "teacher_watch_flow.py")


def _cli(tmp_path, *args, flow=FLOW, timeout=120):
    env = {**os.environ, **flow_env(tmp_path)}
    r = subprocess.run([sys.executable, flow, *args], env=env, cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("flow", [FLOW, WATCH], ids=["distill", "teacher_watch"])
def test_show_describes_every_step(tmp_path, flow):
    rc, out = _cli(tmp_path, "show", flow=flow)
    assert rc == 0, out[-2000:]
    lines = out.splitlines()
    steps = [i for i, line in enumerate(lines) if line.startswith("Step ")]
    assert len(steps) >= 2
    for i in steps:                                   # the line under "Step <name>" is its docstring, not "?"
        assert lines[i + 1].strip() not in ("", "?"), (lines[i], lines[i + 1])


def test_one_option_style_json_options_and_no_test_hook(tmp_path):
    names = {}
    for f in (FLOW, WATCH):
        src = open(f).read()
        names[f] = re.findall(r'Parameter\(\s*"([^"]+)"', src)
        assert names[f] and all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in names[f]), names[f]
        for opt in ("gates", "distill_config"):       # JSON-valued options are Metaflow JSONType
            m = re.search(rf'Parameter\(\s*"{opt}"[^)]*\)', src)
            assert m is None or "type=JSONType" in m.group(0), m.group(0)
    assert "fault_at_step" not in names[FLOW]
    rc, out = _cli(tmp_path, "run", "--help")
    assert rc == 0 and "fault_at_step" not in out and "fault-at-step" not in out
    assert re.search(r"--gates JSON", out) and re.search(r"--distill_config JSON", out)
    assert all(f"--{n} " in out for n in names[FLOW])


@pytest.mark.parametrize("opt", ["gates", "distill_config"])
def test_invalid_json_option_names_it_before_anything_runs(tmp_path, opt):
    rc, out = _cli(tmp_path, "run", f"--{opt}", '{"lr_student": 1e-5')
    assert rc != 0
    assert f"--{opt}" in out and "not a valid JSON" in out, out[-2000:]
    assert "Workflow starting" not in out                        # refused before a run exists


def test_profiles_config_is_checked_before_anything_runs(tmp_path):
    """A profile file of one's own (--config profiles <file>) with missing and unknown keys stops the command as
    it is read, naming the profile and the keys, with the fix and without a traceback."""
    bad = tmp_path / "profiles.json"
    bad.write_text(json.dumps({"mine": {"iterations": 2, "batch_size": 2, "itrations": 3}}))
    rc, out = _cli(tmp_path, "--config", "profiles", str(bad), "run", "--profile", "mine")
    assert rc != 0 and "Workflow starting" not in out and "Traceback" not in out, out[-3000:]
    assert re.search(r"profile 'mine': missing [a-z_, ]*max_train[a-z_, ]*; unknown itrations", out), out[-3000:]
    assert "rCM: fix: correct the profile file given with --config profiles <file>" in out


def test_profile_settings_unit():
    from rcm_steps.errors import ConfigError
    from rcm_steps.profiles import PROFILES, json_object_option, profile_settings

    assert profile_settings(None, "smoke") == PROFILES["smoke"]
    mine = {**PROFILES["default"], "iterations": 7}
    got = profile_settings({"mine": mine}, "mine")               # a file adds profiles; the built-ins stay
    assert got["iterations"] == 7 and profile_settings({"mine": mine}, "smoke")["iterations"] == 2
    with pytest.raises(ConfigError, match=r"unknown profile 'big' \(--profile\); known: default, mine, smoke"):
        profile_settings({"mine": mine}, "big")
    with pytest.raises(ConfigError, match=r"profile 'mine': invalid iterations=0"):
        profile_settings({"mine": {**mine, "iterations": 0}}, "mine")
    assert json_object_option("gates", '{"min_digit_acc": 0.5}') == {"min_digit_acc": 0.5}
    with pytest.raises(ConfigError, match=r"--gates must be a JSON object"):
        json_object_option("gates", [0.5])


def test_param_values_are_rounded():
    from rcm_steps.mlflow_run import param_value, run_name, source_tags

    assert param_value(1.5707963267948966) == "1.5708" and param_value(1e-05) == "1e-05"
    assert param_value((0.0, 0.999)) == "[0.0, 0.999]" and param_value({"a": 2 / 3}) == '{"a": 0.666667}'
    assert param_value(None) == "None" and param_value(3) == "3" and param_value("x" * 600) == "x" * 500
    assert run_name("wan2.1-1.3b", "rcm", "default", "17") == "rcm-wan2.1-1.3b-rcm-default-17"
    assert source_tags("ann", "flows/distill_flow.py", "kubernetes")["mlflow.source.type"] == "JOB"


def test_preview_thumbnails_decode_only_the_first_latent_frame_of_large_videos():
    """Samples over training stay cheap for real videos: a large latent is decoded from its first latent frame,
    a small one whole; thumbnails are uint8 at most 64 px high."""
    import torch

    from rcm_steps.previews import grid_png, thumbnails

    class VAE:                                       # a video VAE: 4x time (causal: 1 + 4 (T - 1)), 8x space
        net = torch.nn.Linear(1, 1)
        seen = []

        def decode(self, lat):
            self.seen.append(tuple(lat.shape))
            b, _, t, h, w = lat.shape
            return torch.rand(b, 3, 1 + 4 * (t - 1), 8 * h, 8 * w)

    vae = VAE()
    big = thumbnails(vae, torch.randn(2, 16, 21, 30, 52))
    small = thumbnails(vae, torch.randn(2, 4, 3, 8, 8))
    assert vae.seen == [(2, 16, 1, 30, 52), (2, 4, 3, 8, 8)]
    assert big.dtype == torch.uint8 and big.shape == (2, 3, 1, 64, 111) and small.shape == (2, 3, 8, 64, 64)
    png = grid_png({"prompts": ["a", "b"], "student_steps": 4, "clips": {0: small, 10: small, 20: small}},
                   max_columns=2)
    assert png[:4] == b"\x89PNG"

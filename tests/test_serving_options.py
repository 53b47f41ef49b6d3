"""Serving options of a registered student (issue 23): FP8 linears and a compiled forward as a switch in the
version's settings, the pyfunc load call and the generate CLI, with the FP8 static scales calibrated in evaluate
(the student's own sampling of the eval prompts) and stored with the version.

The embedded teacher's network stands in for a distilled student (same architecture: 4 blocks of 10 linears,
96/384 wide); a real sqlite MLflow store in a temporary folder. FP8 runs on the CPU through ``torch._scaled_mm``'s
emulation (``RCM_FP8_EMULATE=1``); without it the CPU is refused, as a GPU older than sm89 is."""
from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save

from pipeline_fixtures import FakeTeacher
from real_fixtures import wan_dir  # noqa: F401  (a fixture)
from rcm_core.nets.serving import ServingOptions

PROMPTS = ["a 3 drifting up", "a 7 drifting left"]
META = {"teacher": "embedded", "latent_shape": [1, 4, 16, 16], "default_steps": 2, "sigma_max": 80.0,
        "mid_t": [1.3, 1.0, 0.6], "method": "rcm"}
ROWS = pd.DataFrame({"prompt": ["a 3 drifting up", "a 5 drifting down"], "seed": [0, 1], "steps": [2, 2]})
SERVING_ENV = ("RCM_FP8", "RCM_COMPILE", "RCM_SPARSE", "RCM_OVERLAP", "RCM_FP8_EMULATE", "RCM_DEVICE", "RCM_DTYPE")


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch):
    """No serving override from the environment unless a test sets one; telemetry off."""
    for k in SERVING_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def calibrated():
    """(teacher, student, evaluate's result, the amax / 448 per block linear seen by this test's own hooks on the
    student's network while evaluate ran): the teacher samples with its own network, so the hooks see the
    student's sampling only."""
    from rcm_steps.evaluate import EvalConfig, evaluate, student_denoiser
    from rcm_steps.teacher import load_teacher

    teacher = load_teacher("embedded")
    student = student_denoiser(teacher, teacher.net.state_dict())
    seen: dict = {}

    def hook(name):
        def record(_mod, args, _out):
            seen[name] = max(seen.get(name, 0.0), float(args[0].detach().abs().max()))
        return record

    handles = [m.register_forward_hook(hook(f"blocks.{n}")) for n, m in student.net.blocks.named_modules()
               if isinstance(m, torch.nn.Linear)]
    cfg = EvalConfig(seeds=2, student_steps=(1, 2), teacher_steps=2, batch_size=4, real_clips=4)
    try:
        res = evaluate(teacher, student, PROMPTS, cfg, progress=False)
    finally:
        for h in handles:
            h.remove()
    return teacher, student, res, {k: v / 448.0 for k, v in seen.items()}


@pytest.fixture(scope="module")
def registry(tmp_path_factory, calibrated):
    """A sqlite store with model ``srv`` v1 (the student with evaluate's FP8 scales, default serving) and model
    ``bare`` v1 (no scales)."""
    from rcm_steps.register import register_student

    teacher, student, res, _ = calibrated
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'm.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.create_experiment("serving", artifact_location=f"file://{root / 'art'}")
    weights = save({k: v.float().contiguous() for k, v in student.net.state_dict().items()})
    meta = {**META, "teacher_version": teacher.version}
    kw = dict(lineage={}, metrics={}, gates_passed=True, ema_weights_bytes=weights, meta=meta)
    srv = register_student(run_id=client.create_run(exp).info.run_id, model_name="srv",
                           fp8_scales=res.fp8_scales, **kw)
    bare = register_student(run_id=client.create_run(exp).info.run_id, model_name="bare", **kw)
    return {"uri": uri, "exp": exp, "root": root, "srv": srv, "bare": bare, "weights": weights, "meta": meta}


def _use(registry):
    mlflow.set_tracking_uri(registry["uri"])
    return mlflow.MlflowClient()


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- the options ------------------------------------------------------------------------------------------------

def test_registered_then_environment_then_call_and_bad_values_name_the_option():
    reg = {"fp8": "static", "compile": "default"}
    assert ServingOptions.resolve(None, {}, None) == ServingOptions("off", "off")
    assert ServingOptions.resolve(reg, {}, {}) == ServingOptions("static", "default")
    assert ServingOptions.resolve(reg, {"RCM_FP8": "dynamic"}, {}) == ServingOptions("dynamic", "default")
    assert ServingOptions.resolve(reg, {"RCM_FP8": "dynamic", "RCM_COMPILE": "off"}, {"fp8": "off"}) \
        == ServingOptions("off", "off")
    # keys a load call leaves unset (None, as the logged model declares them) keep the lower levels
    assert ServingOptions.resolve(reg, {"RCM_COMPILE": "off"}, {"fp8": None, "compile": None}) \
        == ServingOptions("static", "off")
    with pytest.raises(ValueError, match=r"fp8='fast'.*off, dynamic, static"):
        ServingOptions.resolve(reg, {"RCM_FP8": "fast"}, {})
    with pytest.raises(ValueError, match=r"compile='max'.*reduce-overhead"):
        ServingOptions.resolve(None, {}, {"compile": "max"})
    with pytest.raises(ValueError, match=r"\['speed'\].*unknown"):
        ServingOptions.from_dict({"speed": "max"})


# ---- calibration in evaluate ------------------------------------------------------------------------------------

def test_evaluate_records_the_students_own_activation_scales(calibrated):
    _, _, res, mine = calibrated
    assert len(mine) == 40                        # 4 blocks x (self q/k/v/o, cross q/k/v/o, ffn in/out)
    assert set(res.fp8_scales) == set(mine)
    for k, v in mine.items():
        assert res.fp8_scales[k] == pytest.approx(v, rel=1e-6), k
    assert len(set(mine.values())) > 10           # layers differ: not one number everywhere


def test_evaluate_of_a_net_without_blocks_has_no_scales():
    from rcm_steps.evaluate import EvalConfig, evaluate
    from rcm_steps.teacher import teacher_denoiser

    te = FakeTeacher()
    res = evaluate(te, teacher_denoiser(te), ["p0", "p1"], EvalConfig(seeds=2, student_steps=(1,), teacher_steps=2,
                                                                      batch_size=4), progress=False)
    assert res.fp8_scales is None


# ---- registration -----------------------------------------------------------------------------------------------

def _written(client, exp):
    """What a registration writes: registered models, their versions, logged models, run artifacts."""
    return (sorted(m.name for m in client.search_registered_models()),
            sorted((v.name, v.version) for v in client.search_model_versions()),
            len(mlflow.search_logged_models(experiment_ids=[exp], output_format="list")))


@pytest.mark.parametrize("serving, scales, match", [
    ({"fp8": "static"}, None, r"fp8=static without fp8_scales.*refused before anything is written"),
    ({"fp8": "fast"}, None, r"fp8='fast'"),
    ({"fp8": "static"}, {"blocks.0.ffn.0": -1.0}, r"fp8_scales: the scale of layer 'blocks.0.ffn.0' is -1.0"),
])
def test_register_refuses_bad_serving_before_anything_is_written(registry, serving, scales, match):
    from rcm_steps.register import register_student

    client = _use(registry)
    before = _written(client, registry["exp"])
    run_id = client.create_run(registry["exp"]).info.run_id
    with pytest.raises(ValueError, match=match):
        register_student(registry["weights"], registry["meta"], run_id, {}, {}, True, model_name="refused",
                         serving=serving, fp8_scales=scales)
    assert _written(client, registry["exp"]) == before
    assert client.list_artifacts(run_id) == []


def test_registered_version_carries_its_scales_and_settings(registry, calibrated, tmp_path):
    client = _use(registry)
    srv = registry["srv"]
    root = mlflow.artifacts.download_artifacts(srv.model_uri, dst_path=str(tmp_path / "dl"))
    with open(f"{root}/artifacts/fp8_scales.json") as f:
        assert json.load(f) == calibrated[2].fp8_scales
    with open(f"{root}/artifacts/meta.json") as f:
        meta = json.load(f)
    assert meta["serving"] == {"fp8": "off", "compile": "off"}
    assert meta["fp8_calibration"]["artifact"] == "fp8_scales" and meta["fp8_calibration"]["layers"] == 40
    tags = client.get_model_version("srv", srv.version).tags
    assert tags["serving"] == "fp8=off, compile=off; FP8 scales: 40 layers"
    assert client.get_model_version("bare", registry["bare"].version).tags["serving"] \
        == "fp8=off, compile=off; no FP8 scales"
    for s in ("## Serving", "fp8=off, compile=off", "artifact `fp8_scales` (40 layers",
              f"mlflow.pyfunc.load_model('{srv.model_uri}', model_config={{\"fp8\": \"static\"",
              "`RCM_FP8`, `RCM_COMPILE`", "--fp8 dynamic --compile default"):
        assert s in srv.card, s


# ---- loading ----------------------------------------------------------------------------------------------------

def _student(model):
    return model.unwrap_python_model().student


def test_fp8_on_the_cpu_is_refused_naming_it(registry):
    _use(registry)
    with pytest.raises(ValueError, match=r"fp8=dynamic.*this run is on the cpu.*\"fp8\": \"off\""):
        mlflow.pyfunc.load_model(registry["srv"].model_uri, model_config={"fp8": "dynamic"})


def test_static_fp8_serves_close_to_the_unquantised_student(registry, monkeypatch):
    """Every block linear in E4M3 (3 mantissa bits: rounding error up to 2^-4 of each operand) changes the clips
    by a relative L2 of about 0.07 here (2 steps, 40 layers); 0.15 leaves twice that, and is still far below what
    another seed changes (asserted, so the bound means something)."""
    from rcm_core.nets.fp8 import Fp8Linear, fp8_layers

    _use(registry)
    uri = registry["srv"].model_uri
    ref = mlflow.pyfunc.load_model(uri).predict(ROWS)
    assert fp8_layers(_student(mlflow.pyfunc.load_model(uri)).net) == []
    monkeypatch.setenv("RCM_FP8_EMULATE", "1")
    model = mlflow.pyfunc.load_model(uri, model_config={"fp8": "static"})
    net = _student(model).net
    assert len(fp8_layers(net)) == 40 and model.unwrap_python_model().serving == ServingOptions("static", "off")
    with open(mlflow.artifacts.download_artifacts(f"{uri}/artifacts/fp8_scales.json")) as f:
        stored = json.load(f)
    got = {n: float(m.act_scale) for n, m in net.named_modules() if isinstance(m, Fp8Linear)}
    assert got == pytest.approx(stored, rel=1e-6)
    out = model.predict(ROWS)
    other_seed = mlflow.pyfunc.load_model(uri).predict(ROWS.assign(seed=[5, 6]))
    assert out.shape == ref.shape == (2, 1, 4, 16, 16) and out.dtype == np.float32
    err = _rel(out, ref)
    assert 1e-4 < err < 0.15, err                 # FP8 did run, and costs little
    assert _rel(other_seed, ref) > 3 * err


def test_environment_and_load_call_switch_fp8(registry, monkeypatch):
    from rcm_core.nets.fp8 import Fp8Linear, fp8_layers

    _use(registry)
    uri = registry["srv"].model_uri
    monkeypatch.setenv("RCM_FP8_EMULATE", "1")
    monkeypatch.setenv("RCM_FP8", "dynamic")
    net = _student(mlflow.pyfunc.load_model(uri)).net
    layers = [m for m in net.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 40 and all(m.act_scale is None for m in layers)          # dynamic: no stored scale
    assert fp8_layers(_student(mlflow.pyfunc.load_model(uri, model_config={"fp8": "off"})).net) == []


def test_static_fp8_of_a_version_without_scales_names_them(registry, monkeypatch):
    _use(registry)
    monkeypatch.setenv("RCM_FP8_EMULATE", "1")
    with pytest.raises(ValueError, match=r"fp8=static needs .*fp8_scales.*this model has none"):
        mlflow.pyfunc.load_model(registry["bare"].model_uri, model_config={"fp8": "static"})


def test_generate_with_fp8_on_the_cpu_exits_2_and_writes_nothing(registry, tmp_path, capsys):
    from rcm_steps.generate import main

    out = tmp_path / "x.gif"
    rc = main(["--model", registry["srv"].model_uri, "--tracking-uri", registry["uri"], "--prompt", "a 3 drifting up",
               "--out", str(out), "--fp8", "dynamic"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("rcm_steps.generate: serving options fp8=dynamic"), err
    assert "this run is on the cpu" in err and not out.exists()
    assert 'model_config={"fp8": "off", "compile": "off"} in' in err, err
    assert list(tmp_path.iterdir()) == []


def test_compiled_blocks_give_the_same_clips(registry):
    """compile=default: torch.compile of each block (inductor on the CPU, ~20 s here); float32 on both sides."""
    _use(registry)
    uri = registry["srv"].model_uri
    ref = mlflow.pyfunc.load_model(uri).predict(ROWS)
    model = mlflow.pyfunc.load_model(uri, model_config={"compile": "default"})
    blocks = _student(model).net.blocks
    assert all(getattr(b, "_rcm_compiled", None) == "default" and "forward" in vars(b) for b in blocks)
    out = model.predict(ROWS)
    assert _rel(out, ref) < 1e-5


# ---- a real (diffusers) teacher's version: its own card and load path --------------------------------------------

def test_real_teachers_version_serves_its_registered_fp8_setting(wan_dir, tmp_path, monkeypatch):
    """A tiny Wan2.1 student registered with fp8=dynamic: its model card says so and how to switch; the pyfunc
    (the bundle load path) quantises the blocks' linears without a load-time option, and model_config turns it
    off again. The upper bound is the static test's; the decoded clips of this random tiny network move far less
    (relative L2 about 2e-4): the lower bound says only that FP8 ran (off is bit-identical run to run)."""
    from rcm_core.nets.fp8 import fp8_layers
    from rcm_steps.register import register_student

    from real_fixtures import tiny_wan

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RCM_COMPONENT_CACHE", str(tmp_path / "component-cache"))
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.create_experiment("e", artifact_location=f"file://{tmp_path / 'art'}")
    opts = {"frames": 5, "height": 8, "width": 8, "text_len": 8, "dtype": "float32"}
    meta = {"teacher": str(wan_dir), "teacher_version": "v", "latent_shape": [4, 3, 4, 4], "default_steps": 2,
            "sigma_max": 80.0, "mid_t": [1.3, 1.0, 0.6], "method": "rcm", "teacher_options": opts}
    state = {k: v.float().contiguous() for k, v in tiny_wan(seed=3).state_dict().items()}
    r = register_student(save(state), meta, client.create_run(exp).info.run_id, {}, {}, True, model_name="w",
                         component_store=str(tmp_path / "store"), serving={"fp8": "dynamic"})
    card = client.get_model_version("w", r.version).description
    assert "Serving: fp8=dynamic, compile=off, sparse=off, overlap=off; no FP8 static scales" in card
    assert f"model_config={{\"fp8\": \"static\", \"compile\": \"default\"}}" in card and "--fp8" in card
    rows = pd.DataFrame({"prompt": ["a red cat runs"], "seed": [0], "steps": [2]})
    ref_model = mlflow.pyfunc.load_model(r.model_uri, model_config={"fp8": "off"})
    assert fp8_layers(_student(ref_model).net) == []
    ref = ref_model.predict(rows)
    with pytest.raises(ValueError, match="this run is on the cpu"):          # the registered setting applies
        mlflow.pyfunc.load_model(r.model_uri)
    monkeypatch.setenv("RCM_FP8_EMULATE", "1")
    model = mlflow.pyfunc.load_model(r.model_uri)
    assert len(fp8_layers(_student(model).net)) > 0
    err = _rel(model.predict(rows), ref)
    assert 1e-5 < err < 0.15, err
    # overlap: the diffusers VAE decodes on the worker thread, three clips in order, the same as in turn
    three = pd.DataFrame({"prompt": ["a red cat runs", "a dog", "a red cat runs"], "seed": [0, 1, 0], "steps": [2] * 3})
    both = ref_model.predict(three)
    np.testing.assert_array_equal(both[0], ref[0])
    on = mlflow.pyfunc.load_model(r.model_uri, model_config={"fp8": "off", "overlap": "on"})
    np.testing.assert_array_equal(on.predict(three), both)


def test_a_version_that_drops_load_options_is_named_by_generate(registry, tmp_path, monkeypatch, capsys):
    """Versions logged without the ``model_config`` keys (before issue 23): MLflow drops --fp8 / --compile
    silently, so generate says so instead of sampling with other settings than asked."""
    from rcm_steps import register
    from rcm_steps.generate import main

    client = _use(registry)
    monkeypatch.setattr(register, "LOAD_CONFIG", None)
    old = register.register_student(registry["weights"], registry["meta"],
                                    client.create_run(registry["exp"]).info.run_id, {}, {}, True, model_name="old")
    out = tmp_path / "x.gif"
    rc = main(["--model", old.model_uri, "--tracking-uri", registry["uri"], "--prompt", "a 3 drifting up",
               "--out", str(out), "--compile", "default"])
    err = capsys.readouterr().err
    assert rc == 2 and "registered before its serving options could be set at load time: --compile default" in err
    assert "loaded with fp8=off, compile=off" in err and not out.exists()


def test_two_expert_students_refuse_fp8_and_compile():
    from rcm_steps.serving import _check_layout

    _check_layout(ServingOptions(), True)                      # the default: nothing to refuse
    _check_layout(ServingOptions(overlap="on"), True)          # the request loop, not the network
    _check_layout(ServingOptions("dynamic", "default"), False)
    with pytest.raises(ValueError, match=r"fp8=dynamic, compile=off: the student is two experts.*\"fp8\": \"off\""):
        _check_layout(ServingOptions("dynamic"), True)


def test_sparse_option_through_the_registered_model_and_generate(registry, tmp_path, capsys):
    """sparse=sta:...: sliding-tile self-attention on the served student (the exact masked path on the CPU). A window
    covering the whole token grid is dense attention; a one-tile window changes the clips; a bad value is refused by
    generate before anything is written, naming the option."""
    from rcm_steps.generate import main

    _use(registry)
    uri = registry["srv"].model_uri
    ref = mlflow.pyfunc.load_model(uri).predict(ROWS)
    whole = mlflow.pyfunc.load_model(uri, model_config={"sparse": "sta:t1x2x2:w9x9x9"})
    assert _student(whole).call is not _student(mlflow.pyfunc.load_model(uri)).call      # the wrapped call
    assert _rel(whole.predict(ROWS), ref) < 1e-5
    local = mlflow.pyfunc.load_model(uri, model_config={"sparse": "sta:t1x2x2:w1x1x1"})
    assert local.unwrap_python_model().serving.sparse == "sta:t1x2x2:w1x1x1"
    assert _rel(local.predict(ROWS), ref) > 1e-3
    out = tmp_path / "x.gif"
    rc = main(["--model", uri, "--prompt", "a 3 drifting up", "--out", str(out), "--sparse", "sta:t1x2x2:w2x1x1"])
    err = capsys.readouterr().err
    assert rc == 2 and "sparse" in err and not out.exists(), err


def test_overlap_gives_the_same_clips_decoded_on_the_worker(registry, tmp_path, monkeypatch, capsys):
    """overlap=on (load call, RCM_OVERLAP, generate --overlap): the same clips, each decoded on the worker thread;
    a bad value is refused by generate before anything is written."""
    import threading

    from rcm_steps import evaluate
    from rcm_steps.generate import main

    _use(registry)
    uri = registry["srv"].model_uri
    decode, threads = evaluate.decode_latents, []

    def watched(*args, **kw):
        threads.append(threading.current_thread().name)
        return decode(*args, **kw)

    monkeypatch.setattr(evaluate, "decode_latents", watched)
    ref = mlflow.pyfunc.load_model(uri).predict(ROWS)
    assert len(threads) == 2 and not any(t.startswith("rcm-decode") for t in threads)
    on = mlflow.pyfunc.load_model(uri, model_config={"overlap": "on"})
    assert on.unwrap_python_model().serving.overlap == "on"
    np.testing.assert_array_equal(on.predict(ROWS), ref)
    assert len(threads) == 4 and all(t.startswith("rcm-decode") for t in threads[2:])
    monkeypatch.setenv("RCM_OVERLAP", "on")
    assert mlflow.pyfunc.load_model(uri).unwrap_python_model().serving.overlap == "on"
    monkeypatch.delenv("RCM_OVERLAP")
    out = tmp_path / "x.gif"
    assert main(["--model", uri, "--prompt", "a 3 drifting up", "--seeds", "2", "--out", str(out),
                 "--overlap", "on"]) == 0 and out.exists()
    assert all(t.startswith("rcm-decode") for t in threads[4:]) and len(threads) == 6
    bad = tmp_path / "y.gif"
    with pytest.raises(SystemExit):
        main(["--model", uri, "--prompt", "a 3 drifting up", "--out", str(bad), "--overlap", "yes"])
    assert "--overlap: invalid choice" in capsys.readouterr().err and not bad.exists()


# ---- serving variants measured by evaluate (--eval_serving) --------------------------------------------------------

def test_evaluate_measures_serving_variants_against_the_student(monkeypatch):
    """FP8 (emulated on the CPU) and a sliding-tile window covering the whole grid (= dense attention) sampled like
    the students; metrics, card rows. The whole-window variant draws the same noise and renoising as the student,
    so its latents equal the student's to float rounding: the comparison is like for like."""
    from rcm_steps.evaluate import EvalConfig, evaluate, student_denoiser
    from rcm_steps.model_card import serving_table
    from rcm_steps.teacher import load_teacher

    monkeypatch.setenv("RCM_FP8_EMULATE", "1")
    teacher = load_teacher("embedded")
    student = student_denoiser(teacher, teacher.net.state_dict())
    whole = "sta:t4x8x8:w1x1x1"                  # the embedded grid (4, 8, 8) is one tile: every pair attends
    cfg = EvalConfig(seeds=2, student_steps=(1, 2), teacher_steps=2, batch_size=4, real_clips=4,
                     serving=("fp8-static", "fp8-dynamic", whole))
    m = evaluate(teacher, student, PROMPTS, cfg, progress=False).metrics
    for v in ("fp8-static", "fp8-dynamic", "sta-t4x8x8-w1x1x1"):
        assert m[f"serve_{v}/first_call_s"] > 0
        for k in (1, 2):
            n = f"serve_{v}_{k}"
            for key in ("sec_per_sample", "digit_acc", "fd_teacher", "diversity_rel", "nfe"):
                assert key in [x.split("/")[1] for x in m if x.startswith(n + "/")], (n, key)
            assert m[f"{n}/nfe"] == k
            assert m[f"{n}/speedup_student"] == pytest.approx(m[f"student_{k}/sec_per_sample"]
                                                              / m[f"{n}/sec_per_sample"])
            if v.startswith("fp8"):
                assert 1e-3 < m[f"{n}/rel_l2_student"] < 0.2, (n, m[f"{n}/rel_l2_student"])
            else:
                assert m[f"{n}/rel_l2_student"] < 1e-5, (n, m[f"{n}/rel_l2_student"])
                assert m[f"{n}/digit_acc"] == m[f"student_{k}/digit_acc"]
    card = "\n".join(serving_table(m))
    assert card.count("| fp8-static | ") == 2 and "| sta-t4x8x8-w1x1x1 | 2 | " in card and "digit_acc (student's)" in card


def test_serving_variants_are_refused_before_anything_samples(monkeypatch):
    from rcm_steps import teacher as T
    from rcm_steps.errors import ConfigError
    from rcm_steps.evaluate import EvalConfig, evaluate, serving_variants_option, student_denoiser
    from rcm_steps.teacher import load_teacher

    with pytest.raises(ConfigError, match=r"--eval_serving: serving variant 'sta:oops'"):
        serving_variants_option("fp8-static, sta:oops")
    assert serving_variants_option(" fp8-static ,compile,") == ("fp8-static", "compile")
    with pytest.raises(ValueError, match=r"cannot read 'fast'"):
        EvalConfig(serving=("fp8-static+fast",))
    teacher = load_teacher("embedded")
    student = student_denoiser(teacher, teacher.net.state_dict())
    sampled = []
    monkeypatch.setattr(T, "sample_teacher_latents", lambda *a, **k: sampled.append(1))
    for variant, match in (("fp8-static", r"'fp8-static'.*FP8 needs an NVIDIA GPU.*on the cpu"),
                           ("compile-reduce-overhead", r"reduce-overhead captures CUDA graphs.*cpu")):
        with pytest.raises(ValueError, match=match):
            evaluate(teacher, student, PROMPTS, EvalConfig(seeds=1, student_steps=(1,), teacher_steps=2,
                                                           serving=(variant,)), progress=False)
    assert not sampled

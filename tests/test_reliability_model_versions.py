"""Self-contained model versions: a registered real-teacher student loads and samples after the teacher
directory it was trained from has moved; a missing component is named with what to do.

Tiny random Wan2.1 checkpoint (tests/real_fixtures.py), real sqlite MLflow, the content store on the local
disk and on a real S3 protocol endpoint (moto server on 127.0.0.1).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline_fixtures import *  # noqa: F401,F403
from real_fixtures import *  # noqa: F401,F403
from real_fixtures import tiny_wan

OPTS = {"frames": 5, "height": 8, "width": 8, "text_len": 8, "dtype": "float32"}
PROMPTS = pd.DataFrame({"prompt": ["a red cat runs", "the big dog"], "seed": [0, 3], "steps": [2, 1]})


@pytest.fixture
def mlflow_env(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RCM_COMPONENT_CACHE", str(tmp_path / "component-cache"))
    for k in ("RCM_COMPONENT_STORE", "RCM_TEACHER_DIR"):
        monkeypatch.delenv(k, raising=False)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    return client, client.create_experiment("e", artifact_location=f"file://{tmp_path / 'art'}")


def _student_state():
    """A 'distilled' student: the tiny transformer with other weights than the teacher's."""
    g = torch.Generator().manual_seed(11)
    return {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).contiguous()
            for k, v in tiny_wan().state_dict().items()}


def _register(client, exp, teacher_dir, store, components="reference", name="m"):
    from safetensors.torch import save

    from rcm_steps.register import register_student

    run_id = client.create_run(exp).info.run_id
    meta = {"teacher": str(teacher_dir), "teacher_version": "v", "latent_shape": [4, 3, 4, 4], "default_steps": 2,
            "sigma_max": 80.0, "mid_t": [1.3, 1.0, 0.6], "method": "rcm", "teacher_options": OPTS}
    r = register_student(save(_student_state()), meta, run_id, {}, {}, True, model_name=name, components=components,
                         component_store=store)
    return r


def _expected(teacher_dir):
    """Clips from the teacher directory itself (the pre-bundle path): the student on the teacher's VAE/encoder."""
    from rcm_core.sampling import sample_student
    from rcm_steps import teacher as T
    from rcm_steps.evaluate import student_denoiser

    te = T.load_teacher(str(teacher_dir), options=OPTS)
    st = student_denoiser(te, _student_state())
    out = []
    for _, r in PROMPTS.iterrows():
        g = torch.Generator().manual_seed(int(r["seed"]))
        noise = torch.randn((1, *te.latent_shape), generator=g, dtype=torch.float64)
        lat = sample_student(st, T.encode(te, [r["prompt"]]), noise, steps=int(r["steps"]), sigma_max=80.0,
                             mid_t=(1.3, 1.0, 0.6), generator=g)
        out.append(T.decode(te, lat.float()).numpy())
    return np.concatenate(out)


def _load(uri):
    import mlflow

    return mlflow.pyfunc.load_model(uri)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_reference_version_loads_after_the_teacher_moved(wan_dir, tmp_path, mlflow_env, where, request):
    from rcm_steps.register import MissingComponentError
    from rcm_steps.storage import ContentStore, Storage, sha256_file

    client, exp = mlflow_env
    teacher = tmp_path / "models" / "my-wan"
    shutil.copytree(wan_dir, teacher)
    want = _expected(teacher)
    if where == "s3":
        url, _ = request.getfixturevalue("s3_bucket")
        store = f"{url}/rcm/components"
    else:
        store = str(tmp_path / "store" / "components")
    r = _register(client, exp, teacher, store)
    mv = client.get_model_version("m", r.version)
    assert mv.tags["teacher_components"].startswith("reference: ") and store in mv.tags["teacher_components"]
    arts = mlflow_artifacts(client, mv)
    assert "artifacts/meta.json" in arts and not any("text_encoder" in a for a in arts)   # by reference
    te_file = teacher / "text_encoder" / "model.safetensors"
    digest = sha256_file(str(te_file))
    assert Storage(store).exists(ContentStore.key(digest))              # stored under its sha256

    moved = tmp_path / "elsewhere" / "wan-moved"
    shutil.move(str(teacher), str(moved))                               # the training machine's path is gone
    if where == "s3":       # another machine: a fresh process elsewhere, S3 credentials only (no endpoint option)
        got = _load_elsewhere(r.model_uri, tmp_path, request.getfixturevalue("monkeypatch"))
    else:
        got = _load(r.model_uri).predict(PROMPTS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # the content store lost the text encoder and the local cache is cold: named, with what to do
    Storage(store).rm(ContentStore.key(digest))
    shutil.rmtree(tmp_path / "component-cache")
    with pytest.raises(MissingComponentError) as e:
        _load(r.model_uri)
    msg = str(e.value)
    assert "1 teacher file(s) of text_encoder not found here: text_encoder/model.safetensors" in msg
    assert f"sha256 {digest[:16]}" in msg and f"content store {store} (recorded at registration): absent" in msg
    assert e.value.missing[0]["sha256"] == digest and e.value.missing[0]["file"] == "text_encoder/model.safetensors"
    fix = msg.split("\nfix: ", 1)[1]                                    # the message itself says what to do
    assert "RCM_COMPONENT_STORE" in fix and "RCM_TEACHER_DIR" in fix and "--model_components copy" in fix
    # a local copy of the teacher fills the gap (hash-checked); so does a store that moved
    request.getfixturevalue("monkeypatch").setenv("RCM_TEACHER_DIR", str(moved))
    np.testing.assert_allclose(_load(r.model_uri).predict(PROMPTS), want, rtol=1e-5, atol=1e-6)


def _load_elsewhere(uri, tmp_path, monkeypatch):
    """predict(PROMPTS) of ``uri`` as on another machine: in an empty folder, with a cold component cache and no
    RCM_STORAGE_OPTIONS (S3 credentials only: the store's endpoint comes from the version)."""
    import os

    saved = os.environ.pop("RCM_STORAGE_OPTIONS", None)
    assert not (tmp_path / "component-cache").exists()
    (tmp_path / "other-machine").mkdir()
    monkeypatch.chdir(tmp_path / "other-machine")
    try:
        return _load(uri).predict(PROMPTS)
    finally:
        if saved is not None:
            os.environ["RCM_STORAGE_OPTIONS"] = saved


def test_store_that_moved_and_a_corrupt_object(wan_dir, tmp_path, mlflow_env, monkeypatch, capsys):
    from rcm_steps.register import MissingComponentError
    from rcm_steps.storage import ContentStore, Storage, sha256_file

    client, exp = mlflow_env
    teacher = tmp_path / "t" / "tiny-wan"
    shutil.copytree(wan_dir, teacher)
    store = tmp_path / "old-store" / "components"
    r = _register(client, exp, teacher, str(store))
    shutil.rmtree(teacher)
    shutil.move(str(store), str(tmp_path / "new-store"))
    with pytest.raises(MissingComponentError) as e:
        _load(r.model_uri)
    # every file named once, compactly, with where it looked; the fix in the message itself
    old = str(tmp_path / "old-store" / "components")
    head, looked, fix = str(e.value).split("\n")
    assert head == ("cannot load the model: 8 teacher file(s) of pipeline index, text_encoder, tokenizer, transformer "
                    "config, vae not found here: model_index.json, transformer/config.json, text_encoder/{config.json, "
                    "model.safetensors}, tokenizer/{tokenizer.json, tokenizer_config.json}, vae/{config.json, "
                    "diffusion_pytorch_model.safetensors}")
    assert f"content store {old} (recorded at registration): absent (all 8)" in looked
    assert fix.startswith("fix: if the component store moved, set RCM_COMPONENT_STORE=") and "RCM_TEACHER_DIR" in fix
    assert len(e.value.missing) == 8 and all(len(m["sha256"]) == 64 for m in e.value.missing)
    from rcm_steps.generate import main as generate

    out = tmp_path / "x.gif"
    assert generate(["--model", r.model_uri, "--prompt", "a red cat", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "8 teacher file(s)" in err and err.count("fix: if the component store moved") == 1 and not out.exists()
    assert generate(["--model", r.model_uri, "--prompt", "a red cat", "--out", str(out), "--steps", "1",
                     "--component-store", str(tmp_path / "new-store")]) == 0
    assert out.read_bytes()[:3] == b"GIF"
    monkeypatch.setenv("RCM_COMPONENT_STORE", str(tmp_path / "new-store"))
    assert _load(r.model_uri).predict(PROMPTS[:1]).shape == (1, 3, 5, 8, 8)
    # bit rot in the store: the fetched object fails its sha256 and is not used
    shutil.rmtree(tmp_path / "component-cache")
    vae_digest = sha256_file(str(wan_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    obj = Storage(str(tmp_path / "new-store"))
    obj.write_bytes(ContentStore.key(vae_digest), b"not the vae")
    with pytest.raises(MissingComponentError, match=r"(?s)vae not found here: vae/diffusion_pytorch_model.safetensors "
                       r"\(sha256 .*\(RCM_COMPONENT_STORE\): ShardError: .* is corrupt: its sha256 is"):
        _load(r.model_uri)


def test_copy_version_carries_the_files(wan_dir, tmp_path, mlflow_env):
    client, exp = mlflow_env
    teacher = tmp_path / "t" / "tiny-wan"
    shutil.copytree(wan_dir, teacher)
    want = _expected(teacher)
    r = _register(client, exp, teacher, None, components="copy")
    arts = mlflow_artifacts(client, client.get_model_version("m", r.version))
    for rel in ("model_index.json", "transformer/config.json", "text_encoder/model.safetensors",
                "tokenizer/tokenizer.json", "vae/diffusion_pytorch_model.safetensors"):
        assert f"artifacts/teacher/{rel}" in arts, rel
    # the teacher's transformer weights are not copied (the student's own live in the diffusers export)
    assert not any(a.startswith("artifacts/teacher/transformer/") and a.endswith(".safetensors") for a in arts)
    from rcm_steps import teacher as T

    te = T.load_teacher(str(teacher), options=OPTS)                       # the teacher's own transformer differs
    assert any((te.net.state_dict()[k].float() - v).abs().max() > 0.01 for k, v in _student_state().items())
    shutil.rmtree(teacher)
    np.testing.assert_allclose(_load(r.model_uri).predict(PROMPTS), want, rtol=1e-5, atol=1e-6)
    from rcm_steps.register import check_components_mode

    with pytest.raises(ValueError, match="--model_components 'hash'; known: reference .* copy"):
        check_components_mode("hash")


def test_version_from_before_bundling_names_the_missing_teacher(wan_dir, tmp_path, mlflow_env, monkeypatch):
    """An old-format version (meta without components) used to fail with "teacher '<dir>' takes no options"."""
    import mlflow
    import rcm_core
    from safetensors.torch import save_file

    import rcm_steps.register as R

    client, exp = mlflow_env
    teacher = tmp_path / "t" / "tiny-wan"
    shutil.copytree(wan_dir, teacher)
    want = _expected(teacher)
    d = tmp_path / "old"
    d.mkdir()
    save_file(_student_state(), str(d / "w.safetensors"))
    (d / "meta.json").write_text(json.dumps({
        "teacher": str(teacher), "teacher_version": "v", "latent_shape": [4, 3, 4, 4], "default_steps": 2,
        "sigma_max": 80.0, "mid_t": [1.3, 1.0, 0.6], "method": "rcm", "teacher_options": OPTS}))
    import os

    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pyfunc.log_model(name="student", python_model=R.RCMStudentModel(),
                                       artifacts={"weights": str(d / "w.safetensors"), "meta": str(d / "meta.json")},
                                       code_paths=[os.path.dirname(R.__file__),
                                                   os.path.dirname(rcm_core.__file__)])
    moved = tmp_path / "moved"
    shutil.move(str(teacher), str(moved))
    with pytest.raises(R.MissingComponentError) as e:
        _load(info.model_uri)
    assert f"loads the teacher from {str(teacher)!r}" in str(e.value) and "does not exist" in str(e.value)
    assert "RCM_TEACHER_DIR" in e.value.fix and "takes no options" not in str(e.value)
    monkeypatch.setenv("RCM_TEACHER_DIR", str(moved))
    np.testing.assert_allclose(_load(info.model_uri).predict(PROMPTS), want, rtol=1e-5, atol=1e-6)


def mlflow_artifacts(client, mv):
    """All artifact paths of a model version's logged model (recursively), relative to the model's root."""
    import os

    import mlflow

    root = mlflow.artifacts.download_artifacts(mv.source)
    return {os.path.relpath(os.path.join(b, f), root).replace(os.sep, "/") for b, _, fs in os.walk(root) for f in fs}


def test_text_to_image_version_says_it_returns_images(cosmos_dir, tmp_path, mlflow_env, capsys):
    """A Cosmos-Predict2 (text-to-image) student returns (N, 3, H, W), and its signature, card and the generate CLI
    say and handle so (README and the cards once said (N, 3, F, H, W) for every model)."""
    from safetensors.torch import save

    from rcm_steps.generate import main as generate
    from rcm_steps.register import register_student
    from real_fixtures import tiny_cosmos

    client, exp = mlflow_env
    g = torch.Generator().manual_seed(5)
    state = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).contiguous()
             for k, v in tiny_cosmos().state_dict().items()}
    meta = {"teacher": str(cosmos_dir), "teacher_version": "v", "latent_shape": [4, 1, 8, 8], "default_steps": 2,
            "sigma_max": 80.0, "mid_t": [1.3, 1.0, 0.6], "method": "rcm",
            "teacher_options": {"frames": 1, "height": 16, "width": 16, "text_len": 8, "dtype": "float32"}}
    r = register_student(save(state), meta, client.create_run(exp).info.run_id, {}, {}, True, model_name="c",
                         components="copy")
    sig = _load_info(r.model_uri).signature
    assert [c.name for c in sig.inputs.inputs] == ["prompt", "steps", "seed", "height", "width"]
    assert tuple(sig.outputs.inputs[0].shape) == (-1, 3, -1, -1)
    assert "# (N, 3, H, W) images float32 in [0, 1]" in r.card and "Components: `copy`" in r.card
    model = _load(r.model_uri)
    assert model.predict(PROMPTS).shape == (2, 3, 16, 16)
    assert model.predict(pd.DataFrame({"prompt": ["a red cat"], "width": [32]})).shape == (1, 3, 16, 32)
    out = tmp_path / "x.png"
    assert generate(["--model", r.model_uri, "--prompt", "a red cat", "--out", str(out), "--seeds", "2"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and "clip(s) of shape (3, 16, 16)" in capsys.readouterr().out


def _load_info(uri):
    import mlflow

    return mlflow.models.get_model_info(uri)

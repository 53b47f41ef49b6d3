"""Wan2.2 A14B through the pipeline's steps with the one-network student (issue 14).

The project's decision (README "Wan2.2 teachers", BENCHMARKS.md "Wan2.2 A14B student: one network or two"): an
A14B teacher's student is ONE network started from the low-noise expert (``DistillConfig.moe_student="one"``, the
default). Here the steps run as plain functions on a tiny A14B checkpoint (tests/real_fixtures.py), not through
Metaflow: cache_teacher -> the distill entrypoint (in process, one rank) -> evaluate -> register_student (sqlite
MLflow) -> mlflow.pyfunc.load_model + predict -> the registered diffusers export with WanPipeline.

References are independent of the code under test: the checkpoint's own expert weights read with safetensors, the
names of a plain ``WanTransformer3DModel``, the teacher directory's model_index.json, and WanPipeline's sampler.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from pipeline_fixtures import *  # noqa: F401,F403
from real_fixtures import *  # noqa: F401,F403
from real_fixtures import diffusers, sqlite_registry, write_wan22_checkpoint  # noqa: E402
from rcm_core.config import DistillConfig  # noqa: E402

SIZE = dict(frames=5, height=16, width=16, text_len=8)
PROMPTS = ["a red cat runs", "a dog on the beach", "a big blue sky", "a small cat video"]
TINY = {"tangent_warmup_steps": 0, "lr_warmup_steps": 0, "student_update_freq": 2, "lr_student": 1e-3,
        "lr_fake": 1e-3, "activation_checkpointing": "none", "fsdp": False, "dtype": "float32"}


def _expert_state(root, sub):
    from safetensors.torch import load_file

    return load_file(str(root / sub / "diffusion_pytorch_model.safetensors"))


def _rel_dist(a, b):
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """cache -> distill (the entrypoint, in process) on a tiny A14B checkpoint; returns paths and results."""
    from rcm_steps import distill
    from rcm_steps.cache import CacheConfig, cache_teacher
    from rcm_steps.storage import Storage
    from rcm_steps.teacher import load_teacher

    base = tmp_path_factory.mktemp("a14b-dag")
    root = write_wan22_checkpoint(base / "tiny-wan22-a14b", "a14b")
    opts = {**SIZE, "dtype": "float32"}
    teacher = load_teacher(str(root), options=opts)
    cache = cache_teacher(teacher, PROMPTS, Storage(str(base / "store")),
                          CacheConfig(samples_per_prompt=1, shard_size=8, steps=2, std_min=0.0, std_max=1e9),
                          progress=False)
    out = base / "distill"
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        assert distill.main(["--teacher", str(root), "--teacher-options", json.dumps(opts), "--cache", cache.url,
                             "--out", str(out), "--iterations", "2", "--batch-size", "2", "--config", json.dumps(TINY),
                             "--ckpt-every", "2", "--device", "cpu"]) == 0
    finally:
        os.environ.update(env)
    res = json.loads((out / "result.json").read_text())
    from safetensors.torch import load_file

    ema = load_file(str(out / "student_ema.safetensors"))
    return dict(root=root, teacher=teacher, opts=opts, out=out, res=res, ema=ema, base=base)


def test_distill_trains_one_network_from_the_low_noise_expert(run):
    res, ema, root = run["res"], run["ema"], run["root"]
    assert res["student_layout"] == "one network (from low-noise expert)"
    assert res["config"]["moe_student"] == "one"
    # the EMA student has one transformer's names: those of a plain WanTransformer3DModel of the expert's config
    cfg = json.loads((root / "transformer_2" / "config.json").read_text())
    plain = diffusers.WanTransformer3DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    assert set(ema) == set(plain.state_dict())
    # started from the low-noise expert (transformer_2), not the high-noise one: after 2 small steps it is far
    # closer to the checkpoint's transformer_2 weights than to transformer's (they differ by ~30 %)
    low, high = _expert_state(root, "transformer_2"), _expert_state(root, "transformer")
    d_low, d_high = _rel_dist(ema, low), _rel_dist(ema, high)
    assert d_high > 0.1 and d_low < 0.1 * d_high, (d_low, d_high)
    assert d_low > 0                                                     # and it trained


def test_evaluate_samples_the_one_network_student(run):
    from rcm_core.sampling import sample_student
    from rcm_core.denoiser import TrigFlowDenoiser
    from rcm_core.real.loading import diffusers_rf_call
    from rcm_steps.evaluate import EvalConfig, evaluate, student_denoiser

    te, ema = run["teacher"], run["ema"]
    student = student_denoiser(te, ema)
    assert type(student.net) is diffusers.WanTransformer3DModel        # one network, no expert switch
    res = evaluate(te, student, PROMPTS[:2], EvalConfig(seeds=2, student_steps=(1, 2), teacher_steps=2, batch_size=4),
                   sigma_max=80.0, mid_t=(1.3, 1.0, 0.6))
    for k in ("student_1/latent_rmse_teacher", "student_2/fd_teacher_latent", "teacher/nfe"):
        assert k in res.metrics and res.metrics[k] == res.metrics[k], k
    # the evaluated network is the EMA student: a WanTransformer3DModel loaded from the file gives the same sample
    cfg = json.loads((run["root"] / "transformer_2" / "config.json").read_text())
    ref_net = diffusers.WanTransformer3DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    ref_net.load_state_dict(ema)
    ref = TrigFlowDenoiser(ref_net.eval(), te.param, diffusers_rf_call)
    cond = te.encode_text(PROMPTS[:1])
    noise = torch.randn((1, *te.latent_shape), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        got = sample_student(student, cond, noise, steps=1)
        want = sample_student(ref, cond, noise, steps=1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))


def test_register_bundle_pyfunc_and_export_of_the_one_network_student(run, tmp_path, monkeypatch):
    import mlflow
    import numpy as np
    import pandas as pd

    from rcm_core.export import initial_latents
    from rcm_core.sampling import sample_student
    from rcm_core.scheduler import RCMScheduler
    from rcm_steps.register import load_diffusers_pipeline, register_student

    client, exp = sqlite_registry(tmp_path, monkeypatch)
    teacher_dir = tmp_path / "t" / "tiny-wan22-a14b"
    shutil.copytree(run["root"], teacher_dir)
    te, ema, res = run["teacher"], run["ema"], run["res"]
    meta = {"teacher": str(teacher_dir), "teacher_version": "v1", "latent_shape": list(te.latent_shape),
            "default_steps": 2, "sigma_max": 80.0, "mid_t": [1.3, 1.0, 0.6], "method": "rcm",
            "teacher_options": run["opts"], "student_layout": res["student_layout"]}
    metrics = {"student_2/fd_teacher": 1.0, "student_2/latent_rmse_teacher": 0.5, "student_2/diversity_rel": 0.9}
    weights = (run["out"] / "student_ema.safetensors").read_bytes()
    r = register_student(weights, meta, client.create_run(exp).info.run_id, {"teacher": str(teacher_dir)}, metrics,
                         True, model_name="a14b-one", component_store=str(tmp_path / "store"))
    mv = client.get_model_version("a14b-one", r.version)
    root = mlflow.artifacts.download_artifacts(mv.source, dst_path=str(tmp_path / "dl"))
    got_meta = json.loads(open(os.path.join(root, "artifacts", "meta.json")).read())
    files = got_meta["teacher_bundle"]["files"]
    # the bundle carries the low-noise expert's config (and model_index.json with the boundary) for the teacher
    assert "transformer_2/config.json" in files and "model_index.json" in files
    import hashlib

    assert files["transformer_2/config.json"]["sha256"] == hashlib.sha256(
        (teacher_dir / "transformer_2" / "config.json").read_bytes()).hexdigest()
    index = json.loads((teacher_dir / "model_index.json").read_text())
    assert got_meta["boundary_ratio"] == index["boundary_ratio"] == 0.875
    assert got_meta["student_layout"] == "one network (from low-noise expert)"
    # the export: one transformer, no switch
    exp_index = json.loads(open(os.path.join(root, "artifacts", "diffusers", "model_index.json")).read())
    assert exp_index["transformer_2"] == [None, None] and exp_index["boundary_ratio"] is None
    assert not os.path.isdir(os.path.join(root, "artifacts", "diffusers", "transformer_2"))

    # the pyfunc rebuilds the one network with the EMA weights and generates
    model = mlflow.pyfunc.load_model(f"models:/a14b-one/{r.version}")
    py = model.unwrap_python_model()
    assert type(py.student.net) is diffusers.WanTransformer3DModel
    sd = py.student.net.state_dict()
    assert set(sd) == set(ema) and all(torch.equal(sd[k].float(), ema[k]) for k in ema)
    clips = model.predict(pd.DataFrame({"prompt": PROMPTS[:1], "seed": [0]}))
    assert clips.shape == (1, 3, SIZE["frames"], SIZE["height"], SIZE["width"]) and np.isfinite(clips).all()

    # the registered diffusers export loads with WanPipeline and gives the pyfunc student's samples
    pipe = load_diffusers_pipeline(f"models:/a14b-one/{r.version}", dst=str(tmp_path / "dl2"))
    assert isinstance(pipe, diffusers.WanPipeline) and pipe.transformer_2 is None
    assert isinstance(pipe.scheduler, RCMScheduler)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn((1, *te.latent_shape), generator=g, dtype=torch.float64)
    st = g.get_state()
    pipe.scheduler.set_noise_generator(g)
    out = pipe(prompt=PROMPTS[:1], latents=initial_latents(pipe, noise), num_inference_steps=2, guidance_scale=1.0,
               num_frames=SIZE["frames"], height=SIZE["height"], width=SIZE["width"], output_type="latent",
               max_sequence_length=SIZE["text_len"]).frames
    pipe.scheduler.set_noise_generator(None)
    g.set_state(st)
    ref = sample_student(py.student, py.teacher.encode_text(PROMPTS[:1]), noise, steps=2, generator=g)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))


def test_student_layout_switch_and_lora(run):
    """moe_student="two" keeps both experts (the trainer's copy of the teacher's TimestepExperts); "one" with LoRA is
    refused at config time (the adapters sit on the teacher's own network: both experts)."""
    from rcm_core.teachers import check_student_layout, student_networks

    te = run["teacher"]
    s, f, layout = student_networks(te, DistillConfig.preset(te.preset, **TINY))
    assert s is f is te.net.transformer_2 and layout == "one network (from low-noise expert)"
    s, f, layout = student_networks(te, DistillConfig.preset(te.preset, moe_student="two", **TINY))
    assert s is None and f is None and layout.startswith("two experts")
    with pytest.raises(ValueError, match="moe_student='two'"):
        check_student_layout(DistillConfig(lora={"rank": 2}), experts=2)
    assert check_student_layout(DistillConfig(lora={"rank": 2}, moe_student="two"), experts=2).startswith("two")
    assert check_student_layout(DistillConfig(lora={"rank": 2}), experts=1) is None
    with pytest.raises(ValueError, match="moe_student"):
        DistillConfig(moe_student="three").validate()


def test_two_expert_student_through_distill_and_register(run, tmp_path, monkeypatch):
    """moe_student="two": the trainer copies both experts; the registered pyfunc rebuilds both from the export's
    transformer/ and transformer_2/ (each the distilled expert's weights) and generates."""
    import mlflow
    import numpy as np
    import pandas as pd

    from rcm_steps import distill
    from rcm_steps.register import register_student

    caches = [p for p in (run["base"] / "store").rglob("manifest.json")]
    assert len(caches) == 1
    out = tmp_path / "distill2"
    assert distill.main(["--teacher", str(run["root"]), "--teacher-options", json.dumps(run["opts"]),
                         "--cache", str(caches[0].parent), "--out", str(out), "--iterations", "2", "--batch-size", "2",
                         "--config", json.dumps({**TINY, "moe_student": "two"}), "--ckpt-every", "2",
                         "--device", "cpu"]) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["student_layout"].startswith("two experts")
    from safetensors.torch import load_file

    ema = load_file(str(out / "student_ema.safetensors"))
    low, high = _expert_state(run["root"], "transformer_2"), _expert_state(run["root"], "transformer")
    assert set(ema) == {f"transformer.{k}" for k in high} | {f"transformer_2.{k}" for k in low}
    assert _rel_dist({k: ema[f"transformer.{k}"] for k in high}, high) < 0.1       # each expert from its own

    client, exp = sqlite_registry(tmp_path, monkeypatch)
    te = run["teacher"]
    meta = {"teacher": str(run["root"]), "teacher_version": "v1", "latent_shape": list(te.latent_shape),
            "default_steps": 1, "sigma_max": 80.0, "mid_t": [1.3, 1.0, 0.6], "method": "rcm",
            "teacher_options": run["opts"]}
    r = register_student((out / "student_ema.safetensors").read_bytes(), meta, client.create_run(exp).info.run_id,
                         {}, {}, True, model_name="a14b-two", component_store=str(tmp_path / "store"))
    model = mlflow.pyfunc.load_model(f"models:/a14b-two/{r.version}")
    py = model.unwrap_python_model()
    assert py.meta["student_layout"].startswith("two experts") and py.meta["boundary_ratio"] == 0.875
    net = py.student.net
    assert hasattr(net, "experts") and net.boundary_timestep == 875.0
    sd = net.state_dict()
    assert set(sd) == set(ema) and all(torch.equal(sd[k].float(), ema[k]) for k in ema)
    clips = model.predict(pd.DataFrame({"prompt": PROMPTS[:1], "seed": [0]}))
    assert clips.shape == (1, 3, SIZE["frames"], SIZE["height"], SIZE["width"]) and np.isfinite(clips).all()

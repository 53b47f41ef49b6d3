"""The distilled student where people use it: diffusers export, the model registry, the generate CLI.

A tiny random Wan2.1 checkpoint (tests/real_fixtures.py) is distilled for 2 rCM steps on the CPU in
float64, the EMA student is exported as a ``WanPipeline`` directory with ``RCMScheduler``, and the
pipeline's latents (``output_type="latent"``) are compared with the project's sampler
(``rcm_core.sampling.sample_student`` on the EMA denoiser, an independent code path) for 1, 2 and 4
steps, from the same noise draws. Also: the single-file transformer, components by reference, the
Cosmos2 pipeline, the errors for bad input, and a registered version's export and model card (sqlite
MLflow), the pyfunc on the CPU and the generate CLI (MP4, GIF without ffmpeg).
"""
from __future__ import annotations

import io
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from pipeline_fixtures import *  # noqa: F401,F403
from real_fixtures import *  # noqa: F401,F403
from real_fixtures import diffusers, sqlite_registry  # noqa: E402

from rcm_core.config import DistillConfig  # noqa: E402
from rcm_core.export import ExportError, export_student, initial_latents, load_pipeline  # noqa: E402
from rcm_core.real import load_teacher_from_path  # noqa: E402
from rcm_core.sampling import sample_student  # noqa: E402
from rcm_core.scheduler import RCMScheduler  # noqa: E402
from rcm_core.trainer import RCMTrainer  # noqa: E402

# WanPipeline wants height and width in multiples of 16 (latents 3 x 8 x 8 with the tiny VAE)
SIZE = dict(frames=5, height=16, width=16, text_len=8)
PROMPT = ["a red cat runs"]
NAME = "rcm-student-tiny-wan"


@pytest.fixture(scope="module")
def distilled(wan_dir, tmp_path_factory):
    """Two rCM training steps of the tiny Wan teacher on the CPU in float64; the EMA student exported."""
    te = load_teacher_from_path(wan_dir, dtype=torch.float64, **SIZE)
    cfg = DistillConfig.preset(te.preset, method="rcm", dtype="float64", tangent_warmup_steps=0,
                               student_update_freq=2, batch_size=2, iterations=2, lr_student=1e-3, lr_fake=1e-3,
                               lr_warmup_steps=0, activation_checkpointing="none")
    tr = RCMTrainer(te, cfg)
    cond = te.encode_text(["a red cat runs", "a dog on the beach"])
    g = torch.Generator().manual_seed(0)
    batch = dict(latents=torch.randn(2, *te.latent_shape, generator=g), cond=cond, uncond=te.negative_embedding())
    for _ in range(2):
        tr.train_step(batch)
    ema = {k: v.detach().clone() for k, v in tr.ema_state_dict().items()}
    teacher_sd = te.net.state_dict()
    assert all(v.dtype == torch.float64 for v in ema.values())
    assert any((ema[k] - teacher_sd[k]).abs().max() > 0 for k in ema)          # the student moved
    out = tmp_path_factory.mktemp("export") / "wan-rcm"
    res = export_student(ema, wan_dir, out, sigma_max=cfg.sigma_max, mid_t=cfg.mid_t, steps=4, guidance=tr.guidance,
                         teacher_name="tiny-wan")
    return SimpleNamespace(te=te, tr=tr, cfg=cfg, ema=ema, res=res, out=out)


def _load64(cls, path, **kw):
    """``cls.from_pretrained`` in float64 throughout: diffusers keeps Wan's time embedder, norms and
    modulation tables in float32 for every dtype but float32 (``_keep_in_fp32_modules``), which would round
    the student's float64 weights; for the float64 comparison that is switched off."""
    with pytest.MonkeyPatch.context() as mp:
        for m in ("WanTransformer3DModel", "CosmosTransformer3DModel"):
            mp.setattr(getattr(diffusers, m), "_keep_in_fp32_modules", None)
        return cls.from_pretrained(str(path), dtype=torch.float64, **kw)


@pytest.fixture(scope="module")
def pipe64(distilled):
    path = distilled.out
    pipe = _load64(diffusers.WanPipeline, path, scheduler=RCMScheduler.from_pretrained(str(path), subfolder="scheduler"))
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float64}
    return pipe


def _run(pipe, steps, **kw):
    kw.setdefault("height", SIZE["height"])
    kw.setdefault("width", SIZE["width"])
    return pipe(num_inference_steps=steps, guidance_scale=1.0, num_frames=SIZE["frames"], output_type="latent",
                max_sequence_length=SIZE["text_len"], **kw).frames


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_wan_pipeline_reproduces_the_project_sampler(distilled, pipe64, steps):
    pipe, den, cfg = pipe64, distilled.tr.ema_denoiser(), distilled.cfg
    cond, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=SIZE["text_len"])
    # the pipeline's text path is the project's (its encoder pads to text_len and zeroes the padding alike)
    torch.testing.assert_close(cond, distilled.te.encode_text(PROMPT).double(), rtol=0, atol=1e-6)
    shape = (1, *distilled.te.latent_shape)
    kw = dict(sigma_max=cfg.sigma_max, mid_t=cfg.mid_t, steps=steps)

    # 1. the exact start: latents = initial_latents(noise); renoising continues the same generator
    g = torch.Generator().manual_seed(5)
    noise0 = torch.randn(shape, generator=g, dtype=torch.float64)
    state = g.get_state()
    lat = initial_latents(pipe, noise0).float()          # WanPipeline holds its initial latents in float32
    pipe.scheduler.set_noise_generator(g)
    out = _run(pipe, steps, prompt=PROMPT, latents=lat)
    g_ref = torch.Generator()
    g_ref.set_state(state)
    noise = lat.double() / pipe.scheduler.init_noise_sigma   # the noise whose start the pipeline got
    ref = sample_student(den, cond, noise, generator=g_ref, **kw)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))

    # 2. the pipeline's own noise from its generator: the sampler from noise eps * (cos t0 + sin t0)
    g = torch.Generator().manual_seed(7)
    pipe.scheduler.set_noise_generator(g)
    out2 = _run(pipe, steps, prompt=PROMPT, generator=g, height=64, width=64)    # the pipeline's VAE factor is 8
    g_ref = torch.Generator().manual_seed(7)
    eps = torch.randn(out2.shape, generator=g_ref, dtype=torch.float32)
    ref2 = sample_student(den, cond, eps.double() / pipe.scheduler.init_noise_sigma, generator=g_ref, **kw)
    torch.testing.assert_close(out2, ref2, rtol=0, atol=1e-12 * float(ref2.abs().max()))

    # 3. trainer.generate's float64 noise: equal up to the float32 rounding of the pipeline's start
    gen = distilled.tr.generate(cond, steps=steps, seed=11)
    g = torch.Generator().manual_seed(11)
    noise0 = torch.randn(shape, generator=g, dtype=torch.float64)
    pipe.scheduler.set_noise_generator(g)
    out3 = _run(pipe, steps, prompt_embeds=cond, latents=initial_latents(pipe, noise0))
    torch.testing.assert_close(out3, gen, rtol=0, atol=1e-5 * float(gen.abs().max()))
    pipe.scheduler.set_noise_generator(None)


def test_export_files_single_file_and_auto_loaded_scheduler(distilled):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out, res = distilled.out, distilled.res
    for rel in ("model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                "scheduler/scheduler_config.json", "text_encoder/model.safetensors", "tokenizer/tokenizer.json",
                "vae/diffusion_pytorch_model.safetensors", "README.md", "rcm_export.json",
                "rcm-student-tiny-wan.safetensors"):
        assert (out / rel).is_file(), rel
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["scheduler"] == ["rcm_core.scheduler", "RCMScheduler"]
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "RCMScheduler" and sched["sigma_max"] == 80.0
    # the "wan2.1-1.3b" preset's mid times: the release's (NVlabs/rcm rcm/inference/wan2pt1_t2v_rcm_infer.py)
    assert sched["mid_t"] == [1.5, 1.4, 1.0] and sched["num_inference_steps"] == 4 and sched["prediction_type"] == "flow"
    weights = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(weights) == set(distilled.ema) and all(torch.equal(weights[k], v) for k, v in distilled.ema.items())
    info = json.loads((out / "rcm_export.json").read_text())
    assert info["guidance_scale"] == 1.0 and info["distilled_guidance"] == 5.0
    assert info["components"]["mode"] == "copy" and set(info["components"]["copied"]) == {"text_encoder", "tokenizer",
                                                                                            "vae"}
    card = (out / "README.md").read_text()
    for s in ("tiny-wan", "guidance_scale=1.0", "weight 5", "RCMScheduler", "sigma_max 80", "[1.5, 1.4, 1.0]",
              "WanPipeline.from_pretrained", "initial_latents", "rcm-student-tiny-wan.safetensors"):
        assert s in card, s

    # single file: the original Wan2.1 tensor names, which diffusers' from_single_file (and ComfyUI) read
    sf = res.single_file
    with safe_open(sf, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {"head.head.weight", "head.modulation", "blocks.0.modulation", "blocks.0.self_attn.q.weight",
            "blocks.0.cross_attn.o.weight", "blocks.0.norm3.weight", "blocks.0.ffn.0.weight", "time_embedding.0.weight",
            "text_embedding.2.weight", "time_projection.1.weight", "patch_embedding.weight"} <= keys
    assert len(keys) == len(distilled.ema) and not any(k.startswith(("condition_embedder", "proj_out")) for k in keys)
    assert json.loads(meta["rcm.sampler"]) == {"sigma_max": 80.0, "mid_t": [1.5, 1.4, 1.0], "steps": 4}
    m = diffusers.WanTransformer3DModel.from_single_file(sf, config=str(out), subfolder="transformer",
                                                         local_files_only=True, torch_dtype=torch.float64)
    sd = m.state_dict()
    assert set(sd) == set(distilled.ema) and all(torch.equal(sd[k], v) for k, v in distilled.ema.items())

    # no scheduler= needed once rcm_core.scheduler is imported: diffusers resolves model_index's entry
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe).__name__ == "WanPipeline" and isinstance(pipe.scheduler, RCMScheduler)
    # 1000 tan t / (1 + tan t) at t = arctan 80 and the mid times 1.5, 1.4, 1.0
    assert pipe.scheduler.timesteps.tolist() == pytest.approx([987.654, 933.781, 852.895, 608.979], abs=1e-3)


def test_components_by_reference_come_from_the_teacher(distilled, wan_dir, tmp_path):
    out = tmp_path / "ref"
    res = export_student(distilled.ema, wan_dir, out, sigma_max=80.0, mid_t=distilled.cfg.mid_t, steps=2,
                         components="reference", teacher_name="tiny-wan", single_file=False)
    assert not (out / "text_encoder").exists() and not (out / "vae").exists() and res.single_file is None
    assert set(res.info["components"]["referenced"]) == {"text_encoder", "tokenizer", "vae"}
    with pytest.raises(ExportError, match=r"component 'text_encoder' is not in the export .* components_dir"):
        load_pipeline(out)
    pipe = load_pipeline(out, components_dir=wan_dir)
    full = load_pipeline(distilled.out)
    assert pipe.scheduler.num_inference_steps == 2
    outs = []
    for p in (pipe, full):
        g = torch.Generator().manual_seed(3)
        noise = torch.randn((1, *distilled.te.latent_shape), generator=g, dtype=torch.float64)
        p.scheduler.set_noise_generator(g)
        outs.append(_run(p, 2, prompt=PROMPT, latents=initial_latents(p, noise)))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_cosmos2_export_with_the_edm_scheduler(cosmos_dir, tmp_path):
    """Cosmos2TextToImagePipeline holds EDM latents x0 + sigma eps; RCMScheduler(prediction_type="edm").
    The pipeline casts the transformer output to float32 (``noise_pred.float()``): float32 tolerance."""
    from rcm_core.denoiser import TrigFlowDenoiser
    from rcm_core.real.loading import _ensure_cosmos_resize

    _ensure_cosmos_resize()
    te = load_teacher_from_path(cosmos_dir, frames=1, height=16, width=16, text_len=8, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in te.net.state_dict().items()}
    res = export_student(state, cosmos_dir, tmp_path / "cosmos", teacher_name="tiny-cosmos", guidance=te.guidance)
    assert res.pipeline_class == "Cosmos2TextToImagePipeline" and res.info["scheduler"]["prediction_type"] == "edm"
    te.net.load_state_dict(state)
    den = TrigFlowDenoiser(te.net, te.param, te.call)

    class NoSafetyChecker:            # cosmos_guardrail is not installed; latents only
        def to(self, *a, **k):
            return self

    pipe = _load64(diffusers.Cosmos2TextToImagePipeline, res.path, safety_checker=NoSafetyChecker())
    assert isinstance(pipe.scheduler, RCMScheduler)
    cond, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=8)
    for steps in (1, 2, 4):
        g = torch.Generator().manual_seed(5)
        noise0 = torch.randn((1, 4, 1, 8, 8), generator=g, dtype=torch.float64)
        st = g.get_state()
        lat = initial_latents(pipe, noise0).float()
        pipe.scheduler.set_noise_generator(g)
        out = pipe(prompt_embeds=cond, num_inference_steps=steps, guidance_scale=1.0, height=16, width=16,
                   latents=lat, output_type="latent").images
        g_ref = torch.Generator()
        g_ref.set_state(st)
        noise = lat.double() * pipe.scheduler.config.sigma_max / pipe.scheduler.init_noise_sigma
        ref = sample_student(den, cond, noise, steps=steps, generator=g_ref)[:, :, 0]
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


def test_bad_input_is_named(distilled, wan_dir, tmp_path):
    # a teacher whose pipeline class the exporter does not know: names the teacher and what is missing
    odd = tmp_path / "odd-teacher"
    shutil.copytree(wan_dir, odd)
    index = json.loads((odd / "model_index.json").read_text())
    (odd / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanImageToVideoPipeline"}))
    with pytest.raises(ExportError, match=r"teacher 'my-odd-teacher'.*pipeline class 'WanImageToVideoPipeline'.*"
                                          r"unknown to the exporter; known: \['Cosmos2TextToImagePipeline', "
                                          r"'WanPipeline'\]. Missing: how WanImageToVideoPipeline calls"):
        export_student(distilled.ema, odd, tmp_path / "x1", teacher_name="my-odd-teacher")
    (odd / "model_index.json").unlink()
    with pytest.raises(ExportError, match=r"teacher 'my-odd-teacher'.*model_index.json is missing .*pipeline class"):
        export_student(distilled.ema, odd, tmp_path / "x2", teacher_name="my-odd-teacher")
    with pytest.raises(ExportError, match=r"teacher 'embedded': it has no diffusers pipeline directory"):
        export_student(distilled.ema, None, tmp_path / "x3", teacher_name="embedded")
    bad = dict(distilled.ema)
    bad.pop("proj_out.bias")
    with pytest.raises(ExportError, match=r"do not match the teacher's transformer/config.json .*1 missing"):
        export_student(bad, wan_dir, tmp_path / "x4", teacher_name="tiny-wan")
    with pytest.raises(ExportError, match="num_inference_steps 5 outside 1-4"):
        export_student(distilled.ema, wan_dir, tmp_path / "x5", steps=5)

    # a scheduler config with steps outside 1-4 or non-decreasing sigmas is rejected at load
    exp = tmp_path / "edited"
    shutil.copytree(distilled.out, exp)
    cfg_path = exp / "scheduler" / "scheduler_config.json"
    good = json.loads(cfg_path.read_text())
    for change, msg in (({"num_inference_steps": 5}, "num_inference_steps 5 outside 1-4"),
                        ({"num_inference_steps": 0}, "num_inference_steps 0 outside 1-4"),
                        ({"mid_t": [1.3, 1.4, 0.6]}, r"sigmas must strictly decrease.*t\[2\]=1.4 is not below t\[1\]=1.3"),
                        ({"sigma_max": 1.0}, r"sigmas must strictly decrease.*sigma_max 1 \(t=0.785398\)"),
                        ({"mid_t": [1.3, 1.0, -0.1]}, "sigmas must strictly decrease.*every time must lie in")):
        cfg_path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=msg):
            RCMScheduler.from_pretrained(str(exp), subfolder="scheduler")
        with pytest.raises(ValueError, match=msg):
            diffusers.WanPipeline.from_pretrained(str(exp))
    sched = RCMScheduler(**{k: good[k] for k in ("sigma_max", "mid_t", "num_inference_steps")})
    with pytest.raises(ValueError, match="5 inference steps; this student samples in 1 to 4 steps"):
        sched.set_timesteps(5)
    with pytest.raises(ValueError, match="0 inference steps"):
        sched.set_timesteps(0)


def test_registered_version_carries_export_and_model_card(distilled, wan_dir, tmp_path, monkeypatch, capsys):
    """register_student on a real teacher: the diffusers export is an artifact of the model version, the
    description is the model card, the pyfunc serves on the CPU (no GPU here), load_diffusers_pipeline gives
    the pipeline from the registry, and the generate CLI writes MP4 (GIF without ffmpeg)."""
    import mlflow
    import numpy as np
    import pandas as pd
    from safetensors.torch import save

    import rcm_steps.evaluate as E
    from rcm_steps import generate
    from rcm_steps.register import load_diffusers_pipeline, register_student

    client, exp = sqlite_registry(tmp_path, monkeypatch)
    teacher = tmp_path / "t" / "tiny-wan"
    shutil.copytree(wan_dir, teacher)
    opts = {**SIZE, "dtype": "float32"}
    meta = {"teacher": str(teacher), "teacher_version": "v7", "latent_shape": list(distilled.te.latent_shape),
            "default_steps": 2, "sigma_max": 80.0, "mid_t": [1.3, 1.0, 0.6], "method": "rcm", "teacher_options": opts}
    metrics = {"teacher/nfe": 100, "teacher/sec_per_sample": 2.5, "student_1/nfe": 1, "student_1/fd_teacher": 3.25,
               "student_2/nfe": 2, "student_2/fd_teacher": 1.5, "student_2/latent_rmse_teacher": 0.25,
               "student_2/diversity_rel": 0.9, "student_2/speedup": 41.0}
    lineage = {"metaflow.flow": "RCMDistillFlow", "metaflow.run_id": "1234", "teacher": str(teacher),
               "teacher_version": "v7", "data_hash": "abcdef", "method": "rcm"}
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 4), (200, 10, 10)).save(buf, format="PNG")
    weights = save({k: v.float().contiguous() for k, v in distilled.ema.items()})

    # a teacher whose pipeline class is unknown is refused before any version exists
    odd = tmp_path / "t" / "odd"
    shutil.copytree(wan_dir, odd)
    idx = json.loads((odd / "model_index.json").read_text())
    (odd / "model_index.json").write_text(json.dumps({**idx, "_class_name": "SomePipeline"}))
    with pytest.raises(ExportError, match="pipeline class 'SomePipeline'"):
        register_student(weights, {**meta, "teacher": str(odd)}, client.create_run(exp).info.run_id, lineage, metrics,
                         True, model_name=NAME, component_store=str(tmp_path / "store"))
    assert not client.search_model_versions(f"name='{NAME}'")

    run_id = client.create_run(exp).info.run_id
    r = register_student(weights, meta, run_id, lineage, metrics, True, model_name=NAME,
                         component_store=str(tmp_path / "store"), sample_grid=buf.getvalue())
    uri = f"models:/{NAME}/{r.version}"
    mv = client.get_model_version(NAME, r.version)
    card = mv.description
    assert len(card) <= 5000 and card == r.card
    assert "registered as: candidate, champion (first version that passes the gates)" in card
    for s in (f"# {NAME} v{r.version}", "rCM few-step student of **tiny-wan**", str(teacher), "## Teacher lineage",
              "metaflow.run_id: 1234", "data_hash: abcdef", "teacher version: v7", "steps: 2 by default",
              "sigma_max 80", "guidance_scale=1.0", "weight 5", "| model |", "| student_2 | 2 |", "1.5",
              "samples_grid.png", f"mlflow.pyfunc.load_model({uri!r})", f'load_diffusers_pipeline("{uri}")',
              "RCMScheduler", "# (N, 3, F, H, W) videos float32 in [0, 1]",
              f"Components: `reference` - the teacher's text encoder, tokenizer and VAE are fetched by sha256 from "
              f"content store {tmp_path / 'store'}", "python -m rcm_steps.register export --model"):
        assert s in card, s
    # the signature: prompt, steps, seed and the size -> videos (N, 3, F, H, W); an input example with the size
    sig = mlflow.models.get_model_info(uri).signature
    assert [(c.name, c.type.name, c.required) for c in sig.inputs.inputs] == [
        ("prompt", "string", True), ("steps", "long", False), ("seed", "long", False), ("frames", "long", False),
        ("height", "long", False), ("width", "long", False)]
    assert tuple(sig.outputs.inputs[0].shape) == (-1, 3, -1, -1, -1)
    from rcm_steps.register import register_card

    md = register_card(r)                                   # the register step's Metaflow card
    for s in (f"# Registered: {NAME} v{r.version}", f"`models:/{NAME}@champion`", "Components: `reference`",
              f"pipe = load_diffusers_pipeline({uri!r})", f"python -m rcm_steps.register export --model {uri} --out DIR",
              "# (N, 3, F, H, W) videos float32 in [0, 1]", "--out x.mp4"):
        assert s in md, s
    root = mlflow.artifacts.download_artifacts(mv.source, dst_path=str(tmp_path / "dl"))
    import os

    arts = {os.path.relpath(os.path.join(b, f), root).replace(os.sep, "/") for b, _, fs in os.walk(root) for f in fs}
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
                "transformer/diffusion_pytorch_model.safetensors", f"{NAME}.safetensors", "README.md",
                "samples_grid.png", "rcm_export.json"):
        assert f"artifacts/diffusers/{rel}" in arts, rel
    assert not any("text_encoder" in a for a in arts)                   # components by reference
    assert not any(a.endswith("student_ema.safetensors") for a in arts)  # the export holds the weights
    info = json.loads(open(os.path.join(root, "artifacts", "diffusers", "rcm_export.json")).read())
    assert info["components"]["registry"]["mode"] == "reference" and info["scheduler"]["num_inference_steps"] == 2
    example = json.loads(open(os.path.join(root, "input_example.json")).read())
    assert dict(zip(example["columns"], example["data"][0])) == {"prompt": "a red fox runs through snow", "steps": 2,
                                                                  "seed": 0, "frames": 5, "height": 16, "width": 16}
    with safe_open_meta(os.path.join(root, "artifacts", "diffusers", f"{NAME}.safetensors")) as dtypes:
        assert dtypes == {"BF16"}                                       # the single file in bf16

    # the pyfunc: CPU and float32 here; its sampler on the same noise as the registry's diffusers pipeline
    model = mlflow.pyfunc.load_model(uri)
    py = model.unwrap_python_model()
    assert py.device == "cpu" and py.student.dtype == torch.float32
    clips = model.predict(pd.DataFrame({"prompt": PROMPT, "seed": [0]}))
    assert clips.shape == (1, 3, 5, 16, 16) and np.isfinite(clips).all()
    other = model.predict(pd.DataFrame({"prompt": PROMPT, "seed": [0], "height": [32], "steps": [1]}))
    assert other.shape == (1, 3, 5, 32, 16) and np.isfinite(other).all()          # another size, as the signature says
    with pytest.raises(ValueError, match="unsupported resolution: height 17 is not a multiple of 4.*nearest valid 16"):
        model.predict(pd.DataFrame({"prompt": PROMPT, "height": [17]}))
    pipe = load_diffusers_pipeline(uri, dst=str(tmp_path / "dl2"))
    assert isinstance(pipe.scheduler, RCMScheduler) and pipe.transformer.dtype == torch.float32
    g = torch.Generator().manual_seed(2)
    noise = torch.randn((1, *distilled.te.latent_shape), generator=g, dtype=torch.float64)
    st = g.get_state()
    pipe.scheduler.set_noise_generator(g)
    out = _run(pipe, 2, prompt=PROMPT, latents=initial_latents(pipe, noise))
    g.set_state(st)
    cond = py.teacher.encode_text(PROMPT)
    ref = sample_student(py.student, cond, noise, steps=2, generator=g)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))

    # one command: the registry's version as a folder that diffusers loads alone (components copied in)
    from rcm_steps.register import main as register_cli

    folder = tmp_path / "wan-rcm-alone"
    capsys.readouterr()
    assert register_cli(["export", "--model", f"models:/{NAME}@champion", "--out", str(folder)]) == 0
    assert f"diffusers.WanPipeline.from_pretrained({str(folder)!r}) loads it alone" in capsys.readouterr().out
    for rel in ("text_encoder/model.safetensors", "tokenizer/tokenizer.json", "vae/diffusion_pytorch_model.safetensors",
                "transformer/diffusion_pytorch_model.safetensors", f"{NAME}.safetensors", "samples_grid.png"):
        assert (folder / rel).is_file(), rel
    info2 = json.loads((folder / "rcm_export.json").read_text())
    assert info2["components"]["mode"] == "copy" and info2["components"]["source"] == f"models:/{NAME}@champion"
    readme = (folder / "README.md").read_text()
    assert "WanPipeline.from_pretrained('path/to/wan-rcm-alone'" in readme and "load_pipeline(" not in readme
    assert "data_hash: abcdef" in readme and "the teacher's, copied (text_encoder, tokenizer, vae)" in readme
    alone = diffusers.WanPipeline.from_pretrained(str(folder))
    assert isinstance(alone.scheduler, RCMScheduler)
    g.set_state(st)
    alone.scheduler.set_noise_generator(g)
    torch.testing.assert_close(_run(alone, 2, prompt=PROMPT, latents=initial_latents(alone, noise)), out, rtol=0, atol=0)

    # the generate CLI: MP4, and a GIF (saying why) when there is no ffmpeg
    assert generate.main(["--model", uri, "--prompt", PROMPT[0], "--out",
                          str(tmp_path / "x.mp4"), "--steps", "1"]) == 0
    assert (tmp_path / "x.mp4").read_bytes()[4:8] == b"ftyp"
    monkeypatch.setattr(E, "ffmpeg_exe", lambda: None)
    capsys.readouterr()
    assert generate.main(["--model", uri, "--prompt", PROMPT[0], "--out",
                          str(tmp_path / "y.mp4"), "--steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "no ffmpeg" in err and f"writing {tmp_path / 'y.gif'} instead" in err
    assert (tmp_path / "y.gif").read_bytes()[:3] == b"GIF" and not (tmp_path / "y.mp4").exists()


class safe_open_meta:
    """The set of tensor dtypes in a safetensors file's header (context manager for symmetry with safe_open)."""

    def __init__(self, path):
        from rcm_core.real.loading import read_safetensors_header

        self.dtypes = {d for d, _ in read_safetensors_header(path).values()}

    def __enter__(self):
        return self.dtypes

    def __exit__(self, *exc):
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pyfunc_and_evaluate_decode_on_the_gpu(distilled, wan_dir, tmp_path, monkeypatch):
    """On a GPU the pyfunc serves in bf16 with the project attention and the fast VAE decode; evaluate's
    decode is the same fast decode (recorded in the eval settings)."""
    import mlflow
    import numpy as np
    import pandas as pd
    from safetensors.torch import save

    from rcm_core.real import uses_rcm_attention
    from rcm_steps.evaluate import EvalConfig, decode_latents, evaluate, student_denoiser
    from rcm_steps.register import register_student

    client, exp = sqlite_registry(tmp_path, monkeypatch)
    meta = {"teacher": str(wan_dir), "teacher_version": "v", "latent_shape": list(distilled.te.latent_shape),
            "default_steps": 2, "sigma_max": 80.0, "mid_t": [1.3, 1.0, 0.6], "method": "rcm",
            "teacher_options": {**SIZE, "dtype": "float32"}}
    weights = save({k: v.float().contiguous() for k, v in distilled.ema.items()})
    r = register_student(weights, meta, client.create_run(exp).info.run_id, {}, {}, True, model_name="g",
                         component_store=str(tmp_path / "store"))
    model = mlflow.pyfunc.load_model(r.model_uri)
    py = model.unwrap_python_model()
    assert py.device == "cuda" and py.student.dtype == torch.bfloat16 and uses_rcm_attention(py.student.net)
    clips = model.predict(pd.DataFrame({"prompt": PROMPT * 2, "seed": [0, 1]}))
    assert clips.shape == (2, 3, 5, 16, 16) and np.isfinite(clips).all()
    assert getattr(py.teacher.meta["codec"], "_rcm_fast_vae", None) is not None

    from rcm_steps import teacher as T

    te = T.load_teacher(str(wan_dir), options={**SIZE, "dtype": "float32"})
    lat = torch.randn(2, *te.latent_shape)
    fast, ref = decode_latents(te, lat), T.decode(te, lat)
    assert (fast - ref).abs().max() < 0.05
    res = evaluate(te, student_denoiser(te, {k: v.float() for k, v in distilled.ema.items()}), PROMPT,
                   EvalConfig(seeds=2, student_steps=(1,), teacher_steps=2))
    assert res.settings["decode"].startswith("fast_vae bf16")

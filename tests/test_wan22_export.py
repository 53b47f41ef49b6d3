"""Wan2.2 students exported as diffusers pipelines: ``WanPipeline.from_pretrained`` reproduces the project sampler.

As tests/test_export.py does for Wan2.1: two rCM steps on the CPU in float64 on a tiny Wan2.2 checkpoint
(TI2V: the Wan2.2 VAE and ``expand_timesteps``; A14B: the two-expert student, ``transformer`` and
``transformer_2`` switched at ``boundary_ratio``), the EMA student exported, the pipeline's latents
(``output_type="latent"``, RCMScheduler) compared with ``sample_student`` on the EMA denoiser at 1, 2, 4 steps.
"""
from __future__ import annotations

import json

import pytest
import torch

from real_fixtures import *  # noqa: F401,F403
from real_fixtures import diffusers, write_wan22_checkpoint  # noqa: E402
from rcm_core.config import DistillConfig  # noqa: E402
from rcm_core.export import export_student, initial_latents  # noqa: E402
from rcm_core.real import load_teacher_from_path  # noqa: E402
from rcm_core.sampling import sample_student  # noqa: E402
from rcm_core.trainer import RCMTrainer  # noqa: E402

SIZE = dict(frames=5, height=16, width=16, text_len=8)
PROMPT = ["a red cat runs"]


@pytest.fixture(scope="module", params=["ti2v", "a14b"])
def exported(request, tmp_path_factory):
    kind = request.param
    root = write_wan22_checkpoint(tmp_path_factory.mktemp("ckpt") / f"tiny-wan22-{kind}", kind)
    te = load_teacher_from_path(root, dtype=torch.float64, **SIZE)
    cfg = DistillConfig.preset(te.preset, method="rcm", dtype="float64", tangent_warmup_steps=0, student_update_freq=2,
                               batch_size=2, iterations=2, lr_student=1e-3, lr_fake=1e-3, lr_warmup_steps=0,
                               activation_checkpointing="none", fsdp=False)
    tr = RCMTrainer(te, cfg)
    g = torch.Generator().manual_seed(0)
    batch = dict(latents=torch.randn(2, *te.latent_shape, generator=g),
                 cond=te.encode_text(["a red cat runs", "a dog on the beach"]), uncond=te.negative_embedding())
    for _ in range(2):
        tr.train_step(batch)
    ema = {k: v.detach().clone() for k, v in tr.ema_state_dict().items()}
    out = tmp_path_factory.mktemp("export") / f"wan22-{kind}-rcm"
    res = export_student(ema, root, out, sigma_max=cfg.sigma_max, mid_t=cfg.mid_t, steps=4, guidance=tr.guidance,
                         teacher_name=f"tiny-wan22-{kind}")
    with pytest.MonkeyPatch.context() as mp:        # float64 throughout (see tests/test_export.py::_load64)
        mp.setattr(diffusers.WanTransformer3DModel, "_keep_in_fp32_modules", None)
        import rcm_core.scheduler  # noqa: F401  (diffusers resolves model_index's RCMScheduler entry)
        pipe = diffusers.WanPipeline.from_pretrained(str(out), dtype=torch.float64)
    return kind, te, tr, cfg, ema, res, out, pipe


def test_exported_wan22_pipeline_reproduces_the_project_sampler(exported):
    kind, te, tr, cfg, ema, res, out, pipe = exported
    from rcm_core.scheduler import RCMScheduler

    assert isinstance(pipe.scheduler, RCMScheduler)
    index = json.loads((out / "model_index.json").read_text())
    if kind == "a14b":
        assert index["boundary_ratio"] == 0.875 and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
        assert pipe.transformer_2 is not None and res.info["experts"] == ["transformer", "transformer_2"]
        assert res.info["single_file"] == "rcm-student-tiny-wan22-a14b-high-noise.safetensors"
        assert res.info["single_file_2"] == "rcm-student-tiny-wan22-a14b-low-noise.safetensors"
        assert (out / res.info["single_file"]).is_file() and (out / res.info["single_file_2"]).is_file()
        # the exported experts are the EMA student's, not the teacher's
        sd2 = pipe.transformer_2.state_dict()
        assert all(torch.equal(sd2[k], ema["transformer_2." + k]) for k in sd2)
        teacher_sd = te.net.state_dict()
        assert any(not torch.equal(v, teacher_sd[k].double()) for k, v in ema.items())   # the student moved
    else:
        assert index["expand_timesteps"] is True and pipe.transformer_2 is None
        assert res.info["teacher"]["hf_id"] is None          # a custom size: no base_model claimed
    den = tr.ema_denoiser()
    cond, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=SIZE["text_len"])
    for steps in (1, 2, 4):
        g = torch.Generator().manual_seed(5 + steps)
        noise0 = torch.randn((1, *te.latent_shape), generator=g, dtype=torch.float64)
        state = g.get_state()
        lat = initial_latents(pipe, noise0).float()
        pipe.scheduler.set_noise_generator(g)
        got = pipe(prompt=PROMPT, latents=lat, num_inference_steps=steps, guidance_scale=1.0, num_frames=SIZE["frames"],
                   height=SIZE["height"], width=SIZE["width"], output_type="latent",
                   max_sequence_length=SIZE["text_len"]).frames
        g_ref = torch.Generator()
        g_ref.set_state(state)
        ref = sample_student(den, cond, lat.double() / pipe.scheduler.init_noise_sigma, generator=g_ref,
                             sigma_max=cfg.sigma_max, mid_t=cfg.mid_t, steps=steps)
        assert got.shape == ref.shape == (1, *te.latent_shape)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    pipe.scheduler.set_noise_generator(None)

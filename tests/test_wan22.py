"""Wan2.2 teachers (issue 14, part 4) on tiny save_pretrained checkpoints (tests/real_fixtures.py), on the CPU.

References are diffusers' own: ``WanPipeline`` built from the same tiny checkpoint (``prepare_latents``' shape,
its decode path, its expert switching and its denoising loop with ``guidance_scale_2``), and closed forms.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from real_fixtures import *  # noqa: F401,F403
from real_fixtures import SMALL, SMALL22, diffusers, write_wan22_checkpoint  # noqa: E402
from rcm_core.config import DistillConfig  # noqa: E402
from rcm_core.denoiser import TimestepExperts, expert_boundary_t, high_noise_expert_at  # noqa: E402
from rcm_core.real import SPECS, RealTeacherError, load_real_teacher, load_teacher_from_path  # noqa: E402
from rcm_core.sampling import rf_schedule, sample_teacher  # noqa: E402
from rcm_core.teachers import known_teachers  # noqa: E402
from rcm_core.trigflow import t_from_rf_time  # noqa: E402

PROMPT = ["a red cat runs"]


def _pipe(root, scheduler=None, dtype=torch.float32):
    from rcm_core.real.attention import install_rcm_attention

    sched = scheduler or diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = diffusers.WanPipeline.from_pretrained(str(root), scheduler=sched, dtype=dtype)
    for name in ("transformer", "transformer_2"):
        if getattr(pipe, name, None) is not None:
            install_rcm_attention(getattr(pipe, name))     # the loader's attention: identical outputs (tested there)
    return pipe


# ---- registry, specs, preset ------------------------------------------------------------------

def test_registry_specs_and_presets():
    assert {"wan2.2-ti2v-5b", "wan2.2-t2v-a14b"} <= set(known_teachers())
    ti = SPECS["wan2.2-ti2v-5b"]
    assert (ti.frames, ti.height, ti.width, ti.fps) == (121, 704, 1280, 24)
    assert (ti.guidance, ti.shift, ti.sample_steps, ti.variant) == (5.0, 5.0, 50, "wan2.2-ti2v")
    assert ti.transformer_config["in_channels"] == 48 and ti.vae_config["z_dim"] == 48
    a = SPECS["wan2.2-t2v-a14b"]
    assert (a.guidance, a.guidance_2, a.boundary_ratio, a.shift, a.sample_steps) == (4.0, 3.0, 0.875, 12.0, 40)
    assert a.transformer_config == SPECS["wan2.1-14b"].transformer_config          # the experts are 14B-shaped
    # the 5B's transformer size from its architecture: ~5B parameters
    from rcm_core.real.specs import transformer_params
    assert 4.0e9 < transformer_params("wan", ti.transformer_config) < 5.5e9
    for name in ("wan2.2-ti2v-5b", "wan2.2-t2v-a14b"):
        cfg = DistillConfig.preset(name)
        assert cfg.fsdp and cfg.activation_checkpointing == "full"
    # real 5B latents: 121 x 704 x 1280 -> 31 x 44 x 80 (VAE 4 x 16 x 16, closed form)
    from rcm_core.real.loading import latent_shape_for
    vae = {"temperal_downsample": [False, True, True], "dim_mult": [1, 2, 4, 4], "patch_size": 2, "z_dim": 48}
    assert latent_shape_for(121, 704, 1280, vae_config=vae, transformer_config=ti.transformer_config) == (48, 31, 44, 80)
    with pytest.raises(ValueError, match=r"height 720 is not a multiple of 32 .*nearest valid 704"):
        latent_shape_for(121, 720, 1280, vae_config=vae, transformer_config=ti.transformer_config)


def test_boundary_conversion_closed_form():
    tb = expert_boundary_t(0.875)
    assert tb == pytest.approx(math.atan(7.0), abs=1e-15)                # sigma = s / (1 - s) = 7
    assert math.sin(tb) / (math.cos(tb) + math.sin(tb)) == pytest.approx(0.875, abs=1e-15)
    # the pipeline's rule `timestep >= 0.875 * 1000` at integer timesteps 874 / 875 / 876, via TrigFlow time
    t = t_from_rf_time(torch.tensor([0.874, 0.875, 0.876], dtype=torch.float64))
    assert high_noise_expert_at(t, 0.875).tolist() == [False, True, True]
    assert (t >= tb).tolist() == [False, True, True]
    with pytest.raises(ValueError, match="boundary_ratio"):
        expert_boundary_t(1.0)


# ---- TI2V-5B-shaped checkpoint ----------------------------------------------------------------

def test_ti2v_loads_with_its_own_vae_factors_and_matches_the_pipeline(wan22_dir):
    te = load_teacher_from_path(wan22_dir, **SMALL22)
    assert te.name == "tiny-wan22-ti2v" and te.preset == "wan2.2-ti2v-5b" and te.meta["variant"] == "wan2.2-ti2v"
    assert te.meta["size"] == "custom" and "custom wan2.2-ti2v size" in te.meta["preset_reason"]
    assert (te.guidance, te.shift, te.sample_steps, te.meta["fps"]) == (5.0, 5.0, 50, 24)
    assert te.meta["expand_timesteps"] and te.meta["vae_factors"] == [2, 4]
    pipe = _pipe(wan22_dir)
    # 1. the latent shape is the pipeline's own prepare_latents shape
    lat = pipe.prepare_latents(1, pipe.transformer.config.in_channels, SMALL22["height"], SMALL22["width"],
                               SMALL22["frames"], torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert tuple(lat.shape) == (1, *te.latent_shape) == (1, 6, 3, 4, 4)
    # 2. decode: the same latents give the pipeline's frames (latents * std + mean -> VAE -> postprocess)
    z = torch.randn(2, *te.latent_shape, generator=torch.Generator().manual_seed(1))
    mine = te.decode(z)
    vae = pipe.vae
    raw = z / (1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)) + torch.tensor(
        vae.config.latents_mean).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        ref = pipe.video_processor.postprocess_video(vae.decode(raw, return_dict=False)[0], output_type="pt")
    assert mine.shape == (2, 3, 5, 16, 16) and ref.shape == (2, 5, 3, 16, 16)
    torch.testing.assert_close(mine, ref.permute(0, 2, 1, 3, 4), rtol=0, atol=1e-6)
    # 3. encode: the VAE posterior mode, normalised; decode(encode(x)) is the VAE's own round trip
    pix = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2))
    enc = te.meta["codec"].encode(pix)
    with torch.no_grad():
        mode = vae.encode(pix * 2 - 1).latent_dist.mode()
    want = (mode - torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)) / torch.tensor(
        vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert enc.shape == (1, *te.latent_shape)
    torch.testing.assert_close(enc, want, rtol=1e-5, atol=1e-5)


def _pipeline_with_project_schedule(pipe, steps, shift):
    """WanPipeline on the project's Euler schedule (rf_schedule: linspace(1, 0) shifted) with float timesteps
    1000 s: FlowMatchEulerDiscreteScheduler takes the unshifted sigmas and shifts them itself."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    orig = sched.set_timesteps
    base = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1].tolist()
    sched.set_timesteps = lambda n, device=None, **kw: orig(sigmas=base, device=device)
    pipe.scheduler = sched
    return pipe


def test_ti2v_teacher_sampler_equals_wanpipeline_with_expand_timesteps(wan22_dir):
    """expand_timesteps (per-token timesteps, all equal for text-to-video) in the pipeline vs the project's
    scalar timestep: the same denoising, so the same latents (CFG 5, Euler, shift 5)."""
    te = load_teacher_from_path(wan22_dir, **SMALL22)
    pipe = _pipeline_with_project_schedule(_pipe(wan22_dir), steps=6, shift=te.shift)
    assert pipe.config.expand_timesteps
    cond, neg = pipe.encode_prompt(PROMPT, negative_prompt=[""], max_sequence_length=8)
    noise = torch.randn(1, *te.latent_shape, generator=torch.Generator().manual_seed(3))
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=neg, latents=noise.clone(), num_inference_steps=6,
               guidance_scale=te.guidance, num_frames=5, height=16, width=16, output_type="latent").frames
    ref = sample_teacher(te.denoiser(), cond, neg, noise.double(), guidance=te.guidance, shift=te.shift, steps=6,
                         solver="euler")
    assert torch.allclose(rf_schedule(6, te.shift)[:-1].float(), pipe.scheduler.sigmas[:-1], atol=1e-6)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5 * float(ref.abs().max()))


# ---- A14B-shaped checkpoint: two experts ---------------------------------------------------------

def test_a14b_loads_as_two_experts_and_is_not_wan21_14b(a14b_dir):
    te = load_teacher_from_path(a14b_dir, **SMALL)
    assert te.meta["variant"] == "wan2.2-a14b" and te.preset == "wan2.2-t2v-a14b"
    assert isinstance(te.net, TimestepExperts) and te.net.boundary_timestep == 875.0
    assert te.net.expert_guidance == (4.0, 3.0) and (te.guidance, te.meta["guidance_2"]) == (4.0, 3.0)
    sd = te.net.state_dict()
    assert any(k.startswith("transformer_2.") for k in sd) and any(k.startswith("transformer.") for k in sd)
    from rcm_core.real.specs import matching_spec
    # the expert architecture alone is Wan2.1-14B's: without the directory's evidence it would be mislabelled
    real14 = {**SPECS["wan2.1-14b"].transformer_config, "_class_name": "WanTransformer3DModel"}
    assert matching_spec(real14).name == "wan2.1-14b"
    assert matching_spec(real14, "wan2.2-a14b").name == "wan2.2-t2v-a14b"
    from rcm_steps.teacher import describe_teacher
    d = describe_teacher(str(a14b_dir), dict(SMALL, dtype="float32"))
    assert d["variant"] == "wan2.2-a14b" and d["experts"] == 2 and d["preset"] == "wan2.2-t2v-a14b"
    assert set(d["tensors"]) == {"transformer", "transformer_2", "text_encoder", "vae"}


def test_a14b_switch_matches_wanpipeline_on_its_timesteps(a14b_dir):
    """diffusers' own switching: hooks record which expert WanPipeline calls at each scheduler timestep (UniPC,
    shift 12, 40 steps); the project's TrigFlow rule at t = t(s = timestep / 1000) picks the same expert."""
    te = load_teacher_from_path(a14b_dir, **SMALL)
    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              num_train_timesteps=1000, flow_shift=12.0)
    pipe = _pipe(a14b_dir, scheduler=sched)
    calls = []
    for k, name in enumerate(("transformer", "transformer_2")):
        getattr(pipe, name).register_forward_pre_hook(
            lambda m, args, kw, k=k: calls.append((k, float(kw["timestep"].flatten()[0]))), with_kwargs=True)
    pipe(PROMPT, negative_prompt=[""], num_inference_steps=40, num_frames=5, height=16, width=16,
         max_sequence_length=8, output_type="latent", guidance_scale=4.0, guidance_scale_2=3.0)
    seen = dict(calls)                                 # cond and uncond calls agree
    assert len({(k, ts) for k, ts in calls}) == 40 and {0, 1} == {k for k, _ in calls}
    ts = torch.tensor([ts for _, ts in calls[::2]], dtype=torch.float64)
    diffusers_expert = torch.tensor([k for k, _ in calls[::2]])
    t = t_from_rf_time(ts / 1000.0)
    den = te.denoiser()
    assert (te.net.route(den.timestep(t)) == diffusers_expert).all()
    assert (high_noise_expert_at(t, 0.875) == (diffusers_expert == 0)).all()
    assert ((t >= expert_boundary_t(0.875)) == (diffusers_expert == 0)).all()
    assert seen                                         # (the dict only documents the pairs)


def test_a14b_teacher_sampler_equals_wanpipeline_with_guidance_scale_2(a14b_dir):
    """The whole A14B teacher (switch, CFG 4.0 on the high-noise expert and 3.0 on the low-noise one) against
    WanPipeline's denoising loop on the same schedule and noise."""
    te = load_teacher_from_path(a14b_dir, **SMALL | {"height": 16, "width": 16})   # WanPipeline: multiples of 16
    pipe = _pipeline_with_project_schedule(_pipe(a14b_dir), steps=8, shift=te.shift)
    cond, neg = pipe.encode_prompt(PROMPT, negative_prompt=[""], max_sequence_length=8)
    noise = torch.randn(1, *te.latent_shape, generator=torch.Generator().manual_seed(4))
    kw = dict(prompt_embeds=cond, negative_prompt_embeds=neg, num_inference_steps=8, num_frames=5, height=16,
              width=16, output_type="latent")
    out = pipe(latents=noise.clone(), guidance_scale=4.0, guidance_scale_2=3.0, **kw).frames
    ref = sample_teacher(te.denoiser(), cond, neg, noise.double(), guidance=te.guidance, shift=te.shift, steps=8,
                         solver="euler")
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5 * float(ref.abs().max()))
    # one weight for both experts differs (guidance_scale_2 matters): an overriding w applies to both
    same = pipe(latents=noise.clone(), guidance_scale=4.0, guidance_scale_2=4.0, **kw).frames
    assert (same - out).abs().max() > 1e-3
    ref44 = sample_teacher(te.denoiser(), cond, neg, noise.double(), guidance=4.5, shift=te.shift, steps=8,
                           solver="euler")
    out44 = pipe(latents=noise.clone(), guidance_scale=4.5, guidance_scale_2=4.5, **kw).frames
    torch.testing.assert_close(out44.double(), ref44, rtol=0, atol=2e-5 * float(ref44.abs().max()))


def test_experts_route_per_sample_with_tangents(a14b_dir):
    """A batch mixing both experts equals each sample run alone; the JVP through the switch is per expert."""
    te = load_teacher_from_path(a14b_dir, **SMALL | {"dtype": torch.float64})
    den = te.denoiser()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, *te.latent_shape, generator=g, dtype=torch.float64)
    c = te.encode_text(["a cat", "a dog", "the sky"]).double()
    t = torch.tensor([1.5, 0.9, 1.43], dtype=torch.float64)          # high, low, high (t_b = 1.4289)
    assert te.net.route(den.timestep(t)).tolist() == [0, 1, 0]
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out, jvp = torch.func.jvp(lambda x_, t_: den(x_, t_, c), (x, t), (dx, torch.ones_like(t)))
        for i in range(3):
            o, j = torch.func.jvp(lambda x_, t_: den(x_, t_, c[i:i + 1]), (x[i:i + 1], t[i:i + 1]),
                                  (dx[i:i + 1], torch.ones(1, dtype=torch.float64)))
            # (Wan keeps its time embedding and norms in float32 even in a float64 model: batch-size rounding)
            torch.testing.assert_close(out[i:i + 1], o, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(jvp[i:i + 1], j, rtol=1e-5, atol=1e-5)
        expert = te.net.transformer_2 if i == 1 else te.net.transformer
    # sample 1 is the low-noise expert's output alone
    from rcm_core.denoiser import TrigFlowDenoiser
    from rcm_core.real.loading import diffusers_rf_call
    lone = TrigFlowDenoiser(te.net.transformer_2, te.param, diffusers_rf_call)
    with torch.no_grad():
        torch.testing.assert_close(den(x[1:2], t[1:2], c[1:2]), lone(x[1:2], t[1:2], c[1:2]), rtol=0, atol=0)
    assert expert is te.net.transformer


def test_a14b_activation_checkpointing_reaches_both_experts(a14b_dir):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from rcm_core.parallel import ParallelConfig, parallelize

    te = load_teacher_from_path(a14b_dir, **SMALL)
    import copy
    net = parallelize(copy.deepcopy(te.net), ParallelConfig(activation_checkpointing="full"))
    assert all(isinstance(b, CheckpointWrapper) for e in net.experts for b in e.blocks)
    assert len(net.blocks) == 4


# ---- bad input: clear errors naming the file and field ------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit(path, **kv):
    cfg = json.loads(path.read_text())
    cfg.update(kv)
    path.write_text(json.dumps(cfg))


def test_bad_wan22_directories_are_rejected_naming_the_file(wan22_dir, a14b_dir, tmp_path):
    from rcm_steps.teacher import describe_teacher

    opts = dict(SMALL22, dtype="float32")
    bad = _copy(wan22_dir, tmp_path / "zdim")
    _edit(bad / "vae" / "config.json", z_dim=4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    with pytest.raises(RealTeacherError, match=r"vae.config\.json: z_dim 4 does not match .*transformer.config\.json "
                                               r"in_channels 6"):
        describe_teacher(str(bad), opts)
    bad = _copy(wan22_dir, tmp_path / "scale")
    _edit(bad / "vae" / "config.json", scale_factor_spatial=16)
    with pytest.raises(RealTeacherError, match=r"vae.config\.json: scale_factor_spatial 16 does not match the VAE's "
                                               r"architecture .* give 4"):
        describe_teacher(str(bad), opts)
    bad = _copy(wan22_dir, tmp_path / "novae")
    (bad / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(RealTeacherError, match=r"missing weights in .*novae.vae: expected diffusion_pytorch_model"):
        describe_teacher(str(bad), opts)
    # expand_timesteps (the TI2V pipeline) with a Wan2.1 VAE
    bad = _copy(a14b_dir, tmp_path / "expand")
    shutil.rmtree(bad / "transformer_2")
    _edit(bad / "model_index.json", boundary_ratio=None, transformer_2=[None, None], expand_timesteps=True)
    with pytest.raises(RealTeacherError, match=r"model_index\.json: expand_timesteps is true .* Wan2.1 VAE"):
        describe_teacher(str(bad), dict(SMALL, dtype="float32"))
    # A14B: a missing expert, a missing boundary, experts of different architectures
    opts = dict(SMALL, dtype="float32")
    bad = _copy(a14b_dir, tmp_path / "noexpert")
    shutil.rmtree(bad / "transformer_2")
    with pytest.raises(RealTeacherError, match=r"missing .*noexpert.transformer_2.config\.json \(transformer_2 config"):
        describe_teacher(str(bad), opts)
    bad = _copy(a14b_dir, tmp_path / "noratio")
    _edit(bad / "model_index.json", boundary_ratio=None)
    with pytest.raises(RealTeacherError, match=r"model_index\.json: transformer_2 .* boundary_ratio is null"):
        describe_teacher(str(bad), opts)
    bad = _copy(a14b_dir, tmp_path / "arch")
    _edit(bad / "transformer_2" / "config.json", ffn_dim=48)
    with pytest.raises(RealTeacherError, match=r"transformer_2.config\.json does not match transformer/config\.json: "
                                               r"ffn_dim 48 \(transformer: 32\)"):
        describe_teacher(str(bad), opts)
    bad = _copy(a14b_dir, tmp_path / "shard")
    (bad / "transformer_2" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(RealTeacherError, match=r"transformer_2.diffusion_pytorch_model\.safetensors: .*too short"):
        describe_teacher(str(bad), opts)
    # a registered name never takes a checkpoint of another generation
    with pytest.raises(RealTeacherError, match=r"a wan2.2-a14b checkpoint, teacher 'wan2.1-14b' is wan2.1 "
                                               r"\(model_index.json lists transformer_2"):
        load_real_teacher("wan2.1-14b", weights=a14b_dir, **SMALL)
    with pytest.raises(RealTeacherError, match=r"a wan2.2-ti2v checkpoint, teacher 'wan2.1-1.3b' is wan2.1"):
        load_real_teacher("wan2.1-1.3b", weights=wan22_dir, **SMALL22)

"""Real teachers through diffusers (issue 4), on tiny random checkpoints written by the tests.

Nothing is downloaded: the tests build tiny Wan2.1 / Cosmos-Predict2 transformers, a tiny
UMT5 / T5 encoder, an offline WordLevel tokenizer and a tiny Wan VAE, save them in diffusers
layout with ``save_pretrained`` and load them back through the project's loader.
"""
from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch

from real_fixtures import *  # noqa: E402,F401,F403
from real_fixtures import SMALL, TEXT_DIM, WORDS, diffusers, tiny_cosmos, tiny_wan, transformers  # noqa: E402
from rcm_core.config import DistillConfig  # noqa: E402
from rcm_core.denoiser import TrigFlowDenoiser  # noqa: E402
from rcm_core.real import (SPECS, WAN_NEGATIVE_PROMPT, RealTeacherError, cosmos_call, diffusers_rf_call,  # noqa: E402
                           estimate_memory, install_rcm_attention, pick_context_parallel, load_real_teacher, load_teacher_from_path,
                           uses_rcm_attention)
from rcm_core.teachers import get_teacher, known_teachers  # noqa: E402
from rcm_core.trainer import RCMTrainer  # noqa: E402


# ---- registry and specs ------------------------------------------------------------------

def test_registry_entries_and_specs():
    for name in ("wan2.1-1.3b", "wan2.1-14b", "cosmos-predict2-2b", "cosmos-predict2-14b"):
        assert name in known_teachers()
    w = SPECS["wan2.1-1.3b"]
    assert (w.transformer_class, w.text_encoder_class, w.vae_class) == ("WanTransformer3DModel", "UMT5EncoderModel",
                                                                        "AutoencoderKLWan")
    assert (w.guidance, w.shift, w.solver, w.sample_steps, w.frames, w.height) == (5.0, 5.0, "unipc", 50, 81, 480)
    assert w.negative_prompt == WAN_NEGATIVE_PROMPT and WAN_NEGATIVE_PROMPT.startswith("色调艳丽")
    assert (w.param_kind, w.timestep_scale, w.preset) == ("rf", 1000.0, "wan2.1-1.3b")
    assert SPECS["wan2.1-14b"].preset == "wan2.1-14b"
    c = SPECS["cosmos-predict2-2b"]
    assert (c.transformer_class, c.text_encoder_class, c.guidance, c.task, c.preset) == (
        "CosmosTransformer3DModel", "T5EncoderModel", 4.5, "t2i", "cosmos-predict2")
    assert (c.param_kind, c.timestep_scale) == ("rf", 1.0)
    for s in SPECS.values():
        DistillConfig.preset(s.preset)
        assert hasattr(diffusers, s.transformer_class) and hasattr(transformers, s.text_encoder_class)


def test_missing_weights_error_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("RCM_WEIGHTS_ROOT", str(tmp_path / "models"))
    with pytest.raises(RealTeacherError) as e:
        get_teacher("wan2.1-1.3b")
    msg = str(e.value)
    assert "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in msg
    assert "transformer/" in msg and "RCM_WEIGHTS_WAN2_1_1_3B" in msg and str(tmp_path / "models") in msg
    with pytest.raises(ValueError, match="known teachers: .*cosmos-predict2-2b.*wan2.1-14b"):
        get_teacher("wan2.2")


def test_weights_found_in_hf_cache_offline(wan_dir, tmp_path, monkeypatch):
    from rcm_core.real import resolve_weights
    repo = tmp_path / "hub" / "models--Wan-AI--Wan2.1-T2V-14B-Diffusers"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(wan_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("RCM_WEIGHTS_ROOT", raising=False)
    monkeypatch.delenv("RCM_WEIGHTS_WAN2_1_14B", raising=False)
    assert resolve_weights(SPECS["wan2.1-14b"]) == snap


# ---- attention processors: same outputs, JVP, no SDPA ----------------------------------------

def _inputs(family, dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 3 if family == "wan" else 1, 4, 6, generator=g).to(dtype)
    c = torch.randn(2, 5, TEXT_DIM, generator=g).to(dtype)
    t = torch.tensor([300.0, 800.0] if family == "wan" else [0.3, 0.8], dtype=dtype)
    return x, c, t


@pytest.mark.parametrize("family", ["wan", "cosmos"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_processor_matches_stock_and_avoids_sdpa(family, dtype, tol, monkeypatch):
    stock = (tiny_wan() if family == "wan" else tiny_cosmos()).to(dtype)
    call = diffusers_rf_call if family == "wan" else cosmos_call
    x, c, t = _inputs(family, dtype)
    calls = {"n": 0}
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **k):
        calls["n"] += 1
        return real_sdpa(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        ref = call(stock, x, t, c)
        assert calls["n"] > 0                      # the stock model does use SDPA (the counter works)
        calls["n"] = 0
        assert install_rcm_attention(stock) == 4 and uses_rcm_attention(stock)
        out = call(stock, x, t, c)
    assert calls["n"] == 0
    assert ref.abs().max() > 0.1
    assert (out - ref).abs().max() <= tol * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("family", ["wan", "cosmos"])
def test_whole_model_jvp_matches_finite_differences(family):
    net = (tiny_wan() if family == "wan" else tiny_cosmos()).double()
    install_rcm_attention(net)
    call = diffusers_rf_call if family == "wan" else cosmos_call
    x, c, t = _inputs(family, torch.float64)
    g = torch.Generator().manual_seed(7)
    dx, dc = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(c.shape, generator=g, dtype=torch.float64)
    dt = torch.tensor([40.0, -25.0] if family == "wan" else [0.04, -0.025], dtype=torch.float64)
    f = lambda x_, c_, t_: call(net, x_, t_, c_)  # noqa: E731
    with torch.no_grad():
        out, jvp = torch.func.jvp(f, (x, c, t), (dx, dc, dt))
        h = 1e-3
        fd = (f(x + h * dx, c + h * dc, t + h * dt) - f(x - h * dx, c - h * dc, t - h * dt)) / (2 * h)
    # Both keep parts (time embedding, norms) in fp32 even in an fp64 model (stack notes): the step must
    # stay ~1e-3 and the check reaches ~1e-4 (Wan) / ~1e-6 (Cosmos) relative, not fp64 precision
    rel = float((jvp - fd).norm() / fd.norm())
    assert rel < (1e-3 if family == "wan" else 1e-5), rel


def test_cosmos_preconditioning_is_rf_with_unit_timestep_scale():
    """Closed form: the Cosmos2 pipeline's EDM wrapper at sigma = tan t equals our TrigFlow 'rf' wrapper."""
    net = tiny_cosmos().double()
    install_rcm_attention(net)
    den = TrigFlowDenoiser(net, SPECS["cosmos-predict2-2b"].param_kind, cosmos_call)
    den.param = type(den.param)("rf", SPECS["cosmos-predict2-2b"].timestep_scale)
    x0, c, _ = _inputs("cosmos", torch.float64)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor([0.4, 1.2], dtype=torch.float64)
    x_t = torch.cos(t).view(-1, 1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1, 1) * eps
    with torch.no_grad():
        ours = den.x0(x_t, t, c)
        # pipeline_cosmos2_text2image: latents = x0 + sigma eps; current_t = sigma / (sigma + 1);
        # c_in = c_skip = 1 - current_t; c_out = -current_t; transformer at timestep current_t
        sigma = torch.tan(t).view(-1, 1, 1, 1, 1)
        latents = x_t / torch.cos(t).view(-1, 1, 1, 1, 1)
        cur = sigma / (sigma + 1)
        pred = cosmos_call(net, latents * (1 - cur), cur.flatten(), c)
        theirs = (1 - cur) * latents + (-cur) * pred
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


# ---- loading ----------------------------------------------------------------------------

def test_load_by_path_detects_architecture_and_installs_attention(wan_dir, cosmos_dir):
    te = get_teacher(str(wan_dir))                                    # --teacher <dir>
    from rcm_steps.teacher import UnknownTeacherError, is_known_teacher, load_teacher
    assert is_known_teacher(str(wan_dir)) and not is_known_teacher(str(wan_dir / "transformer"))
    assert load_teacher(str(wan_dir)).name == "tiny-wan"              # the pipeline's resolver takes paths too
    with pytest.raises(UnknownTeacherError, match="has no model_index.json.*pass the checkpoint's top directory"):
        load_teacher(str(wan_dir / "transformer"))
    # a custom size: named after its directory, the family's sampler, the preset of the nearest known size
    assert te.name == "tiny-wan" and te.preset == "wan2.1-1.3b" and te.guidance == 5.0
    assert te.meta["size"] == "custom" and te.meta["preset_reason"].startswith("custom wan2.1 size")
    assert isinstance(te.net, diffusers.WanTransformer3DModel) and uses_rcm_attention(te.net)
    assert te.latent_shape == (4, 41, 240, 416)                        # 81 x 480 x 832 with the tiny VAE (x2)
    assert te.negative_prompt == WAN_NEGATIVE_PROMPT and len(te.version) == 12
    tc = load_teacher_from_path(cosmos_dir, **SMALL | {"frames": 1})
    assert tc.name == "tiny-cosmos" and tc.preset == "cosmos-predict2" and tc.latent_shape == (4, 1, 4, 4)
    assert uses_rcm_attention(tc.net) and tc.param.timestep_scale == 1.0
    emb = tc.encode_text(["a red cat", "the blue sky"])
    assert emb.shape == (2, 8, TEXT_DIM) and (emb[0, 4:] == 0).all() and emb[0, :4].abs().sum() > 0
    x = torch.randn(1, *tc.latent_shape)
    assert tc.denoiser()(x.double(), torch.tensor([0.7]), emb[:1]).shape == x.shape
    img = tc.decode(x)
    assert img.shape == (1, 3, 8, 8) and img.min() >= 0 and img.max() <= 1


def test_registry_name_loads_from_env_and_checks_config(wan_dir, monkeypatch):
    monkeypatch.setenv("RCM_WEIGHTS_WAN2_1_1_3B", str(wan_dir))
    with pytest.raises(RealTeacherError, match=r"does not match teacher 'wan2.1-1.3b': num_attention_heads=2 "
                                               r"\(expected 12\)"):
        get_teacher("wan2.1-1.3b")                                    # tiny config is not the real 1.3B
    with pytest.raises(RealTeacherError, match="expects 'CosmosTransformer3DModel'"):
        load_real_teacher("cosmos-predict2-2b", weights=wan_dir)


def test_bad_checkpoints_are_rejected_clearly(wan_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(wan_dir, bad)
    (bad / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(RealTeacherError, match=r"missing weights in .*vae: expected diffusion_pytorch_model"):
        load_teacher_from_path(bad, **SMALL)
    shutil.rmtree(bad)
    shutil.copytree(wan_dir, bad)
    (bad / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(RealTeacherError, match="missing tokenizer"):
        load_teacher_from_path(bad, **SMALL)
    shutil.rmtree(bad)
    shutil.copytree(wan_dir, bad)
    cfg = json.loads((bad / "transformer" / "config.json").read_text())
    cfg["ffn_dim"] = 48                                                # config no longer matches the weights
    (bad / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RealTeacherError, match=r"shape mismatches, e.g. .*checkpoint \(32, 32\) vs config \(48, 32\)"):
        load_teacher_from_path(bad, **SMALL)
    cfg["_class_name"] = "FluxTransformer2DModel"
    (bad / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RealTeacherError, match="not a supported teacher architecture"):
        get_teacher(str(bad))
    (bad / "transformer" / "config.json").write_text("{not json")
    with pytest.raises(RealTeacherError, match="not valid JSON"):
        load_teacher_from_path(bad, **SMALL)


def test_long_prompt_truncated_with_warning(wan_dir):
    te = load_teacher_from_path(wan_dir, **SMALL)
    with pytest.warns(UserWarning, match="truncated to 8 tokens"):
        emb = te.encode_text([" ".join(WORDS)])
    assert emb.shape == (1, 8, TEXT_DIM)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert te.encode_text(["a cat"]).shape == (1, 8, TEXT_DIM)
    assert te.negative_embedding().shape == (1, 8, TEXT_DIM)        # the Chinese prompt maps to <unk>s here


def test_resolution_rejected_with_nearest_valid_size(wan_dir):
    with pytest.raises(ValueError, match=r"height 9 is not a multiple of 4.*nearest valid 8.*frames 6 is not 2k\+1"):
        load_teacher_from_path(wan_dir, frames=6, height=9, width=8, text_len=8, dtype=torch.float32)
    from rcm_core.real import check_resolution
    with pytest.raises(ValueError, match=r"width 830 is not a multiple of 16 \(VAE x patch\); nearest valid 832"):
        check_resolution(81, 480, 830, vae_config={"temperal_downsample": [False, True, True]},
                         transformer_config={"patch_size": [1, 2, 2]})
    check_resolution(81, 480, 832, vae_config={"temperal_downsample": [False, True, True]},
                     transformer_config={"patch_size": [1, 2, 2]})


def test_decode_to_pixels(wan_dir):
    te = load_teacher_from_path(wan_dir, **SMALL)
    codec = te.meta["codec"]
    vid = te.decode(torch.randn(1, *te.latent_shape))
    assert vid.shape == (1, 3, 5, 8, 8) and 0 <= float(vid.min()) and float(vid.max()) <= 1
    z = codec.encode(torch.rand(1, 3, 5, 8, 8))
    assert z.shape == (1, *te.latent_shape)


def test_memory_estimate_raises_with_settings_that_fit():
    small = estimate_memory("wan2.1-1.3b", 1, 81, 480, 832, torch.bfloat16, gpus=8, context_parallel=1)
    assert small["fits"] and 1.2e9 < small["params"] < 1.6e9 and small["tokens_per_sample"] == 21 * 30 * 52
    # calibrated against the H100/H200 measurements (60.0-62.1 GiB peak; every measured run is checked in
    # tests/test_memory_calibration.py): on the safe side, within +16 %
    assert 62.1 <= small["gib_per_gpu"] <= 1.16 * 62.1
    # replicated training state: a 14B teacher does not fit however many GPUs; the error says why and what would
    with pytest.raises(MemoryError, match=r"wan2.1-14b: estimated .* GiB per GPU .* gpus=8, context_parallel=1.*"
                                          r"full replica.*fsdp=True.*gpus=\d+, context_parallel"):
        estimate_memory("wan2.1-14b", 1, 81, 480, 832, torch.bfloat16, gpus=8)
    with pytest.raises(MemoryError, match=r"Settings that would fit: batch=1 .*gpus=1"):
        estimate_memory("wan2.1-1.3b", 4, 81, 480, 832, torch.bfloat16, gpus=1)
    # the smallest CP degree that fits, dividing the GPUs, heads and tokens (8 x 80 GiB: only without the
    # foreach AdamW's group-sized temporary)
    with pytest.raises(MemoryError, match=r"wan2.1-14b: estimated .* gpus=8, context_parallel=8"):
        pick_context_parallel("wan2.1-14b", 1, 81, 480, 832, torch.bfloat16, gpus=8, gpu_memory_gib=80,
                              heads=40, tokens=32760)
    pick = pick_context_parallel("wan2.1-14b", 1, 81, 480, 832, torch.bfloat16, gpus=8, gpu_memory_gib=80,
                                 heads=40, tokens=32760, optimizer_foreach=False)
    assert pick["fits"] and pick["context_parallel"] in (1, 2, 4, 8)
    smaller = [c for c in (1, 2, 4, 8) if c < pick["context_parallel"]]
    for c in smaller:
        assert not estimate_memory("wan2.1-14b", 1, 81, 480, 832, torch.bfloat16, gpus=8, context_parallel=c,
                                   sharded=True, raise_if_too_big=False, optimizer_foreach=False)["fits"]
    big = estimate_memory("wan2.1-14b", 1, 81, 480, 832, torch.bfloat16, gpus=8, context_parallel=4,
                          raise_if_too_big=False, sharded=True)
    assert 13e9 < big["params"] < 15e9
    with pytest.raises(MemoryError, match=r"Settings that would fit: .*gpus=\d+, context_parallel=\d+"):
        estimate_memory("wan2.1-14b", 4, 81, 480, 832, torch.bfloat16, gpus=1, sharded=True)
    # Cosmos-Predict2 2B: replicated it is over 80 GiB (its preset shards with FSDP2, which fits)
    assert not estimate_memory("cosmos-predict2-2b", 1, 1, 768, 1360, "bfloat16", gpus=8, context_parallel=1,
                               raise_if_too_big=False)["fits"]
    cos = estimate_memory("cosmos-predict2-2b", 1, 1, 768, 1360, "bfloat16", gpus=8, context_parallel=1, sharded=True)
    assert cos["fits"] and cos["tokens_per_sample"] == 48 * 85


# ---- training on the tiny Wan teacher ---------------------------------------------------------

@pytest.mark.parametrize("method", ["scm", "rcm"])
def test_trainer_two_steps_on_tiny_wan(wan_dir, method):
    te = load_teacher_from_path(wan_dir, **SMALL)
    cfg = DistillConfig.preset(te.preset, method=method, dtype="float32", tangent_warmup_steps=0,
                               student_update_freq=2, batch_size=2, iterations=2, lr_student=1e-3, lr_fake=1e-3,
                               lr_warmup_steps=0)
    tr = RCMTrainer(te, cfg)
    assert uses_rcm_attention(tr.student.net) and (tr.fake is None or uses_rcm_attention(tr.fake.net))
    cond = te.encode_text(["a red cat runs", "a dog on the beach"])
    batch = dict(latents=torch.randn(2, *te.latent_shape), cond=cond, uncond=te.negative_embedding())
    before = [p.detach().clone() for p in tr.student.parameters()]
    ms = [tr.train_step(batch) for _ in range(2)]
    for m in ms:
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
    assert ms[0]["kind"] == "student" and (method == "scm" or ms[1]["kind"] == "critic")
    assert any((a - b).abs().max() > 0 for a, b in zip(before, tr.student.parameters()))


@pytest.mark.parametrize("which", ["wan", "cosmos"])
def test_bf16_autocast_step_with_project_attention(wan_dir, cosmos_dir, which):
    """Under bf16 autocast the project attention gets q/k and v in one dtype (Cosmos' q/k norms return
    fp32 while v is bf16; the stock SDPA casts them itself): a bf16 training step runs on both."""
    te = load_teacher_from_path(wan_dir if which == "wan" else cosmos_dir, **(SMALL if which == "wan" else SMALL | {"frames": 1}))
    cfg = DistillConfig.preset(te.preset, method="scm", dtype="bfloat16", tangent_warmup_steps=0, batch_size=1,
                               iterations=1, lr_warmup_steps=0, activation_checkpointing="none", fsdp=False)
    tr = RCMTrainer(te, cfg)
    batch = dict(latents=torch.randn(1, *te.latent_shape), cond=te.encode_text(["a red cat runs"]),
                 uncond=te.negative_embedding())
    with torch.profiler.profile() as prof:
        m = tr.train_step(batch)
    assert m["skipped"] == 0 and math.isfinite(m["loss_cm"]) and m["nan_masked"] == 0
    # every RMSNorm call (Wan's q/k norms: fp32 master weight, bf16 input) runs on the fused kernel
    names = [e.name for e in prof.events()]
    assert names.count("aten::rms_norm") == names.count("aten::_fused_rms_norm")
    if which == "wan":
        from rcm_core.nets.norms import uses_matched_norms
        assert names.count("aten::rms_norm") > 0 and uses_matched_norms(tr.student.net)


def test_plan_mesh_picks_the_smallest_context_parallel_degree_that_fits():
    from rcm_steps.teacher import plan_mesh
    cfg = lambda n: {**SPECS[n].transformer_config, "_class_name": SPECS[n].transformer_class}   # as in describe_teacher
    info = {"transformer_config": cfg("wan2.1-14b"), "frames": 81, "height": 480, "width": 832}
    mesh = plan_mesh(info, global_batch=8, gpus=8, gpu_memory_gib=80, sharded=True, micro_batch=1)
    assert mesh["fits"] and 40 % mesh["context_parallel"] == 0 and 8 % mesh["context_parallel"] == 0
    assert mesh["data_parallel"] * mesh["context_parallel"] == 8
    # 14B full fine-tuning on 8 x 80 GiB fits only with the per-tensor AdamW: the plan says so
    assert mesh["optimizer_foreach"] is False
    for cp in (1, 2, 4, 8):                                  # nothing smaller fits
        if cp < mesh["context_parallel"]:
            with pytest.raises(MemoryError):
                plan_mesh(info, 8, 8, 80, sharded=True, micro_batch=1, context_parallel=cp, optimizer_foreach=False)
    # asked for the foreach AdamW: kept, and nothing fits 8 x 80 GiB
    with pytest.raises(MemoryError, match="Settings that would fit: .*gpus=16"):
        plan_mesh(info, 8, 8, 80, sharded=True, micro_batch=1, optimizer_foreach=True)
    # on 8 x 141 GiB (H200) the default AdamW fits: left as it is
    assert plan_mesh(info, 8, 8, 141, sharded=True, micro_batch=1)["optimizer_foreach"] is None
    # 1.3B fits one 80 GiB GPU replicated: no CP; a given degree is only checked
    small = {**info, "transformer_config": cfg("wan2.1-1.3b")}
    assert plan_mesh(small, 1, 1, 80)["context_parallel"] == 1
    assert plan_mesh(small, 4, 4, 80, sharded=True, context_parallel=2)["data_parallel"] == 2
    with pytest.raises(MemoryError, match="Settings that would fit"):
        plan_mesh(info, 8, 1, 80, sharded=True)              # 14B on one GPU: nothing fits


def test_plan_run_puts_what_the_plan_chose_in_the_config():
    """The flow's start (rcm_steps.teacher.plan_run): Wan2.1-14B full fine-tuning on one node of 8 GPUs."""
    from rcm_steps.distill import build_config
    from rcm_steps.teacher import plan_run

    def plan(config, gib):          # as the flow's start builds the run's config: preset, method, batch 64
        return plan_run(info, build_config("wan2.1-14b", "rcm", None, 64, 0, config), config, 8, gib)

    info = {"preset": "wan2.1-14b", "frames": 81, "height": 480, "width": 832,
            "transformer_config": {**SPECS["wan2.1-14b"].transformer_config, "_class_name": "WanTransformer3DModel"}}
    # 8 x 80 GiB: only CP8 with the per-tensor AdamW fits; both are written into the run's config
    est, config, notes = plan({"micro_batch": 1}, 80)
    assert config == {"micro_batch": 1, "optimizer_foreach": False, "context_parallel": 8}
    assert est["fits"] and est["gib_per_gpu"] <= 80 and any("per-tensor AdamW" in n for n in notes)
    # 8 x 141 GiB: the foreach AdamW and no CP fit; nothing is added
    est, config, notes = plan({"micro_batch": 1}, 141)
    assert config == {"micro_batch": 1} and est["context_parallel"] == 1 and len(notes) == 1
    # what the user set is kept and only checked
    with pytest.raises(MemoryError):
        plan({"micro_batch": 1, "optimizer_foreach": True}, 80)
    est, config, _ = plan({"micro_batch": 1, "optimizer_foreach": False, "context_parallel": 8}, 80)
    assert config == {"micro_batch": 1, "optimizer_foreach": False, "context_parallel": 8}
    # LoRA: fits 8 x 80 GiB with the default AdamW and no CP
    _, config, _ = plan({"micro_batch": 1, "lora": {"rank": 64}}, 80)
    assert "optimizer_foreach" not in config and "context_parallel" not in config

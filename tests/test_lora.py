"""LoRA distillation (rcm_core/lora.py, DistillConfig.lora): student and fake score as adapters on one frozen
teacher network.

Expected values never come from the code under test: the LoRA layer against its closed form written out
here, tangents and adapter gradients against float64 central finite differences, the student at init
against the teacher's own untouched network, the export against diffusers/peft's own LoRA layers
(``load_lora_adapter`` / ``WanPipeline.load_lora_weights``), resume against the uninterrupted run.
"""
import json
import math

import pytest
import torch
from torch.autograd import forward_ad as fwAD

from rcm_core.config import DistillConfig, LoRAConfig
from rcm_core.denoiser import Parameterization, TrigFlowDenoiser
from rcm_core.lora import EMA, FAKE, STUDENT, LoRALinear, use_adapter
from rcm_core.teachers import Teacher
from rcm_core.trainer import RCMTrainer
from spawn_ranks import end_rank

D = torch.float64
RF = Parameterization("rf", 1000.0)


def _embedded_teacher(seed=0):
    from rcm_core.embedded.dit import VideoDiT, VideoDiTConfig
    torch.manual_seed(seed)
    net = VideoDiT(VideoDiTConfig(dim=24, heads=2, layers=2, ffn_dim=48, text_dim=16, freq_dim=16))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return Teacher(name="tiny-embedded", version="t", net=net.double().eval(), param=RF, latent_shape=(1, 2, 4, 4),
                   guidance=2.0)


def _wan_teacher():
    from real_fixtures import tiny_wan

    from rcm_core.real import diffusers_rf_call, install_rcm_attention
    net = tiny_wan()
    install_rcm_attention(net)
    return Teacher(name="tiny-wan", version="t", net=net.double().eval(), param=RF, latent_shape=(4, 2, 4, 4),
                   guidance=2.0, call=diffusers_rf_call)


def _cfg(**kw):
    base = dict(method="rcm", dtype="float64", tangent_warmup_steps=0, lr_warmup_steps=0, student_update_freq=2,
                lr_student=1e-2, lr_fake=1e-2, activation_checkpointing="full", lora={"rank": 2, "alpha": 3.0})
    return DistillConfig.preset("embedded", **{**base, **kw})


def _batch(teacher, b=2, text=(5, 16), seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(b, *teacher.latent_shape, generator=g, dtype=D),
            "cond": torch.randn(b, *text, generator=g, dtype=D), "uncond": torch.zeros(1, *text, dtype=D)}


def _randomise_adapters(tr, scale=0.3, seed=5):
    """Non-zero B (and A) so that the adapters change the network (at init B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in tr.student.net.named_parameters():
            if ".lora_" in _:
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _xt(teacher, b=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *teacher.latent_shape, generator=g, dtype=D)
    t = torch.tensor([0.4, 1.1], dtype=D)[:b]
    return x, t, torch.randn(b, 5, 16, generator=g, dtype=D)


# ---- the layer and the configuration --------------------------------------------------------------------
def test_lora_layer_is_its_closed_form_and_switches():
    from rcm_core.lora import add_adapters
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double()
    W, b = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    layers = add_adapters(net, LoRAConfig(rank=2, alpha=6.0, target_modules=("0",)), ["a", "b"], seed=0)
    assert layers == ["0"] and isinstance(net[0], LoRALinear) and type(net[2]) is torch.nn.Linear
    assert list(net.state_dict())[:2] == ["0.weight", "0.bias"]           # base names unchanged
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net[0].lora_B.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D))
    x = torch.randn(3, 6, generator=g, dtype=D)
    for name in ("a", "b"):
        A, B = net[0].lora_A[name].weight, net[0].lora_B[name].weight
        expected = x @ W.T + b + 3.0 * (x @ A.T) @ B.T                   # alpha / rank = 3
        with use_adapter(net, name):
            assert torch.allclose(net[0](x), expected, atol=1e-13)
    assert torch.allclose(net[0](x), x @ W.T + b, atol=1e-14)            # no adapter active: the base layer


def test_config_round_trip_and_bad_values():
    c = DistillConfig.preset("embedded", lora={"rank": 8, "target_modules": ["q", "k"]})
    assert c.lora == LoRAConfig(rank=8, target_modules=("q", "k")) and c.lora.scaling == 1.0
    assert DistillConfig.from_dict(c.to_dict()).lora == c.lora
    assert DistillConfig.preset("embedded").lora is None                 # default: full fine-tuning
    with pytest.raises(ValueError, match="unknown DistillConfig.lora keys"):
        DistillConfig.preset("embedded", lora={"rnak": 8})
    with pytest.raises(ValueError, match="dropout"):
        DistillConfig.preset("embedded", lora={"rank": 8, "dropout": 0.1})
    with pytest.raises(ValueError, match="rank must be an integer"):
        DistillConfig.preset("embedded", lora={"rank": 0})


# ---- bad input at construction ------------------------------------------------------------------------
def test_bad_targets_rank_and_architecture_are_refused_at_construction():
    te = _embedded_teacher()
    with pytest.raises(ValueError, match=r"match no module.*blocks\.0\.self_attn\.q"):
        RCMTrainer(te, _cfg(lora={"rank": 2, "target_modules": ["to_q"]}))
    with pytest.raises(ValueError, match=r"rank=25 is larger than layer 'blocks\.0\.self_attn\.q'.*<= 24"):
        RCMTrainer(te, _cfg(lora={"rank": 25, "target_modules": ["q"]}))
    with pytest.raises(ValueError, match="is a GELU"):
        RCMTrainer(te, _cfg(lora={"rank": 2, "target_modules": ["ffn.1"]}))
    other = _embedded_teacher().net
    other.blocks = other.blocks[:1]                                      # one block fewer
    with pytest.raises(ValueError, match="student_net .* another architecture than the teacher"):
        RCMTrainer(te, _cfg(), student_net=other)
    with pytest.raises(ValueError, match="fake_net has the teacher's architecture but other weights"):
        RCMTrainer(te, _cfg(), fake_net=_embedded_teacher(seed=1).net)


def test_wan_architecture_mismatch_is_refused():
    pytest.importorskip("diffusers")
    from real_fixtures import tiny_wan
    te = _wan_teacher()
    with pytest.raises(ValueError, match="another architecture than the teacher"):
        RCMTrainer(te, _cfg(), student_net=tiny_wan(num_layers=1).double())
    with pytest.raises(ValueError, match=r"match no module of WanTransformer3DModel.*attn1\.to_q"):
        RCMTrainer(te, _cfg(lora={"rank": 2, "target_modules": ["self_attn.q"]}))


# ---- init, tangent, gradients ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["embedded", "wan"])
def test_student_fake_and_ema_start_exactly_equal_to_the_teacher(which):
    if which == "wan":
        pytest.importorskip("diffusers")
    te = _embedded_teacher() if which == "embedded" else _wan_teacher()
    ref = TrigFlowDenoiser(te.net, te.param, te.call)                   # the caller's untouched teacher network
    tr = RCMTrainer(te, _cfg())
    x, t, c = _xt(te)
    want = ref(x, t, c)
    for den in (tr.teacher, tr.student, tr.fake, tr.ema_denoiser()):
        assert torch.equal(den(x, t, c), want)
    assert sum(p.numel() for p in tr.student.parameters()) < 0.2 * sum(p.numel() for p in te.net.parameters())
    assert not any(isinstance(m, LoRALinear) for m in te.net.modules())  # the caller's network is not modified


def test_tangent_matches_finite_differences_fused_and_separate():
    te = _embedded_teacher()
    tr = RCMTrainer(te, _cfg())
    _randomise_adapters(tr)
    x, t, c = _xt(te)
    g = torch.Generator().manual_seed(3)
    F_T = torch.randn(x.shape, generator=g, dtype=D)
    cs = torch.cos(t) * torch.sin(t)
    dx = cs[:, None, None, None, None] * F_T
    h = 1e-5
    with torch.no_grad():
        fd = (tr.student(x + h * dx, t + h * cs, c) - tr.student(x - h * dx, t - h * cs, c)) / (2 * h)
        teacher_only = tr.teacher(x, t, c)
    F_sep, J_sep = tr.tangent(x, t, F_T, c)
    F_fused, _, J_fused = tr.student_with_tangent(x, t, F_T, c)
    # the embedded DiT computes its time embedding in float32 (by design): the t-part of a difference
    # quotient carries that round-off; the x-part alone is checked to float64 accuracy below
    for J in (J_sep, J_fused):
        assert float((J - fd).norm() / fd.norm()) < 2e-5
    with torch.no_grad():
        fd_x = (tr.student(x + h * dx, t, c) - tr.student(x - h * dx, t, c)) / (2 * h)
    with torch.no_grad(), fwAD.dual_level():
        J_x = fwAD.unpack_dual(tr.student(fwAD.make_dual(x, dx), t, c)).tangent
    assert float((J_x - fd_x).norm() / fd_x.norm()) < 1e-8
    assert torch.allclose(F_sep, F_fused.detach(), atol=1e-12)
    assert not torch.allclose(F_sep, teacher_only)                       # the adapter is in the tangent's network


@pytest.mark.parametrize("ac", ["full", "keep_attention"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "dual-inputs"])
def test_adapter_gradients_match_finite_differences_across_adapter_switches(fused, ac, monkeypatch):
    """Grad of sum(w * F_student) w.r.t. student adapter entries, with activation checkpointing, while the
    teacher and the fake score run between the forward and the backward (the recomputation must see the
    student's adapter; with keep_attention also the student's kept attention outputs, through PyTorch's SDPA so
    that the selective checkpointing keeps them): against central differences."""
    if ac == "keep_attention":
        monkeypatch.setenv("RCM_ATTN_PRIMAL", "sdpa")
    te = _embedded_teacher()
    tr = RCMTrainer(te, _cfg(activation_checkpointing=ac))
    _randomise_adapters(tr)
    x, t, c = _xt(te)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=D)
    F_T = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=D)
    if fused:
        F, _, _ = tr.student_with_tangent(x, t, F_T, c)                  # dual inputs: the _Recompute path
    else:
        F = tr.student(x, t, c)
    with torch.no_grad():
        tr.teacher(x, t, c), tr.fake(x, t, c)                            # other adapters active in between
    params = dict(tr.student.net.named_parameters())
    (F * w).sum().backward()
    grads = {n: p.grad for n, p in params.items() if p.grad is not None}
    assert grads and all(f".{STUDENT}." in n for n in grads)          # only the student's adapter gets gradients
    h = 1e-6
    for name in sorted(grads)[:: max(1, len(grads) // 6)]:
        p = params[name]
        for idx in [(0, 0), (p.shape[0] - 1, p.shape[1] - 1)]:
            with torch.no_grad():
                old = p[idx].item()
                p[idx] = old + h
                up = float((tr.student(x, t, c) * w).sum())
                p[idx] = old - h
                dn = float((tr.student(x, t, c) * w).sum())
                p[idx] = old
            assert grads[name][idx].item() == pytest.approx((up - dn) / (2 * h), rel=1e-6, abs=1e-8), (name, idx)


# ---- training steps and resume ---------------------------------------------------------------------------
def _snapshot(net):
    return {n: p.detach().clone() for n, p in net.state_dict().items()}


def _changed(before, after):
    return {n for n in before if not torch.equal(before[n], after[n])}


def test_student_and_critic_steps_change_only_their_adapters():
    te = _embedded_teacher()
    tr = RCMTrainer(te, _cfg())
    batch = _batch(te)
    s0 = _snapshot(tr.student.net)
    m = tr.train_step(batch)
    assert m["kind"] == "student" and "loss_dmd" in m                  # sCM + DMD (uses teacher and fake score)
    s1 = _snapshot(tr.student.net)
    ch = _changed(s0, s1)
    assert ch and all(f".{STUDENT}." in n or f".{EMA}." in n for n in ch)
    assert any(f".lora_B.{STUDENT}." in n for n in ch)
    m = tr.train_step(batch)
    assert m["kind"] == "critic"
    ch = _changed(s1, _snapshot(tr.student.net))
    assert ch and all(f".{FAKE}." in n for n in ch)
    base = {n for n in s0 if ".lora_" not in n}
    assert base == set(te.net.state_dict())                              # the base is the teacher's, bit-identical
    assert all(torch.equal(tr.student.net.state_dict()[n], te.net.state_dict()[n]) for n in base)


@pytest.mark.parametrize("fmt", ["file", "dcp"])
def test_checkpoint_resume_is_bit_identical(tmp_path, fmt):
    te = _embedded_teacher()
    batch = _batch(te)
    tr = RCMTrainer(te, _cfg())
    for _ in range(3):
        tr.train_step(batch)
    url = str(tmp_path / ("ck.pt" if fmt == "file" else "ck.dcp"))
    tr.save_checkpoint(url, format=fmt)
    if fmt == "file":                                                    # adapters only: no base weight saved
        saved = torch.load(url, weights_only=False)
        assert all(".lora_" in k for part in ("student", "fake") for k in saved[part])
        assert all(f".lora_A.{EMA}." in k or f".lora_B.{EMA}." in k for k in saved["ema"]["module"])
    tr2 = RCMTrainer(te, _cfg())
    tr2.load_checkpoint(url)
    for _ in range(3):                                                   # student, critic, student
        a, b = tr.train_step(batch), tr2.train_step(batch)
        assert a["loss"] == b["loss"]
    s, s2 = tr.student.net.state_dict(), tr2.student.net.state_dict()
    assert all(torch.equal(s[k], s2[k]) for k in s)
    assert tr.ema.num_updates == tr2.ema.num_updates
    with pytest.raises(ValueError, match="LoRA and full checkpoints do not load"):
        RCMTrainer(te, _cfg(lora=None)).load_checkpoint(url)
    with pytest.raises(ValueError, match="lora="):
        RCMTrainer(te, _cfg(lora={"rank": 1})).load_checkpoint(url)


# ---- export ---------------------------------------------------------------------------------------
def test_export_loads_into_diffusers_and_matches_the_ema_student(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from real_fixtures import tiny_encoder, tiny_tokenizer, tiny_vae, tiny_wan
    from safetensors.torch import load

    from rcm_core.checkpoint import ema_safetensors, lora_safetensors
    from rcm_core.real import diffusers_rf_call
    te = _wan_teacher()
    tr = RCMTrainer(te, _cfg())
    tr.train_step(_batch(te, text=(6, 16)))
    _randomise_adapters(tr, scale=0.2)                                   # make the EMA adapter clearly non-zero
    x, t, _ = _xt(te)
    c = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(8), dtype=D)
    timestep = 1000 * torch.sin(t) / (torch.cos(t) + torch.sin(t))
    ema = tr.ema_denoiser()
    with torch.no_grad(), use_adapter(ema.net, EMA):
        want = diffusers_rf_call(ema.net, x, timestep, c)
        base_out = diffusers_rf_call(tiny_wan().double(), x, timestep, c)
    assert not torch.allclose(want, base_out, atol=1e-6)

    data = lora_safetensors(tr)
    sd = load(data)
    assert sd and all(k.startswith("transformer.blocks.") and (k.endswith(".lora_A.weight") or
                                                              k.endswith(".lora_B.weight")) for k in sd)
    net = tiny_wan().double()                                            # a fresh diffusers model, stock attention
    net.load_lora_adapter(sd, prefix="transformer", adapter_name="rcm")
    with torch.no_grad():
        got = diffusers_rf_call(net, x, timestep, c)
    assert float((got - want).abs().max()) < 1e-10, float((got - want).abs().max())

    path = tmp_path / "student_lora.safetensors"                         # the pipeline loader, from the file
    path.write_bytes(data)
    pipe = diffusers.WanPipeline(tokenizer=tiny_tokenizer(), text_encoder=tiny_encoder("umt5"),
                                 transformer=tiny_wan().double(), vae=tiny_vae(),
                                 scheduler=diffusers.UniPCMultistepScheduler())
    pipe.load_lora_weights(str(path), adapter_name="rcm")
    with torch.no_grad():
        got = diffusers_rf_call(pipe.transformer, x, timestep, c)
    assert float((got - want).abs().max()) < 1e-10, float((got - want).abs().max())

    merged = tiny_wan().double()                                         # merged weights: the teacher's names
    merged.load_state_dict(load(ema_safetensors(tr, expected_keys=te.net.state_dict().keys())))
    with torch.no_grad():
        assert torch.allclose(diffusers_rf_call(merged.double(), x, timestep, c), want, rtol=1e-6, atol=1e-6)
        m2 = tr.student_ema                                              # the trainer's merged copy (float64)
        assert not any(isinstance(m, LoRALinear) for m in m2.modules())
        assert torch.allclose(diffusers_rf_call(m2, x, timestep, c), want, rtol=1e-9, atol=1e-10)
    x0 = tr.generate(c, steps=2)                                         # the EMA student samples
    assert x0.shape == (2, *te.latent_shape) and torch.isfinite(x0).all()


@pytest.mark.slow
def test_registration_carries_the_adapter_file(tmp_path):
    """register_student(lora_adapter=...): the adapter file is an extra artifact of the model version."""
    mlflow = pytest.importorskip("mlflow")
    from rcm_steps.register import register_student
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    client = mlflow.MlflowClient()
    exp = client.create_experiment("e", artifact_location=f"file://{tmp_path / 'art'}")
    run_id = client.create_run(exp).info.run_id
    meta = {"teacher": "embedded", "teacher_version": "x", "latent_shape": [1, 4, 16, 16], "default_steps": 4,
            "sigma_max": 80.0, "mid_t": [1.3, 1.0, 0.6], "method": "rcm"}
    r = register_student(b"weights", meta, run_id, {"metaflow.run_id": run_id}, {"student_4/digit_acc": 0.5}, True,
                         model_name="m", lora_adapter=b"adapter-bytes")
    mv = client.get_model_version("m", r.version)
    assert "lora_adapter" in mv.tags and "transformer_2" not in mv.tags["lora_adapter"]
    root = mlflow.artifacts.download_artifacts(f"models:/m/{r.version}", dst_path=str(tmp_path / "dl"))
    found = list(__import__("pathlib").Path(root).rglob("student_lora.safetensors"))
    assert found and found[0].read_bytes() == b"adapter-bytes"
    # a two-expert (A14B) student: the second expert's adapter is the artifact lora_2
    run_id = client.create_run(exp).info.run_id
    r = register_student(b"weights", meta, run_id, {"metaflow.run_id": run_id}, {"student_4/digit_acc": 0.5}, True,
                         model_name="m", lora_adapter=b"expert-1", lora_adapter_2=b"expert-2")
    assert "transformer_2: artifact lora_2/student_lora_2.safetensors" in client.get_model_version(
        "m", r.version).tags["lora_adapter"]
    root = __import__("pathlib").Path(mlflow.artifacts.download_artifacts(f"models:/m/{r.version}",
                                                                         dst_path=str(tmp_path / "dl2")))
    assert [p.read_bytes() for p in sorted(root.rglob("student_lora*.safetensors"))] == [b"expert-1", b"expert-2"]
    assert json.loads(next(root.rglob("meta.json")).read_text())["lora_adapter_2"]["load_into_transformer_2"]
    with pytest.raises(ValueError, match="lora_adapter_2 .* without lora_adapter"):
        register_student(b"weights", meta, run_id, {}, {}, True, model_name="m", lora_adapter_2=b"x")


# ---- FSDP2 (2 gloo ranks): the shared network sharded once, against plain data parallel ----------------
def _fsdp_worker(rank, world, port, out_dir, fsdp):
    import copy
    import os

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from safetensors.torch import load
        from torch.distributed.tensor import DTensor

        from rcm_core.checkpoint import lora_safetensors
        te = _embedded_teacher()
        cfg = _cfg(fsdp=fsdp, fused_tangent=True)
        tr = RCMTrainer(te, cfg)
        assert tr.sharded == fsdp
        if fsdp:                     # one sharded network: base and adapters are DTensors, shared by all roles
            assert all(isinstance(p, DTensor) for p in tr.student.net.parameters())
            assert tr.teacher.net is tr.student.net is tr.fake.net
        batch = _batch(te, seed=10 + rank)
        losses = [tr.train_step(batch)["loss"] for _ in range(3)]          # student, critic, student
        ckpt = os.path.join(out_dir, f"ck_{fsdp}")
        if fsdp or rank == 0:
            tr.save_checkpoint(ckpt)                                       # FSDP: DCP, every rank its shards
        dist.barrier()
        sd = copy.deepcopy(tr.state_dict())
        merged = tr.ema_state_dict()
        adapter = lora_safetensors(tr)
        tr2 = RCMTrainer(te, cfg)
        tr2.load_checkpoint(ckpt)
        nxt = tr.train_step(batch)["loss"], tr2.train_step(batch)["loss"]
        if rank == 0:
            torch.save({"losses": losses, "student": sd["student"], "fake": sd["fake"], "ema": sd["ema"]["module"],
                        "merged_keys": sorted(merged), "adapter": load(adapter), "next": nxt},
                       os.path.join(out_dir, f"res_{fsdp}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    end_rank()


@pytest.mark.slow
def test_fsdp_lora_matches_data_parallel_and_resumes(tmp_path):
    import os
    import socket

    import torch.multiprocessing as mp
    res = {}
    for fsdp in (True, False):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_fsdp_worker, args=(2, port, str(tmp_path), fsdp), nprocs=2, join=True,
                           start_method="spawn")
        res[fsdp] = torch.load(os.path.join(tmp_path, f"res_{fsdp}.pt"), weights_only=False)
    a, b = res[True], res[False]
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-10)
    for part in ("student", "fake", "ema"):
        assert set(a[part]) == set(b[part]) and all(".lora_" in k for k in a[part])
        for k in a[part]:
            assert torch.allclose(a[part][k], b[part][k], atol=1e-12), (part, k)
    assert a["merged_keys"] == sorted(_embedded_teacher().net.state_dict())
    assert set(a["adapter"]) == set(b["adapter"])
    for fsdp in (True, False):                                             # resume: the same next step
        assert res[fsdp]["next"][0] == res[fsdp]["next"][1]


@pytest.mark.slow
def test_distill_step_writes_merged_weights_and_the_adapter(tmp_path):
    """rcm_steps.distill with DistillConfig.lora: student_ema.safetensors has the teacher's names (merged),
    student_lora.safetensors the adapter (peft keys), result.json its URL (the flow registers it)."""
    import json

    from pipeline_fixtures import FakeTeacher
    from rcm_steps.cache import CacheConfig, cache_teacher
    from rcm_steps.distill import main
    from rcm_steps.storage import Storage
    from safetensors.torch import load_file
    cache = cache_teacher(FakeTeacher(), [f"p{i}" for i in range(2)], Storage(str(tmp_path / "store")),
                          CacheConfig(samples_per_prompt=4, shard_size=8)).url
    out = tmp_path / "out"
    cfg = {"tangent_warmup_steps": 1, "lr_warmup_steps": 1, "student_update_freq": 2, "guidance": 2.0,
           "lora": {"rank": 1, "target_modules": ["proj"]}}
    main(["--teacher", "pipeline_fixtures:FakeTeacher", "--cache", cache, "--out", str(out), "--iterations", "3",
          "--batch-size", "4", "--config", json.dumps(cfg), "--ckpt-every", "2"])
    res = json.loads((out / "result.json").read_text())
    assert res["lora_url"].endswith("student_lora.safetensors")
    assert set(load_file(str(out / "student_ema.safetensors"))) == set(FakeTeacher().net.state_dict())
    assert set(load_file(str(out / "student_lora.safetensors"))) == {"proj.lora_A.weight", "proj.lora_B.weight"}


def test_two_expert_adapters_load_into_wan_pipeline_and_match_the_ema_experts(tmp_path):
    """Wan2.2 A14B (``moe_student="two"``): the adapter is written as distill writes it, one file per expert
    with ONE transformer's keys; diffusers' own WanPipeline (from the tiny checkpoint) loads the first into
    ``transformer`` and the second with ``load_into_transformer_2=True``; each expert then equals the
    trainer's EMA student's expert."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from real_fixtures import write_wan22_checkpoint
    from rcm_steps.teacher import load_teacher
    from safetensors.torch import load

    from rcm_core.checkpoint import lora_experts, lora_safetensors
    root = write_wan22_checkpoint(tmp_path / "tiny-wan22-a14b", "a14b")
    te = load_teacher(str(root), options=dict(frames=5, height=16, width=16, text_len=8, dtype="float32"))
    cfg = DistillConfig.preset(te.preset, tangent_warmup_steps=0, lr_warmup_steps=0, student_update_freq=2,
                               dtype="float64", activation_checkpointing="none", fsdp=False, moe_student="two",
                               lora={"rank": 2, "alpha": 3.0})
    tr = RCMTrainer(te, cfg)
    assert lora_experts(tr) == ("transformer", "transformer_2")
    _randomise_adapters(tr, scale=0.2)                                   # student, fake and EMA adapters non-zero
    with pytest.raises(ValueError, match="expert="):
        lora_safetensors(tr)
    files = {}
    for e, name in (("transformer", "student_lora.safetensors"), ("transformer_2", "student_lora_2.safetensors")):
        data = lora_safetensors(tr, prefix="transformer", expert=e)      # as steps/rcm_steps/distill.py writes it
        sd = load(data)
        assert sd and all(k.startswith("transformer.blocks.") for k in sd), sorted(sd)[:3]
        (tmp_path / name).write_bytes(data)
        files[e] = tmp_path / name

    pipe = diffusers.WanPipeline.from_pretrained(str(root), scheduler=diffusers.UniPCMultistepScheduler())
    assert pipe.transformer_2 is not None
    pipe.transformer.double(), pipe.transformer_2.double()
    pipe.load_lora_weights(str(files["transformer"]), adapter_name="rcm")
    pipe.load_lora_weights(str(files["transformer_2"]), adapter_name="rcm_2", load_into_transformer_2=True)

    ema = tr.ema_denoiser().net
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, *te.latent_shape, generator=g, dtype=D)
    c = torch.randn(2, 8, pipe.transformer.config.text_dim, generator=g, dtype=D)
    ts = torch.tensor([900.0, 300.0], dtype=D)
    for e, loaded in (("transformer", pipe.transformer), ("transformer_2", pipe.transformer_2)):
        mine = getattr(ema, e)
        with torch.no_grad(), use_adapter(ema, EMA):
            want = mine(hidden_states=x, timestep=ts, encoder_hidden_states=c, return_dict=False)[0]
            got = loaded(hidden_states=x, timestep=ts, encoder_hidden_states=c, return_dict=False)[0]
        with torch.no_grad(), use_adapter(ema, None):                    # the adapter changes the expert
            base = mine(hidden_states=x, timestep=ts, encoder_hidden_states=c, return_dict=False)[0]
        assert want.dtype == got.dtype == torch.float64
        assert float((want - base).abs().max()) > 1e-3, e
        err = float((got - want).abs().max())
        assert err < 1e-10, (e, err)                                     # float64 both sides (0.0 seen)

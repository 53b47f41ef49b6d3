"""The memory model (rcm_core/real/memory.py) with LoRA and with a two-expert (Wan2.2 A14B) teacher.

References are independent of the formula: the trainer's actual tensors. A real :class:`RCMTrainer` is built on a
tiny Wan (and a tiny two-expert Wan), one training step is taken so AdamW's moments exist, and every distinct
tensor it holds is counted - the teacher / shared base, the student's and fake score's weights and their
gradients, the AdamW moments, the EMA - with its real element size. The memory model's ``state_bytes`` (the
closed form: params x bytes) must equal that sum; its LoRA adapter count must equal the adapter parameters the
trainer created (which are also checked against rank x (in + out) summed over the nn.Linear layers of the blocks,
enumerated by hand).
"""
from __future__ import annotations

import json

import pytest
import torch

from real_fixtures import *  # noqa: F401,F403
from real_fixtures import diffusers, tiny_expert_pair  # noqa: E402
from real_fixtures import tiny_wan as _tiny_wan  # noqa: E402
from rcm_core.real import install_rcm_attention  # noqa: E402
from rcm_core.config import DistillConfig  # noqa: E402
from rcm_core.denoiser import Parameterization, TimestepExperts  # noqa: E402
from rcm_core.real.loading import diffusers_rf_call  # noqa: E402
from rcm_core.real.memory import estimate_memory, lora_params  # noqa: E402
from rcm_core.trainer import RCMTrainer  # noqa: E402

LATENT = (4, 2, 4, 4)
CFG = dict(method="rcm", tangent_warmup_steps=0, lr_warmup_steps=0, student_update_freq=2, batch_size=2,
           iterations=4, activation_checkpointing="none")


def tiny_wan():
    net = _tiny_wan()
    install_rcm_attention(net)          # the project attention (forward-mode AD on the CPU), as the loader installs
    return net


def _config(net) -> dict:
    return {**{k: v for k, v in dict(net.config).items() if not k.startswith("_")},
            "_class_name": "WanTransformer3DModel"}


class _Teacher:
    def __init__(self, net, guidance=1.0):
        self.net, self.param, self.call = net, Parameterization("rf", 1000.0), diffusers_rf_call
        self.guidance, self.latent_shape = guidance, LATENT


def _trainer_state_bytes(tr) -> int:
    """Bytes of every distinct tensor the trainer holds after a step (weights, gradients, AdamW moments, EMA);
    gradients counted for every trainable parameter (they all exist at the step's peak)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is None or t.numel() <= 1 or id(t) in seen:       # AdamW's scalar 'step' counters are left out
            return
        seen.add(id(t))
        total += t.numel() * t.element_size()

    mods = [tr.teacher.net, tr.student.net] + ([tr.fake.net] if tr.fake is not None else [])
    if tr.cfg.lora is None:
        mods.append(tr.ema.module)
    for m in mods:
        for p in m.parameters():
            add(p)
    for opt in (tr.opt_student, tr.opt_fake):
        for group in opt.param_groups:
            for p in group["params"]:
                total += p.numel() * 4          # its fp32 gradient
                for v in opt.state[p].values():
                    add(v)
    return total


def _step(tr):
    g = torch.Generator().manual_seed(0)
    batch = dict(latents=torch.randn(2, *LATENT, generator=g), cond=torch.randn(2, 8, 16, generator=g),
                 uncond=torch.randn(1, 8, 16, generator=g))
    tr.train_step(batch)        # K = 2: the student step (AdamW moments of the student)
    tr.train_step(batch)        # and the critic step (the fake score's)
    for opt in (tr.opt_student, tr.opt_fake):
        assert all(len(opt.state[p]) for g_ in opt.param_groups for p in g_["params"])


def _estimate(net, **kw):
    # 5 x 16 x 16 pixels -> the tiny teacher's (4, 2, 4, 4) latents are not needed: only state_bytes is compared
    return estimate_memory(_config(net), 1, 5, 64, 64, dtype=kw.pop("dtype", "float32"), raise_if_too_big=False,
                           **kw)


def _hand_lora_count(net, rank) -> int:
    """rank x (in + out) over every nn.Linear inside net.blocks except the AdaLN/time paths (none in Wan blocks)."""
    return sum(rank * (m.in_features + m.out_features) for m in net.blocks.modules()
               if type(m) is torch.nn.Linear)


@pytest.mark.parametrize("rank", [2, 4])
def test_lora_adapter_count_and_state_bytes_match_the_trainer(rank):
    net = tiny_wan()
    tr = RCMTrainer(_Teacher(net), DistillConfig(lora={"rank": rank}, **CFG))
    trained = sum(p.numel() for p in tr.student.parameters())          # the student's adapter, as the trainer holds it
    assert trained == _hand_lora_count(net, rank) == lora_params(tiny_wan(), {"rank": rank})
    _step(tr)
    est = _estimate(net, lora={"rank": rank})
    assert est["state_params"]["student"] == trained and est["state_params"]["teacher"] == sum(
        p.numel() for p in net.parameters())
    assert est["state_bytes"] == _trainer_state_bytes(tr)
    # and much less than full fine-tuning of the same network (measured the same way)
    full = RCMTrainer(_Teacher(net), DistillConfig(**CFG))
    _step(full)
    assert _estimate(net)["state_bytes"] == _trainer_state_bytes(full) > 3 * est["state_bytes"]


def test_lora_targets_named_and_bf16_base():
    net = tiny_wan()
    targets = ("to_q", "to_v")
    n = lora_params(tiny_wan(), {"rank": 3, "target_modules": targets})
    hand = sum(3 * (m.in_features + m.out_features) for name, m in net.named_modules()
               if name.endswith(targets) and isinstance(m, torch.nn.Linear))
    assert n == hand > 0
    # a bf16 base under bf16 autocast stays bf16 (2 B/param); the adapters keep fp32 master weights
    tr = RCMTrainer(_Teacher(net.to(torch.bfloat16)), DistillConfig(lora={"rank": 2}, dtype="bfloat16", **CFG))
    _step(tr)
    assert _estimate(net, lora={"rank": 2}, dtype="bfloat16")["state_bytes"] == _trainer_state_bytes(tr)
    with pytest.raises(ValueError, match="match no module"):
        lora_params(tiny_wan(), {"rank": 2, "target_modules": ("nope",)})
    with pytest.raises(ValueError, match="rank must be <="):
        lora_params(tiny_wan(), {"rank": 40})


@pytest.mark.parametrize("layout", ["one", "two", "lora"])
def test_two_expert_teacher_state_bytes_match_the_trainer(layout):
    """Wan2.2 A14B-shaped: the teacher holds both experts (bf16 here), a one-network student one expert, a
    two-expert student both, LoRA adapters on both experts of the shared base."""
    high, low = tiny_expert_pair()
    for n in (high, low):
        install_rcm_attention(n)
    te_net = TimestepExperts(high.to(torch.bfloat16), low.to(torch.bfloat16), boundary_timestep=875.0,
                             expert_guidance=(4.0, 3.0))
    te = _Teacher(te_net, guidance=4.0)
    kw = dict(dtype="bfloat16", **CFG)
    if layout == "lora":
        cfg, student = DistillConfig(lora={"rank": 2}, moe_student="two", **kw), None
    else:
        cfg = DistillConfig(moe_student=layout, **kw)
        student = te_net.transformer_2 if layout == "one" else None
    tr = RCMTrainer(te, cfg, student_net=student, fake_net=student)
    _step(tr)
    est = _estimate(high, dtype="bfloat16", experts=2, moe_student=cfg.moe_student, lora=cfg.lora)
    assert est["state_bytes"] == _trainer_state_bytes(tr)
    one = sum(p.numel() for p in high.parameters())
    assert est["state_params"]["teacher"] == sum(p.numel() for p in te_net.parameters()) == 2 * one
    trained = sum(p.numel() for p in tr.student.parameters())
    assert est["state_params"]["student"] == trained == {"one": one, "two": 2 * one,
                                                         "lora": 2 * _hand_lora_count(high, 2)}[layout]


def test_check_memory_passes_the_training_settings(tmp_path):
    """The flow's start: check_memory / plan_mesh take the teacher's experts from describe_teacher and LoRA /
    moe_student / critic from the DistillConfig (rcm_steps.teacher.memory_settings)."""
    from rcm_core.real import SPECS
    from rcm_steps.teacher import check_memory, memory_settings, plan_mesh

    a14b = {"name": "wan2.2-t2v-a14b", "frames": 81, "height": 720, "width": 1280, "experts": 2,
            "transformer_config": {**SPECS["wan2.2-t2v-a14b"].transformer_config,
                                   "_class_name": "WanTransformer3DModel"}}
    one = check_memory(a14b, 1, 8, 1e6, sharded=True, context_parallel=8,
                       **memory_settings(DistillConfig.preset("wan2.2-t2v-a14b")))
    two = check_memory(a14b, 1, 8, 1e6, sharded=True, context_parallel=8,
                       **memory_settings(DistillConfig.preset("wan2.2-t2v-a14b", moe_student="two")))
    lora = check_memory(a14b, 1, 8, 1e6, sharded=True, context_parallel=8,
                        **memory_settings(DistillConfig.preset("wan2.2-t2v-a14b", moe_student="two",
                                                               lora={"rank": 64})))
    n = one["params"]
    # closed forms, bytes of the whole training state: bf16 teacher of 2 experts + 16 B x (student + fake) + 4 B EMA
    assert one["state_bytes"] == 2 * n * 2 + n * 36
    assert two["state_bytes"] == 2 * n * 2 + 2 * n * 36
    a = lora["state_params"]["student"]
    assert lora["state_bytes"] == 2 * n * 2 + a * 36 and a < 0.05 * 2 * n
    assert lora["gib_per_gpu"] < one["gib_per_gpu"] < two["gib_per_gpu"]
    # Wan2.1-14B's architecture: rank 64 on every block linear of 40 blocks of dim 5120, ffn 13824
    cfg = SPECS["wan2.2-t2v-a14b"].transformer_config
    d, f, L = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"]
    per_block = 8 * 64 * (d + d) + 64 * (d + f) + 64 * (f + d)      # attn1 + attn2 q,k,v,o; ffn in, out
    assert a == 2 * L * per_block
    plan = plan_mesh(a14b, 8, 8, 80, sharded=True, micro_batch=1,
                     **memory_settings(DistillConfig.preset("wan2.2-t2v-a14b", moe_student="two", lora={"rank": 64})))
    assert plan["state_params"]["lora"] and plan["experts"] == 2

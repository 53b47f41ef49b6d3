"""Attention settings asked for where they cannot run fail at start with a clear error (issue 22's bad input);
automatic fallbacks are logged once, not per call."""
import logging

import pytest
import torch

from rcm_core.config import DistillConfig
from rcm_core.nets import attention as A
from rcm_core.nets.attention import check_attention_request, primal_backend


@pytest.fixture
def env(monkeypatch):
    for k in ("RCM_ATTN_KERNEL", "RCM_ATTN_PRIMAL", "RCM_ATTN_BACKEND", "TRITON_INTERPRET"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_defaults_pass_on_the_cpu(env):
    assert check_attention_request("cpu", torch.float32) == {"kernel": "portable", "primal": "auto", "tangent": "auto"}


@pytest.mark.parametrize("var,value", [("RCM_ATTN_KERNEL", "hoper"), ("RCM_ATTN_PRIMAL", "flash"),
                                       ("RCM_ATTN_BACKEND", "fast")])
def test_unknown_values_are_named(env, var, value):
    env.setenv(var, value)
    with pytest.raises(ValueError, match=f"{var}={value!r}: expected one of"):
        check_attention_request("cpu", torch.float32)


def test_hopper_kernel_off_hopper_is_refused_naming_the_device(env):
    env.setenv("RCM_ATTN_KERNEL", "hopper")
    with pytest.raises(ValueError, match=r"RCM_ATTN_KERNEL=hopper: .*compute capability 9.x.*on the cpu.*Unset"):
        check_attention_request("cpu", torch.bfloat16)
    env.setenv("TRITON_INTERPRET", "1")          # the kernel's own CPU tests run it in the interpreter
    assert check_attention_request("cpu", torch.float32)["kernel"] == "hopper"


def test_fa3_asked_for_on_the_cpu_is_refused(env):
    env.setenv("RCM_ATTN_PRIMAL", "fa3")
    with pytest.raises(ValueError, match=r"RCM_ATTN_PRIMAL=fa3 on the cpu: .*CUDA only.*RCM_ATTN_PRIMAL=auto"):
        check_attention_request("cpu", torch.bfloat16)


def test_the_trainer_checks_at_construction(env):
    """Before any network is copied: the error comes from RCMTrainer(...), not from the first step."""
    from rcm_core.teachers import get_teacher
    from rcm_core.trainer import RCMTrainer
    env.setenv("RCM_ATTN_KERNEL", "hopper")
    teacher = get_teacher("embedded")
    with pytest.raises(ValueError, match="RCM_ATTN_KERNEL=hopper"):
        RCMTrainer(teacher, DistillConfig(method="scm", iterations=1, batch_size=2, tangent_warmup_steps=0,
                                                   lr_warmup_steps=0))


def test_runtime_fallbacks_are_logged_once(env, caplog):
    A._log_once.cache_clear()
    env.setenv("RCM_ATTN_PRIMAL", "fa3")
    with caplog.at_level(logging.WARNING, logger="rcm.attention"):
        for _ in range(3):     # unequal head dims: FA3 cannot take them, SDPA does (on a Hopper GPU)
            assert primal_backend("cuda", torch.bfloat16, (64, 128), (9, 0)) == "sdpa"
    msgs = [r.getMessage() for r in caplog.records if r.name == "rcm.attention"]
    assert len(msgs) == 1 and "RCM_ATTN_PRIMAL=fa3 cannot take" in msgs[0]

"""Trainer: schedule, baselines, NaN masking, checkpoint/resume equality, bad input."""
import math

import pytest
import torch

from rcm_core.config import DistillConfig
from rcm_core.denoiser import Parameterization
from rcm_core.gaussian import AffineTimeNet, GaussianTeacher
from rcm_core.trainer import RCMTrainer

D = torch.float64
F_PARAM = Parameterization("F", 1.0)


def make(method="rcm", seed=0, **kw):
    torch.manual_seed(seed)
    teacher = GaussianTeacher(torch.tensor([1.0, -1.0, 0.5], dtype=D), 0.5)
    net = AffineTimeNet(3).double()
    cfg = DistillConfig.preset("embedded", method=method, guidance=2.0, tangent_warmup_steps=2, student_update_freq=2,
                               lr_student=1e-3, lr_fake=1e-3, dtype="float64", seed=seed, **kw)
    return RCMTrainer(teacher, cfg, student_net=net, fake_net=net, student_param=F_PARAM), teacher


def batches(teacher, n, b=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"latents": teacher.sample_data(b, g), "cond": torch.randn(b, 2, 3, generator=g, dtype=D),
             "uncond": torch.zeros(1, 2, 3, dtype=D)} for _ in range(n)]


def test_schedule_losses_and_logged_metrics():
    tr, te = make()
    kinds, logged = [], []
    tr.log_fn = lambda step, m: logged.append(step)
    for b in batches(te, 7):
        m = tr.train_step(b)
        kinds.append(m["kind"])
        assert math.isfinite(m["loss"]) and m["step_time_s"] > 0 and m["samples_per_s"] > 0
        if m["kind"] == "student":
            assert "loss_cm" in m and "grad_norm_student" in m and m["nan_masked"] == 0
            assert ("loss_dmd" in m) == (m["step"] >= 2)               # DMD only after the warm-up H = 2
        else:
            assert "loss_fake" in m and "grad_norm_fake" in m
    assert kinds == ["student", "student", "student", "critic", "student", "critic", "student"]
    assert logged == list(range(1, 8))


@pytest.mark.parametrize("method", ["scm", "dmd", "dcm"])
def test_baselines_from_the_same_code(method):
    tr, te = make(method)
    ms = [tr.train_step(b) for b in batches(te, 4)]
    assert all(math.isfinite(m["loss"]) for m in ms)
    if method in ("scm", "dcm"):
        assert tr.fake is None and all(m["kind"] == "student" and "loss_dmd" not in m for m in ms)
    else:
        assert [m["kind"] for m in ms] == ["student", "critic", "student", "critic"]
        assert all("loss_cm" not in m for m in ms if m["kind"] == "student")


def test_semi_continuous_tangent_matches_jvp():
    tr, te = make("scm")
    tr_fd, _ = make("scm", time_derivative="semi_continuous")
    tr_fd.student.net.load_state_dict(tr.student.net.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g, dtype=D)
    t = torch.rand(8, generator=g, dtype=D) + 0.2
    F_T = torch.randn(8, 3, generator=g, dtype=D)
    cond = torch.zeros(8, 2, 3, dtype=D)
    F1, J1 = tr.tangent(x, t, F_T, cond)
    F2, J2 = tr_fd.tangent(x, t, F_T, cond)
    assert torch.allclose(F1, F2)
    assert float((J1 - J2).norm() / J1.norm()) < 1e-3


def test_nan_samples_are_masked_counted_and_training_goes_on():
    tr, te = make("scm")
    bs = batches(te, 3)
    bs[1]["latents"][[2, 5]] = float("nan")
    ms = [tr.train_step(b) for b in bs]
    assert [m["nan_masked"] for m in ms] == [0, 2, 0]
    assert all(math.isfinite(m["loss"]) for m in ms)
    assert all(torch.isfinite(p).all() for p in tr.student.parameters())
    assert all(torch.isfinite(p).all() for p in tr.student_ema.parameters())


def _state_equal(a: dict, b: dict):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _state_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_checkpoint_resume_gives_the_same_next_steps(tmp_path):
    tr, te = make()
    bs = batches(te, 8)
    ref = [tr.train_step(b) for b in bs]
    tr2, _ = make()
    for b in bs[:4]:
        tr2.train_step(b)
    tr2.save_checkpoint(str(tmp_path / "ckpt" / "state.pt"))
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["state.pt"]   # no temp files left behind
    tr3, _ = make(seed=0)
    tr3.load_checkpoint(str(tmp_path / "ckpt" / "state.pt"))
    resumed = [tr3.train_step(b) for b in bs[4:]]
    for a, b in zip(ref[4:], resumed):
        assert {k: v for k, v in a.items() if "time" not in k and "per_s" not in k} == \
               {k: v for k, v in b.items() if "time" not in k and "per_s" not in k}
    _state_equal(tr.state_dict(), tr3.state_dict())


def test_bad_config_and_batches_name_the_culprit():
    with pytest.raises(ValueError, match=r"unknown DistillConfig keys: \['learning_rate'\]"):
        DistillConfig.from_dict({"learning_rate": 1e-4})
    with pytest.raises(ValueError, match="lr_student must be finite"):
        DistillConfig(lr_student=float("nan")).validate()
    with pytest.raises(ValueError, match="P_std must be > 0"):
        DistillConfig(P_std=0.0).validate()
    with pytest.raises(ValueError, match="method='cm'"):
        DistillConfig(method="cm").validate()
    with pytest.raises(ValueError, match="no DistillConfig preset 'wan3'"):
        DistillConfig.preset("wan3")
    with pytest.raises(ValueError, match="mid_t must be decreasing"):
        DistillConfig(mid_t=(0.6, 1.0)).validate()
    tr, te = make()
    good = batches(te, 1)[0]
    with pytest.raises(ValueError, match=r"batch\['latents'\] has shape \(16, 4\)"):
        tr.train_step({**good, "latents": torch.zeros(16, 4, dtype=D)})
    with pytest.raises(TypeError, match=r"batch\['latents'\] must be a floating-point tensor"):
        tr.train_step({**good, "latents": torch.zeros(16, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"batch\['cond'\] must be \(B=16"):
        tr.train_step({**good, "cond": torch.zeros(8, 2, 3, dtype=D)})
    with pytest.raises(KeyError, match="uncond"):
        tr.train_step({"latents": good["latents"], "cond": good["cond"]})
    assert tr.step == 0                                               # nothing happened


def test_presets_have_the_papers_values():
    # the paper's Wan2.1 values are the "-paper" presets; the defaults "wan2.1-1.3b" / "wan2.1-14b" are the release's
    # (tests/test_fidelity.py::test_wan21_defaults_are_the_release_and_the_paper_presets_the_papers)
    w13, w14, cos = (DistillConfig.preset(n) for n in ("wan2.1-1.3b-paper", "wan2.1-14b-paper", "cosmos-predict2"))
    assert (w13.P_mean, w13.tangent_warmup_steps, w13.student_update_freq, w13.lr_student, w13.lr_fake) == \
        (0.7, 1000, 5, 2e-6, 4e-7)
    assert (w14.P_mean, w14.tangent_warmup_steps, w14.student_update_freq, w14.lr_student, w14.lr_fake,
            w14.batch_size) == (1.5, 200, 10, 1e-6, 1e-7, 64)
    assert (cos.P_mean, cos.tangent_warmup_steps, cos.dmd_time) == (-0.8, 0, "lognormal")
    for c in (w13, w14, cos):
        assert c.betas == (0.0, 0.999) and c.weight_decay == 0.01 and c.ema_sigma_rel == 0.05
        assert c.loss_scale == 100 and c.loss_scale_dmd == 1 and c.tangent_norm_c == 0.1
        assert c.guidance is None                   # CFG comes from the teacher (Wan 5.0, Cosmos 4.5)
        assert c.warmup_scales_jvp is False         # the reference's tangent warm-up


def test_optimizer_foreach_is_the_configs_and_changes_nothing_but_memory():
    """``optimizer_foreach``: torch's default (None), foreach or per tensor; the same AdamW maths either way."""
    with pytest.raises(ValueError, match="optimizer_foreach must be true, false or null"):
        DistillConfig.preset("embedded", optimizer_foreach="no").validate()
    runs = {}
    for foreach in (None, True, False):
        tr, te = make(optimizer_foreach=foreach)
        assert tr.opt_student.defaults["foreach"] is foreach and tr.opt_fake.defaults["foreach"] is foreach
        for b in batches(te, 4):
            tr.train_step(b)
        runs[foreach] = [p.detach().clone() for p in tr.student.parameters()]
    for foreach in (True, False):
        for a, b in zip(runs[None], runs[foreach]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)

"""The staged schedule (rcm_core/stages.py) and the diagnostics that came with it.

* ``locate`` against a brute-force walk over the phases, iteration by iteration (also past the end);
* the config: phases that do not add up, unknown phase methods, stages without method "rcm", the round trip
  through to_dict / from_dict / JSON, the dropped ``dcm_delta``;
* dCM as NVlabs/rcm's ``_student_dcm_step``: ``dcm_times`` against the formula written out here, and the
  trainer's dCM loss and gradient against a hand computation on the analytic Gaussian teacher;
* a staged trainer run: per step the method, the kind, the networks' own update counts (LR warm-up, rollout
  length), and a fake score that stays put until the rCM phase;
* the sCM / DMD split of the student's weight gradient and the output-level ratio;
* the critic's relative loss, its "falls behind" flag and warning, and their state across a resume;
* the separate tangent pass (F^- = sg F_theta of the back-propagated pass) against the fused one.

Everything runs on the Gaussian teacher (an AffineTimeNet student) in float64, but the tangent paths, which
run on the embedded video DiT (attention), with a batch of 2-3.
"""
import copy
import io
import json
import math
import re
import warnings

import pytest
import torch

from rcm_core.config import DistillConfig
from rcm_core.denoiser import Parameterization, guided
from rcm_core.gaussian import AffineTimeNet, GaussianTeacher
from rcm_core.losses import dcm_loss, dcm_times, dmd_direction, dmd_loss
from rcm_core.rng import SampleRNG
from rcm_core.stages import Stage, StagePosition, locate, parse_stages, stage_iterations
import rcm_core.trainer as trainer_module
from rcm_core.trainer import RCMTrainer

D = torch.float64
F_PARAM = Parameterization("F", 1.0)
MU = torch.tensor([1.0, -1.0, 0.5], dtype=D)
S = 0.5


def gaussian_trainer(seed=0, **kw):
    torch.manual_seed(seed)
    teacher = GaussianTeacher(MU.clone(), S)
    net = AffineTimeNet(3, hidden=16).double()
    opts = dict(guidance=2.0, tangent_warmup_steps=0, student_update_freq=2, lr_student=1e-3, lr_fake=1e-3,
                lr_warmup_steps=0, dtype="float64", seed=seed)
    opts.update(kw)
    cfg = DistillConfig.preset("embedded", **opts)
    return RCMTrainer(teacher, cfg, student_net=net, fake_net=net, student_param=F_PARAM), teacher


def gaussian_batches(n, b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"latents": MU + S * torch.randn(b, 3, generator=g, dtype=D),
             "cond": torch.randn(b, 2, 3, generator=g, dtype=D), "uncond": torch.zeros(1, 2, 3, dtype=D)}
            for _ in range(n)]


def snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# ---- locate -----------------------------------------------------------------------------------------------

def brute_force(stages, K, n):
    """Walk the phases iteration by iteration: a dcm/scm phase is `updates` student iterations; an rcm/dmd
    phase is, per student update, K - 1 critic iterations then the student's. Past the end the last phase's
    pattern repeats. Each iteration's position records the updates counted before it."""
    def one_update(i, st):
        if st.method in ("rcm", "dmd"):
            return [(i, st.method, False)] * (K - 1) + [(i, st.method, True)]
        return [(i, st.method, True)]

    walk = []
    for i, st in enumerate(stages):
        for _ in range(st.updates):
            walk += one_update(i, st)
    planned = len(walk)
    while len(walk) < n:
        walk += one_update(len(stages) - 1, stages[-1])
    out, students, critics = [], 0, 0
    for i, method, is_student in walk[:n]:
        out.append(StagePosition(i, method, is_student, students, critics))
        if is_student:
            students += 1
        else:
            critics += 1
    return out, planned


STAGE_LISTS = [
    [("dcm", 3), ("scm", 2), ("rcm", 4)],
    [("rcm", 3)],
    [("scm", 1)],
    [("rcm", 2), ("scm", 3)],
    [("dmd", 2), ("dcm", 1), ("rcm", 1)],
    [("dcm", 1), ("dmd", 3), ("scm", 2), ("rcm", 2)],
]


@pytest.mark.parametrize("K", [1, 2, 3, 5])
@pytest.mark.parametrize("raw", STAGE_LISTS, ids=lambda r: "+".join(f"{m}{u}" for m, u in r))
def test_locate_matches_a_walk_over_the_phases(raw, K):
    stages = parse_stages(raw)
    n = sum(u * (K if m in ("rcm", "dmd") else 1) for m, u in raw) + 3 * K + 4     # well past the end
    want, planned = brute_force(stages, K, n)
    assert stage_iterations(stages, K) == planned
    assert [st.iterations(K) for st in stages] == [u * (K if m in ("rcm", "dmd") else 1) for m, u in raw]
    got = [locate(step, stages, K) for step in range(n)]
    for step, (g, w) in enumerate(zip(got, want)):
        assert g == w, (step, g, w)


def test_locate_by_hand_and_parse_errors():
    st = parse_stages([("dcm", 2), {"method": "rcm", "updates": 2}])
    assert st == (Stage("dcm", 2), Stage("rcm", 2))
    # K = 3: dcm s s | rcm c c s c c s | (past the end) c c s
    assert [locate(i, st, 3) for i in (0, 1, 2, 4, 5, 7, 8, 9, 11)] == [
        StagePosition(0, "dcm", True, 0, 0), StagePosition(0, "dcm", True, 1, 0),
        StagePosition(1, "rcm", False, 2, 0), StagePosition(1, "rcm", True, 2, 2),
        StagePosition(1, "rcm", False, 3, 2), StagePosition(1, "rcm", True, 3, 4),
        StagePosition(1, "rcm", False, 4, 4), StagePosition(1, "rcm", False, 4, 5),
        StagePosition(1, "rcm", False, 5, 6)]
    assert parse_stages(st) == st and parse_stages(()) == () and parse_stages(None) == ()
    for bad, match in [([("scm", 0)], "integer >= 1"), ([("scm", 2.0)], "integer >= 1"),
                       ([("scm", True)], "integer >= 1"), ([("sCM", 2)], "'sCM'"),
                       ([{"method": "scm", "updates": 2, "k": 1}], "phase is"), ([("scm",)], "phase is"),
                       (["scm"], "phase is")]:
        with pytest.raises(ValueError, match=match):
            parse_stages(bad)
    with pytest.raises(ValueError):
        locate(0, (), 2)


# ---- config ---------------------------------------------------------------------------------------------

def small(**kw):
    """The embedded preset without its warm-ups (they may not be longer than these short runs)."""
    return DistillConfig.preset("embedded", **{"tangent_warmup_steps": 0, "lr_warmup_steps": 0, **kw})


def test_config_stages_errors_name_the_numbers_and_the_method():
    # dcm 2 + rcm 3 x K=2 = 8 iterations, not 10
    with pytest.raises(ValueError) as e:
        small(stages=[("dcm", 2), ("rcm", 3)], student_update_freq=2, iterations=10)
    msg = str(e.value)
    assert re.search(r"\b8\b", msg) and re.search(r"\b10\b", msg), msg
    assert small(stages=[("dcm", 2), ("rcm", 3)], student_update_freq=2,
                                iterations=8).iterations == 8
    # K = 5: the same phases take 2 + 15 = 17
    with pytest.raises(ValueError, match=r"\b17\b"):
        small(stages=[("dcm", 2), ("rcm", 3)], student_update_freq=5, iterations=8)
    with pytest.raises(ValueError, match="'ddim'"):
        small(stages=[("dcm", 2), ("ddim", 3)], iterations=5)
    for method in ("scm", "dmd", "dcm"):
        with pytest.raises(ValueError, match=f"method must be 'rcm'.*{method}"):
            small(method=method, stages=[("scm", 4)], iterations=4)
    for name, value in [("dcm_total_steps", 0), ("dcm_total_steps", 2.5), ("dcm_shift", 0.0), ("critic_lag_warn", 0.0),
                        ("grad_ratio_every", -1), ("grad_ratio_every", 1.5)]:
        with pytest.raises(ValueError, match=name):
            small(**{name: value})


def test_config_stages_round_trip_and_derived_methods():
    cfg = small(stages=[("dcm", 2), {"method": "scm", "updates": 3}, ["rcm", 4]],
                               student_update_freq=3, iterations=2 + 3 + 4 * 3, dcm_total_steps=8, dcm_shift=3.0,
                               grad_ratio_every=2, critic_lag_warn=2.5)
    assert cfg.stages == (Stage("dcm", 2), Stage("scm", 3), Stage("rcm", 4))
    d = cfg.to_dict()
    assert d["stages"] == [["dcm", 2], ["scm", 3], ["rcm", 4]]
    assert DistillConfig.from_dict(d) == cfg
    assert DistillConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert cfg.replace(seed=7).stages == cfg.stages
    assert (cfg.methods, cfg.uses_dmd, cfg.uses_consistency) == (("dcm", "scm", "rcm"), True, True)
    # the phases decide, not method="rcm"
    cm_only = small(stages=[("dcm", 2), ("scm", 2)], iterations=4)
    assert (cm_only.methods, cm_only.uses_dmd, cm_only.uses_consistency) == (("dcm", "scm"), False, True)
    dmd_only = small(stages=[("dmd", 2)], student_update_freq=2, iterations=4)
    assert (dmd_only.uses_dmd, dmd_only.uses_consistency) == (True, False)
    assert not small(method="rcm", loss_scale_dmd=0.0).uses_dmd      # (staged: refused, see below)
    plain = small(method="dcm")
    assert (plain.stages, plain.methods, plain.uses_dmd, plain.to_dict()["stages"]) == ((), ("dcm",), False, [])


def test_config_drops_dcm_delta_with_a_deprecation_warning():
    # dcm_delta (the old fixed TrigFlow step) is in every config saved before the release's dCM
    plain = small(method="dcm")
    old = {**plain.to_dict(), "dcm_delta": 0.05}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        again = DistillConfig.from_dict(old)
    assert any(issubclass(w.category, DeprecationWarning) and "dcm_delta" in str(w.message) for w in rec)
    assert again == plain and not hasattr(again, "dcm_delta")


# ---- dCM -----------------------------------------------------------------------------------------------

def dcm_times_by_hand(u, total_steps, shift):
    """NVlabs/rcm _student_dcm_step: du = 1/N, s0 = 1 - u (1 - du), s1 = s0 - du; s' = shift s / (1 + (shift-1) s);
    t = arctan(s' / (1 - s')) (pi/2 at s' = 1)."""
    du = 1.0 / total_steps

    def trig(s):
        sp = shift * s / (1 + (shift - 1) * s)
        return math.pi / 2 if sp >= 1.0 else math.atan(sp / (1 - sp))

    s0 = 1.0 - u * (1.0 - du)
    return trig(s0), trig(s0 - du)


@pytest.mark.parametrize("total_steps,shift", [(48, 5.0), (8, 3.0), (4, 1.0), (1000, 12.0)])
def test_dcm_times_are_the_release_formula(total_steps, shift):
    us = [0.0, 1e-9, 1e-3, 0.1, 0.25, 0.37, 0.5, 0.75, 0.9, 0.999, 1 - 1e-9]
    u = torch.tensor(us, dtype=D)
    t0, t1 = dcm_times(u, total_steps, shift)
    assert t0.dtype == D and t1.dtype == D and t0.shape == t1.shape == u.shape
    for k, uk in enumerate(us):
        w0, w1 = dcm_times_by_hand(uk, total_steps, shift)
        assert float(t0[k]) == pytest.approx(w0, abs=1e-12, rel=1e-12), (uk, "t0")
        assert float(t1[k]) == pytest.approx(w1, abs=1e-12, rel=1e-12), (uk, "t1")
    assert bool((t0 > t1).all())
    assert bool((t0 <= math.pi / 2).all()) and bool((t1 >= 0).all())
    assert float(t0[0]) == pytest.approx(math.pi / 2, abs=1e-15)        # u = 0: pure noise
    assert float(t1[-1]) == pytest.approx(0.0, abs=1e-6)                # u -> 1: the clean end
    assert bool((t0[1:] < t0[:-1]).all())                               # t0 falls as u grows


def test_dcm_loss_and_dmd_direction_by_hand():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, 4, generator=g, dtype=D), torch.randn(3, 2, 4, generator=g, dtype=D)
    b.requires_grad_(True)
    loss = dcm_loss(a, b)
    want = sum(float(((a[i] - b[i].detach()) ** 2).sum()) for i in range(3)) / 3        # no 1/delta
    assert float(loss) == pytest.approx(want, rel=1e-14)
    a.requires_grad_(True)
    loss = dcm_loss(a, b)
    loss.backward()
    assert b.grad is None and torch.allclose(a.grad, 2 * (a - b).detach() / 3, rtol=1e-14)

    G = torch.randn(3, 5, generator=g, dtype=D, requires_grad=True)
    fake, real = torch.randn(3, 5, generator=g, dtype=D), torch.randn(3, 5, generator=g, dtype=D)
    real[1] = G[1].detach()                                   # w = 0 for sample 1: clipped at 1e-5
    direction = dmd_direction(G, fake, real)
    for i in range(3):
        w = max(float((G[i].detach() - real[i]).abs().mean()), 1e-5)
        assert torch.allclose(direction[i], (fake[i] - real[i]) / w, rtol=1e-14)
    (grad,) = torch.autograd.grad(dmd_loss(G, fake, real), G)
    assert torch.allclose(grad, 2 * direction / 3, rtol=1e-12)            # "half the per-sample gradient"


def test_dcm_step_is_one_teacher_euler_step_and_the_students_stopped_x0():
    """The trainer's dCM loss and gradient against a hand computation: the analytic teacher's F at t0, one
    Euler step in TrigFlow to t1, the (initial) student's x0 there as the target."""
    tr, _ = gaussian_trainer(method="dcm", dcm_total_steps=8, dcm_shift=3.0, loss_scale=7.0)
    student0 = copy.deepcopy(tr.student)
    (batch,) = gaussian_batches(1, b=4)
    m = tr.train_step(batch)
    x0, cond = batch["latents"], batch["cond"]
    rng = SampleRNG(tr.cfg.seed, 0, range(4))
    u, noise = rng.rand(), rng.randn((3,))
    pairs = [dcm_times_by_hand(float(v), 8, 3.0) for v in u]
    t0 = torch.tensor([p[0] for p in pairs], dtype=D)
    t1 = torch.tensor([p[1] for p in pairs], dtype=D)
    c0, s0 = torch.cos(t0)[:, None], torch.sin(t0)[:, None]
    x_t = c0 * x0 + s0 * noise
    # the Gaussian teacher's E[x0 | x_t] and its TrigFlow F = (cos t x_t - x0_hat) / sin t (no CFG effect: it
    # ignores the condition)
    x0_hat = MU + c0 * S ** 2 * (x_t - c0 * MU) / (c0 ** 2 * S ** 2 + s0 ** 2)
    F_T = (c0 * x_t - x0_hat) / s0
    x1 = x_t - (t0 - t1)[:, None] * F_T
    with torch.no_grad():
        target = student0.x0(x1, t1, cond)
    pred = student0.x0(x_t, t0, cond)
    loss = ((pred - target) ** 2).sum(1).mean()
    assert m["loss_cm"] == pytest.approx(float(loss.detach()), rel=1e-10)
    assert m["loss"] == pytest.approx(7.0 * float(loss.detach()), rel=1e-10)
    grads = torch.autograd.grad(7.0 * loss, list(student0.parameters()))
    for p, want in zip(tr.student.parameters(), grads):
        assert torch.allclose(p.grad, want, rtol=1e-9, atol=1e-14)
    assert "tangent_ratio" not in m and "loss_dmd" not in m and m["nan_masked_frac"] == 0.0


# ---- a staged run -----------------------------------------------------------------------------------------

def test_staged_run_switches_method_per_phase():
    stages = (("dcm", 2), ("scm", 2), ("rcm", 2))
    tr, _ = gaussian_trainer(stages=stages, student_update_freq=2, iterations=2 + 2 + 2 * 2, lr_warmup_steps=8,
                             tangent_warmup_steps=8)
    assert tr.fake is not None
    # by hand: dcm s s | scm s s | rcm c s c s | past the end: rcm c s
    methods = ["dcm"] * 2 + ["scm"] * 2 + ["rcm"] * 6
    kinds = ["student"] * 4 + ["critic", "student"] * 3
    index = [0, 0, 1, 1] + [2] * 6
    students_before = [0, 1, 2, 3, None, 4, None, 5, None, 6]
    critics_before = [None] * 4 + [0, None, 1, None, 2, None]
    fake_start = snapshot(tr.fake.net)
    for step, b in enumerate(gaussian_batches(10)):
        assert (tr.method(), tr.stage().index, tr.is_student_step()) == (methods[step], index[step],
                                                                         kinds[step] == "student")
        student_before, fake_before = snapshot(tr.student.net), snapshot(tr.fake.net)
        m = tr.train_step(b)
        assert (m["kind"], m["stage_method"], m["stage"]) == (kinds[step], methods[step], index[step]), step
        assert m["skipped"] == 0 and math.isfinite(m["loss"])
        fake_moved = not same_weights(fake_before, snapshot(tr.fake.net))
        student_moved = not same_weights(student_before, snapshot(tr.student.net))
        assert fake_moved == (kinds[step] == "critic"), step
        assert student_moved == (kinds[step] == "student"), step
        if step < 4:                                      # no critic update before the rcm phase
            assert same_weights(fake_start, snapshot(tr.fake.net))
        # LR warm-up (8 updates from 1e-6) and the rollout length (n = u mod 4 + 1) on each network's own count
        if kinds[step] == "student":
            u = students_before[step]
            assert m["lr_student"] == pytest.approx(1e-3 * (1e-6 + (1 - 1e-6) * u / 8), rel=1e-12)
            assert ("loss_cm" in m) and ("loss_dmd" in m) == (methods[step] == "rcm")
            assert ("tangent_ratio" in m) == (methods[step] != "dcm")
            if "tangent_ratio" in m:                      # r = min(1, u / H) on the student's own count
                assert m["tangent_ratio"] == pytest.approx(min(1.0, u / 8), rel=1e-12)
            if methods[step] == "rcm":
                assert m["rollout_steps"] == u % 4 + 1
                assert {"grad_norm_dmd", "grad_norm_scm", "dmd_scm_ratio_w", "dmd_scm_ratio_out",
                        "dmd_nan_masked_frac"} <= set(m)
            else:
                assert not {"grad_norm_dmd", "dmd_scm_ratio_out", "loss_dmd"} & set(m)
        else:
            u = critics_before[step]
            assert m["lr_fake"] == pytest.approx(1e-3 * (1e-6 + (1 - 1e-6) * u / 8), rel=1e-12)
            assert m["rollout_steps"] == u % 4 + 1
    assert tr.step == 10


def test_staged_run_without_dmd_phases_has_no_critic():
    tr, _ = gaussian_trainer(stages=(("dcm", 2), ("scm", 1)), iterations=3)
    assert tr.fake is None and tr.opt_fake is None
    ms = [tr.train_step(b) for b in gaussian_batches(4)]                  # one past the end: scm goes on
    assert [(m["kind"], m["stage_method"]) for m in ms] == [("student", "dcm")] * 2 + [("student", "scm")] * 2


# ---- the sCM / DMD split of the student's gradient ------------------------------------------------------------

def test_scm_part_of_the_rcm_gradient_is_the_scm_trainers_gradient():
    kw = dict(tangent_warmup_steps=0, lr_warmup_steps=0, loss_scale=10.0, loss_scale_dmd=0.5)
    rcm, teacher = gaussian_trainer(method="rcm", **kw)
    scm, _ = gaussian_trainer(method="scm", **kw)
    ref, _ = gaussian_trainer(method="rcm", **kw)               # untouched: the DMD term by hand below
    (batch,) = gaussian_batches(1, b=4)
    m_r, m_s = rcm.train_step(batch), scm.train_step(batch)
    assert m_r["kind"] == m_s["kind"] == "student" and "loss_dmd" in m_r and m_r["rollout_steps"] == 1
    assert m_r["loss_cm"] == pytest.approx(m_s["loss_cm"], rel=1e-12)
    assert m_r["g_norm"] == pytest.approx(m_s["g_norm"], rel=1e-12)
    assert m_r["grad_norm_scm"] == pytest.approx(m_s["grad_norm_student"], rel=1e-10)
    # the DMD part: the rcm trainer's total gradient less the scm trainer's (both left in .grad by the step)
    dmd_sq = sum(float((pr.grad - ps.grad).pow(2).sum()) for pr, ps in zip(rcm.student.parameters(),
                                                                             scm.student.parameters()))
    assert m_r["grad_norm_dmd"] > 0
    assert m_r["grad_norm_dmd"] == pytest.approx(math.sqrt(dmd_sq), rel=1e-8)
    assert m_r["dmd_scm_ratio_w"] == pytest.approx(m_r["grad_norm_dmd"] / m_r["grad_norm_scm"], rel=1e-12)
    total_sq = sum(float(p.grad.pow(2).sum()) for p in rcm.student.parameters())
    assert m_r["grad_norm_student"] == pytest.approx(math.sqrt(total_sq), rel=1e-12)

    # the ratio on the outputs: loss_scale_dmd mean_i ||(x0_fake - x0_real) / w||_i / (loss_scale mean_i ||g_i||),
    # the DMD term redone by hand on the same draws (the sCM term's time and noise come first)
    x0, cond, uncond = batch["latents"], batch["cond"], batch["uncond"]
    rng = SampleRNG(ref.cfg.seed, 0, range(4))
    rng.randn(), rng.randn((3,))
    with torch.no_grad():
        G, _ = ref.rollout(cond, (3,), keep_graph=False, rng=rng, n=1)
        t_D = ref.sample_t_D(rng)
        x_D = torch.cos(t_D)[:, None] * G + torch.sin(t_D)[:, None] * rng.randn((3,))
        x0_fake = ref.fake.x0(x_D, t_D, cond)
        x0_real = guided(ref.teacher, x_D, t_D, cond, uncond, ref.guidance, want="x0")
    w = (G - x0_real).abs().mean(1, keepdim=True)
    norms = ((x0_fake - x0_real) / w).norm(dim=1)
    want = 0.5 * float(norms.mean()) / (10.0 * m_r["g_norm"])
    assert m_r["dmd_scm_ratio_out"] == pytest.approx(want, rel=1e-10)


def test_gradient_split_does_not_depend_on_the_micro_batch():
    kw = dict(method="rcm", loss_scale=10.0, loss_scale_dmd=0.5)
    (batch,) = gaussian_batches(1, b=4)
    whole = gaussian_trainer(**kw)[0].train_step(batch)
    micro = gaussian_trainer(micro_batch=2, **kw)[0].train_step(batch)
    for k in ("loss_cm", "loss_dmd", "grad_norm_student", "grad_norm_scm", "grad_norm_dmd", "dmd_scm_ratio_w",
              "dmd_scm_ratio_out"):
        assert micro[k] == pytest.approx(whole[k], rel=1e-10), k


def test_staged_dmd_phase_without_dmd_is_refused():
    with pytest.raises(ValueError, match="loss_scale_dmd"):
        gaussian_trainer(stages=(("scm", 1), ("rcm", 2)), student_update_freq=2, iterations=5, loss_scale_dmd=0.0)


def test_grad_ratio_every_and_off():
    tr, _ = gaussian_trainer(method="rcm", student_update_freq=2, grad_ratio_every=2)
    ms = [tr.train_step(b) for b in gaussian_batches(8)]
    student = [m for m in ms if m["kind"] == "student"]
    assert len(student) == 4
    assert [("grad_norm_dmd" in m) for m in student] == [True, False, True, False]      # student updates 0, 2
    assert all("dmd_scm_ratio_out" in m for m in student)                              # always (free)
    off, _ = gaussian_trainer(method="rcm", student_update_freq=2, grad_ratio_every=0)
    m0 = off.train_step(gaussian_batches(1)[0])
    assert "dmd_scm_ratio_out" in m0 and not {"grad_norm_dmd", "grad_norm_scm", "dmd_scm_ratio_w"} & set(m0)
    # the split does not change the step: same weights with and without it
    assert m0["grad_norm_student"] == pytest.approx(ms[0]["grad_norm_student"], rel=1e-12)


# ---- the critic's diagnostics --------------------------------------------------------------------------------

CRITIC_KW = dict(method="rcm", student_update_freq=3, tangent_warmup_steps=0)
N_STEPS = 16                                   # 6 student and 10 critic updates (K = 3, student first: 0, 3, ...)


def expected_critic(ms, lag):
    """critic_loss_rel / critic_behind by hand from the returned loss_fake: rel = loss / mean(first 5 losses) from
    the 5th critic update on; smoothed s = rel at the 5th, then 0.9 s + 0.1 rel; behind = s > lag."""
    losses = [m["loss_fake"] for m in ms if m["kind"] == "critic"]
    ref = sum(losses[:5]) / 5
    out, smooth = [], None
    for k, loss in enumerate(losses):
        if k < 4:
            out.append(None)
            continue
        rel = loss / ref
        smooth = rel if smooth is None else 0.9 * smooth + 0.1 * rel
        out.append((rel, float(smooth > lag), smooth))
    return out


def got_critic(ms):
    return [(m["critic_loss_rel"], m["critic_behind"]) if "critic_loss_rel" in m else None
            for m in ms if m["kind"] == "critic"]


def assert_same_critic(got, want):
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, k
        else:
            assert g is not None and g[0] == pytest.approx(w[0], rel=1e-12) and g[1] == w[1], (k, g, w)


def critic_run(**kw):
    tr, _ = gaussian_trainer(**CRITIC_KW, **kw)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ms = [tr.train_step(b) for b in gaussian_batches(N_STEPS)]
    return tr, ms, sum("critic falls behind" in str(w.message) for w in rec)


def warning_starts(want):
    flags = [w[1] for w in want if w is not None]
    return sum(1 for k, f in enumerate(flags) if f == 1.0 and (k == 0 or flags[k - 1] == 0.0))


def test_critic_loss_rel_and_behind_from_the_returned_losses():
    tr, ms, n_warn = critic_run()
    want = expected_critic(ms, 3.0)
    assert sum(w is not None for w in want) == 6
    assert_same_critic(got_critic(ms), want)
    assert tr.critic_rel_smooth == pytest.approx(want[-1][2], rel=1e-12)
    assert n_warn == warning_starts(want)
    assert all("critic_loss_rel" not in m for m in ms if m["kind"] == "student")
    # a threshold inside the smoothed values' range: the flag follows the hand-smoothed series (not the raw one)
    smooth = sorted(w[2] for w in want if w is not None)
    lag = (smooth[2] + smooth[3]) / 2
    tr2, ms2, n_warn2 = critic_run(critic_lag_warn=lag)
    want2 = expected_critic(ms2, lag)
    assert [w[1] for w in want2 if w is not None].count(1.0) == 3
    assert_same_critic(got_critic(ms2), want2)
    assert n_warn2 == warning_starts(want2) >= 1


def test_critic_behind_warns_once_when_it_starts():
    tr, _ = gaussian_trainer(critic_lag_warn=1e-6, **CRITIC_KW)
    with pytest.warns(RuntimeWarning, match="critic falls behind") as rec:
        ms = [tr.train_step(b) for b in gaussian_batches(N_STEPS)]
    ours = [w for w in rec if "critic falls behind" in str(w.message)]
    assert len(ours) == 1
    fifth = [m["step"] for m in ms if m["kind"] == "critic"][4]
    assert f"step {fifth}:" in str(ours[0].message)
    want = expected_critic(ms, 1e-6)
    assert [w[1] for w in want if w is not None] == [1.0] * 6
    assert_same_critic(got_critic(ms), want)


@pytest.mark.parametrize("cut", [6, 11])            # 4 critic updates before (mid-reference) / 7 (after)
def test_resume_keeps_the_critic_reference(cut, tmp_path):
    bs = gaussian_batches(N_STEPS)
    whole, _ = gaussian_trainer(**CRITIC_KW)
    ms = [whole.train_step(b) for b in bs]
    first, _ = gaussian_trainer(**CRITIC_KW)
    for b in bs[:cut]:
        first.train_step(b)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert sd["diagnostics"]["critic_first"] == [m["loss_fake"] for m in ms[:cut] if m["kind"] == "critic"][:5]
    resumed, _ = gaussian_trainer(**CRITIC_KW)
    resumed.load_state_dict(sd)
    rest = [resumed.train_step(b) for b in bs[cut:]]
    assert_same_critic(got_critic(rest), got_critic(ms[cut:]))
    assert any(g is not None for g in got_critic(rest))
    assert (resumed.critic_ref, resumed.critic_rel_smooth) == pytest.approx((whole.critic_ref, whole.critic_rel_smooth),
                                                                            rel=1e-12)
    # and through a DCP checkpoint (the state in its meta)
    url = str(tmp_path / "dcp")
    first.save_checkpoint(url, format="dcp")
    again, _ = gaussian_trainer(**CRITIC_KW)
    again.load_checkpoint(url)
    assert (again.critic_ref, again._critic_first, again.critic_rel_smooth) == \
        (first.critic_ref, first._critic_first, first.critic_rel_smooth)
    assert_same_critic(got_critic([again.train_step(b) for b in bs[cut:]]), got_critic(ms[cut:]))


# ---- the separate tangent pass ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded():
    from rcm_core.teachers import get_teacher
    return get_teacher("embedded")


@pytest.mark.parametrize("perturb", [False, True], ids=["plain", "jvp_primal_perturbed"])
@pytest.mark.parametrize("nan_row", [None, 1])
def test_separate_tangent_pass_equals_the_fused_one(embedded, nan_row, perturb, monkeypatch):
    """On the CPU in float64 the separate JVP pass's primal output equals the back-propagated pass's bit for bit;
    on the GPU another attention kernel computes it. ``perturb`` stands in for that: the separate (no-grad) JVP
    pass's primal output is moved by 1e-3 of its scale; g, the loss and the gradient must not see it (F^- is
    sg F_theta of the back-propagated pass)."""
    g = torch.Generator().manual_seed(3)
    b = 3 if nan_row is not None else 2
    batch = {"latents": torch.randn(b, *embedded.latent_shape, generator=g),
             "cond": torch.randn(b, 16, 64, generator=g), "uncond": torch.zeros(1, 16, 64)}
    if nan_row is not None:
        batch["latents"][nan_row] = float("nan")
    out = {}
    real_jvp = trainer_module._jvp

    def jvp_with_another_primal(f, primals, tangents):
        y, j = real_jvp(f, primals, tangents)
        if torch.is_grad_enabled():                       # the fused pass: untouched
            return y, j
        noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
        return y + 1e-3 * y.detach().abs().nanmean() * noise, j

    for fused in (True, False):
        cfg = DistillConfig.preset("embedded", method="scm", dtype="float64", fused_tangent=fused,
                                   time_derivative="jvp", tangent_warmup_steps=0, lr_warmup_steps=0)
        tr = RCMTrainer(embedded, cfg)
        if perturb and not fused:
            monkeypatch.setattr(trainer_module, "_jvp", jvp_with_another_primal)
        m = tr.train_step(batch)
        monkeypatch.setattr(trainer_module, "_jvp", real_jvp)
        out[fused] = (m, [p.grad.detach().clone() for p in tr.student.parameters()])
    (mf, gf), (ms, gs) = out[True], out[False]
    assert mf["nan_masked"] == ms["nan_masked"] == (0 if nan_row is None else 1)
    assert mf["loss_cm"] > 0 and mf["loss_cm"] == pytest.approx(ms["loss_cm"], rel=1e-8)
    assert mf["g_norm"] == pytest.approx(ms["g_norm"], rel=1e-8)
    assert mf["grad_norm_student"] > 0
    assert mf["grad_norm_student"] == pytest.approx(ms["grad_norm_student"], rel=1e-8)
    for a, c in zip(gf, gs):
        assert torch.allclose(a, c, rtol=1e-8, atol=1e-12 * mf["grad_norm_student"])


def test_real_presets_leave_the_weight_ratio_off():
    # the weights' DMD/sCM ratio keeps two gradient copies during the DMD backward, which the memory planner does
    # not count: off (0) for the real teachers, on at every student update for the embedded toy
    for name in ("wan2.1-1.3b", "wan2.1-14b", "wan2.1-1.3b-paper", "wan2.1-14b-paper", "cosmos-predict2",
                 "wan2.2-ti2v-5b", "wan2.2-t2v-a14b"):
        assert DistillConfig.preset(name).grad_ratio_every == 0, name
    assert DistillConfig.preset("embedded").grad_ratio_every == 1

"""FP8 (E4M3) linears for frozen passes (rcm_core.nets.fp8), on the CPU: torch._scaled_mm against the product
of the dequantised operands written out here; the error against the float layer; quantising a Wan network's
blocks; what is refused. Speed and the quality cost on a GPU are not measured here."""
import copy

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad as fwAD

from real_fixtures import SMALL, tiny_wan, wan_dir  # noqa: F401  (wan_dir: a fixture)
from rcm_core.nets.fp8 import E4M3_MAX, Fp8Linear, calibrate, check_fp8_device, fp8_layers, quantize_fp8


def _rows_e4m3(x, scale=None):
    """Per-row E4M3 quantisation, written out: s = amax(|row|) / 448 (or the given scalar), q = round(x / s)."""
    x = x.double()
    s = (x.abs().amax(1, keepdim=True) / 448.0) if scale is None else torch.full((x.shape[0], 1), float(scale),
                                                                               dtype=torch.float64)
    q = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).double()
    return q, s


def _lin(n_in=64, n_out=48, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def test_cpu_and_old_gpus_are_refused_by_name():
    assert E4M3_MAX == 448.0
    with pytest.raises(ValueError, match=r"FP8 needs an NVIDIA GPU .*8\.9.*this run is on the cpu"):
        check_fp8_device("cpu")


@pytest.mark.parametrize("static", [False, True])
def test_scaled_mm_matches_the_dequantised_product(static):
    lin = _lin()
    x = torch.randn(3, 5, 64)
    act = float(x.abs().max()) / 448.0 if static else None
    f8 = Fp8Linear(lin, act_scale=act)
    with torch.no_grad():
        y = f8(x)
    assert y.shape == (3, 5, 48) and y.dtype == torch.bfloat16
    xq, sx = _rows_e4m3(x.reshape(-1, 64), act)
    wq, sw = _rows_e4m3(lin.weight.detach())
    ref = (xq * sx) @ (wq * sw).t() + lin.bias.detach().to(torch.bfloat16).double()
    torch.testing.assert_close(y.double().reshape(-1, 48), ref, rtol=1e-2, atol=1e-2)   # bf16 output rounding
    # the cost against the float layer: E4M3 keeps 3 mantissa bits (relative spacing 2^-3), errors average out
    exact = lin(x).double()
    rel = float((y.double() - exact).norm() / exact.norm())
    assert rel < 0.06, rel


def test_frozen_only():
    f8 = Fp8Linear(_lin())
    with pytest.raises(RuntimeError, match="requires grad"):
        f8(torch.randn(2, 64, requires_grad=True))
    with fwAD.dual_level(), torch.no_grad():
        with pytest.raises(RuntimeError, match="no forward-mode rule"):
            f8(fwAD.make_dual(torch.randn(2, 64), torch.randn(2, 64)))


def test_quantise_a_wan_networks_blocks_dynamic_and_calibrated():
    net = tiny_wan(num_attention_heads=2, attention_head_dim=16, ffn_dim=64).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, 8, 8, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 8, net.config.text_dim, generator=g)
    run = lambda m, b: m(hidden_states=b[0], timestep=t, encoder_hidden_states=b[1], return_dict=False)[0]
    with torch.no_grad():
        want = run(net, (x, ctx)).double()
    # per block: self-attention q/k/v/out, cross-attention q/k/v/out, FFN in/out = 10 linears, 2 blocks
    dyn = copy.deepcopy(net)
    assert quantize_fp8(dyn) == 20
    assert len(fp8_layers(dyn)) == 20 and all(n.startswith("blocks.") for n in fp8_layers(dyn))
    assert isinstance(dyn.condition_embedder.time_embedder.linear_1, nn.Linear)      # embeddings untouched
    calib = calibrate(net, [(x, ctx), (0.5 * x, ctx)], run)
    assert len(calib) == 20 and all(v > 0 for v in calib.values())
    stat = copy.deepcopy(net)
    assert quantize_fp8(stat, calibration=calib) == 20
    with torch.no_grad():
        for m in (dyn, stat):
            got = run(m, (x, ctx)).double()
            rel = float((got - want).norm() / want.norm())
            assert rel < 0.02, rel          # the serving goal for a clip (issue 23): 2 %
    # a calibration missing a layer is refused before anything is replaced
    partial = dict(list(calib.items())[:5])
    other = copy.deepcopy(net)
    with pytest.raises(ValueError, match="no calibrated activation scale for 15 of 20 layers"):
        quantize_fp8(other, calibration=partial)
    assert fp8_layers(other) == []


def test_teacher_fp8_option_in_the_trainer(wan_dir, monkeypatch):
    """DistillConfig.teacher_fp8: refused on the CPU at construction (naming it) and where the teacher is not its
    own bf16 network; with the CPU emulation a bf16 sCM step and an rCM critic/student pair run, the teacher's
    blocks in FP8 (no gradient or tangent reaches them: Fp8Linear would raise) and the student's in float."""
    import math
    from rcm_core.config import DistillConfig
    from rcm_core.real import load_teacher_from_path
    from rcm_core.trainer import RCMTrainer
    te = load_teacher_from_path(wan_dir, **SMALL)
    kw = dict(dtype="bfloat16", tangent_warmup_steps=0, batch_size=1, iterations=2, lr_warmup_steps=0,
              student_update_freq=2, teacher_fp8=True)
    with pytest.raises(ValueError, match="teacher_fp8=True needs .*fsdp=True"):
        DistillConfig.preset(te.preset, method="scm", fsdp=True, activation_checkpointing="full", **kw)
    monkeypatch.delenv("RCM_FP8_EMULATE", raising=False)
    with pytest.raises(ValueError, match="this run is on the cpu"):
        RCMTrainer(te, DistillConfig.preset(te.preset, method="scm", **kw))
    monkeypatch.setenv("RCM_FP8_EMULATE", "1")
    batch = dict(latents=torch.randn(1, *te.latent_shape), cond=te.encode_text(["a red cat runs"]),
                 uncond=te.negative_embedding())
    for method in ("scm", "rcm"):
        tr = RCMTrainer(te, DistillConfig.preset(te.preset, method=method, **kw))
        assert fp8_layers(tr.teacher.net) and not fp8_layers(tr.student.net)
        for _ in range(2):
            m = tr.train_step(batch)
            assert m["skipped"] == 0 and all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m

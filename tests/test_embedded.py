"""Tests for the embedded teacher (rcm_core.embedded): data, text encoder, VideoDiT, assets.

Fast CPU tests: tiny configs, a handful of clips.
"""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from rcm_core.embedded import data as D
from rcm_core.embedded.dit import VideoDiT, VideoDiTConfig, apply_rope, rope_freqs
from rcm_core.embedded.text import TextEncoder, tokenize

TINY = dict(dim=24, heads=2, layers=2, ffn_dim=48, text_dim=16, freq_dim=16)


def _tiny(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    net = VideoDiT(VideoDiTConfig(**{**TINY, **kw}))
    with torch.no_grad():  # the head is zero-initialised: randomise so the output depends on everything
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.to(dtype)


# ---------------------------------------------------------------- data

def test_clips_shapes_and_determinism():
    a, pa, la = D.make_clips(6, seed=3)
    b, pb, lb = D.make_clips(6, seed=3)
    c, _, _ = D.make_clips(6, seed=4)
    assert a.shape == (6, 1, D.T, D.H, D.W) == (6, 1, 4, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and pa == pb and la == lb
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and a.amax((1, 2, 3, 4)).min() > 0.5
    for p, (digit, name) in zip(pa, la):
        assert p == f"a {digit} drifting {name}" and D.parse_prompt(p) == (digit, name)


def test_prompt_set_splits_and_latents():
    ps = D.embedded_prompts()
    assert len(ps) == 80 == len(set(ps)) and "a 3 drifting up-left" in ps
    tr, ytr = D.digit_images("train")
    ev, yev = D.digit_images("eval")
    assert tr.shape[1:] == ev.shape[1:] == (8, 8) and len(tr) + len(ev) == 1797 and len(ev) > 300
    assert set(ytr.tolist()) == set(yev.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="split"):
        D.digit_images("test")
    clips, _, _ = D.make_clips(64, seed=0)
    z = D.to_latent(clips)
    assert abs(z.mean().item()) < 0.2 and 0.8 < z.std().item() < 1.2
    assert torch.allclose(D.from_latent(z), clips, atol=1e-6)
    assert D.from_latent(torch.full((1,), 100.0)).item() == 1.0


def test_motion_matches_prompt_direction():
    clips, _, labels = D.make_clips(24, seed=7)
    for i, (_, name) in enumerate(labels):
        dy, dx = D.DIRECTIONS[name]
        frames = clips[i, 0]
        shifts = []
        for sp in D.SPEEDS:
            if all(torch.equal(torch.roll(frames[f], (dy * sp, dx * sp), (0, 1)), frames[f + 1])
                   for f in range(D.T - 1)):
                shifts.append(sp)
        assert len(shifts) == 1, f"clip {i} ({name}) does not move by a whole speed per frame"
    from rcm_core.embedded.preview import centroid_motion, direction_of
    assert direction_of(centroid_motion(clips)) == [n for _, n in labels]


# ---------------------------------------------------------------- text encoder

def test_text_encoder_shapes_and_properties():
    enc = TextEncoder(dim=64, max_tokens=16)
    assert all(not p.requires_grad for p in enc.parameters())
    out = enc.encode(["a 3 drifting up-left", "a 3 drifting up-right", ""])
    assert out.shape == (3, 16, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])
    neg = enc.encode([""])
    assert torch.equal(neg[0], out[2]) and neg.abs().sum() > 0  # </s> token: not all zeros
    assert neg[0, 1:].abs().sum() == 0  # padding is zero
    assert tokenize("A 3, drifting UP-left!")[0] == ["a", "3", "drifting", "up", "left", "</s>"]
    # unknown words get stable embeddings
    assert torch.equal(enc.encode(["zebra quantum"]), TextEncoder().encode(["zebra quantum"]))


def test_text_encoder_same_in_fresh_process(tmp_path):
    prompts = ["a 7 drifting down", "", "an unknown word salad"]
    ref = TextEncoder().encode(prompts)
    f = tmp_path / "emb.pt"
    code = textwrap.dedent(f"""
        import torch
        from rcm_core.embedded.text import TextEncoder
        torch.save(TextEncoder().encode({prompts!r}), {str(f)!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert torch.equal(torch.load(f), ref)


def test_text_encoder_truncation_warns():
    enc = TextEncoder(max_tokens=16)
    long = " ".join(f"w{i}" for i in range(20))
    with pytest.warns(UserWarning, match="truncated.*w19"):
        out = enc.encode([long])
    assert out.shape == (1, 16, 64)


# ---------------------------------------------------------------- DiT

def test_dit_shapes_and_uses_project_attention(monkeypatch):
    import rcm_core.embedded.dit as dit
    net = _tiny()
    calls = []
    real = dit.attention

    def counting(q, k, v, **kw):
        calls.append(kw.get("layout"))
        return real(q, k, v, **kw)

    def no_sdpa(*a, **k):
        raise AssertionError("torch SDPA must not be used")

    monkeypatch.setattr(dit, "attention", counting)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    x = torch.randn(2, 1, 4, 8, 6)
    y = net(x, torch.tensor([10.0, 900.0]), torch.randn(2, 5, 16))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert calls == ["bnhd"] * (2 * net.cfg.layers)


@pytest.mark.parametrize("x_shape,t_shape,c_shape,match", [
    ((2, 1, 4, 8), (2,), (2, 5, 16), "x must be 5-D"),
    ((2, 3, 4, 8, 8), (2,), (2, 5, 16), "channels"),
    ((2, 1, 4, 7, 8), (2,), (2, 5, 16), "H=7 not divisible"),
    ((2, 1, 4, 8, 8), (3,), (2, 5, 16), "timestep"),
    ((2, 1, 4, 8, 8), (2, 1), (2, 5, 16), "timestep"),
    ((2, 1, 4, 8, 8), (2,), (2, 5, 17), "context"),
    ((2, 1, 4, 8, 8), (2,), (1, 5, 16), "context"),
    ((2, 1, 4, 8, 8), (2,), (2, 16), "context must be 3-D"),
])
def test_dit_shape_errors(x_shape, t_shape, c_shape, match):
    net = _tiny()
    with pytest.raises(ValueError, match=match):
        net(torch.randn(x_shape), torch.rand(t_shape), torch.randn(c_shape))


def test_config_roundtrip_and_validation():
    cfg = VideoDiTConfig(**TINY)
    assert VideoDiTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        VideoDiTConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="divisible"):
        VideoDiTConfig(dim=25, heads=2)


def test_rope_relative_position():
    torch.manual_seed(0)
    hd, grid = 24, (3, 4, 5)
    cos, sin = rope_freqs(grid, hd, dtype=torch.float64)
    n = math.prod(grid)
    q0, k0 = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)
    q = apply_rope(q0.expand(1, n, 1, hd), cos, sin)[0, :, 0]
    k = apply_rope(k0.expand(1, n, 1, hd), cos, sin)[0, :, 0]
    dots = q @ k.T  # (n, n)
    pos = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1).reshape(n, 3)
    by_diff = {}
    for i in range(n):
        for j in range(n):
            by_diff.setdefault(tuple((pos[j] - pos[i]).tolist()), []).append(dots[i, j])
    assert len(by_diff) == (2 * 3 - 1) * (2 * 4 - 1) * (2 * 5 - 1)
    for vals in by_diff.values():
        v = torch.stack(vals)
        assert torch.allclose(v, v[0].expand_as(v), atol=1e-10)
    # and it really depends on the difference (not a constant)
    assert dots.std() > 1e-3
    # rotation preserves norms
    assert torch.allclose(q.norm(dim=-1), q0.norm().expand(n))


def test_dit_jvp_matches_finite_differences():
    net = _tiny(torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 2, 4, 4, generator=g, dtype=torch.float64)
    ts = torch.tensor([250.0, 800.0], dtype=torch.float64)
    ctx = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    dt = 50.0 * torch.randn(2, generator=g, dtype=torch.float64)
    f = lambda a, b: net(a, b, ctx)
    y, jv = torch.func.jvp(f, (x, ts), (dx, dt))
    assert torch.allclose(y, f(x, ts))
    h = 1e-5  # float64 throughout (time path follows the model dtype): FD error ~h^2
    fd = (f(x + h * dx, ts + h * dt) - f(x - h * dx, ts - h * dt)) / (2 * h)
    rel = ((jv - fd).norm() / fd.norm()).item()
    assert rel < 1e-6, rel
    # the time direction alone contributes (timestep is really differentiated)
    _, jt = torch.func.jvp(f, (x, ts), (torch.zeros_like(x), dt))
    assert jt.norm() > 1e-6 * jv.norm()


def test_time_path_is_high_precision():
    net = _tiny(torch.bfloat16)
    e, e0 = net._time(torch.tensor([123.4, 999.0]))
    assert e.dtype == e0.dtype == torch.float32
    y = net(torch.randn(1, 1, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, 16))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert _tiny(torch.float64)._time(torch.tensor([1.0]))[0].dtype == torch.float64


# ---------------------------------------------------------------- shipped teacher

def test_shipped_teacher_loads_and_runs():
    from rcm_core.embedded import ASSETS, load_teacher_net, load_text_encoder, teacher_meta
    meta = teacher_meta()
    assert (ASSETS / "teacher.safetensors").stat().st_size < 8 * 2 ** 20
    for key in ("model_config", "data_config", "training_command", "steps", "final_loss", "seed",
                "torch_version"):
        assert key in meta
    net = load_teacher_net()
    assert not net.training and all(not p.requires_grad for p in net.parameters())
    enc = load_text_encoder()
    clips, prompts, _ = D.make_clips(2, seed=0)
    x0 = D.to_latent(clips)
    eps = torch.randn_like(x0)
    s = torch.tensor([0.3, 0.7])
    xs = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * eps
    with torch.no_grad():
        v = net(xs, 1000 * s, enc.encode(prompts))
    assert v.shape == x0.shape and torch.isfinite(v).all()
    # a trained teacher beats the trivial predictor v = 0 (MSE = E|eps - x0|^2 ~ 2)
    assert (v - (eps - x0)).pow(2).mean() < 1.0


def test_save_grid(tmp_path):
    from rcm_core.embedded.preview import save_grid
    clips, prompts, _ = D.make_clips(3, seed=0)
    p = save_grid(clips, tmp_path / "g.png", ncol=2, titles=prompts)
    assert p.exists() and p.stat().st_size > 1000
    with pytest.raises(ValueError, match="B, 1, T, H, W"):
        save_grid(clips[:, 0], tmp_path / "bad.png")

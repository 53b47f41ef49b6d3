"""The compute floor of a training step and of a served clip: FLOPs counted on meta tensors, divided by a card's
dense peak (issues 22 and 23). No GPU and no weights needed: the networks are built on the ``meta`` device
(diffusers' classes, the registered architecture) and run under ``torch.utils.flop_counter.FlopCounterMode``,
which counts matmuls, convolutions and attention (SDPA: 4 N^2 d per head, x2.5 for its backward) at the
dispatcher. Element-wise work, norms and casts count nothing: the floor is the tensor-core time alone, so a
measured time above it is the room left, and a goal below it cannot be met on that card by kernels alone.

    python bench/flop_floor.py [--teacher wan2.1-1.3b] [--frames 81 --height 480 --width 832]
                               [--out bench/results/flop_floor.json]

Rows: the DiT forward (split into linears, attention and the rest), the Wan VAE decode, and the passes each
training step makes (as ``rcm-algorithm.md`` and issue 22 count them: the sCM step = teacher CFG pair +
student forward with the tangent (2 x the forward's linear FLOPs, attention tangent 2 x primal (S and dS)) +
backward (2 x forward) [+ recompute under AC]). Peaks: dense bf16 / FP8 tensor-core TFLOP/s from the vendor
data sheets (H100 SXM 989 / 1979, H200 the same chip and clocks: 989 / 1979). No sparsity.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "steps", ROOT / "kernels"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

PEAK_TFLOPS = {"h200_bf16": 989.0, "h200_fp8": 1979.0}     # dense, data sheets; the H100 SXM has the same figures
# On meta tensors SDPA decomposes to its math path, whose two products are ``bmm``s; the DiTs' linears are
# ``mm``/``addmm`` (diffusers has no batched-matmul linears), so ``bmm`` is attention here.
ATTN_OPS = ("_scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention", "aten.bmm")


def _split(counts: dict) -> dict:
    """{op name: flops} of the whole run -> linears (mm/addmm/bmm), attention, convolutions, other."""
    out = {"linear": 0, "attention": 0, "conv": 0, "other": 0}
    for op, n in counts.items():
        name = str(op)
        if any(a in name for a in ATTN_OPS):
            out["attention"] += n
        elif "conv" in name:
            out["conv"] += n
        elif any(m in name for m in ("mm", "addmm", "bmm", "linear")):
            out["linear"] += n
        else:
            out["other"] += n
    return out


def count(fn) -> dict:
    with FlopCounterMode(display=False) as fc:
        fn()
    return _split(fc.get_flop_counts()["Global"])


def dit_forward_flops(teacher: str, frames: int, height: int, width: int, overrides: dict | None = None,
                      text_len: int | None = None) -> dict:
    """FLOPs of one forward of the registered DiT on one latent, SDPA attention (the primal path);
    ``overrides``: transformer config changes (tests use a tiny one), ``text_len``: the text tokens (the spec's)."""
    import diffusers
    from rcm_core.real import SPECS

    spec = SPECS[teacher]
    cfg = {**spec.transformer_config, **(overrides or {})}
    with torch.device("meta"):
        net = getattr(diffusers, spec.transformer_class)(**cfg).to(torch.bfloat16)
    lat = (1, cfg.get("in_channels", 16), (frames - 1) // 4 + 1, height // 8, width // 8)
    x = torch.empty(lat, device="meta", dtype=torch.bfloat16)
    t = torch.full((1,), 500.0, device="meta")
    ctx = torch.empty(1, text_len or spec.text_len, cfg["text_dim"], device="meta", dtype=torch.bfloat16)
    with torch.no_grad():
        f = count(lambda: net(x, t, ctx, return_dict=False))
    p = cfg.get("patch_size", (1, 2, 2))
    f["tokens"] = (lat[2] // p[0]) * (lat[3] // p[1]) * (lat[4] // p[2])
    f["params"] = sum(q.numel() for q in net.parameters())
    return f


def vae_decode_flops(frames: int, height: int, width: int) -> dict:
    """FLOPs of the Wan2.1 VAE decode of one clip (diffusers' frame-by-frame causal decode; chunking does not
    change the count)."""
    import diffusers
    with torch.device("meta"):
        vae = diffusers.AutoencoderKLWan().to(torch.bfloat16).eval()
    z = torch.empty(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, device="meta", dtype=torch.bfloat16)
    with torch.no_grad():
        return count(lambda: vae.decode(z, return_dict=False))


def step_floors(fwd: dict) -> dict:
    """Tensor-core FLOPs of each step kind (batch 1, as bench_real.py's rows), from the forward's linears (L)
    and attention (A = 2 products of 2 N^2 d per head):

    * backward: 2 L (input and weight gradients) + 2.5 A (flash-style: S again, dP, dV, dQ, dK: 5 products);
    * forward-mode tangent: + L (the tangents through the linears; weights carry none) + 2 A (dS = dQ K^T +
      Q dK^T and dO = dP V + P dV: 4 products), so a fused forward with tangent is L + L + A + 2 A; its
      attention, 3 A, is why the tangent kernel's floor is 3x the primal's (issue 22's <= 3.1x goal);
    * activation checkpointing: ``full`` recomputes the forward (L + A) before the backward,
      ``keep_attention`` recomputes L only;
    * sCM step: teacher CFG pair (2 forwards) + student forward with tangent + recompute + backward;
    * rCM student step, rollout n = 1: the sCM step + the generator's forward, recompute and backward + teacher
      CFG pair and fake-score forward at the generated sample;
    * critic step at bench_real.py's step 11 (rollout n = 2: the critic's 6th update, n = 5 mod 4 + 1): 2
      student forwards without grad + the fake score's forward, recompute and backward."""
    L, A = fwd["linear"], fwd["attention"]
    fw = L + A
    bwd = 2 * L + 2.5 * A
    fw_tangent = fw + L + 2 * A

    def trained(recompute):                      # forward + AC recompute + backward of a trained pass
        return recompute + bwd

    out = {"forward": fw, "teacher_cfg_pair": 2 * fw}
    for ac, rec in (("full_ac", fw), ("keep_attention", L)):
        scm = 2 * fw + fw_tangent + trained(rec)
        out[f"plain_{ac}"] = fw + trained(rec)
        out[f"scm_fused_{ac}"] = scm
        out[f"rcm_student_rollout1_{ac}"] = scm + fw + trained(rec) + 2 * fw + fw
        out[f"critic_rollout2_{ac}"] = 2 * fw + fw + trained(rec)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="wan2.1-1.3b")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--out", default="bench/results/flop_floor.json")
    a = ap.parse_args(argv)
    fwd = dit_forward_flops(a.teacher, a.frames, a.height, a.width)
    vae = vae_decode_flops(a.frames, a.height, a.width)
    steps = step_floors(fwd)
    bf16 = PEAK_TFLOPS["h200_bf16"] * 1e12
    fp8 = PEAK_TFLOPS["h200_fp8"] * 1e12
    vae_total = sum(v for k, v in vae.items())
    fwd_total = fwd["linear"] + fwd["attention"] + fwd["conv"] + fwd["other"]
    serving = {}
    for n in (1, 2, 4):
        serving[f"{n}_step_e2e"] = {"tflop": (n * fwd_total + vae_total) / 1e12,
                                    "floor_s_bf16": (n * fwd_total + vae_total) / bf16,
                                    # FP8 linears (the serving option) with bf16 attention and decode
                                    "floor_s_fp8_linears": (n * (fwd["linear"] / fp8 + (fwd_total - fwd["linear"])
                                                                 / bf16)) + vae_total / bf16,
                                    # the whole DiT in FP8 (linears and attention), decode in bf16
                                    "floor_s_fp8_dit": n * fwd_total / fp8 + vae_total / bf16}
    res = {"teacher": a.teacher, "shape": [a.frames, a.height, a.width], "peak_tflops": PEAK_TFLOPS,
           "dit_forward": {k: (v / 1e12 if k not in ("tokens", "params") else v) for k, v in fwd.items()},
           "vae_decode_tflop": {k: v / 1e12 for k, v in vae.items()},
           "steps_tflop": {k: v / 1e12 for k, v in steps.items()},
           "steps_floor_s_bf16": {k: v / bf16 for k, v in steps.items()}, "serving": serving,
           "torch": torch.__version__}
    print(f"{a.teacher} {a.frames}x{a.height}x{a.width}: {fwd['tokens']} tokens, {fwd['params'] / 1e9:.2f} B params")
    print(f"DiT forward: linear {fwd['linear'] / 1e12:.1f}, attention {fwd['attention'] / 1e12:.1f}, conv "
          f"{fwd['conv'] / 1e12:.2f}, other {fwd['other'] / 1e12:.2f} TFLOP -> {fwd_total / bf16 * 1e3:.0f} ms at "
          f"{PEAK_TFLOPS['h200_bf16']:.0f} TFLOP/s")
    print(f"VAE decode: {vae_total / 1e12:.1f} TFLOP ({vae['conv'] / 1e12:.1f} conv) -> {vae_total / bf16 * 1e3:.0f} ms")
    for k, v in steps.items():
        print(f"  {k:<40} {v / 1e12:8.1f} TFLOP  floor {v / bf16:6.3f} s")
    for k, v in serving.items():
        print(f"  serving {k:<10} {v['tflop']:8.1f} TFLOP  floor bf16 {v['floor_s_bf16']:.3f} s, FP8 linears "
              f"{v['floor_s_fp8_linears']:.3f} s, FP8 DiT {v['floor_s_fp8_dit']:.3f} s")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    os.environ.setdefault("RCM_ATTN_PRIMAL", "sdpa")
    main()

"""The Wan block's element-wise ops, Triton (rcm_core.nets.block_ops with kernel=True) against diffusers'
expressions (kernel=False), at Wan2.1-1.3B's width and 480x832x81's 32,760 tokens, bf16 residual stream:
forward, forward with a tangent (a dual input, as the fused sCM pass) and forward + backward; and RoPE on q at
12 heads x 128: the formula, the stride-2 kernel and the split kernel. Prints a table and
writes JSON (median of CUDA-event timings; memory traffic the kernel must move, and the bandwidth it reached).

    python bench/bench_block_ops.py --out bench/results/block_ops.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.autograd import forward_ad as fwAD

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from rcm_core.nets.block_ops import gated_residual, norm_affine  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def cases(L: int, D: int, dev):
    x = torch.randn(1, L, D, device=dev, dtype=torch.bfloat16)
    dx, gy, y = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
    a = (1 + 0.3 * torch.randn(1, 1, D, device=dev)).requires_grad_(True)
    b = (0.2 * torch.randn(1, 1, D, device=dev)).requires_grad_(True)
    da, db = 0.1 * torch.randn(1, 1, D, device=dev), 0.1 * torch.randn(1, 1, D, device=dev)
    elem = x.numel() * 2            # bytes of one bf16 (L, D) tensor

    def norm(kernel, mode):
        if mode == "forward":
            return lambda: norm_affine(x, a.detach(), b.detach(), 1e-6, kernel=kernel)
        if mode == "tangent":
            def f():
                with torch.no_grad(), fwAD.dual_level():
                    return fwAD.unpack_dual(norm_affine(fwAD.make_dual(x, dx), fwAD.make_dual(a.detach(), da),
                                                        fwAD.make_dual(b.detach(), db), 1e-6, kernel=kernel))
            return f
        xs = x.detach().requires_grad_(True)
        return lambda: torch.autograd.backward(norm_affine(xs, a, b, 1e-6, kernel=kernel), gy)

    def resid(kernel, mode):
        if mode == "forward":
            return lambda: gated_residual(x, y, a.detach(), kernel=kernel)
        if mode == "tangent":
            def f():
                with torch.no_grad(), fwAD.dual_level():
                    return fwAD.unpack_dual(gated_residual(fwAD.make_dual(x, dx), fwAD.make_dual(y, gy),
                                                           fwAD.make_dual(a.detach(), da), kernel=kernel))
            return f
        xs, ys = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
        return lambda: torch.autograd.backward(gated_residual(xs, ys, a, kernel=kernel), gy)

    # bytes the fused kernels must move (bf16 tensors of the residual stream's size)
    traffic = {("norm_affine", "forward"): 2 * elem, ("norm_affine", "tangent"): 5 * elem,
               ("norm_affine", "fwd+bwd"): 5 * elem, ("gated_residual", "forward"): 3 * elem,
               ("gated_residual", "tangent"): 6 * elem, ("gated_residual", "fwd+bwd"): 6 * elem}
    return {"norm_affine": norm, "gated_residual": resid}, traffic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="bench/results/block_ops.json")
    a = p.parse_args()
    dev = torch.device("cuda")
    ops, traffic = cases(a.tokens, a.dim, dev)
    rows = []
    print(f"{'op':16s} {'pass':8s} {'diffusers ms':>13s} {'triton ms':>10s} {'speed-up':>9s} {'triton GB/s':>12s}")
    for name, make in ops.items():
        for mode in ("forward", "tangent", "fwd+bwd"):
            ref = timed(make(False, mode), a.repeats)
            ker = timed(make(True, mode), a.repeats)
            gbs = traffic[(name, mode)] / ker / 1e9
            rows.append({"op": name, "pass": mode, "diffusers_s": ref, "triton_s": ker, "speedup": ref / ker,
                         "triton_gb_s": gbs})
            print(f"{name:16s} {mode:8s} {ref * 1e3:13.3f} {ker * 1e3:10.3f} {ref / ker:8.2f}x {gbs:12.0f}")
    # RoPE on q (or k): diffusers' formula, the stride-2 kernel (the default) and the split kernel
    from rcm_core.nets.rope import rotate_pairs
    from rcm_kernels import rope
    heads = a.dim // 128
    q = torch.randn(1, a.tokens, heads, 128, device=dev, dtype=torch.bfloat16)
    theta = torch.rand(a.tokens, 64, device=dev) * 6 - 3
    c, s_ = theta.cos(), theta.sin()
    ref = timed(lambda: rotate_pairs(q, c[None, :, None], s_[None, :, None]), a.repeats)
    moved = 2 * q.numel() * 2
    for name, fn in (("stride-2 kernel", lambda: rope.rotate(q, c, s_)),
                     ("split kernel", lambda: rope.rotate(q, c, s_, split=True))):
        ker = timed(fn, a.repeats)
        rows.append({"op": "rope", "pass": f"forward, {name}", "diffusers_s": ref, "triton_s": ker,
                     "speedup": ref / ker, "triton_gb_s": moved / ker / 1e9})
        print(f"{'rope':16s} {name:16s} {ref * 1e3:5.3f} {ker * 1e3:10.3f} {ref / ker:8.2f}x {moved / ker / 1e9:12.0f}")
    import triton
    meta = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "tokens": a.tokens, "dim": a.dim, "dtype": "bfloat16 residual stream",
            "baseline": "diffusers' expressions (PyTorch eager kernels)", "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()

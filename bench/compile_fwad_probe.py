"""Does torch.compile compose with the forward-mode AD the sCM tangent uses (issue 22, item 2)?

    python bench/compile_fwad_probe.py [--out bench/results/compile_fwad_probe.json]

One block of a tiny Wan2.1 transformer (the project's attention op installed, float32, CPU) is compiled
(``torch.compile(block)``, inductor) and called three ways: a plain forward; a forward on
``torch.autograd.forward_ad`` dual tensors (how the trainer's fused tangent records the tangent together
with the graph); ``torch.func.jvp`` (the separate-JVP mode). Each result is compared with the eager block
(float32, relative L2), or the exception is recorded. The answer decides where compile can be used: not in
the student's dual forward when the first mode fails; in the frozen teacher's no-grad passes always.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.autograd import forward_ad as fwAD

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/compile_fwad_probe.json")
    a = ap.parse_args(argv)
    from real_fixtures import tiny_wan
    from rcm_core.real import install_rcm_attention

    net = tiny_wan().float().eval()
    install_rcm_attention(net)
    block = net.blocks[0]
    g = torch.Generator().manual_seed(0)
    D = block.norm1.normalized_shape[0] if hasattr(block.norm1, "normalized_shape") else 32
    x, dx = (torch.randn(1, 128, D, generator=g) for _ in range(2))     # 2 x 8 x 8 patches
    ctx = torch.randn(1, 8, D, generator=g)
    temb = torch.randn(1, 6, D, generator=g)
    rope = net.rope(torch.randn(1, 4, 2, 16, 16, generator=g))

    def call(m, h):
        return m(h, ctx, temb, rope)

    def dual(m):
        with fwAD.dual_level():
            out = call(m, fwAD.make_dual(x, dx))
            p, t = fwAD.unpack_dual(out)
            return p, t

    def func_jvp(m):
        return torch.func.jvp(lambda h: call(m, h), (x,), (dx,))

    rel = lambda u, v: float((u.detach().double() - v.detach().double()).norm() / v.detach().double().norm())
    eager = {"plain": (call(block, x),), "fwAD dual": dual(block), "torch.func.jvp": func_jvp(block)}
    rows = {}
    for name, fn in (("plain", lambda m: (call(m, x),)), ("fwAD dual", dual), ("torch.func.jvp", func_jvp)):
        torch._dynamo.reset()
        comp = torch.compile(block)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                got = fn(comp)
            lost = [i for i, (u, v) in enumerate(zip(got, eager[name])) if u is None and v is not None]
            errs = [rel(u, v) for u, v in zip(got, eager[name]) if u is not None and v is not None]
            rows[name] = {"ok": not lost, "rel_l2_vs_eager": errs, "s": time.perf_counter() - t0,
                          **({"error": "the tangent came back None (dropped silently)"} if lost else {})}
        except Exception as e:  # noqa: BLE001 - the point is to record it
            rows[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                          "s": time.perf_counter() - t0}
        print(f"{name:16s} {rows[name]}", flush=True)
    res = {"torch": torch.__version__, "device": "cpu", "date": time.strftime("%Y-%m-%d"), "rows": rows}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()

"""Sliding-tile (block-sparse) self-attention against dense SDPA at Wan2.1-1.3B's 480p size (issue 23, item 3).

Wan2.1 1.3B at 480x832x81: latent 16x21x60x104, patch (1, 2, 2) -> token grid (21, 30, 52) = 32760 tokens,
12 heads of 128, bf16. Rows:

  dense               F.scaled_dot_product_attention, PyTorch's default backend choice (cuDNN on Hopper):
                      the baseline
  sta:t..:w..         rcm_core.nets.sparse_attention.sliding_tile_attention (compiled flex_attention with a
                      BlockMask built from the tiles; the q/k/v permutation to tile-major order and back is
                      inside the timing)

per row: median ms, speedup over dense, density (fraction of the real (query, key) pairs attended), the fraction
of the dense work the kernel computes (listed blocks x block^2 / N^2: padding makes it exceed the density), and the
output's relative L2 error against dense attention. One setting is also compared with the exact masked reference
(dense maths with the sliding-tile mask, fp32), which checks the kernel itself.

Two input sets, neither a quality measurement (that needs the student's real weights):
  random  N(0, 1) q/k/v: attention spread over all keys, the error against dense a pessimistic bound;
  local   synthetic locality: q and k share a positional embedding whose dot product falls off with the 3-D
          token distance as exp(-d^2 / (2 * 4^2)) (random Fourier features), plus noise, so attention peaks
          within a few tokens, as a video DiT's mostly does; timings are not repeated for it.
Timing: CUDA events, median of ``--reps`` calls after warm-up; the first call of each kernel (compile) is timed
apart, as ``compile_s``.

    python bench/sparse_attention.py --out bench/results/sparse_attention.json          # H200, < 60 s
    python bench/sparse_attention.py --smoke --out /tmp/sparse_smoke.json               # CPU, tiny grid
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from rcm_core.nets import sparse_attention as sa  # noqa: E402
from rcm_core.nets.sparse_attention import TileSpec, density, parse_sliding_tile, sliding_tile_attention  # noqa: E402

# the tile: sa.WAN_480P_TILE, (3, 8, 8) (why: the comment at its definition)
WAN = {"grid": sa.WAN_480P_GRID, "heads": 12, "head_dim": 128, "dtype": torch.bfloat16,
       "settings": ["sta:t3x8x8:w3x3x3", "sta:t3x8x8:w3x3x5", "sta:t3x8x8:w5x3x5"], "exact": "sta:t3x8x8:w3x3x5"}
SMOKE = {"grid": (4, 8, 16), "heads": 2, "head_dim": 32, "dtype": torch.float32,
         "settings": ["sta:t2x4x8:w1x1x1", "sta:t2x4x8:w1x1x3"], "exact": "sta:t2x4x8:w1x1x3"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def timed(fn, reps: int, warmup: int = 3) -> tuple:
    """(first call s, median ms of ``reps`` calls after ``warmup``)."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return first, statistics.median(times)


def work_fraction(spec: TileSpec) -> float:
    """Dense-work fraction the flex kernel computes: listed blocks x block^2 over N^2."""
    block = sa._block_size(spec)
    kv_num, _, full_num, _, _ = sa.block_tables(spec, block)
    return int(kv_num.sum() + full_num.sum()) * block * block / spec.tokens ** 2


def local_qkv(grid, h: int, d: int, dtype, device, g, length: float = 4.0, peak: float = 12.0):
    """q, k, v (1, h, N, d) whose scaled q.k is about ``peak`` * exp(-|x - y|^2 / (2 length^2)) for tokens at
    grid coordinates x, y (random Fourier features of the coordinates), plus N(0, 1/4) noise."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in grid],
                                        indexing="ij"), -1).reshape(-1, 3)
    w = torch.randn(h, 3, d // 2, device=device, generator=g) / length
    phase = coords @ w                                                   # (h, N, d/2)
    e = torch.cat([phase.cos(), phase.sin()], -1) / (d / 2) ** 0.5       # e(x).e(y) ~ exp(-|x-y|^2 / 2l^2)
    alpha = (peak * d ** 0.5) ** 0.5
    noise = lambda: 0.5 * torch.randn(h, coords.shape[0], d, device=device, generator=g)  # noqa: E731
    q, k = alpha * e + noise(), alpha * e + noise()
    v = torch.randn(h, coords.shape[0], d, device=device, generator=g)
    return [x[None].to(dtype) for x in (q, k, v)]


def run(cfg: dict, reps: int, device: str) -> dict:
    grid, h, d, dt = cfg["grid"], cfg["heads"], cfg["head_dim"], cfg["dtype"]
    n = grid[0] * grid[1] * grid[2]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, device=device, dtype=dt, generator=g) for _ in range(3))
    lq, lk, lv = local_qkv(grid, h, d, dt, device, g)
    rows = []
    with torch.no_grad():
        dense = F.scaled_dot_product_attention(q, k, v)
        dense_local = F.scaled_dot_product_attention(lq, lk, lv)
        first, ms = timed(lambda: F.scaled_dot_product_attention(q, k, v), reps)
        rows.append({"name": "dense", "ms": ms, "speedup": 1.0, "density": 1.0, "work": 1.0, "rel_l2_vs_dense": 0.0,
                     "rel_l2_vs_dense_local": 0.0, "compile_s": first})
        for setting in cfg["settings"]:
            spec = parse_sliding_tile(setting).spec(grid)
            backend = "flex"                                  # on the CPU too (--smoke): the kernel under test
            fn = lambda: sliding_tile_attention(q, k, v, spec, backend=backend)  # noqa: E731
            first, t = timed(fn, reps)
            out = fn()
            row = {"name": setting, "ms": t, "speedup": ms / t, "density": density(spec), "work": work_fraction(spec),
                   "rel_l2_vs_dense": rel(out, dense), "compile_s": first,
                   "rel_l2_vs_dense_local": rel(sliding_tile_attention(lq, lk, lv, spec, backend=backend), dense_local)}
            if setting == cfg["exact"]:
                ref = sliding_tile_attention(q, k, v, spec, backend="reference")
                row["rel_l2_vs_exact_masked"] = rel(out, ref)
            rows.append(row)
    return {"grid": list(grid), "tokens": n, "heads": h, "head_dim": d, "dtype": str(dt).replace("torch.", ""),
            "rows": rows}


def table(res: dict) -> str:
    lines = [f"grid {tuple(res['grid'])} = {res['tokens']} tokens, {res['heads']} heads x {res['head_dim']}, "
             f"{res['dtype']}",
             f"{'setting':<20}{'ms':>10}{'speedup':>9}{'density':>9}{'work':>7}{'L2 vs dense':>13}"
             f"{'(local)':>9}{'vs exact':>10}{'first s':>9}"]
    for r in res["rows"]:
        ex = r.get("rel_l2_vs_exact_masked")
        lines.append(f"{r['name']:<20}{r['ms']:>10.3f}{r['speedup']:>9.2f}{r['density']:>9.3f}{r['work']:>7.3f}"
                     f"{r['rel_l2_vs_dense']:>13.4f}{r['rel_l2_vs_dense_local']:>9.4f}"
                     f"{'' if ex is None else f'{ex:.2e}':>10}{r['compile_s']:>9.1f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny grid, float32, runs on the CPU")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per row (default 20; 3 with --smoke)")
    ap.add_argument("--out", default="bench/results/sparse_attention.json")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not a.smoke and not cuda:
        raise SystemExit("bench/sparse_attention.py: the full-size run needs a CUDA GPU; use --smoke on the CPU")
    cfg = SMOKE if a.smoke else WAN
    device = "cuda" if cuda else "cpu"
    t0 = time.perf_counter()
    res = run(cfg, a.reps or (3 if a.smoke else 20), device)
    res.update({"smoke": a.smoke, "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                "torch": torch.__version__, "when": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "wall_s": time.perf_counter() - t0})
    print(table(res))
    print(f"wall {res['wall_s']:.1f} s on {res['device']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

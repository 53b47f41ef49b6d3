"""Benchmark of the forward-with-tangent attention kernel against its baselines (issue 5).

One run, one device, all rows side by side:
  sdpa_fwd            PyTorch SDPA forward, flash backend
  ours_fwd            rcm_kernels.flash_jvp.forward
  ours_fwd_tangent    rcm_kernels.flash_jvp.forward_tangent (O, dO, LSE in one pass)
  op_func_jvp         torch.func.jvp through the project op rcm_core.attention.attention
  peer_fwd_tangent    jvp-flash-attention (PyPI) JVPAttn forward with tangents
  math_func_jvp       torch.func.jvp over SDPA with the MATH backend (where memory allows)
  sdpa_fwd_bwd        SDPA (flash) forward + backward
  ours_fwd_bwd        flash_jvp.forward + flash_jvp.backward (Triton)
  ours_fwd_bwd_aten   flash_jvp.forward + PyTorch's fused flash backward fed our LSE
  hopper_fwd          rcm_kernels.flash_jvp_hopper.forward (issue 15; TMA descriptors, warp-specialised loop)
  hopper_fwd_tangent  flash_jvp_hopper.forward_tangent
  hopper_fwd_bwd      flash_jvp_hopper.forward + flash_jvp_hopper.backward
  (hopper rows: compute capability 9.x only, else skipped; ratios against all three SDPA forwards)

FLOP counts (rcm-algorithm.md section 7): forward 4 B H Nq Nk D, forward with tangent
12 B H Nq Nk D, forward + backward 14 B H Nq Nk D (backward = 2.5 forwards).
Times are medians of triton.testing.do_bench (CUDA events); peak memory is
torch.cuda.max_memory_allocated during one call minus what was allocated before it.

    PYTHONPATH=$PWD:$PWD/kernels python bench/bench_attention.py --out bench/results/attention.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "kernels")):
    if p not in sys.path:
        sys.path.insert(0, p)

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from rcm_core.attention import attention  # noqa: E402
from rcm_kernels import flash_jvp as fj  # noqa: E402

try:
    from rcm_kernels import flash_jvp_hopper as fh  # noqa: E402
except Exception as _e:  # noqa: BLE001 - the bench still runs the other rows
    fh, _FH_ERR = None, f"{type(_e).__name__}: {_e}"

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover
    SDPBackend = sdpa_kernel = None


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def measure(fn, warmup=25, rep=100):
    """(median ms, extra peak MiB) of fn(); None where it fails (reason returned)."""
    torch.cuda.synchronize()
    ms = do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del out
    return ms, peak


def load_peer():
    try:
        import jvp_flash_attention.jvp_attention as ja  # noqa: F401
        import importlib.metadata as md
        return ja, md.version("jvp-flash-attention")
    except Exception as e:  # noqa: BLE001
        return None, f"not importable: {type(e).__name__}: {e}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "attention.json"))
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=12)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--cases", default="4096x4096,16384x16384,32760x32760,32760x512")
    ap.add_argument("--rep", type=int, default=100)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    B, H, D = args.B, args.H, args.D
    scale = 1 / math.sqrt(D)
    peer, peer_ver = load_peer()
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "dtype": "bfloat16", "B": B, "H": H, "D": D, "layout": "bhnd contiguous",
        "peer": peer_ver if peer is None else f"jvp-flash-attention {peer_ver}",
        "hopper_module": "rcm_kernels.flash_jvp_hopper" if fh is not None else _FH_ERR,
        "hopper_env": {k: os.environ[k] for k in ("RCM_HOPPER_CONFIG", "RCM_HOPPER_WS", "RCM_HOPPER_TMA")
                       if k in os.environ},
        "flops": {"fwd": "4BHNqNkD", "fwd_tangent": "12BHNqNkD", "fwd_bwd": "14BHNqNkD"},
    }
    print(json.dumps(meta), flush=True)
    results = []
    for case in args.cases.split(","):
        Nq, Nk = (int(x) for x in case.split("x"))
        g = torch.Generator(device=dev).manual_seed(Nq + Nk)

        def rnd(n, d=D):
            return torch.randn(B, H, n, d, device=dev, dtype=torch.float32, generator=g).to(dtype)

        q, k, v, dq, dk, dv = rnd(Nq), rnd(Nk), rnd(Nk), rnd(Nq), rnd(Nk), rnd(Nk)
        go = rnd(Nq)
        unit = B * H * Nq * Nk * D
        row = {"Nq": Nq, "Nk": Nk, "rows": {}, "notes": [], "checks": {}}

        def rec(name, fn, flops_mult, note=None):
            try:
                ms, peak = measure(fn, rep=args.rep)
                row["rows"][name] = {"ms": ms, "tflops": flops_mult * unit / ms / 1e9, "peak_mib": peak}
                if note:
                    row["rows"][name]["note"] = note
            except torch.cuda.OutOfMemoryError as e:
                row["rows"][name] = {"skipped": f"OOM: {str(e).splitlines()[0][:160]}"}
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                row["rows"][name] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
                traceback.print_exc()
                torch.cuda.empty_cache()
            print(f"  {Nq}x{Nk} {name}: {row['rows'][name]}", flush=True)

        def sdpa_fwd():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)

        # correctness spot checks of what is timed (vs SDPA flash, bf16 vs bf16)
        o_sdpa = sdpa_fwd()
        o, do, lse = fj.forward_tangent(q, k, v, dq, dk, dv, scale)
        row["checks"]["ours_O_vs_sdpa_rel"] = rel(o, o_sdpa)
        row["checks"]["ours_dO_finite"] = bool(torch.isfinite(do).all())
        del o_sdpa

        def sdpa_backend_fwd(backend):
            def f():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, scale=scale)
            return f

        rec("sdpa_fwd", sdpa_fwd, 4)
        rec("sdpa_cudnn_fwd", sdpa_backend_fwd(SDPBackend.CUDNN_ATTENTION), 4,
            note="SDPA cuDNN backend (not the issue's flash baseline; shown for reference)")
        rec("sdpa_default_fwd", lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), 4,
            note="SDPA with PyTorch's own backend choice")
        rec("ours_fwd", lambda: fj.forward(q, k, v, scale), 4)
        rec("ours_fwd_tangent", lambda: fj.forward_tangent(q, k, v, dq, dk, dv, scale), 12)
        hopper_ok = fh is not None and fh.applies(q, k, v, dq, dk, dv)
        if hopper_ok:
            try:
                ho, hdo, hlse = fh.forward_tangent(q, k, v, dq, dk, dv, scale)
                torch.cuda.synchronize()
                row["checks"]["hopper_O_vs_ours_rel"] = rel(ho, o)
                row["checks"]["hopper_dO_vs_ours_rel"] = rel(hdo, do)
                row["checks"]["hopper_lse_vs_ours_rel"] = rel(hlse, lse)
                del ho, hdo, hlse
            except Exception as e:  # noqa: BLE001
                row["checks"]["hopper_error"] = f"{type(e).__name__}: {e}"[:300]
                traceback.print_exc()
            rec("hopper_fwd", lambda: fh.forward(q, k, v, scale), 4)
            rec("hopper_fwd_tangent", lambda: fh.forward_tangent(q, k, v, dq, dk, dv, scale), 12)
        else:
            why = "flash_jvp_hopper not importable" if fh is None else "not eligible (needs compute capability 9.x)"
            for n in ("hopper_fwd", "hopper_fwd_tangent", "hopper_fwd_bwd"):
                row["rows"][n] = {"skipped": why}
        rec("op_func_jvp", lambda: torch.func.jvp(lambda a, b, c: attention(a, b, c, scale=scale),
                                                  (q, k, v), (dq, dk, dv)), 12,
            note="torch.func.jvp through rcm_core.attention (forward + jvp calls)")

        if peer is not None and Nq != Nk:
            row["rows"]["peer_fwd_tangent"] = {"skipped": "peer kernel takes one sequence length for q and k "
                                                          "(self-attention only); on 32760x512 it hit an "
                                                          "illegal memory access in the first run"}
        elif peer is not None:
            def peer_call(ws, tma):
                return peer.JVPAttn.forward(q, k, v, dq, dk, dv, None, 0.0, False, scale, ws, tma, False)
            chosen = None
            for ws, tma in ((True, True), (False, True), (False, False)):
                try:
                    out = peer_call(ws, tma)
                    torch.cuda.synchronize()
                    o_p, o_t = out[0], out[1][0]
                    row["checks"]["peer_O_vs_ours_rel"] = rel(o_p, o)
                    row["checks"]["peer_dO_vs_ours_rel"] = rel(o_t, do)
                    chosen = (ws, tma)
                    break
                except Exception as e:  # noqa: BLE001
                    row["notes"].append(f"peer warp_specialize={ws} USE_TMA={tma}: {type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:200] if str(e) else ''}")
            if chosen:
                rec("peer_fwd_tangent", lambda: peer_call(*chosen), 12,
                    note=f"warp_specialize={chosen[0]} USE_TMA={chosen[1]}")
            else:
                row["rows"]["peer_fwd_tangent"] = {"skipped": "peer failed: see notes"}
        else:
            row["rows"]["peer_fwd_tangent"] = {"skipped": f"peer {peer_ver}"}

        # math SDPA under torch.func.jvp materialises several Nq x Nk matrices
        est_gib = 8 * B * H * Nq * Nk * 4 / 2**30
        free = torch.cuda.mem_get_info()[0] / 2**30
        if est_gib < 0.8 * free:
            def math_jvp():
                with sdpa_kernel([SDPBackend.MATH]):
                    return torch.func.jvp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=scale),
                                          (q, k, v), (dq, dk, dv))
            rec("math_func_jvp", math_jvp, 12)
        else:
            row["rows"]["math_func_jvp"] = {"skipped": f"would need ~{est_gib:.0f} GiB of N x N "
                                                       f"intermediates, {free:.0f} GiB free"}
            print(f"  {Nq}x{Nk} math_func_jvp: skipped ({est_gib:.0f} GiB est.)", flush=True)

        qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))

        def sdpa_fb():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                out = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)
            out.backward(go)
            return out

        def ours_fb(impl):
            def f():
                out, l_ = fj.forward(q, k, v, scale)
                return fj.backward(q, k, v, out, l_, go, scale, impl=impl)
            return f

        # gradient spot check of both backward paths against SDPA's
        sdpa_fb()
        g_ref = [x.grad.clone() for x in (qg, kg, vg)]
        for impl in ("triton", "aten"):
            try:
                gs = ours_fb(impl)()
                row["checks"][f"grad_{impl}_vs_sdpa_rel"] = [rel(a, b) for a, b in zip(gs, g_ref)]
            except Exception as e:  # noqa: BLE001
                row["checks"][f"grad_{impl}_vs_sdpa_rel"] = f"{type(e).__name__}: {e}"[:200]
        del g_ref
        rec("sdpa_fwd_bwd", sdpa_fb, 14)
        rec("ours_fwd_bwd", ours_fb("triton"), 14)
        rec("ours_fwd_bwd_aten", ours_fb("aten"), 14)
        if hopper_ok:
            def hopper_fb():
                out, l_ = fh.forward(q, k, v, scale)
                return fh.backward(q, k, v, out, l_, go, scale)
            try:
                gs = hopper_fb()
                row["checks"]["grad_hopper_vs_sdpa_rel"] = [rel(a, b) for a, b in zip(gs, [x.grad for x in (qg, kg, vg)])]
                del gs
            except Exception as e:  # noqa: BLE001
                row["checks"]["grad_hopper_vs_sdpa_rel"] = f"{type(e).__name__}: {e}"[:200]
            rec("hopper_fwd_bwd", hopper_fb, 14)
        r = row["rows"]
        for base in ("sdpa_fwd", "sdpa_cudnn_fwd", "sdpa_default_fwd"):
            if "ms" in r.get(base, {}):
                for name in ("ours_fwd_tangent", "hopper_fwd_tangent", "ours_fwd", "hopper_fwd", "peer_fwd_tangent",
                             "op_func_jvp", "math_func_jvp"):
                    if "ms" in r.get(name, {}):
                        row["checks"][f"ratio_{name}_over_{base}"] = r[name]["ms"] / r[base]["ms"]
        row["best_configs"] = {n: str(getattr(kern, "best_config", None)) for n, kern in (
            ("fwd_kernel", fj._fwd_kernel), ("bwd_dkdv", fj._bwd_dkdv_kernel), ("bwd_dq", fj._bwd_dq_kernel))}
        if hopper_ok:
            row["best_configs"].update({n: str(getattr(kern, "best_config", None)) for n, kern in (
                ("hopper_fwd_kernel", fh._fwd_kernel), ("hopper_bwd_dkdv", fh._bwd_dkdv_kernel),
                ("hopper_bwd_dq", fh._bwd_dq_kernel))})
        print(f"  checks: {row['checks']}  best: {row['best_configs']}", flush=True)
        results.append(row)
        del q, k, v, dq, dk, dv, go, qg, kg, vg, o, do, lse
        torch.cuda.empty_cache()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:      # after every case: a run cut by a time limit keeps what it measured
            json.dump({"meta": meta, "results": results}, f, indent=1)

    names = ["sdpa_fwd", "sdpa_cudnn_fwd", "sdpa_default_fwd", "ours_fwd", "ours_fwd_tangent", "hopper_fwd",
             "hopper_fwd_tangent", "op_func_jvp", "peer_fwd_tangent", "math_func_jvp",
             "sdpa_fwd_bwd", "ours_fwd_bwd", "ours_fwd_bwd_aten", "hopper_fwd_bwd"]
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  bf16 B={B} H={H} D={D}")
    print(f"{'Nq x Nk':>13} {'method':>18} {'ms':>9} {'TFLOP/s':>8} {'peak MiB':>9} {'x sdpa_fwd':>10}")
    for row in results:
        sd = row["rows"].get("sdpa_fwd", {}).get("ms")
        for n in names:
            r = row["rows"].get(n, {})
            tag = f"{row['Nq']}x{row['Nk']}"
            if "ms" in r:
                ratio = f"{r['ms'] / sd:.2f}" if sd else "-"
                print(f"{tag:>13} {n:>18} {r['ms']:9.3f} {r['tflops']:8.1f} {r['peak_mib']:9.1f} {ratio:>10}")
            else:
                print(f"{tag:>13} {n:>18}  skipped: {r.get('skipped', 'not run')[:70]}")
    for name in ("ours_fwd_tangent", "hopper_fwd_tangent"):
        for base in ("sdpa_fwd", "sdpa_cudnn_fwd", "sdpa_default_fwd"):
            print(f"ratios {name} / {base}:",
                  {f"{r['Nq']}x{r['Nk']}": round(r["checks"].get(f"ratio_{name}_over_{base}", float("nan")), 3)
                   for r in results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

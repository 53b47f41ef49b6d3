"""Where the warp-specialised Hopper forward's LSE goes wrong (issue 15), one GPU, a few seconds.

Session 5 (H200, triton 3.6.0): with the warp-specialised forward the autotuner chose, O and its tangent were
right but the LSE was 0.4-0.6 % off at 4K-32K tokens and 70 % at N = 1000. This probe runs the forward and
the forward-with-tangent under each forced config (``RCM_HOPPER_CONFIG``: warp-specialised and not) and
compares the LSE row by row with a float32 ``logsumexp`` of the same inputs. It prints, per config:

- the error's size, and over which rows: the two 64-row halves of a 128-row tile (the two consumer warp
  groups of the specialised loop), the last (ragged) tile;
- whether each tile's wrong LSEs are the right values in another order (a row permutation in the epilogue);
- whether ``lse - ref`` is constant per row across N (a stale running max: lse = m_stale + log l);
- O's error, for contrast.

    RCM_ATTN_KERNEL=hopper PYTHONPATH=$PWD:$PWD/kernels python3 bench/hopper_ws_lse_probe.py --out $OUT/ws_probe.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os

import torch


def reference(q, k, v, scale):
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    return torch.logsumexp(s, -1), torch.softmax(s, -1) @ v.float()


def probe(mod, n, cfg, tangent, seed=0, H=4, D=128):
    os.environ["RCM_HOPPER_CONFIG"] = cfg
    mod._reset_tuning()
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, dq, dk, dv = (torch.randn(1, H, n, D, device="cuda", generator=g, dtype=torch.bfloat16)
                           for _ in range(6))
    scale = 1 / math.sqrt(D)
    if tangent:
        o, _, lse = mod.forward_tangent(q, k, v, dq, dk, dv, scale)
    else:
        o, lse = mod.forward(q, k, v, scale)
    torch.cuda.synchronize()
    ref_lse, ref_o = reference(q, k, v, scale)
    err = (lse.float() - ref_lse)                             # (1, H, n)
    bad = err.abs() > 1e-2
    rows = torch.arange(n, device="cuda")
    half = (rows % 128) // 64
    tiles = n // 128
    perm = []
    for t in range(math.ceil(n / 128)):
        a, b = lse[0, :, t * 128:(t + 1) * 128].float(), ref_lse[0, :, t * 128:(t + 1) * 128]
        if bool(((a - b).abs() > 1e-2).any()):
            perm.append(bool(torch.allclose(a.sort(-1).values, b.sort(-1).values, atol=1e-2)))
    return {
        "n": n, "config": cfg, "tangent": tangent,
        "lse_max_abs_err": float(err.abs().max()), "lse_rel_l2": float(err.norm() / ref_lse.norm()),
        "bad_rows": int(bad.sum()), "rows": int(bad.numel()),
        "bad_rows_first_half_of_tile": int((bad & (half == 0)).sum()),
        "bad_rows_second_half_of_tile": int((bad & (half == 1)).sum()),
        "bad_rows_in_last_ragged_tile": int(bad[..., tiles * 128:].sum()) if n % 128 else 0,
        "bad_tiles_that_are_a_row_permutation": f"{sum(perm)}/{len(perm)}",
        "mean_signed_err": float(err.mean()),
        "o_rel_l2": float((o.float() - ref_o).norm() / ref_o.norm()),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="1000,4096")
    ap.add_argument("--configs", default="128,128,2,4,1;128,64,2,4,1;128,128,2,8,0;128,64,3,8,0",
                    help="RCM_HOPPER_CONFIG values (BLOCK_M,BLOCK_N,stages,warps,ws), ';'-separated")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    os.environ["RCM_HOPPER_WS"] = "1"                      # let the forced WS configs through
    mod = importlib.import_module("rcm_kernels.flash_jvp_hopper")
    mod._WS_OK[0] = mod.HAS_WARP_SPECIALIZE
    rows = []
    for cfg in a.configs.split(";"):
        for n in (int(x) for x in a.ns.split(",")):
            for tangent in (False, True):
                try:
                    r = probe(mod, n, cfg, tangent)
                except Exception as e:  # noqa: BLE001 - a config that does not compile is a row too
                    r = {"n": n, "config": cfg, "tangent": tangent, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                rows.append(r)
                print(json.dumps(r))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"triton": __import__("triton").__version__, "torch": torch.__version__,
                       "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

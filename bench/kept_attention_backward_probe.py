"""Which backward can take attention outputs kept from the fused forward-with-tangent kernel (issue 22)?

``activation_checkpointing="keep_attention"`` keeps, for blocks carrying the fused sCM tangent, the Triton kernel's O
and LSE (natural log, fp32, (B, H, N)) and runs a backward on them instead of recomputing attention. On an H200 the
Triton kernel's backward made that no faster than full checkpointing (cuDNN forward again + cuDNN backward). This
probe times, at Wan2.1-1.3B's self-attention (1 x 12 heads x 32760 tokens x 128, bf16, (B, N, H, D) memory as the
Wan processor hands it over):

* ``triton_bwd``: the project kernel's backward on its own O/LSE;
* ``cudnn_fwd`` and ``cudnn_bwd``: PyTorch's cuDNN SDPA forward and backward ops on their own state (what full
  checkpointing pays: forward in the recomputation + backward);
* ``cudnn_bwd_kept`` and ``flash_bwd_kept``: the cuDNN / flash backward ops fed the KEPT O and LSE (LSE reshaped
  to each op's stats shape), with the relative L2 of their dq/dk/dv against the cuDNN backward on its own state.

    python bench/kept_attention_backward_probe.py --out bench/results/kept_attention_backward.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "kernels"):
    sys.path.insert(0, str(p))


def timed(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--out", default="bench/results/kept_attention_backward.json")
    a = ap.parse_args()
    from rcm_core.nets.attention import _kernels
    aten = torch.ops.aten
    g = torch.Generator(device="cuda").manual_seed(0)
    B, N, H, D = 1, a.tokens, a.heads, a.dim
    mk = lambda: torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    q, k, v, dq, dk, dv = (mk() for _ in range(6))
    go = mk()
    s = D ** -0.5
    mod = _kernels(q, k, v)
    o, do, lse = mod.forward_tangent(q, k, v, dq, dk, dv, s)
    res = {"shape": [B, H, N, D], "kernel": mod.__name__, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(), "ms": {}, "rel_l2_vs_cudnn": {}, "errors": {}}
    res["ms"]["triton_bwd"] = timed(lambda: mod.backward(q, k, v, o, lse, go.contiguous(), s))
    ref_o, ref_lse, cq, ck, mq, mk_, seed, off, _ = aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, False, False, scale=s)
    res["lse_shapes"] = {"triton": list(lse.shape), "cudnn": list(ref_lse.shape)}
    res["rel_l2_o_triton_vs_cudnn"] = rel(o, ref_o)
    res["rel_l2_lse_triton_vs_cudnn"] = rel(lse.reshape(ref_lse.shape), ref_lse)
    res["ms"]["cudnn_fwd"] = timed(lambda: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False,
                                                                                   False, scale=s))

    def cudnn_bwd(out, lse_):
        return aten._scaled_dot_product_cudnn_attention_backward(go, q, k, v, out, lse_, seed, off, None, cq, ck, mq,
                                                                  mk_, 0.0, False, scale=s)
    ref = cudnn_bwd(ref_o, ref_lse)
    res["ms"]["cudnn_bwd"] = timed(lambda: cudnn_bwd(ref_o, ref_lse))
    ours = mod.backward(q, k, v, o, lse, go.contiguous(), s)
    res["rel_l2_vs_cudnn"]["triton_bwd"] = [rel(x, y) for x, y in zip(ours, ref)]
    kept_lse = lse.reshape(ref_lse.shape).to(ref_lse.dtype).contiguous()
    kept_o = o if o.stride() == ref_o.stride() else torch.empty_like(ref_o).copy_(o)
    res["kept_o_restrided"] = kept_o is not o
    try:
        got = cudnn_bwd(kept_o, kept_lse)
        res["rel_l2_vs_cudnn"]["cudnn_bwd_kept"] = [rel(x, y) for x, y in zip(got, ref)]
        res["ms"]["cudnn_bwd_kept"] = timed(lambda: cudnn_bwd(kept_o, kept_lse))
    except Exception as e:  # noqa: BLE001 - the probe records what fails
        res["errors"]["cudnn_bwd_kept"] = f"{type(e).__name__}: {e}"[:500]
    try:
        fo, flse, fcq, fck, fmq, fmk, fseed, foff, _ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False,
                                                                                              False, scale=s)

        def flash_bwd(out, lse_):
            return aten._scaled_dot_product_flash_attention_backward(go, q, k, v, out, lse_, fcq, fck, fmq, fmk, 0.0,
                                                                      False, fseed, foff, scale=s)
        fl = lse.reshape(flse.shape).to(flse.dtype).contiguous()
        got = flash_bwd(o, fl)
        res["rel_l2_vs_cudnn"]["flash_bwd_kept"] = [rel(x, y) for x, y in zip(got, ref)]
        res["ms"]["flash_bwd_kept"] = timed(lambda: flash_bwd(o, fl))
        res["ms"]["flash_fwd"] = timed(lambda: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False,
                                                                                       scale=s))
    except Exception as e:  # noqa: BLE001
        res["errors"]["flash_bwd_kept"] = f"{type(e).__name__}: {e}"[:500]
    ms = res["ms"]
    res["full_ac_ms"] = ms["cudnn_fwd"] + ms["cudnn_bwd"]
    print(json.dumps(res, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

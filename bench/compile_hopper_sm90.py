"""Compile every GPU autotune config of rcm_kernels.flash_jvp_hopper for sm_90 WITHOUT a GPU (issue 15).

Runs triton.compile for GPUTarget("cuda", 90, 32) (TTIR -> TTGIR -> PTX -> cubin with triton's bundled
ptxas), each config in a subprocess (a compiler abort, e.g. an LLVM ERROR, kills only that one), and
prints per config whether the loop was warp-specialised (ttg.warp_specialize ops in the TTGIR), the
warps and the shared memory. Nothing is launched. Use: before offering a new config to the autotuner.

    PYTHONPATH=$PWD:$PWD/kernels python bench/compile_hopper_sm90.py
"""
import os, sys, subprocess, json, itertools
os.environ.pop("TRITON_INTERPRET", None)
if len(sys.argv) > 1:
    spec = json.loads(sys.argv[1])
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from rcm_kernels import flash_jvp_hopper as fh
    kern = getattr(fh, spec["kern"])
    fn = kern
    while not isinstance(fn, triton.runtime.jit.JITFunction): fn = fn.fn
    c = spec["consts"]
    sig, cx = {}, {}
    for name in fn.arg_names:
        if name in c: sig[name] = "constexpr"; cx[name] = c[name]
        elif name in ("LSE", "DELTA"): sig[name] = "*fp32"
        elif name in ("sm_scale", "qk_scale"): sig[name] = "fp32"
        elif name in ("Q","K","V","DQ","DK","DV","O","DO","DOG","GK","GV","GQ"): sig[name] = "*" + spec["dtype"]
        else: sig[name] = "i32"
    k = triton.compile(ASTSource(fn, sig, cx), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": spec["w"], "num_stages": spec["st"]})
    print(json.dumps({"ws_op": k.asm["ttgir"].count("ttg.warp_specialize"), "warps": k.metadata.num_warps,
                      "shared": k.metadata.shared}))
    sys.exit(0)
from rcm_kernels import flash_jvp_hopper as fh
common = dict(PREC="tf32", HAS_WS_KW=fh.HAS_WARP_SPECIALIZE, HAS_STAGES_KW=fh._HAS_RANGE_STAGES)
jobs = []
for (dqk, dv), tangent, even in itertools.product(((128, 128), (64, 64), (128, 64)), (True, False), (True, False)):
    cfgs = fh._prune_fwd(fh._fwd_kernel.configs, {"D_QK": dqk, "D_V": dv, "TANGENT": tangent})
    for c in cfgs:
        jobs.append(("_fwd_kernel", dict(common, D_QK=dqk, D_V=dv, TANGENT=tangent, EVEN_N=even, **c.kwargs), c))
for (dqk, dv) in ((128, 128), (64, 64), (128, 64)):
    for c in fh._prune_bwd(fh._bwd_dkdv_kernel.configs, {"D_QK": dqk, "D_V": dv}):
        jobs.append(("_bwd_dkdv_kernel", dict(common, D_QK=dqk, D_V=dv, **c.kwargs), c))
    for even in (True, False):
        for c in fh._prune_bwd(fh._bwd_dq_kernel.configs, {"D_QK": dqk, "D_V": dv}):
            jobs.append(("_bwd_dq_kernel", dict(common, D_QK=dqk, D_V=dv, EVEN_N=even, **c.kwargs), c))
print(len(jobs), "compiles", flush=True)
bad = 0
for kern, consts, c in jobs:
    spec = json.dumps({"kern": kern, "consts": consts, "w": c.num_warps, "st": c.num_stages, "dtype": "bf16"})
    r = subprocess.run([sys.executable, __file__, spec], capture_output=True, text=True, timeout=300)
    tag = f"{kern} D={consts['D_QK']}/{consts['D_V']} T={consts.get('TANGENT','-')} even={consts.get('EVEN_N','-')} BM={consts['BLOCK_M']} BN={consts['BLOCK_N']} st={c.num_stages} w={c.num_warps} ws={consts['WARP_SPEC']}"
    if r.returncode == 0:
        print("OK  ", tag, r.stdout.strip().splitlines()[-1], flush=True)
    else:
        bad += 1
        err = [l for l in (r.stderr + r.stdout).splitlines() if "ERROR" in l or "Error" in l or "error" in l][:2]
        print("FAIL", tag, f"rc={r.returncode}", err, flush=True)
print("failed:", bad)

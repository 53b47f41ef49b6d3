"""Hopper variant of the forward-with-tangent attention kernels (issue 15, parts 1 and 2).

STATUS (2026-12-05): the DEFAULT on compute capability 9.x in bf16/fp16 (``RCM_ATTN_KERNEL=auto``;
``portable`` forces the portable kernel). Its forward, tangent and backward pass the GPU tests on an H200
without warp specialisation, and the training-step rows of BENCHMARKS.md (issue 22) ran on it. Warp
specialisation stays off (``RCM_HOPPER_WS=1`` for experiments): its LSE was wrong. The history below says what
was verified where before the first GPU run.

Same maths and the same public functions as :mod:`rcm_kernels.flash_jvp` (``forward``,
``forward_tangent``, ``backward``), ``rcm-algorithm.md`` section 7:

    O   = softmax(s Q K^T) V
    dO  = P dV + H V - rowsum(H) O,   H = P * s (dQ K^T + Q dK^T)
    LSE = log sum_j exp(s q_i . k_j)        (natural log, fp32, (B, H, Nq))

streamed over key blocks: running max ``m`` in base-2 units (log2(e) folded into the
scale, ``exp2`` everywhere), running sum ``l``, one fp32 accumulator for ``P V``, one for
``P dV + H V`` (two tensor-core products into the same registers), ``rowsum(H)`` in fp32;
at the end ``O = acc_o / l``, ``dO = acc_t / l - (r / l) O``. The backward is the
FlashAttention-2 pair (dK/dV kernel over query blocks, dQ kernel over key blocks) fed with
the forward's LSE, as in the portable module.

What differs from the portable kernel (the Hopper features):

* **Tensor descriptors (TMA).** Every tile (Q, dQ, K, V, dK, dV in the forward; Q, dO, K, V
  in the backward) is loaded through ``tl.make_tensor_descriptor`` (device-side descriptors,
  one 2-D ``[N, D]`` descriptor per (batch, head) and tensor, built in the kernel; Triton's
  tutorial 06 also builds them in the kernel on Hopper with warp specialisation), and O, dO,
  dQ, dK, dV are stored through descriptors. The descriptor's row bound does the tail masking
  of the loads (out-of-range rows come back as zeros) and clips the stores; the scores of
  out-of-range keys are still set to -inf. Descriptor kernels need a global scratch allocator:
  the module installs one (``triton.set_allocator``) when none is set.
* **Warp specialisation.** Every key block (the ragged tail included, masked when N_K is
  not a multiple of BLOCK_N) runs in one ``tl.range(..., num_stages=S, warp_specialize=WS)``
  loop. Compiled for sm_90 on a CPU (triton 3.9.0, its bundled ptxas; nothing run), Triton's
  Hopper pass splits the forward and forward-with-tangent loops and the dK/dV loop into a TMA
  producer warp group and two 4-warp consumer groups (``ttg.warp_specialize`` in the TTGIR,
  12 warps, ``setmaxnreg``, wgmma): it does so with ``num_warps=4`` and ``BLOCK_M=128`` (each
  consumer takes 64 rows), NOT with ``num_warps=8``, and not when a separate tail step follows
  the loop (hence the single masked loop). The tangent variant (BLOCK_N 64, 2 stages) then
  uses 230,136 B of shared memory and ptxas reports 144-192 B of register spills at the
  consumers' 168-register cap. The dQ loop is NOT specialised: the pass aborts the process
  on it ("LLVM ERROR: unsupported load type for producer commit"), so the dQ kernel has no WS
  configs. The autotune list holds WS variants (4 warps) and plain ones (8 warps); if a WS
  variant raises a compile error the autotuner does not catch, the module turns WS off for
  the process (a warning says so) and relaunches.
* **Autotune configs** for Hopper: ``BLOCK_M=128`` (dK/dV: 64-row query tiles), ``BLOCK_N``
  64/128, ``num_stages`` 2-4, 4 warps with WS and 8 without; pruned by a shared-memory estimate
  (227 KiB; configs that still run out are skipped by the autotuner) and, with a tangent and
  head dim 128, ``BLOCK_N=64`` (registers: two 128 x 128 fp32 accumulators).
* Not done (issue 15 asks for them; Triton gives no direct control): explicit ping-pong
  scheduling of the two consumer groups, overlapping one tile's softmax with the next
  tile's products beyond what Triton's pipeliner does, persistent CTAs.

Where each feature has run:

* CPU, Triton interpreter (``TRITON_INTERPRET=1``, triton 3.9.0): the descriptor loads and
  stores are emulated (pointer gathers with the descriptor's bounds, including its 16-byte
  alignment checks) and ``tl.range``'s ``num_stages``/``warp_specialize`` are accepted and
  ignored. So the maths, the tail handling, both layouts and the descriptor geometry are
  verified there (tests/test_kernel_flash_jvp_hopper.py), for both the descriptor path
  (``USE_TMA=True``) and the plain-pointer path (``USE_TMA=False``, the constexpr switch).
* CPU, compiled for sm_90 (not run): every GPU autotune config of the three kernels for
  head dims 128/128, 64/64, 128/64, bf16, even and ragged key lengths compiles to a cubin
  (TTGIR -> PTX -> ptxas), with wgmma and ``cp.async.bulk.tensor`` (TMA) in the PTX.
* NEVER EXECUTED ANYWHERE: TMA hardware copies, the device-side descriptor creation with
  the scratch allocator, the warp-specialised code, any launch on a GPU, bf16 numerics (the
  interpreter's bf16 ``tl.dot`` is wrong, so bf16 is covered by the GPU tests marked ``gpu``
  only), and any speed.

Eligibility (:func:`applies`): CUDA tensors on compute capability 9.x (or any tensors under
the interpreter), fp16/bf16 (fp32 only under the interpreter), head dims 32/64/128, last
dimension contiguous, 16-byte aligned data pointers and 16-byte multiples for the batch,
head and token strides (TMA's rules). Anything else goes to the portable kernel
(``rcm_core.attention`` checks :func:`applies` before choosing this module).

Knobs: ``RCM_HOPPER_CONFIG="BLOCK_M,BLOCK_N,num_stages,num_warps,ws[,tma]"`` forces one
config (tests; sweeps on the GPU); ``RCM_HOPPER_WS=1`` adds the warp-specialised
variants (off by default, see below); ``RCM_HOPPER_TMA=0`` uses the plain-pointer path; ``RCM_FLASH_AUTOTUNE=0`` takes
the first surviving config without tuning (as in the portable module).
"""
from __future__ import annotations

import inspect
import os
import warnings

import torch
import triton
import triton.language as tl

from . import flash_jvp as _portable
from .flash_jvp import (_bucket, _bwd_buffers, _check, _check_backward, _check_qkv, _check_tangents, _fwd_buffers,
                        _prec, _scale)

__all__ = ["supports", "applies", "forward", "forward_tangent", "backward", "SUPPORTED_HEAD_DIMS",
           "HAS_TENSOR_DESCRIPTORS", "HAS_WARP_SPECIALIZE"]

SUPPORTED_HEAD_DIMS = (32, 64, 128)
_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SMEM_BYTES = 227 * 1024          # H100/H200 shared memory per block (opt-in maximum);
                                  # estimates only: the autotuner skips configs that run out

# --- feature checks: the module imports (and falls back) on any triton -----------------------
HAS_TENSOR_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")
try:
    HAS_WARP_SPECIALIZE = "warp_specialize" in inspect.signature(tl.range.__init__).parameters
    _HAS_RANGE_STAGES = "num_stages" in inspect.signature(tl.range.__init__).parameters
except (TypeError, ValueError):  # pragma: no cover
    HAS_WARP_SPECIALIZE = _HAS_RANGE_STAGES = False

# turned off for the process when a warp-specialised variant fails to compile
# Warp specialisation is OFF unless RCM_HOPPER_WS=1. Measured on an H200 (2026-11-26, triton 3.6.0,
# BENCHMARKS "Hopper variant ... first GPU run"): with the warp-specialised forward chosen by the autotuner,
# O and dO were right (1e-3 of the portable kernel, bf16) and fast (forward-with-tangent 2.74-2.99x the
# cuDNN SDPA forward), but the LSE was wrong (0.4-0.6% at 4K-32K tokens, 70% at N = 1000), so the backward's
# gradients were wrong too (0.9 relative error). The unspecialised variants have not run on a GPU yet.
_WS_OK = [os.environ.get("RCM_HOPPER_WS", "0") == "1" and HAS_WARP_SPECIALIZE]


def supports(head_dim: int) -> bool:
    """True if the kernels handle this head dim (QK or V)."""
    return int(head_dim) in SUPPORTED_HEAD_DIMS


def _tma_ok(t: torch.Tensor) -> bool:
    es = t.element_size()
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    return all((st * es) % 16 == 0 for st in t.stride()[:-1])


def applies(*tensors) -> bool:
    """True if this module's kernels can take these (B, H, N, D) tensors (see module doc)."""
    if not tensors or not HAS_TENSOR_DESCRIPTORS:
        return False
    t0 = tensors[0]
    if not isinstance(t0, torch.Tensor):
        return False
    if t0.is_cuda:
        if torch.cuda.get_device_capability(t0.device)[0] != 9:
            return False
        dtypes = (torch.float16, torch.bfloat16)
    elif _INTERPRET:
        dtypes = (torch.float16, torch.float32)
    else:
        return False
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype not in dtypes:
            return False
        if not supports(t.shape[-1]) or not _tma_ok(t):
            return False
    return True


# ----------------------------------------------------------------------------------
# tiles: through a tensor descriptor (TMA) or plain pointers (USE_TMA constexpr)
# ----------------------------------------------------------------------------------

@triton.jit
def _desc(base, n_rows, stride_n, ROWS: tl.constexpr, D: tl.constexpr, USE_TMA: tl.constexpr):
    """A 2-D [n_rows, D] descriptor (row stride ``stride_n``, unit column stride) with
    [ROWS, D] boxes, or the base pointer itself on the pointer path."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[n_rows, D], strides=[stride_n, 1],
                                         block_shape=[ROWS, D])
    else:
        return base


@triton.jit
def _load(desc, row0, n_rows, stride_n, ROWS: tl.constexpr, D: tl.constexpr, USE_TMA: tl.constexpr):
    """[ROWS, D] tile starting at row ``row0``; rows >= n_rows read as zeros."""
    if USE_TMA:
        return desc.load([row0, 0])
    else:
        r = row0 + tl.arange(0, ROWS)
        ptrs = desc + r[:, None].to(tl.int64) * stride_n + tl.arange(0, D)[None, :]
        return tl.load(ptrs, mask=r[:, None] < n_rows, other=0.0)


@triton.jit
def _store(desc, row0, n_rows, stride_n, val, ROWS: tl.constexpr, D: tl.constexpr, USE_TMA: tl.constexpr):
    """Store a [ROWS, D] tile at row ``row0``; rows >= n_rows are dropped."""
    if USE_TMA:
        desc.store([row0, 0], val)
    else:
        r = row0 + tl.arange(0, ROWS)
        ptrs = desc + r[:, None].to(tl.int64) * stride_n + tl.arange(0, D)[None, :]
        tl.store(ptrs, val, mask=r[:, None] < n_rows)


# ----------------------------------------------------------------------------------
# forward (with optional tangent)
# ----------------------------------------------------------------------------------

def _cfg(bm, bn, stages, warps, ws, tma=True):
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "LOOP_STAGES": stages, "WARP_SPEC": bool(ws), "USE_TMA": bool(tma)}
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def _forced_config():
    spec = os.environ.get("RCM_HOPPER_CONFIG")
    if not spec:
        return None
    f = [int(x) for x in spec.split(",")]
    if len(f) not in (5, 6):
        raise ValueError(f"RCM_HOPPER_CONFIG={spec!r}: expected BLOCK_M,BLOCK_N,num_stages,num_warps,ws[,tma]")
    return _cfg(*f[:5], tma=bool(f[5]) if len(f) == 6 else True)


def _interp_configs():
    # two entries so that the autotuner calls the prune function (which honours
    # RCM_HOPPER_CONFIG / RCM_HOPPER_TMA); small tiles keep the interpreter quick
    return [_cfg(16, 16, 1, 4, False, True), _cfg(16, 16, 1, 4, False, False)]


def _reset_tuning():
    """Forget the chosen configs (tests switch RCM_HOPPER_CONFIG / RCM_HOPPER_TMA in one process)."""
    for kern in (_fwd_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel):
        kern.cache.clear()


def _fwd_configs():
    if _INTERPRET:
        return _interp_configs()
    out = []
    # warp-specialised: num_warps=4 per consumer group; triton 3.9's Hopper pass makes two
    # consumer groups (64 rows each of BLOCK_M=128) plus a producer group: 12 warps in all
    # (seen compiling for sm_90; with num_warps=8 the pass left the loop alone)
    for bn, stages in ((64, 2), (64, 3), (128, 2), (128, 3)):
        out.append(_cfg(128, bn, stages, 4, True))
    # not specialised: 8 warps (two warp groups) on BLOCK_M=128
    for bn, stages in ((64, 2), (64, 3), (64, 4), (128, 2), (128, 3)):
        out.append(_cfg(128, bn, stages, 8, False))
    return out


def _smem_fwd(c, d_qk, d_v, tangent, es):
    bm, bn, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
    mult = 2 if tangent else 1
    return es * (mult * bm * d_qk + st * mult * bn * (d_qk + d_v))


def _finish_prune(out, configs):
    if not _WS_OK[0]:
        out = [c for c in out if not c.kwargs["WARP_SPEC"]]
    if os.environ.get("RCM_HOPPER_TMA", "1") == "0":
        out = [_cfg(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, c.num_warps,
                    c.kwargs["WARP_SPEC"], False) for c in out]
    out = out or [c for c in configs if not c.kwargs["WARP_SPEC"]][:1] or configs[:1]
    if os.environ.get("RCM_FLASH_AUTOTUNE", "1") == "0":
        return out[:1]
    return out


def _prune_fwd(configs, named_args, **kwargs):
    forced = _forced_config()
    if forced is not None:
        return [forced]
    args = {**named_args, **kwargs}
    q = args.get("Q")
    d_qk, d_v = int(args.get("D_QK", 128)), int(args.get("D_V", 128))
    tangent = bool(args.get("TANGENT", False))
    if _INTERPRET:
        return _finish_prune(configs[:1], configs)
    es = q.element_size() if isinstance(q, torch.Tensor) else 2
    out = []
    for c in configs:
        if tangent and max(d_qk, d_v) > 64 and c.kwargs["BLOCK_N"] > 64:
            continue              # two 128 x 128 fp32 accumulators plus two score tiles
        if _smem_fwd(c, d_qk, d_v, tangent, es) > _SMEM_BYTES:
            continue
        out.append(c)
    return _finish_prune(out, configs)


@triton.jit
def _fwd_step(acc_o, acc_t, m_i, l_i, r_i, q, dq,
              k_desc, v_desc, dk_desc, dv_desc, start_n, N_K,
              skn, svn, sdkn, sdvn, qk_scale, sm_scale,
              D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_N: tl.constexpr,
              TANGENT: tl.constexpr, MASK_N: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr):
    k = _load(k_desc, start_n, N_K, skn, BLOCK_N, D_QK, USE_TMA)
    kt = tl.trans(k)
    s = tl.dot(q, kt, input_precision=PREC)                  # (M, N) fp32, unscaled
    if MASK_N:
        cols = start_n + tl.arange(0, BLOCK_N)
        s = tl.where(cols[None, :] < N_K, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    v = _load(v_desc, start_n, N_K, svn, BLOCK_N, D_V, USE_TMA)
    p_lo = p.to(v.dtype)
    if TANGENT:
        dk = _load(dk_desc, start_n, N_K, sdkn, BLOCK_N, D_QK, USE_TMA)
        dv = _load(dv_desc, start_n, N_K, sdvn, BLOCK_N, D_V, USE_TMA)
        # dS / s = dQ K^T + Q dK^T: two products into one accumulator
        ds = tl.dot(dq, kt, input_precision=PREC)
        ds = tl.dot(q, tl.trans(dk), ds, input_precision=PREC)
        h = p * ds * sm_scale
        r_i = r_i * alpha + tl.sum(h, 1)
        # P dV + H V: one accumulator
        acc_t = acc_t * alpha[:, None]
        acc_t = tl.dot(p_lo, dv, acc_t, input_precision=PREC)
        acc_t = tl.dot(h.to(v.dtype), v, acc_t, input_precision=PREC)
    acc_o = acc_o * alpha[:, None]
    acc_o = tl.dot(p_lo, v, acc_o, input_precision=PREC)
    # the running sums last: shorter live ranges (as Triton's tutorial 06 orders them)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc_o, acc_t, m_new, l_i, r_i


@triton.autotune(configs=_fwd_configs(), key=["D_QK", "D_V", "TANGENT", "N_K_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.heuristics({"EVEN_N": lambda a: a["N_K"] % a["BLOCK_N"] == 0})
@triton.jit
def _fwd_kernel(
    Q, K, V, DQ, DK, DV, O, DO, LSE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    sdqb, sdqh, sdqn, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    sob, soh, son, sdob, sdoh, sdon,
    H, N_Q, N_K, N_K_BUCKET, sm_scale, qk_scale,
    D_QK: tl.constexpr, D_V: tl.constexpr, TANGENT: tl.constexpr, PREC: tl.constexpr,
    HAS_WS_KW: tl.constexpr, HAS_STAGES_KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOOP_STAGES: tl.constexpr,
    WARP_SPEC: tl.constexpr, USE_TMA: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    hh = (pid_bh % H).to(tl.int64)
    row0 = pid_m * BLOCK_M

    q_desc = _desc(Q + b * sqb + hh * sqh, N_Q, sqn, BLOCK_M, D_QK, USE_TMA)
    k_desc = _desc(K + b * skb + hh * skh, N_K, skn, BLOCK_N, D_QK, USE_TMA)
    v_desc = _desc(V + b * svb + hh * svh, N_K, svn, BLOCK_N, D_V, USE_TMA)
    o_desc = _desc(O + b * sob + hh * soh, N_Q, son, BLOCK_M, D_V, USE_TMA)
    q = _load(q_desc, row0, N_Q, sqn, BLOCK_M, D_QK, USE_TMA)
    if TANGENT:
        dq_desc = _desc(DQ + b * sdqb + hh * sdqh, N_Q, sdqn, BLOCK_M, D_QK, USE_TMA)
        dk_desc = _desc(DK + b * sdkb + hh * sdkh, N_K, sdkn, BLOCK_N, D_QK, USE_TMA)
        dv_desc = _desc(DV + b * sdvb + hh * sdvh, N_K, sdvn, BLOCK_N, D_V, USE_TMA)
        do_desc = _desc(DO + b * sdob + hh * sdoh, N_Q, sdon, BLOCK_M, D_V, USE_TMA)
        dq = _load(dq_desc, row0, N_Q, sdqn, BLOCK_M, D_QK, USE_TMA)
    else:
        dq = q
        dk_desc = k_desc
        dv_desc = v_desc
        do_desc = o_desc

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, D_V], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, D_V], dtype=tl.float32)

    # One loop over all key blocks, the ragged tail included (masked when N_K is not a multiple
    # of BLOCK_N: EVEN_N from the heuristic). A separate tail step after the loop stops
    # triton 3.9's Hopper pass from warp-specialising the loop (seen compiling for sm_90).
    if HAS_WS_KW:
        for start_n in tl.range(0, N_K, BLOCK_N, num_stages=LOOP_STAGES, warp_specialize=WARP_SPEC):
            acc_o, acc_t, m_i, l_i, r_i = _fwd_step(
                acc_o, acc_t, m_i, l_i, r_i, q, dq, k_desc, v_desc, dk_desc, dv_desc, start_n, N_K,
                skn, svn, sdkn, sdvn, qk_scale, sm_scale, D_QK, D_V, BLOCK_N, TANGENT, not EVEN_N, PREC, USE_TMA)
    elif HAS_STAGES_KW:
        for start_n in tl.range(0, N_K, BLOCK_N, num_stages=LOOP_STAGES):
            acc_o, acc_t, m_i, l_i, r_i = _fwd_step(
                acc_o, acc_t, m_i, l_i, r_i, q, dq, k_desc, v_desc, dk_desc, dv_desc, start_n, N_K,
                skn, svn, sdkn, sdvn, qk_scale, sm_scale, D_QK, D_V, BLOCK_N, TANGENT, not EVEN_N, PREC, USE_TMA)
    else:
        for start_n in range(0, N_K, BLOCK_N):
            acc_o, acc_t, m_i, l_i, r_i = _fwd_step(
                acc_o, acc_t, m_i, l_i, r_i, q, dq, k_desc, v_desc, dk_desc, dv_desc, start_n, N_K,
                skn, svn, sdkn, sdvn, qk_scale, sm_scale, D_QK, D_V, BLOCK_N, TANGENT, not EVEN_N, PREC, USE_TMA)

    inv_l = 1.0 / l_i
    o = acc_o * inv_l[:, None]
    _store(o_desc, row0, N_Q, son, o.to(O.dtype.element_ty), BLOCK_M, D_V, USE_TMA)
    if TANGENT:
        t = acc_t * inv_l[:, None] - (r_i * inv_l)[:, None] * o
        _store(do_desc, row0, N_Q, sdon, t.to(DO.dtype.element_ty), BLOCK_M, D_V, USE_TMA)
    # natural-log LSE: m is in base-2 units
    offs_m = row0 + tl.arange(0, BLOCK_M)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)


# ----------------------------------------------------------------------------------
# launching
# ----------------------------------------------------------------------------------

class _Scratch:
    """Global scratch for device-side tensor descriptors (``triton.set_allocator``)."""

    def __call__(self, size, alignment, stream):
        return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    if _INTERPRET:
        return
    try:
        from triton.runtime import _allocation as A
        cur = A._allocator.get() if hasattr(A._allocator, "get") else None
        if cur is not None and not isinstance(cur, A.NullAllocator):
            return
    except Exception:  # noqa: BLE001 - private API moved: set ours
        pass
    triton.set_allocator(_Scratch())


def _common(dtype):
    return dict(PREC=_prec(dtype), HAS_WS_KW=HAS_WARP_SPECIALIZE, HAS_STAGES_KW=_HAS_RANGE_STAGES)


def _run(launch):
    """Launch; if a warp-specialised variant fails to compile, turn WS off and relaunch."""
    _ensure_allocator()
    try:
        with torch._C._DisableFuncTorch():   # the interpreter copies tensors: keep them plain
            return launch()
    except (torch.cuda.OutOfMemoryError, ValueError, TypeError):
        raise
    except Exception as e:  # noqa: BLE001 - compiler errors have many types
        if not _WS_OK[0] or _INTERPRET or os.environ.get("RCM_HOPPER_CONFIG"):
            raise
        _WS_OK[0] = False
        _reset_tuning()
        warnings.warn(f"flash_jvp_hopper: a warp-specialised variant failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''}); warp specialisation off for this "
                      f"process", RuntimeWarning, stacklevel=3)
        with torch._C._DisableFuncTorch():
            return launch()


def _launch_fwd(q, k, v, dq, dk, dv, scale, tangent):
    B, H, Nq, Dqk = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    s, (q, k, v, dq, dk, dv, o, do, lse) = _fwd_buffers(q, k, v, dq, dk, dv, scale, tangent)

    def grid(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)

    def st(x):
        return x.stride(0), x.stride(1), x.stride(2)

    def launch():
        _fwd_kernel[grid](
            q, k, v, dq, dk, dv, o, do, lse,
            *st(q), *st(k), *st(v), *st(dq), *st(dk), *st(dv), *st(o), *st(do),
            H, Nq, Nk, _bucket(Nk), s, s * _LOG2E,
            D_QK=Dqk, D_V=Dv, TANGENT=tangent, **_common(q.dtype))

    _run(launch)
    return o, (do if tangent else None), lse


def _check_applies(what, *ts):
    if not applies(*ts):
        raise ValueError(f"flash_jvp_hopper.{what}: inputs not eligible for the Hopper kernels (CUDA "
                         f"capability 9.x, fp16/bf16, head dims {SUPPORTED_HEAD_DIMS}, unit last stride, "
                         f"16-byte aligned pointers and strides); use rcm_kernels.flash_jvp")


def forward(q, k, v, scale=None):
    """O = softmax(scale Q K^T) V and the row LSE (fp32, (B, H, Nq), natural log)."""
    _check([("q", q), ("k", k), ("v", v)], scale, "forward")
    _check_qkv(q, k, v, "forward")
    _check_applies("forward", q, k, v)
    o, _, lse = _launch_fwd(q, k, v, None, None, None, scale, tangent=False)
    return o, lse


def forward_tangent(q, k, v, dq, dk, dv, scale=None):
    """(O, dO, LSE) in one pass over the key/value blocks."""
    _check_tangents(q, k, v, dq, dk, dv, scale, module="flash_jvp_hopper")
    _check_applies("forward_tangent", q, k, v, dq, dk, dv)
    return _launch_fwd(q, k, v, dq, dk, dv, scale, tangent=True)


# ----------------------------------------------------------------------------------
# backward (FlashAttention-2 style, O's gradient given the LSE)
# ----------------------------------------------------------------------------------

def _bwd_configs():
    if _INTERPRET:
        return _interp_configs()
    # dK/dV kernel: BLOCK_N key rows stay, BLOCK_M query rows stream
    out = [_cfg(bm, bn, st, 4, True) for bm, bn, st in ((64, 128, 2), (64, 128, 3), (64, 64, 3))]
    out += [_cfg(bm, bn, st, w, False) for bm, bn, st, w in
            ((64, 128, 2, 8), (64, 128, 3, 8), (128, 128, 2, 8), (64, 64, 3, 4), (128, 64, 3, 8))]
    return out


def _dq_configs():
    if _INTERPRET:
        return _interp_configs()
    # dQ kernel: BLOCK_M query rows stay, BLOCK_N key rows stream. No warp-specialised
    # variant: triton 3.9's Hopper pass aborts the process on this loop compiling for sm_90
    # ("LLVM ERROR: unsupported load type for producer commit"), which no fallback can catch.
    return [_cfg(bm, bn, st, w, False) for bm, bn, st, w in
            ((128, 64, 2, 8), (128, 64, 3, 8), (128, 128, 2, 8), (64, 64, 3, 4))]


def _prune_bwd(configs, named_args, **kwargs):
    forced = _forced_config()
    if forced is not None:
        return [forced]
    if _INTERPRET:
        return _finish_prune(configs[:1], configs)
    args = {**named_args, **kwargs}
    d_qk, d_v = int(args.get("D_QK", 128)), int(args.get("D_V", 128))
    out = []
    for c in configs:
        bm, bn, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
        # resident tile (bn or bm rows of K,V / Q,dO) + streamed tiles per stage, bf16
        smem = 2 * (max(bm, bn) * (d_qk + d_v) + st * min(bm, bn) * (d_qk + d_v))
        if smem <= _SMEM_BYTES:
            out.append(c)
    return _finish_prune(out, configs)


@triton.jit
def _dkdv_step(gk, gv, k, v, q_desc, go_desc, LSE, DELTA, row_base, start_m, offs_n, N_Q, N_K,
               sqn, sgon, qk_scale, D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_M: tl.constexpr,
               PREC: tl.constexpr, USE_TMA: tl.constexpr):
    rows = start_m + tl.arange(0, BLOCK_M)
    rmask = rows < N_Q
    q = _load(q_desc, start_m, N_Q, sqn, BLOCK_M, D_QK, USE_TMA)
    go = _load(go_desc, start_m, N_Q, sgon, BLOCK_M, D_V, USE_TMA)
    lse2 = tl.load(LSE + row_base + rows, mask=rmask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + rows, mask=rmask, other=0.0)
    st = tl.dot(k, tl.trans(q), input_precision=PREC)          # transposed scores (N, M)
    pt = tl.exp2(st * qk_scale - lse2[None, :])
    pt = tl.where(offs_n[:, None] < N_K, pt, 0.0)
    gv = tl.dot(pt.to(go.dtype), go, gv, input_precision=PREC)
    dpt = tl.dot(v, tl.trans(go), input_precision=PREC)
    dst = pt * (dpt - delta[None, :])
    gk = tl.dot(dst.to(q.dtype), q, gk, input_precision=PREC)
    return gk, gv


@triton.autotune(configs=_bwd_configs(), key=["D_QK", "D_V", "N_Q_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOG, LSE, DELTA, GK, GV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sgob, sgoh, sgon,
    sgkb, sgkh, sgkn, sgvb, sgvh, sgvn,
    H, N_Q, N_K, N_Q_BUCKET, sm_scale, qk_scale,
    D_QK: tl.constexpr, D_V: tl.constexpr, PREC: tl.constexpr,
    HAS_WS_KW: tl.constexpr, HAS_STAGES_KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOOP_STAGES: tl.constexpr,
    WARP_SPEC: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    hh = (pid_bh % H).to(tl.int64)
    col0 = pid_n * BLOCK_N
    offs_n = col0 + tl.arange(0, BLOCK_N)
    k_desc = _desc(K + b * skb + hh * skh, N_K, skn, BLOCK_N, D_QK, USE_TMA)
    v_desc = _desc(V + b * svb + hh * svh, N_K, svn, BLOCK_N, D_V, USE_TMA)
    q_desc = _desc(Q + b * sqb + hh * sqh, N_Q, sqn, BLOCK_M, D_QK, USE_TMA)
    go_desc = _desc(DOG + b * sgob + hh * sgoh, N_Q, sgon, BLOCK_M, D_V, USE_TMA)
    gk_desc = _desc(GK + b * sgkb + hh * sgkh, N_K, sgkn, BLOCK_N, D_QK, USE_TMA)
    gv_desc = _desc(GV + b * sgvb + hh * sgvh, N_K, sgvn, BLOCK_N, D_V, USE_TMA)
    k = _load(k_desc, col0, N_K, skn, BLOCK_N, D_QK, USE_TMA)
    v = _load(v_desc, col0, N_K, svn, BLOCK_N, D_V, USE_TMA)
    gk = tl.zeros([BLOCK_N, D_QK], dtype=tl.float32)
    gv = tl.zeros([BLOCK_N, D_V], dtype=tl.float32)
    row_base = pid_bh.to(tl.int64) * N_Q
    # query rows past N_Q load as zeros with LSE = +inf: P = 0 there, no separate tail step
    if HAS_WS_KW:
        for start_m in tl.range(0, N_Q, BLOCK_M, num_stages=LOOP_STAGES, warp_specialize=WARP_SPEC):
            gk, gv = _dkdv_step(gk, gv, k, v, q_desc, go_desc, LSE, DELTA, row_base, start_m, offs_n, N_Q, N_K,
                                sqn, sgon, qk_scale, D_QK, D_V, BLOCK_M, PREC, USE_TMA)
    elif HAS_STAGES_KW:
        for start_m in tl.range(0, N_Q, BLOCK_M, num_stages=LOOP_STAGES):
            gk, gv = _dkdv_step(gk, gv, k, v, q_desc, go_desc, LSE, DELTA, row_base, start_m, offs_n, N_Q, N_K,
                                sqn, sgon, qk_scale, D_QK, D_V, BLOCK_M, PREC, USE_TMA)
    else:
        for start_m in range(0, N_Q, BLOCK_M):
            gk, gv = _dkdv_step(gk, gv, k, v, q_desc, go_desc, LSE, DELTA, row_base, start_m, offs_n, N_Q, N_K,
                                sqn, sgon, qk_scale, D_QK, D_V, BLOCK_M, PREC, USE_TMA)
    gk = gk * sm_scale
    _store(gk_desc, col0, N_K, sgkn, gk.to(GK.dtype.element_ty), BLOCK_N, D_QK, USE_TMA)
    _store(gv_desc, col0, N_K, sgvn, gv.to(GV.dtype.element_ty), BLOCK_N, D_V, USE_TMA)


@triton.jit
def _dq_step(gq, q, go, lse2, delta, k_desc, v_desc, start_n, N_K, skn, svn, qk_scale,
             D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
             PREC: tl.constexpr, USE_TMA: tl.constexpr):
    k = _load(k_desc, start_n, N_K, skn, BLOCK_N, D_QK, USE_TMA)
    v = _load(v_desc, start_n, N_K, svn, BLOCK_N, D_V, USE_TMA)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASK_N:
        cols = start_n + tl.arange(0, BLOCK_N)
        p = tl.where(cols[None, :] < N_K, p, 0.0)
    dp = tl.dot(go, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    gq = tl.dot(ds.to(k.dtype), k, gq, input_precision=PREC)
    return gq


@triton.autotune(configs=_dq_configs(), key=["D_QK", "D_V", "N_K_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_bwd})
@triton.heuristics({"EVEN_N": lambda a: a["N_K"] % a["BLOCK_N"] == 0})
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOG, LSE, DELTA, GQ,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sgob, sgoh, sgon, sgqb, sgqh, sgqn,
    H, N_Q, N_K, N_K_BUCKET, sm_scale, qk_scale,
    D_QK: tl.constexpr, D_V: tl.constexpr, PREC: tl.constexpr,
    HAS_WS_KW: tl.constexpr, HAS_STAGES_KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOOP_STAGES: tl.constexpr,
    WARP_SPEC: tl.constexpr, USE_TMA: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    hh = (pid_bh % H).to(tl.int64)
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    rmask = offs_m < N_Q
    q_desc = _desc(Q + b * sqb + hh * sqh, N_Q, sqn, BLOCK_M, D_QK, USE_TMA)
    go_desc = _desc(DOG + b * sgob + hh * sgoh, N_Q, sgon, BLOCK_M, D_V, USE_TMA)
    gq_desc = _desc(GQ + b * sgqb + hh * sgqh, N_Q, sgqn, BLOCK_M, D_QK, USE_TMA)
    k_desc = _desc(K + b * skb + hh * skh, N_K, skn, BLOCK_N, D_QK, USE_TMA)
    v_desc = _desc(V + b * svb + hh * svh, N_K, svn, BLOCK_N, D_V, USE_TMA)
    q = _load(q_desc, row0, N_Q, sqn, BLOCK_M, D_QK, USE_TMA)
    go = _load(go_desc, row0, N_Q, sgon, BLOCK_M, D_V, USE_TMA)
    row_base = pid_bh.to(tl.int64) * N_Q
    lse2 = tl.load(LSE + row_base + offs_m, mask=rmask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=rmask, other=0.0)
    gq = tl.zeros([BLOCK_M, D_QK], dtype=tl.float32)
    # one loop over all key blocks, the ragged tail masked in it (see the forward kernel)
    if HAS_WS_KW:
        for start_n in tl.range(0, N_K, BLOCK_N, num_stages=LOOP_STAGES, warp_specialize=WARP_SPEC):
            gq = _dq_step(gq, q, go, lse2, delta, k_desc, v_desc, start_n, N_K, skn, svn, qk_scale,
                          D_QK, D_V, BLOCK_N, not EVEN_N, PREC, USE_TMA)
    elif HAS_STAGES_KW:
        for start_n in tl.range(0, N_K, BLOCK_N, num_stages=LOOP_STAGES):
            gq = _dq_step(gq, q, go, lse2, delta, k_desc, v_desc, start_n, N_K, skn, svn, qk_scale,
                          D_QK, D_V, BLOCK_N, not EVEN_N, PREC, USE_TMA)
    else:
        for start_n in range(0, N_K, BLOCK_N):
            gq = _dq_step(gq, q, go, lse2, delta, k_desc, v_desc, start_n, N_K, skn, svn, qk_scale,
                          D_QK, D_V, BLOCK_N, not EVEN_N, PREC, USE_TMA)
    gq = gq * sm_scale
    _store(gq_desc, row0, N_Q, sgqn, gq.to(GQ.dtype.element_ty), BLOCK_M, D_QK, USE_TMA)


def backward(q, k, v, o, lse, do_grad, scale=None, impl=None):
    """(dQ, dK, dV) for the primal output O given the upstream gradient ``do_grad``.

    ``impl`` is accepted for signature compatibility with ``flash_jvp.backward``: "aten"
    (or ``RCM_FLASH_BWD=aten``) hands over to the portable module's aten path.
    """
    impl = impl or os.environ.get("RCM_FLASH_BWD", "triton")
    if impl == "aten":
        return _portable.backward(q, k, v, o, lse, do_grad, scale, impl="aten")
    _check_backward(q, k, v, o, lse, do_grad, scale, module="flash_jvp_hopper")
    B, H, Nq, Dqk = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    _check_applies("backward", q, k, v, do_grad)
    s = _scale(scale, Dqk)
    q, k, v, do_grad, lse, delta, gq, gk, gv = _bwd_buffers(q, k, v, o, lse, do_grad)
    for name, t in (("dq", gq), ("dk", gk), ("dv", gv)):
        if not _tma_ok(t):   # empty_like keeps a dense layout; guard anyway
            raise ValueError(f"flash_jvp_hopper.backward: gradient buffer {name} not TMA-eligible")

    def st(x):
        return x.stride(0), x.stride(1), x.stride(2)

    def launch():
        _bwd_dkdv_kernel[lambda m: (triton.cdiv(Nk, m["BLOCK_N"]), B * H)](
            q, k, v, do_grad, lse, delta, gk, gv,
            *st(q), *st(k), *st(v), *st(do_grad), *st(gk), *st(gv),
            H, Nq, Nk, _bucket(Nq), s, s * _LOG2E, D_QK=Dqk, D_V=Dv, **_common(q.dtype))
        _bwd_dq_kernel[lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), B * H)](
            q, k, v, do_grad, lse, delta, gq,
            *st(q), *st(k), *st(v), *st(do_grad), *st(gq),
            H, Nq, Nk, _bucket(Nk), s, s * _LOG2E, D_QK=Dqk, D_V=Dv, **_common(q.dtype))

    _run(launch)
    return gq, gk, gv

"""FlashAttention-2 forward with tangent (JVP) in Triton, plus forward and backward.

One pass over key/value blocks computes, for every query row block,

    O   = softmax(s Q K^T) V
    dO  = P dV + H V - rowsum(H) O,   H = P * s (dQ K^T + Q dK^T)
    LSE = log sum_j exp(s q_i . k_j)

with the streaming maths of ``rcm-algorithm.md`` section 7: running max ``m`` (base-2
units, log2(e) folded into the scale), running sum ``l``, one accumulator for ``P V``,
ONE accumulator for ``P dV + H V`` (two tensor-core products into the same registers)
and ``rowsum(H)`` in fp32.  At the end ``O = acc_o / l`` and
``dO = acc_t / l - (r / l) O``.  Nothing of size N x N is ever allocated.

All public functions take (B, H, N, D) "bhnd" tensors, possibly non-contiguous views
(e.g. of a (B, N, H, D) tensor): the kernels address memory through strides, and the
outputs are allocated in the query's layout (bnhd-contiguous when q is a bnhd view).

Inputs: fp16 / bf16 (fp32 accumulation), or fp32 (IEEE fp32 products; for reference
checks).  Head dims 32, 64, 128; QK head dim may differ from the V head dim;
Nq != Nk (cross-attention); any length (masked tails).

The backward is a FlashAttention-2 style Triton backward (dK/dV kernel looping over
query blocks, dQ kernel looping over key blocks) fed with the forward's LSE.  With
``RCM_FLASH_BWD=aten`` it uses PyTorch's fused flash backward
(``aten._scaled_dot_product_flash_attention_backward``) instead, where eligible
(CUDA, fp16/bf16, equal QK and V head dims).

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

import math
import os
from typing import Tuple

import torch
import triton
import triton.language as tl

__all__ = ["supports", "forward", "forward_tangent", "backward", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (32, 64, 128)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(head_dim: int) -> bool:
    """True if the kernels handle this head dim (QK or V)."""
    return int(head_dim) in SUPPORTED_HEAD_DIMS


# ----------------------------------------------------------------------------------
# forward (with optional tangent)
# ----------------------------------------------------------------------------------

def _fwd_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    cfgs = []
    for bm, bn, w, s in [
        (128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 4, 3),
        (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 8, 3),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return cfgs


def _prune_fwd(configs, named_args, **kwargs):
    # 128x128 tiles with a tangent and D=128 need too many registers; keep the rest.
    args = {**named_args, **kwargs}
    q = args.get("Q")
    if isinstance(q, torch.Tensor) and q.dtype == torch.float32:
        # IEEE fp32 products (reference checks): small tiles, no pipelining
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    big = max(int(args.get("D_QK", 128)), int(args.get("D_V", 128))) > 64
    if os.environ.get("RCM_FLASH_AUTOTUNE", "1") == "0":
        # tests: one config, no tuning (compile time). With a tangent and a head dim
        # of 128, 3 stages of K, V, dK, dV tiles need 256 KiB of shared memory (over
        # the H100's 227 KiB), so take 2 stages there.
        if args.get("TANGENT", False) and big:
            return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2)]
        return configs[:1]
    out = []
    for c in configs:
        if args.get("TANGENT", False) and big and c.kwargs["BLOCK_N"] > 64:
            continue
        out.append(c)
    return out or configs


@triton.jit
def _fwd_block(acc_o, acc_t, m_i, l_i, r_i, q, dq, k_ptrs, v_ptrs, dk_ptrs, dv_ptrs,
               offs_n, start_n, N_K, qk_scale, sm_scale,
               TANGENT: tl.constexpr, MASK_N: tl.constexpr, PREC: tl.constexpr):
    if MASK_N:
        kmask = (start_n + offs_n)[:, None] < N_K
        k = tl.load(k_ptrs, mask=kmask, other=0.0)
        v = tl.load(v_ptrs, mask=kmask, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    kt = tl.trans(k)
    s = tl.dot(q, kt, input_precision=PREC)  # (M, N) fp32, unscaled
    if MASK_N:
        s = tl.where((start_n + offs_n)[None, :] < N_K, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc_o = acc_o * alpha[:, None]
    p_lo = p.to(v.dtype)
    if TANGENT:
        if MASK_N:
            dk = tl.load(dk_ptrs, mask=kmask, other=0.0)
            dv = tl.load(dv_ptrs, mask=kmask, other=0.0)
        else:
            dk = tl.load(dk_ptrs)
            dv = tl.load(dv_ptrs)
        # dS / s = dQ K^T + Q dK^T: two products into one accumulator
        ds = tl.dot(dq, kt, input_precision=PREC)
        ds = tl.dot(q, tl.trans(dk), ds, input_precision=PREC)
        h = p * ds * sm_scale
        r_i = r_i * alpha + tl.sum(h, 1)
        # P dV + H V: one accumulator
        acc_t = acc_t * alpha[:, None]
        acc_t = tl.dot(p_lo, dv, acc_t, input_precision=PREC)
        acc_t = tl.dot(h.to(v.dtype), v, acc_t, input_precision=PREC)
    acc_o = tl.dot(p_lo, v, acc_o, input_precision=PREC)
    return acc_o, acc_t, m_new, l_i, r_i


@triton.autotune(configs=_fwd_configs(), key=["D_QK", "D_V", "TANGENT", "N_K_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _fwd_kernel(
    Q, K, V, DQ, DK, DV, O, DO, LSE,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdqb, sdqh, sdqn, sdqd,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    sob, soh, son, sod,
    sdob, sdoh, sdon, sdod,
    H, N_Q, N_K, N_K_BUCKET, sm_scale, qk_scale,
    D_QK: tl.constexpr, D_V: tl.constexpr, TANGENT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    hh = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, D_QK)
    offs_dv = tl.arange(0, D_V)
    mmask = offs_m[:, None] < N_Q

    q_ptrs = Q + b * sqb + hh * sqh + offs_m[:, None] * sqn + offs_dk[None, :] * sqd
    q = tl.load(q_ptrs, mask=mmask, other=0.0)
    k_ptrs = K + b * skb + hh * skh + offs_n[:, None] * skn + offs_dk[None, :] * skd
    v_ptrs = V + b * svb + hh * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd
    if TANGENT:
        dq = tl.load(DQ + b * sdqb + hh * sdqh + offs_m[:, None] * sdqn + offs_dk[None, :] * sdqd,
                     mask=mmask, other=0.0)
        dk_ptrs = DK + b * sdkb + hh * sdkh + offs_n[:, None] * sdkn + offs_dk[None, :] * sdkd
        dv_ptrs = DV + b * sdvb + hh * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd
    else:
        dq = q
        dk_ptrs = k_ptrs
        dv_ptrs = v_ptrs

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, D_V], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, D_V], dtype=tl.float32)

    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc_o, acc_t, m_i, l_i, r_i = _fwd_block(
            acc_o, acc_t, m_i, l_i, r_i, q, dq, k_ptrs, v_ptrs, dk_ptrs, dv_ptrs,
            offs_n, start_n, N_K, qk_scale, sm_scale, TANGENT, False, PREC)
        k_ptrs += BLOCK_N * skn
        v_ptrs += BLOCK_N * svn
        if TANGENT:
            dk_ptrs += BLOCK_N * sdkn
            dv_ptrs += BLOCK_N * sdvn
    if n_full < N_K:
        acc_o, acc_t, m_i, l_i, r_i = _fwd_block(
            acc_o, acc_t, m_i, l_i, r_i, q, dq, k_ptrs, v_ptrs, dk_ptrs, dv_ptrs,
            offs_n, n_full, N_K, qk_scale, sm_scale, TANGENT, True, PREC)

    inv_l = 1.0 / l_i
    o = acc_o * inv_l[:, None]
    o_ptrs = O + b * sob + hh * soh + offs_m[:, None] * son + offs_dv[None, :] * sod
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=mmask)
    if TANGENT:
        t = acc_t * inv_l[:, None] - (r_i * inv_l)[:, None] * o
        do_ptrs = DO + b * sdob + hh * sdoh + offs_m[:, None] * sdon + offs_dv[None, :] * sdod
        tl.store(do_ptrs, t.to(DO.dtype.element_ty), mask=mmask)
    # natural-log LSE: m is in base-2 units
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)


# ----------------------------------------------------------------------------------
# input checks (all before any launch)
# ----------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(name_tensors, scale, what):
    names = [n for n, _ in name_tensors]
    ts = [t for _, t in name_tensors]
    for n, t in name_tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_jvp.{what}: {n} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"flash_jvp.{what}: {n} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"flash_jvp.{what}: {n} has unsupported dtype {t.dtype} (fp16, bf16, fp32)")
        if t.numel() and t.stride(-1) != 1 and t.shape[-1] > 1:
            # strided head dims work but waste bandwidth; accept them (pointer maths
            # uses strides), nothing to reject.
            pass
    d0 = ts[0].dtype
    for n, t in name_tensors:
        if t.dtype != d0:
            raise TypeError(f"flash_jvp.{what}: dtypes differ: {names[0]} {d0} vs {n} {t.dtype}")
        if t.device != ts[0].device:
            raise ValueError(f"flash_jvp.{what}: devices differ: {names[0]} {ts[0].device} vs {n} {t.device}")
    if not (ts[0].is_cuda or _INTERPRET):
        raise ValueError(f"flash_jvp.{what}: tensors must be on a CUDA device (or set TRITON_INTERPRET=1), "
                         f"got {ts[0].device}")
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"flash_jvp.{what}: scale must be finite, got {scale}")


def _check_qkv(q, k, v, what):
    B, H, Nq, Dqk = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"flash_jvp.{what}: batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] != H or v.shape[1] != H:
        raise ValueError(f"flash_jvp.{what}: head counts differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"flash_jvp.{what}: k and v token counts differ: {k.shape[2]} vs {v.shape[2]}")
    if k.shape[3] != Dqk:
        raise ValueError(f"flash_jvp.{what}: q and k head dims differ: {Dqk} vs {k.shape[3]}")
    for n, d in (("q/k", Dqk), ("v", v.shape[3])):
        if not supports(d):
            raise ValueError(f"flash_jvp.{what}: unsupported {n} head dim {d}; supported: {SUPPORTED_HEAD_DIMS}")
    if Nq == 0 or k.shape[2] == 0:
        raise ValueError(f"flash_jvp.{what}: empty sequence (Nq={Nq}, Nk={k.shape[2]})")
    if B * H > 65535 * 65535 or triton.cdiv(Nq, 16) > 2**31 - 1:
        raise ValueError(f"flash_jvp.{what}: problem too large for the launch grid")


def _alloc_like_layout(q, dv_dim, dtype):
    """(B, H, Nq, Dv) output in q's memory layout (bnhd-contiguous for bnhd views)."""
    B, H, N, _ = q.shape
    if q.stride(1) < q.stride(2) and q.transpose(1, 2).is_contiguous():
        return torch.empty((B, N, H, dv_dim), dtype=dtype, device=q.device).transpose(1, 2)
    return torch.empty((B, H, N, dv_dim), dtype=dtype, device=q.device)


def _raw(*xs):
    """The storage-backed tensors under torch.func grad/jvp wrappers (not vmap's).

    Tensors created while a torch.func transform is active (inputs and our own
    allocations) are wrappers without storage; the kernels need the data pointers.
    The values are the same; derivatives of the kernels' outputs come from the
    autograd.Function rules in rcm_core.attention, not from tracing the kernels.
    """
    F = torch._C._functorch
    out = []
    for x in xs:
        while isinstance(x, torch.Tensor) and F.is_functorch_wrapped_tensor(x):
            if F.is_batchedtensor(x):
                raise NotImplementedError("flash_jvp: vmap (batched) tensors are not supported; "
                                          "use the exact path")
            x = F.get_unwrapped(x)
        out.append(x)
    return out


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _scale(scale, d_qk: int) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(d_qk)


def _fwd_buffers(q, k, v, dq, dk, dv, scale, tangent):
    """The forward kernels' arguments (shared with ``flash_jvp_hopper``): the scale and the plain
    q, k, v, dq, dk, dv (q, k, v again without a tangent), O, dO (O without a tangent), LSE."""
    B, H, Nq, Dqk = q.shape
    o = _alloc_like_layout(q, v.shape[3], q.dtype)
    do = _alloc_like_layout(q, v.shape[3], q.dtype) if tangent else o
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if not tangent:
        dq, dk, dv = q, k, v
    return _scale(scale, Dqk), _raw(q, k, v, dq, dk, dv, o, do, lse)


def _check_tangents(q, k, v, dq, dk, dv, scale, module="flash_jvp"):
    """forward_tangent's argument checks (``module`` names the caller in the message)."""
    _check([("q", q), ("k", k), ("v", v), ("dq", dq), ("dk", dk), ("dv", dv)], scale, "forward_tangent")
    _check_qkv(q, k, v, "forward_tangent")
    for n, t, ref in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if t.shape != ref.shape:
            raise ValueError(f"{module}.forward_tangent: {n} shape {tuple(t.shape)} != primal shape "
                             f"{tuple(ref.shape)}")


def _check_backward(q, k, v, o, lse, do_grad, scale, module="flash_jvp"):
    """backward's argument checks (``module`` names the caller in the message)."""
    _check([("q", q), ("k", k), ("v", v), ("o", o), ("do_grad", do_grad)], scale, "backward")
    _check_qkv(q, k, v, "backward")
    B, H, Nq, _ = q.shape
    Dv = v.shape[3]
    if o.shape != (B, H, Nq, Dv) or do_grad.shape != o.shape:
        raise ValueError(f"{module}.backward: o {tuple(o.shape)} / do_grad {tuple(do_grad.shape)} must be "
                         f"{(B, H, Nq, Dv)}")
    if lse.shape != (B, H, Nq) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"{module}.backward: lse must be fp32 {(B, H, Nq)} on {q.device}, got "
                         f"{lse.dtype} {tuple(lse.shape)} on {lse.device}")


def _bwd_buffers(q, k, v, o, lse, do_grad):
    """The backward kernels' arguments (shared with ``flash_jvp_hopper``): plain q, k, v, dO, LSE,
    delta = rowsum(O * dO) in fp32, and the gradient buffers gQ, gK, gV."""
    delta = (o.float() * do_grad.float()).sum(-1).contiguous()  # (B, H, Nq) fp32
    gq, gk, gv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    return _raw(q, k, v, do_grad, lse.contiguous(), delta, gq, gk, gv)


def _launch_fwd(q, k, v, dq, dk, dv, scale, tangent):
    B, H, Nq, Dqk = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    s, (q, k, v, dq, dk, dv, o, do, lse) = _fwd_buffers(q, k, v, dq, dk, dv, scale, tangent)

    def grid(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)

    with torch._C._DisableFuncTorch():  # the interpreter copies tensors: keep them plain
        _fwd_kernel[grid](
            q, k, v, dq, dk, dv, o, do, lse,
            *q.stride(), *k.stride(), *v.stride(),
            *dq.stride(), *dk.stride(), *dv.stride(),
            *o.stride(), *do.stride(),
            H, Nq, Nk, _bucket(Nk), s, s * _LOG2E,
            D_QK=Dqk, D_V=Dv, TANGENT=tangent, PREC=_prec(q.dtype),
        )
    return o, (do if tangent else None), lse


def _bucket(n):
    """Autotune key for the key length: next power of two (few re-tunings)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def forward(q, k, v, scale=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """O = softmax(scale Q K^T) V and the row LSE (fp32, (B, H, Nq), natural log)."""
    _check([("q", q), ("k", k), ("v", v)], scale, "forward")
    _check_qkv(q, k, v, "forward")
    o, _, lse = _launch_fwd(q, k, v, None, None, None, scale, tangent=False)
    return o, lse


def forward_tangent(q, k, v, dq, dk, dv, scale=None):
    """(O, dO, LSE) in one pass over the key/value blocks."""
    _check_tangents(q, k, v, dq, dk, dv, scale)
    return _launch_fwd(q, k, v, dq, dk, dv, scale, tangent=True)


# ----------------------------------------------------------------------------------
# backward (FlashAttention-2 style)
# ----------------------------------------------------------------------------------

def _bwd_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(64, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3),
                                 (64, 128, 8, 2), (32, 128, 4, 3)]]


def _dq_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3),
                                 (128, 64, 8, 2), (64, 128, 8, 3)]]


def _prune_first(configs, named_args, **kwargs):
    if os.environ.get("RCM_FLASH_AUTOTUNE", "1") == "0":
        return configs[:1]
    return configs


@triton.autotune(configs=_bwd_configs(), key=["D_QK", "D_V", "N_Q_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_first})
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOG, LSE, DELTA, GK, GV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sgob, sgoh, sgon, sgod,
    sgkb, sgkh, sgkn, sgkd, sgvb, sgvh, sgvn, sgvd,
    H, N_Q, N_K, N_Q_BUCKET, sm_scale, qk_scale,
    D_QK: tl.constexpr, D_V: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    hh = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, D_QK)
    offs_dv = tl.arange(0, D_V)
    nmask = offs_n[:, None] < N_K
    k = tl.load(K + b * skb + hh * skh + offs_n[:, None] * skn + offs_dk[None, :] * skd, mask=nmask, other=0.0)
    v = tl.load(V + b * svb + hh * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd, mask=nmask, other=0.0)
    gk = tl.zeros([BLOCK_N, D_QK], dtype=tl.float32)
    gv = tl.zeros([BLOCK_N, D_V], dtype=tl.float32)
    q_base = Q + b * sqb + hh * sqh + offs_dk[None, :] * sqd
    go_base = DOG + b * sgob + hh * sgoh + offs_dv[None, :] * sgod
    row_base = pid_bh.to(tl.int64) * N_Q
    for start_m in range(0, N_Q, BLOCK_M):
        rows = start_m + offs_m
        rmask = rows < N_Q
        q = tl.load(q_base + rows[:, None] * sqn, mask=rmask[:, None], other=0.0)
        go = tl.load(go_base + rows[:, None] * sgon, mask=rmask[:, None], other=0.0)
        lse = tl.load(LSE + row_base + rows, mask=rmask, other=float("inf"))
        delta = tl.load(DELTA + row_base + rows, mask=rmask, other=0.0)
        # transposed scores: (N, M)
        st = tl.dot(k, tl.trans(q), input_precision=PREC)
        pt = tl.exp2(st * qk_scale - (lse * 1.4426950408889634)[None, :])
        pt = tl.where(offs_n[:, None] < N_K, pt, 0.0)
        gv = tl.dot(pt.to(go.dtype), go, gv, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(go), input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        gk = tl.dot(dst.to(q.dtype), q, gk, input_precision=PREC)
    gk = gk * sm_scale
    tl.store(GK + b * sgkb + hh * sgkh + offs_n[:, None] * sgkn + offs_dk[None, :] * sgkd,
             gk.to(GK.dtype.element_ty), mask=nmask)
    tl.store(GV + b * sgvb + hh * sgvh + offs_n[:, None] * sgvn + offs_dv[None, :] * sgvd,
             gv.to(GV.dtype.element_ty), mask=nmask)


@triton.autotune(configs=_dq_configs(), key=["D_QK", "D_V", "N_K_BUCKET"],
                 prune_configs_by={"early_config_prune": _prune_first})
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOG, LSE, DELTA, GQ,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sgob, sgoh, sgon, sgod, sgqb, sgqh, sgqn, sgqd,
    H, N_Q, N_K, N_K_BUCKET, sm_scale, qk_scale,
    D_QK: tl.constexpr, D_V: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    hh = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, D_QK)
    offs_dv = tl.arange(0, D_V)
    rmask = offs_m < N_Q
    q = tl.load(Q + b * sqb + hh * sqh + offs_m[:, None] * sqn + offs_dk[None, :] * sqd,
                mask=rmask[:, None], other=0.0)
    go = tl.load(DOG + b * sgob + hh * sgoh + offs_m[:, None] * sgon + offs_dv[None, :] * sgod,
                 mask=rmask[:, None], other=0.0)
    row_base = pid_bh.to(tl.int64) * N_Q
    lse2 = tl.load(LSE + row_base + offs_m, mask=rmask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=rmask, other=0.0)
    gq = tl.zeros([BLOCK_M, D_QK], dtype=tl.float32)
    k_base = K + b * skb + hh * skh + offs_dk[None, :] * skd
    v_base = V + b * svb + hh * svh + offs_dv[None, :] * svd
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        cmask = cols < N_K
        k = tl.load(k_base + cols[:, None] * skn, mask=cmask[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * svn, mask=cmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        p = tl.where(cmask[None, :], p, 0.0)
        dp = tl.dot(go, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        gq = tl.dot(ds.to(k.dtype), k, gq, input_precision=PREC)
    gq = gq * sm_scale
    tl.store(GQ + b * sgqb + hh * sgqh + offs_m[:, None] * sgqn + offs_dk[None, :] * sgqd,
             gq.to(GQ.dtype.element_ty), mask=rmask[:, None])


def _aten_backward(q, k, v, o, lse, go, s):
    Nq, Nk = q.shape[2], k.shape[2]
    # non-varlen call: undefined (empty) cumulative lengths; no dropout, so the
    # philox seed/offset are not read.
    cu = None  # undefined: not varlen
    seed = torch.empty((), dtype=torch.int64, device=q.device)
    with torch._C._DisableFuncTorch():
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            go, q, k, v, o, lse.contiguous(), cu, cu, Nq, Nk, 0.0, False, seed, seed, scale=s)
    return gq, gk, gv


def backward(q, k, v, o, lse, do_grad, scale=None, impl=None):
    """(dQ, dK, dV) for the primal output O given the upstream gradient ``do_grad``.

    impl: "triton" (default), or "aten" (PyTorch's fused flash backward, CUDA, fp16/bf16,
    equal QK/V head dims); default from ``RCM_FLASH_BWD``.
    """
    _check_backward(q, k, v, o, lse, do_grad, scale)
    B, H, Nq, Dqk = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    s = _scale(scale, Dqk)
    impl = impl or os.environ.get("RCM_FLASH_BWD", "triton")
    if impl == "aten" and q.is_cuda and q.dtype != torch.float32 and Dqk == Dv:
        return _aten_backward(*_raw(q, k, v, o, lse, do_grad), s)
    q, k, v, do_grad, lse, delta, gq, gk, gv = _bwd_buffers(q, k, v, o, lse, do_grad)
    prec = _prec(q.dtype)

    def grid_kv(meta):
        return (triton.cdiv(Nk, meta["BLOCK_N"]), B * H)

    def grid_q(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)

    with torch._C._DisableFuncTorch():
        _bwd_dkdv_kernel[grid_kv](
            q, k, v, do_grad, lse, delta, gk, gv,
            *q.stride(), *k.stride(), *v.stride(), *do_grad.stride(), *gk.stride(), *gv.stride(),
            H, Nq, Nk, _bucket(Nq), s, s * _LOG2E, D_QK=Dqk, D_V=Dv, PREC=prec)
        _bwd_dq_kernel[grid_q](
            q, k, v, do_grad, lse, delta, gq,
            *q.stride(), *k.stride(), *v.stride(), *do_grad.stride(), *gq.stride(),
            H, Nq, Nk, _bucket(Nk), s, s * _LOG2E, D_QK=Dqk, D_V=Dv, PREC=prec)
    return gq, gk, gv

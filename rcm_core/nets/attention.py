"""The project's one attention op, with its own forward-mode (JVP) rule.

Every network in the project calls :func:`attention`. It is a
``torch.autograd.Function`` with ``forward``/``backward`` (reverse mode, for the
student's gradient) and ``jvp`` (forward mode, for the sCM tangent). Under
``torch.func.jvp`` or ``torch.autograd.forward_ad`` the whole unmodified network
is differentiated in forward mode and attention contributes

    dS = s (dQ K^T + Q dK^T),  H = P * dS,  dO = P dV + H V - rowsum(H) * O

(``rcm-algorithm.md`` section 7). On CUDA with a supported head dim the fused
Triton kernel (``rcm_kernels``) computes O, dO and the log-sum-exp in one pass;
elsewhere the exact maths below runs, chunked over queries so that only a
(chunk x Nk) block of scores exists at a time.

Two forward-mode entries: under ``torch.func.jvp`` torch calls ``forward`` and then
the ``jvp`` rule (O computed twice); when q/k/v are ``torch.autograd.forward_ad``
dual tensors (the trainer's tangent passes) :func:`attention` unpacks them itself
and :class:`_AttentionWithTangent` gets O and dO from one pass, keeping O
differentiable in reverse mode for the fused sCM step.

Primal-only calls (no tangent: teacher forwards, the critic's forward and backward, sampling) go
to the fastest backend available (:func:`primal_backend`): on CUDA, FlashAttention-3
(``flash_attn_interface``, Hopper, when installed) or PyTorch's SDPA with its default backend
choice (cuDNN/flash on Hopper); the project's kernel and exact path stay the fallback and
``RCM_ATTN_PRIMAL=auto|fa3|sdpa|op`` overrides the choice (``op``: this op's own forward and
backward, i.e. the Triton kernel on CUDA, the exact path elsewhere or with ``RCM_ATTN_BACKEND=exact``). Calls with tangents
(forward-AD duals, ``torch.func`` transforms) always take the op's own rules above: SDPA's fused
backends have no forward-AD formula. On the CPU the default stays the exact path.

Layouts: ``"bhnd"`` (batch, heads, tokens, dim) or ``"bnhd"`` (batch, tokens,
heads, dim), the layout transformer blocks produce after the QKV projection.
The op keeps no global state: it only sees its arguments, so tangents arriving
through a context-parallel all-to-all are handled like any other.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Optional

import torch

from .base import _STATE, group_attention

__all__ = ["attention", "attention_reference", "check_attention_inputs", "check_attention_request", "primal_backend",
           "KeptAttention", "kept_attention", "is_attention_forward_op",
           "PRIMAL_BACKENDS"]

_LAYOUTS = ("bhnd", "bnhd")
# Query rows per block of the exact path: bounds the score block to chunk x Nk.
_CHUNK = int(os.environ.get("RCM_ATTN_CHUNK", "1024"))


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> None:
    """Raise a ValueError naming the culprit for inconsistent attention inputs."""
    if layout not in _LAYOUTS:
        raise ValueError(f"attention: layout must be one of {_LAYOUTS}, got {layout!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D ({layout}), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"attention: {name} must be floating point, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    b_ax, h_ax, n_ax = (0, 1, 2) if layout == "bhnd" else (0, 2, 1)
    if not (q.shape[b_ax] == k.shape[b_ax] == v.shape[b_ax]):
        raise ValueError(f"attention: batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.shape[h_ax] == k.shape[h_ax] == v.shape[h_ax]):
        raise ValueError(f"attention: head counts differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[n_ax] != v.shape[n_ax]:
        raise ValueError(f"attention: k and v token counts differ: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")


def _to_bhnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bhnd" else x.transpose(1, 2)


def attention_reference(q, k, v, scale: Optional[float] = None, layout: str = "bhnd"):
    """Naive softmax attention (materialises N x N); the reference for tests."""
    q, k, v = (_to_bhnd(x, layout) for x in (q, k, v))
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    p = torch.softmax(s * q @ k.transpose(-1, -2), dim=-1)
    o = p @ v
    return o if layout == "bhnd" else o.transpose(1, 2)


# --- exact maths, chunked over query rows (bhnd, any float dtype) -------------

def _exact_forward(q, k, v, s):
    """O and row log-sum-exp, computed in fp32 (or the input dtype if wider)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    kt = k.to(acc).transpose(-1, -2)
    vv = v.to(acc)
    outs, lses = [], []
    for i in range(0, q.shape[2], _CHUNK):
        sc = s * (q[:, :, i:i + _CHUNK].to(acc) @ kt)
        lse = torch.logsumexp(sc, dim=-1)
        outs.append(torch.exp(sc - lse[..., None]) @ vv)
        lses.append(lse)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)


def _exact_forward_tangent(q, k, v, dq, dk, dv, s):
    """O, dO and LSE in one pass over query chunks (the kernel's maths)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    kt, dkt, vv, dvv = (x.to(acc) for x in (k.transpose(-1, -2), dk.transpose(-1, -2), v, dv))
    outs, touts, lses = [], [], []
    for i in range(0, q.shape[2], _CHUNK):
        qc, dqc = q[:, :, i:i + _CHUNK].to(acc), dq[:, :, i:i + _CHUNK].to(acc)
        sc = s * (qc @ kt)
        lse = torch.logsumexp(sc, dim=-1)
        p = torch.exp(sc - lse[..., None])
        o = p @ vv
        h = p * (s * (dqc @ kt + qc @ dkt))
        do = p @ dvv + h @ vv - h.sum(-1, keepdim=True) * o
        outs.append(o)
        touts.append(do)
        lses.append(lse)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(touts, 2).to(q.dtype), torch.cat(lses, 2)


def _exact_backward(q, k, v, o, lse, go, s):
    acc = torch.promote_types(q.dtype, torch.float32)
    kk, vv = k.to(acc), v.to(acc)
    gq_chunks = []
    gk = torch.zeros(k.shape, dtype=acc, device=k.device)
    gv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for i in range(0, q.shape[2], _CHUNK):
        sl = slice(i, i + _CHUNK)
        qc, goc, oc = q[:, :, sl].to(acc), go[:, :, sl].to(acc), o[:, :, sl].to(acc)
        p = torch.exp(s * (qc @ kk.transpose(-1, -2)) - lse[:, :, sl, None])
        gv += p.transpose(-1, -2) @ goc
        dp = goc @ vv.transpose(-1, -2)
        ds = p * (dp - (goc * oc).sum(-1, keepdim=True))
        gq_chunks.append(s * ds @ kk)
        gk += s * ds.transpose(-1, -2) @ qc
    return torch.cat(gq_chunks, 2).to(q.dtype), gk.to(k.dtype), gv.to(v.dtype)


# --- backend selection ---------------------------------------------------------

def _use_kernel(q: torch.Tensor, v: torch.Tensor) -> bool:
    """CUDA, fp16/bf16/fp32, and both head dims (QK and V) supported by the kernel.

    Cost under forward AD: torch calls ``forward`` (one flash forward, 4 B H Nq Nk D
    flops) and then ``jvp`` (one fused forward-with-tangent pass, 12 B H Nq Nk D, which
    recomputes O on the way), so a JVP through this op costs about 4/3 of the fused
    kernel alone. Callers that only need (O, dO) can call
    ``rcm_kernels.flash_jvp.forward_tangent`` directly.
    """
    if not q.is_cuda or os.environ.get("RCM_ATTN_BACKEND", "auto") == "exact":
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    try:
        from rcm_kernels import flash_jvp
    except ImportError:
        return False
    return flash_jvp.supports(q.shape[-1]) and flash_jvp.supports(v.shape[-1])


def _plain(*xs, allowed=()):
    """Storage-backed tensors for the kernel, or None to take the exact path.

    Inside torch.func transforms the tensors reaching this op's rules are functorch
    wrappers without storage. The kernel may compute on the unwrapped values only
    when no transform needs to differentiate the kernel's own output: at most one
    transform is active and it is the one whose rule is running (``allowed``: the
    Jvp transform for the tangent pass, the Grad transform for the backward). Nested
    transforms (jvp of grad, jvp of jvp) take the exact, differentiable path.
    """
    F = torch._C._functorch
    if any(F.is_functorch_wrapped_tensor(x) for x in xs):
        stack = F.get_interpreter_stack() or []
        if len(stack) > 1 or any(i.key() not in allowed for i in stack):
            return None
    out = []
    for x in xs:
        while F.is_functorch_wrapped_tensor(x):
            if F.is_batchedtensor(x):
                return None
            x = F.get_unwrapped(x)
        out.append(x)
    return out


# --- primal-only calls: the fastest available backend ------------------------------------

PRIMAL_BACKENDS = ("auto", "fa3", "sdpa", "op")


def _find_fa3():
    try:
        from flash_attn_interface import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


_FA3_FUNC = _find_fa3()


def _fa3():
    """FlashAttention-3's function (package ``flash_attn_interface``, built from flash-attn's ``hopper/`` folder),
    or None where it is not installed. Looked up once, at import: every primal call asks (a failed import would
    search sys.path each time), and a compiled block (serving ``compile``) reads a plain global where an
    ``lru_cache`` wrapper broke its graph (H200 run, bench/serving.py)."""
    return _FA3_FUNC


def primal_backend(device_type: str, dtype: torch.dtype, head_dims: tuple, capability: tuple = (0, 0),
                   choice: Optional[str] = None) -> str:
    """Which backend runs a primal-only (no tangent) attention call.

    ``choice`` (default: ``$RCM_ATTN_PRIMAL`` or ``"auto"``). ``auto``: on CUDA, FlashAttention-3 for
    fp16/bf16 with equal q/v head dims <= 256 on compute capability 9.x when installed, else SDPA
    (PyTorch's own choice among cuDNN, flash, memory-efficient); on other devices ``op`` (this op's
    exact path: the CPU tests compare it with float64 references). ``fa3`` where it cannot run falls
    back to ``sdpa``; ``sdpa`` is honoured on any device.
    """
    choice = choice or os.environ.get("RCM_ATTN_PRIMAL", "auto")
    if choice not in PRIMAL_BACKENDS:
        raise ValueError(f"RCM_ATTN_PRIMAL={choice!r}: expected one of {PRIMAL_BACKENDS}")
    if device_type != "cuda":
        return "sdpa" if choice == "sdpa" else "op"
    if choice in ("auto", "fa3"):
        ok = (dtype in (torch.float16, torch.bfloat16) and capability[0] == 9 and len(set(head_dims)) == 1
              and head_dims[0] <= 256 and _fa3() is not None)
        if choice == "fa3" and not ok:
            _log_once(f"attention: RCM_ATTN_PRIMAL=fa3 cannot take {str(dtype).replace('torch.', '')} with head dims "
                      f"{tuple(head_dims)}; SDPA runs these calls")
        return "fa3" if ok else "sdpa"
    return choice


def _primal_attention(q, k, v, s, backend: str):
    """O for (B, H, N, D) q, k, v through ``backend`` ("fa3" or "sdpa"); autograd by the backend."""
    if backend == "fa3":
        out = _fa3()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=s)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)
    import torch.nn.functional as F
    return F.scaled_dot_product_attention(q, k, v, scale=s)


KERNELS = ("auto", "portable", "hopper")      # auto: hopper where it applies (sm90), else portable
TANGENT_BACKENDS = ("auto", "exact")


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    """Say an automatic fallback once per process (stderr), not once per call."""
    import logging
    logging.getLogger("rcm.attention").warning(message)


def check_attention_request(device: torch.device | str, dtype: torch.dtype) -> dict:
    """Check the attention settings asked for in the environment against where the run computes, at start.

    ``device``: the run's device; ``dtype``: its compute dtype (the autocast dtype, or the weights').
    Returns the choices as they will apply (``kernel``, ``primal``, ``tangent``). A setting that was asked for
    explicitly and cannot run here raises ``ValueError`` naming the variable, the device and the fix, instead
    of a slow fallback found later: ``RCM_ATTN_KERNEL=hopper`` off compute capability 9.x or in float32,
    ``RCM_ATTN_PRIMAL=fa3`` where FlashAttention-3 is missing or cannot run, an unknown value of
    ``RCM_ATTN_KERNEL``/``RCM_ATTN_PRIMAL``/``RCM_ATTN_BACKEND``. Fallbacks of the defaults (no Triton kernel
    on this CUDA machine: the exact path) are logged once.
    """
    device = torch.device(device)
    env = os.environ.get
    kernel, primal, tangent = env("RCM_ATTN_KERNEL", "auto"), env("RCM_ATTN_PRIMAL", "auto"), \
        env("RCM_ATTN_BACKEND", "auto")
    for var, value, allowed in (("RCM_ATTN_KERNEL", kernel, KERNELS), ("RCM_ATTN_PRIMAL", primal, PRIMAL_BACKENDS),
                                ("RCM_ATTN_BACKEND", tangent, TANGENT_BACKENDS)):
        if value not in allowed:
            raise ValueError(f"{var}={value!r}: expected one of {allowed} (unset it for the default)")
    cuda = device.type == "cuda"
    cap = torch.cuda.get_device_capability(device) if cuda else (0, 0)
    where = f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]})" if cuda else \
        f"the {device.type}"
    if kernel == "hopper":
        interpret = device.type == "cpu" and env("TRITON_INTERPRET") == "1"      # the kernel's CPU tests
        if not interpret and (cap[0] != 9 or dtype not in (torch.float16, torch.bfloat16)):
            raise ValueError(f"RCM_ATTN_KERNEL=hopper: the Hopper kernel needs compute capability 9.x and "
                             f"bf16/fp16; this run computes in {str(dtype).replace('torch.', '')} on {where}. "
                             "Unset RCM_ATTN_KERNEL (the portable kernel) or run on an H100/H200")
    if primal == "fa3":
        why = ("it runs on CUDA only" if not cuda else "it needs compute capability 9.x" if cap[0] != 9 else
               "it needs bf16/fp16" if dtype not in (torch.float16, torch.bfloat16) else
               "flash_attn_interface is not installed (build flash-attn's hopper/ folder)" if _fa3() is None else "")
        if why:
            raise ValueError(f"RCM_ATTN_PRIMAL=fa3 on {where}: FlashAttention-3 cannot run ({why}). "
                             "Use RCM_ATTN_PRIMAL=auto (SDPA where FA3 cannot run) or sdpa")
    if kernel == "auto":        # as _kernels decides per call (tensors it cannot take go to the portable one)
        kernel = "hopper" if cap[0] == 9 and dtype in (torch.float16, torch.bfloat16) else "portable"
    out = {"kernel": kernel, "primal": primal, "tangent": tangent}
    if cuda and tangent == "auto":
        try:
            from rcm_kernels import flash_jvp  # noqa: F401
        except ImportError as e:
            out["tangent"] = "exact"
            _log_once(f"attention: the Triton forward-with-tangent kernel is unavailable on {where} ({e}); "
                      "tangent passes take the exact (chunked PyTorch) path, several times slower")
    return out


def _kernels(*plain):
    """The kernel module for these storage-backed tensors: ``rcm_kernels.flash_jvp_hopper`` where it applies
    (compute capability 9.x, fp16/bf16, TMA-aligned strides, head dim 32/64/128; its forward, tangent and
    backward passed the GPU tests on an H200, without warp specialisation, whose LSE was wrong), else
    ``rcm_kernels.flash_jvp`` (portable). ``RCM_ATTN_KERNEL``: ``auto`` (default), ``portable`` (always the
    portable kernel), ``hopper`` (asked for: the start check refuses it off sm90; tensors it cannot take are
    logged once and run on the portable kernel)."""
    from rcm_kernels import flash_jvp
    kernel = os.environ.get("RCM_ATTN_KERNEL", "auto")
    if kernel in ("auto", "hopper") and (plain[0].is_cuda or kernel == "hopper"):
        from rcm_kernels import flash_jvp_hopper
        if flash_jvp_hopper.applies(*plain):
            return flash_jvp_hopper
        if kernel == "hopper" or torch.cuda.get_device_capability(plain[0].device)[0] == 9:
            _log_once(f"attention: the Hopper kernel does not apply to tensors of shape {tuple(plain[0].shape)}, "
                      f"{plain[0].dtype}, strides {plain[0].stride()} (TMA alignment / head dim); the portable "
                      "kernel runs them")
    return flash_jvp


def _forward_impl(q, k, v, s):
    if _use_kernel(q, v):
        plain = _plain(q, k, v)
        if plain is not None:
            return _kernels(*plain).forward(*plain, s)
    return _exact_forward(q, k, v, s)


def _forward_tangent_impl(q, k, v, dq, dk, dv, s):
    if _use_kernel(q, v):
        plain = _plain(q, k, v, dq, dk, dv, allowed=(torch._C._functorch.TransformType.Jvp,))
        if plain is not None:
            return _kernels(*plain).forward_tangent(*plain, s)
    return _exact_forward_tangent(q, k, v, dq, dk, dv, s)


def _backward_impl(q, k, v, o, lse, go, s):
    if _use_kernel(q, v):
        plain = _plain(q, k, v, o, lse, go, allowed=(torch._C._functorch.TransformType.Grad,))
        if plain is not None:
            return _kernels(*plain[:3], plain[5]).backward(*plain, s)
    return _exact_backward(q, k, v, o, lse, go, s)


class _Attention(torch.autograd.Function):
    """softmax(s Q K^T) V on (B, H, N, D) tensors with reverse and forward rules."""

    @staticmethod
    def forward(q, k, v, s):
        o, lse = _forward_impl(q, k, v, s)
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, s = inputs
        o, lse = output
        ctx.s = s
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, go, _glse):
        q, k, v, o, lse = ctx.saved_tensors
        gq, gk, gv = _backward_impl(q, k, v, o, lse, go.contiguous(), ctx.s)
        return gq, gk, gv, None

    @staticmethod
    def jvp(ctx, dq, dk, dv, _ds):
        q, k, v = ctx.saved_tensors
        zeros = torch.zeros_like
        dq = zeros(q) if dq is None else dq
        dk = zeros(k) if dk is None else dk
        dv = zeros(v) if dv is None else dv
        _, do, _ = _forward_tangent_impl(q, k, v, dq, dk, dv, ctx.s)
        return do, None


class _AttentionWithTangent(torch.autograd.Function):
    """(O, dO, LSE) from one fused pass; reverse mode through O only.

    Used when the inputs carry ``torch.autograd.forward_ad`` tangents while the graph
    for the backward is being recorded (the fused sCM student step): the primal O
    and its tangent dO come from one forward-with-tangent pass instead of a forward
    followed by the op's ``jvp`` rule, which would compute O twice.
    """

    @staticmethod
    def forward(q, k, v, dq, dk, dv, s):
        return _forward_tangent_impl(q, k, v, dq, dk, dv, s)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _dq, _dk, _dv, s = inputs
        o, do, lse = output
        ctx.s = s
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mark_non_differentiable(do, lse)

    @staticmethod
    def backward(ctx, go, _gdo, _glse):
        q, k, v, o, lse = ctx.saved_tensors
        gq, gk, gv = _backward_impl(q, k, v, o, lse, go.contiguous(), ctx.s)
        return gq, gk, gv, None, None, None, None


def is_attention_forward_op(op) -> bool:
    """Whether a dispatcher op is a fused attention forward of a primal call (PyTorch's SDPA backends, the CPU's
    flash path, FlashAttention-3's forward where it is registered as an op): what torch's selective checkpointing
    keeps under ``keep_attention``."""
    name = str(op)
    return (name.startswith("aten._scaled_dot_product_") and "backward" not in name) or \
        (name.startswith("flash_attn_3.") and "fwd" in name and "bwd" not in name)


# --- activation checkpointing that keeps attention (ParallelConfig "keep_attention") ----------------------------

class KeptAttention:
    """The self-attention outputs (O, LSE) of one checkpointed block's forward, handed back in the same order to
    that block's recomputation in the backward, so the recomputation runs everything but attention.

    Used by :func:`rcm_core.parallel.fsdp._checkpoint_block` for blocks that see forward-AD tangents (the fused sCM
    step): their forward computes O (with its tangent) in the Triton kernel, and the recomputation's backward runs
    on the kept O and LSE: cuDNN's SDPA backward where it applies (:func:`_cudnn_backward`; faster than the Triton
    backward, which made keeping no faster than recomputing on an H200), else the Triton kernel's. (Blocks
    without tangents keep attention through torch's selective checkpointing instead, which keeps the outputs of
    the SDPA/FlashAttention op.) Self-attention: key length = query length; cross-attention over the text is
    cheap to recompute and is not kept."""

    def __init__(self):
        self.kept: list = []
        self.replaying = False
        self.next = 0

    @staticmethod
    def wanted(q: torch.Tensor, k: torch.Tensor) -> bool:
        return q.shape[-2] == k.shape[-2]

    def record(self, o: torch.Tensor, lse: torch.Tensor) -> None:
        self.kept.append((o.detach(), lse.detach()))

    def take(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: float) -> torch.Tensor:
        if self.next >= len(self.kept) or self.kept[self.next][0].shape[:-1] != q.shape[:-1]:
            raise RuntimeError(
                f"activation checkpointing keep_attention: the recomputation's self-attention call {self.next} "
                f"(query {tuple(q.shape)}) does not match the forward's ({len(self.kept)} kept: "
                f"{[tuple(o.shape) for o, _ in self.kept]}); checkpointed blocks must call attention in the same "
                "order with the same shapes (deterministic blocks)")
        o, lse = self.kept[self.next]
        self.next += 1
        return _KeptAttention.apply(q, k, v, s, o, lse)


@contextlib.contextmanager
def _keeping(store: KeptAttention, replay: bool):
    before = getattr(_STATE, "keep", None)
    store.replaying, store.next = replay, 0
    _STATE.keep = store
    try:
        yield store
    finally:
        _STATE.keep = before


def kept_attention(store: Optional[KeptAttention], replay: bool = False):
    """Context: this thread's attention calls record their self-attention outputs into ``store`` (``replay``
    False) or take them from it in order (``replay`` True); ``store`` None: a no-op."""
    return contextlib.nullcontext() if store is None else _keeping(store, replay)


class _KeptAttention(torch.autograd.Function):
    """O kept from the forward, as the output of q, k, v: its backward is the op's backward with the kept LSE."""

    @staticmethod
    def forward(ctx, q, k, v, s, o, lse):
        ctx.s = s
        ctx.save_for_backward(q, k, v, o, lse)
        return o.clone()

    @staticmethod
    def backward(ctx, go):
        q, k, v, o, lse = ctx.saved_tensors
        if _cudnn_takes(q, v):
            try:
                return (*_cudnn_backward(q, k, v, o, lse, go, ctx.s), None, None, None)
            except (RuntimeError, TypeError) as e:
                _log_once(f"attention: cuDNN's backward did not take the kept attention output ({e}); the Triton "
                          "kernel's backward runs it")
        gq, gk, gv = _backward_impl(q, k, v, o, lse, go.contiguous(), ctx.s)
        return gq, gk, gv, None, None, None


def _cudnn_takes(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether PyTorch's cuDNN attention backward can run on these kept tensors: CUDA, bf16/fp16, one head dim
    <= 128 for q and v, the cuDNN SDPA backend enabled."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == v.shape[-1] <= 128
            and torch.backends.cuda.cudnn_sdp_enabled() and os.environ.get("RCM_ATTN_BACKEND", "auto") != "exact")


def _cudnn_backward(q, k, v, o, lse, go, s):
    """dq, dk, dv from cuDNN's SDPA backward on O and LSE kept from the Triton forward (natural-log LSE, fp32: the
    stats cuDNN's forward writes, as (B, H, N, 1)). H200, 32,760 tokens x 12 heads x 128: 31.1 ms against the Triton
    backward's 44.9 ms and cuDNN's own forward + backward's 41.8 ms; dq/dk/dv within 7e-4 relative L2 of cuDNN's
    backward on its own forward (bench/kept_attention_backward_probe.py). No dropout: the philox seed and offset
    are the zeros cuDNN's forward returns then; no nested tensors: no cumulative sequence lengths."""
    zero = torch.zeros(1, dtype=torch.long, device=q.device)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        go, q, k, v, o, lse.unsqueeze(-1), zero, zero, None, None, None, q.shape[-2], k.shape[-2], 0.0, False,
        scale=s)


def _dual_parts(*xs):
    """(primals, tangents) if any input is a ``forward_ad`` dual tensor (outside torch.func), else None."""
    from torch.autograd import forward_ad as fwAD
    if any(torch._C._functorch.is_functorch_wrapped_tensor(x) for x in xs):
        return None                      # torch.func.jvp: the op's own jvp rule handles it
    parts = [fwAD.unpack_dual(x) for x in xs]
    if all(p.tangent is None for p in parts):
        return None
    # a tangent in the primal's dtype: some ops' forward-AD rules return a wider tangent (e.g. rms_norm
    # with bf16 input and weight, as under FSDP's bf16 parameters, gives a bf16 primal, fp32 tangent)
    return ([p.primal for p in parts],
            [torch.zeros_like(p.primal) if p.tangent is None else p.tangent.detach().to(p.primal.dtype)
             for p in parts])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              scale: Optional[float] = None, layout: str = "bhnd") -> torch.Tensor:
    """softmax(scale * Q K^T) V with exact reverse- and forward-mode derivatives.

    q: (B, H, Nq, Dqk) or (B, Nq, H, Dqk) per ``layout``; k: same with Nk;
    v: same with Nk and Dv. Returns the output in the input layout.

    Under autocast, q, k and v are cast to the autocast dtype first, as PyTorch's SDPA does (a
    processor may hand over fp32 q/k from a norm and a bf16 v from a linear layer).
    """
    group = getattr(_STATE, "group", None)
    if group is not None:                # self-attention of a context-parallel network: Ulysses
        ulysses_attention = group_attention()   # rcm_core.parallel.context_parallel registers it (it set the group)
        _STATE.group = None              # the local attention inside runs on full sequences
        try:
            return ulysses_attention(q, k, v, group, layout=layout, scale=scale)
        finally:
            _STATE.group = group
    dev = q.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) and q.is_floating_point():
        adt = torch.get_autocast_dtype(dev)
        q, k, v = (x.to(adt) if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else x for x in (q, k, v))
    check_attention_inputs(q, k, v, layout)
    s = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not math.isfinite(s):
        raise ValueError(f"attention: scale must be finite, got {scale}")
    sparse = getattr(_STATE, "sparse", None)     # sliding-tile self-attention (nets.sparse_attention) in force
    if sparse is not None:
        o = sparse(q, k, v, s, layout)           # None: not the grid's self-attention (cross-attention): dense
        if o is not None:
            return o
    qb, kb, vb = (_to_bhnd(x, layout) for x in (q, k, v))
    if torch.compiler.is_compiling():
        # inside a compiled block (serving compile, the compiled teacher, compile_nograd): no-grad passes only,
        # no tangents (compile_blocks refuses duals) and no torch.func, so SDPA, which inductor lowers to PyTorch's
        # fused backends. The functorch checks below cannot be traced: each one broke the block's graph, and the
        # attention processor's frame then recompiled per block past dynamo's limit (H200, 2026-12-05)
        o = _primal_attention(qb, kb, vb, s, "sdpa")
        return o if layout == "bhnd" else o.transpose(1, 2)
    duals = _dual_parts(qb, kb, vb)
    keep = getattr(_STATE, "keep", None)        # a checkpointed block's kept attention (keep_attention)
    if duals is not None:                # forward-AD tangents with the graph kept: one fused pass
        from torch.autograd import forward_ad as fwAD
        (qp, kp, vp), (dq, dk, dv) = duals
        o, do, lse = _AttentionWithTangent.apply(qp, kp, vp, dq, dk, dv, s)
        if keep is not None and not keep.replaying and KeptAttention.wanted(qp, kp):
            keep.record(o, lse)
        o = fwAD.make_dual(o, do)
    elif keep is not None and keep.replaying and KeptAttention.wanted(qb, kb):
        o = keep.take(qb, kb, vb, s)
    else:
        backend = "op"
        if not any(torch._C._functorch.is_functorch_wrapped_tensor(x) for x in (qb, kb, vb)):  # no torch.func
            cap = torch.cuda.get_device_capability(q.device) if q.is_cuda else (0, 0)
            backend = primal_backend(q.device.type, q.dtype, (q.shape[-1], v.shape[-1]), cap)
        if backend in ("fa3", "sdpa"):
            o = _primal_attention(qb, kb, vb, s, backend)
        else:
            o, _ = _Attention.apply(qb, kb, vb, s)
    return o if layout == "bhnd" else o.transpose(1, 2)

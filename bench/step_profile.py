"""Where a training step's time and memory traffic go: an op-class profile and a census of casts and copies.

Used by ``bench/bench_real.py --profile`` (one profiled call per step kind, after the timed ones); the
functions take any zero-argument callable.

* :func:`profile_call`: torch.profiler over one call. On CUDA, kernel time by class, matched on kernel
  names (cuDNN SDPA forward/backward, the project's Triton forward-with-tangent and backward, matmuls,
  norms, copies and casts, the optimiser's foreach kernels, reductions, other elementwise kernels); on
  the CPU, self time by aten op class. Plus the peak memory and the top kernels.
* :func:`cast_census`: every copy and cast the call dispatches (``aten._to_copy``, ``copy_``, ``clone``,
  ``contiguous``), counted and sized (bytes read + written) by kind: a parameter cast to another dtype
  (float32 master weights to bf16 under autocast), a cast of a tensor shaped like a weight matrix (mostly the
  weight gradients' way back to float32 through autocast's cast), an activation cast, a same-dtype layout copy. Counts
  and bytes are device-independent: a CPU run at a small token count says which kind dominates and how
  it scales (activation bytes grow with tokens, parameter bytes do not), before GPU time is spent.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GiB = 2 ** 30

# (class, pattern) in order: the first match wins. CUDA kernel names.
CUDA_CLASSES = [
    ("attn fwd (cudnn/flash)", r"sdpa.*fprop|flash_fwd|fmha.*fwd|flash_attn.*fwd"),
    ("attn bwd (cudnn/flash)", r"sdpa.*bprop|flash_bwd|fmha.*bwd|flash_attn.*bwd"),
    ("attn fwd+tangent (triton)", r"^_fwd_kernel|forward_tangent|_attn_fwd"),
    ("attn bwd (triton)", r"^_bwd|_attn_bwd"),
    ("rope (triton)", r"^_rope"),
    ("norm + modulation (triton)", r"^_norm_affine"),
    ("gated residual (triton)", r"^_gated_residual"),
    ("matmul", r"nvjet|gemm|cutlass|xmma|cublas|wgmma"),
    ("norm", r"layer_norm|rms_norm|group_norm"),
    ("copy/cast", r"copy_kernel|bfloat16_copy|Memcpy|direct_copy|_to_copy|cat_|CatArray"),
    ("optimizer/foreach", r"multi_tensor_apply|Optimizer|adam"),
    ("reduce", r"reduce_kernel"),
    ("elementwise", r"elementwise_kernel|vectorized|unrolled|Functor"),
]
# CPU: aten op names (self time)
CPU_CLASSES = [
    ("attention", r"rcm_attention|scaled_dot_product|_attention"),
    ("matmul", r"aten::(mm|addmm|bmm|matmul|linear|baddbmm|convolution|_convolution|mkldnn_convolution)$"),
    ("norm", r"aten::(native_layer_norm|layer_norm|_fused_rms_norm|rms_norm|group_norm)"),
    ("copy/cast", r"aten::(_to_copy|copy_|clone|contiguous|to|cat|_copy_from)$"),
    ("optimizer/foreach", r"aten::_foreach|Optimizer"),
    ("reduce", r"aten::(sum|mean|amax|max|min|norm|var)"),
]


# Records of the profiler itself, not kernels: CUPTI's "Command Buffer Full" (launches waiting while the
# profiler's buffer drains). Reported apart (``profiler_s``), never in a class.
PROFILER_RECORDS = ("Command Buffer Full",)


def is_kernel_time(key: str, device_type) -> bool:
    """Whether a profiler entry's self device time is kernel time of its own. A CPU-side entry (an aten op, or
    an ``autograd.Function`` such as the project's ``_AttentionWithTangent`` that launches a Triton kernel with no
    aten op between) reports the device time of the kernels it launched directly, which the kernels' own
    entries report again: counting both put the tangent kernel's time twice into the 2026-12-05 profiles'
    "other" class. Only device-side entries count, and not the profiler's own records."""
    return device_type != torch.autograd.DeviceType.CPU and key not in PROFILER_RECORDS


def classify(name: str, device_type: str) -> str:
    for cls, pat in (CUDA_CLASSES if device_type == "cuda" else CPU_CLASSES):
        if re.search(pat, name):
            return cls
    return "elementwise/other" if device_type != "cuda" else "other"


def profile_call(fn, device: torch.device, top: int = 15) -> dict:
    """One call of ``fn`` under torch.profiler: seconds by class (CUDA kernel time on CUDA, CPU self time of
    aten ops on the CPU), their shares, the top entries and the peak memory."""
    device = torch.device(device)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    by_class: dict[str, float] = defaultdict(float)
    entries: Counter = Counter()
    calls: Counter = Counter()
    profiler_s = 0.0
    for e in prof.key_averages():
        if device.type == "cuda":
            t = getattr(e, "self_device_time_total", 0) or 0
            if e.key in PROFILER_RECORDS:
                profiler_s += t / 1e6
                continue
            if t <= 0 or not is_kernel_time(e.key, e.device_type):
                continue                                  # kernels only (not the CPU ops that launch them)
        else:
            t = e.self_cpu_time_total
            if not e.key.startswith("aten::") or t <= 0:
                continue
        s = t / 1e6
        by_class[classify(e.key, device.type)] += s
        entries[e.key] += s
        calls[e.key] += e.count
    total = sum(by_class.values())
    out = {"total_s": total, "classes": {k: {"s": v, "share": v / total if total else 0.0}
                                         for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
           "top": [{"name": k[:120], "s": v, "calls": calls[k]} for k, v in entries.most_common(top)]}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / GiB
        out["profiler_s"] = profiler_s
    return out


_COPY_OPS = {"_to_copy", "copy_", "clone", "contiguous", "_copy_from_and_resize", "copy"}


class _Census(TorchDispatchMode):
    def __init__(self, param_ptrs: set, param_shapes: set):
        super().__init__()
        self.param_ptrs, self.param_shapes = param_ptrs, param_shapes
        self.count: Counter = Counter()
        self.bytes: Counter = Counter()
        self.pairs: Counter = Counter()
        self.sites: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _COPY_OPS:
            src = args[1] if name == "copy_" else args[0]
            dst = out if isinstance(out, torch.Tensor) else args[0]
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.is_floating_point():
                if src.dtype != dst.dtype:
                    kind = ("param cast" if _ptr(src) in self.param_ptrs else
                            "param-shaped cast" if tuple(src.shape) in self.param_shapes else "activation cast")
                else:
                    kind = "same-dtype copy"
                moved = src.numel() * src.element_size() + dst.numel() * dst.element_size()
                self.count[kind] += 1
                self.bytes[kind] += moved
                if kind != "same-dtype copy":
                    self.pairs[f"{kind}: {_dt(src)}->{_dt(dst)}"] += moved
                self.sites[f"{kind} {_dt(src)}->{_dt(dst)} at {_site()}"] += moved
        return out


def _site() -> str:
    """The innermost model-side source line of the current op (diffusers or this project, not torch): where a
    cast is asked for. Backward ops have no such frame ("autograd")."""
    import traceback
    for f in reversed(traceback.extract_stack()[:-3]):
        if ("diffusers" in f.filename or "rcm_core" in f.filename) and "step_profile" not in f.filename:
            short = f.filename.split("site-packages/")[-1].split("/work/")[-1]
            return f"{short}:{f.lineno} {f.line.strip()[:70] if f.line else ''}"
    return "autograd (backward)"


def _ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def cast_census(fn, params) -> dict:
    """Copies and casts dispatched by one call of ``fn``: count and bytes (read + written) by kind. ``params``:
    the parameters whose dtype casts count as "param cast" (e.g. the student's float32 master weights)."""
    params = list(params)
    ptrs = {_ptr(p) for p in params}
    shapes = {tuple(p.shape) for p in params if p.dim() >= 2}     # matrices: activations rarely share them
    mode = _Census(ptrs, shapes)
    with mode:
        fn()
    total = sum(mode.bytes.values())
    return {"total_gb": total / 1e9,
            "kinds": {k: {"count": mode.count[k], "gb": mode.bytes[k] / 1e9} for k in sorted(mode.bytes)},
            "pairs_gb": {k: v / 1e9 for k, v in mode.pairs.most_common()},
            "top_sites_gb": {k: v / 1e9 for k, v in mode.sites.most_common(12)}}


def format_profile(what: str, prof: dict, census: dict | None = None) -> str:
    """A printed table: seconds and share by class, then the census."""
    lines = [f"== {what}: {prof['total_s']:.3f} s profiled" + (f", peak {prof['peak_gib']:.1f} GiB"
                                                               if "peak_gib" in prof else "")]
    for cls, v in prof["classes"].items():
        lines.append(f"  {cls:28s} {v['s']:8.3f} s {100 * v['share']:6.1f}%")
    if prof.get("profiler_s"):
        lines.append(f"  (profiler's own records, not counted: {prof['profiler_s']:.3f} s)")
    if census:
        lines.append(f"  casts/copies dispatched: {census['total_gb']:.2f} GB moved")
        for k, v in census["kinds"].items():
            lines.append(f"    {k:26s} {v['count']:6d} ops {v['gb']:9.3f} GB")
    return "\n".join(lines)

"""Ulysses context parallelism (CP) for the project's attention op, carrying forward-mode tangents.

A ``cp`` process group of P ranks shares one sample: rank r holds the contiguous chunk r of
the token sequence (``split_sequence``), every layer that acts per token (projections, norms,
MLPs, RoPE with frequencies split the same way) runs locally, and only self-attention needs
the other ranks. :func:`ulysses_attention` does it with all-to-alls (DeepSpeed-Ulysses)::

    q, k, v    [B, N/P, H, D]  local tokens, all heads           (layout "bnhd" or "bhnd")
      |  seq_to_heads: all-to-all (3 tensors)
    q, k, v    [B, N, H/P, D]  all tokens, H/P heads
      |  rcm_core.attention.attention  (the unchanged local op: Triton kernel on CUDA)
    o          [B, N, H/P, D]
      |  heads_to_seq: all-to-all (1 tensor)
    o          [B, N/P, H, D]  local tokens, all heads

That is 4 tensor all-to-alls per attention, 8 when q, k, v carry forward-mode tangents (the
sCM tangent) and the output carries dO; each moves (P-1)/P of a local activation. Here they
are packed: q, k, v and their tangents travel in ONE collective, O and dO in one more; the
backward is one collective for dO's cotangent and one for (dq, dk, dv) - 2 collectives
forward, 2 backward, with or without tangents. ``cp`` must divide the head count (Wan2.1
1.3B: 12 heads, 14B: 40; Cosmos-Predict2 2B: 16) and the global sequence length.

Why Ulysses and not ring attention: after the all-to-all every rank holds full sequences
for its heads and runs the project's attention op as it is, including its forward-mode rule
(one fused O + dO pass) and exact backward; nothing about the tangent changes. Ring
attention splits the keys and merges partial outputs by their log-sum-exp, and that merge
would need its own forward-mode rule (none exists in torch's ``context_parallel``, which
also only patches SDPA, whose fused kernels have no forward-AD formula).

Tangents: inside a ``torch.autograd.forward_ad`` dual level (the trainer's ``_jvp``: the
separate tangent pass under no_grad, and the fused sCM step that records the graph while
pushing duals), the helpers unpack the duals, move primal and tangent in the same collective
and return duals again. Tangents are carried detached, as the attention op does: reverse mode
flows through the primals only (the trainer detaches J). Under ``torch.func.jvp`` the
all-to-all's own ``jvp`` rule moves the tangents (one more collective).

Cross-attention (keys = text or image-context tokens, replicated on every rank, not split)
needs no communication: local queries attend to all keys, which is exact
(:func:`ulysses_cross_attention`).

Sequence ends: :func:`split_sequence` (rank r keeps chunk r; the patch embedding's output
and the RoPE frequencies) and :func:`gather_sequence` (all-gather with tangents; the
backward keeps the local chunk's gradient, so parameter gradients on each rank are the
contribution of its own tokens and must be SUMMED over the cp group - averaging over dp*cp
ranks, as FSDP does, leaves them 1/P of the true value).

Shape checks: by default every call all-gathers the ranks' shapes (a few integers) so that a
bad input raises the same error on every rank instead of hanging a collective; this costs a
host sync per call on GPUs. ``check=False`` or ``RCM_CP_CHECK=0`` turns it off (local checks
stay).
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.autograd import forward_ad as fwAD

from ..nets.attention import attention
from ..nets.base import set_group_attention

__all__ = ["seq_to_heads", "heads_to_seq", "ulysses_attention", "ulysses_cross_attention",
           "split_sequence", "gather_sequence", "cp_world"]

_LAYOUTS = ("bnhd", "bhnd")
_MAX_DIMS = 8
CHECK_SHAPES = os.environ.get("RCM_CP_CHECK", "1") != "0"

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]


# --- group and checks --------------------------------------------------------------------

def cp_world(group=None) -> tuple:
    """(rank, size) in ``group`` (None: the default group); (0, 1) without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("context parallel: a process group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _check_layout(layout: str, where: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"{where}: layout must be one of {_LAYOUTS}, got {layout!r}")


def _shape_row(x) -> list:
    if not isinstance(x, torch.Tensor) or x.dim() > _MAX_DIMS:
        return [-1] * (_MAX_DIMS + 2)
    return [x.dim()] + list(x.shape) + [-1] * (_MAX_DIMS - x.dim()) + [x.element_size()]


def _comm_device(group, tensors):
    for x in tensors:
        if isinstance(x, torch.Tensor):
            return x.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_shapes(group, tensors: list, local_error: Optional[str], where: str) -> List[List[tuple]]:
    """Every rank's shapes of ``tensors`` (one small all-gather); raises on all ranks if any rank failed.

    A rank with a bad input raises its own message; the others raise one naming that rank, so
    no rank is left waiting in a later collective. Also raises if element sizes differ.
    """
    _, size = cp_world(group)
    row = [1 if local_error else 0]
    for x in tensors:
        row += _shape_row(x)
    t = torch.tensor(row, dtype=torch.int64, device=_comm_device(group, tensors))
    got = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(got, t, group=group)
    table = torch.stack(got).cpu().tolist()
    if local_error:
        raise ValueError(local_error)
    bad = [r for r, rw in enumerate(table) if rw[0]]
    if bad:
        raise ValueError(f"{where}: rank(s) {bad} of the cp group rejected their inputs (their error says why)")
    w = _MAX_DIMS + 2
    segs = [[rw[1 + i * w: 1 + (i + 1) * w] for i in range(len(tensors))] for rw in table]
    for i in range(len(tensors)):
        elsizes = [sg[i][-1] for sg in segs]
        if len(set(elsizes)) > 1:
            raise ValueError(f"{where}: tensor {i} has element sizes {elsizes} (bytes) on ranks 0..{size - 1}; "
                             "the cp group must use one dtype")
    return [[tuple(sg[i][1:1 + sg[i][0]]) for i in range(len(tensors))] for sg in segs]


def _want_check(check: Optional[bool]) -> bool:
    return CHECK_SHAPES if check is None else bool(check)


def _local_4d(xs, names, where) -> Optional[str]:
    for name, x in zip(names, xs):
        if not isinstance(x, torch.Tensor):
            return f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}"
        if x.dim() != 4:
            return f"{where}: {name} must be 4-D, got shape {tuple(x.shape)}"
        if not x.is_floating_point():
            return f"{where}: {name} must be floating point, got {x.dtype}"
    return None


def _shape_table(xs, group, check, err: Optional[str], where: str):
    """Every rank's shapes of ``xs`` (raising on all ranks if any found ``err``); None when checks are off."""
    if not _want_check(check):
        if err:
            raise ValueError(err)
        return None
    return _all_shapes(group, list(xs), err, where)


def _check_seq_to_heads(xs, names, group, size, check, where, err: Optional[str] = None) -> None:
    """Local tokens equal on every rank, heads divisible by cp (xs in bnhd); ``err``: a local error found earlier."""
    err = err or _local_4d(xs, names, where)
    if err is None:
        for name, x in zip(names, xs):
            if x.shape[2] % size:
                err = (f"{where}: {name} has {x.shape[2]} heads, not divisible by the cp size {size}; "
                       f"Ulysses gives each rank heads/cp heads (choose cp among the divisors of {x.shape[2]})")
                break
    table = _shape_table(xs, group, check, err, where)
    if table is None:
        return
    for i, name in enumerate(names):
        shapes = [tbl[i] for tbl in table]
        lens = [s[1] for s in shapes]
        if len(set(lens)) > 1:
            raise ValueError(
                f"{where}: local sequence lengths of {name} differ across the cp group: {lens} tokens on ranks "
                f"0..{size - 1} (global {sum(lens)}); the global sequence must be divisible by cp={size} and "
                f"split into equal contiguous chunks (split_sequence)")
        if len(set(shapes)) > 1:
            raise ValueError(f"{where}: {name} shapes (as B, N/cp, H, D) differ across the cp group: "
                             + ", ".join(f"rank {r} {s}" for r, s in enumerate(shapes)))


def _check_heads_to_seq(xs, names, group, size, check, where) -> None:
    err = _local_4d(xs, names, where)
    if err is None:
        for name, x in zip(names, xs):
            if x.shape[1] % size:
                err = (f"{where}: {name} has {x.shape[1]} tokens, not divisible by the cp size {size}")
                break
    table = _shape_table(xs, group, check, err, where)
    if table is None:
        return
    for i, name in enumerate(names):
        shapes = [tbl[i] for tbl in table]
        if len(set(shapes)) > 1:
            raise ValueError(f"{where}: {name} shapes (B, N, H/cp, D) differ across the cp group: "
                             + ", ".join(f"rank {r} {s}" for r, s in enumerate(shapes)))


# --- the collectives on plain tensors ------------------------------------------------------

def _all_to_all_rows(rows: List[torch.Tensor], group) -> List[torch.Tensor]:
    """All-to-all of [P, m_i] tensors: row p goes to rank p, row p of the result came from rank p.

    Tensors of one dtype travel in one collective (concatenated along the columns).
    """
    out: List[Optional[torch.Tensor]] = [None] * len(rows)
    for dtype in dict.fromkeys(r.dtype for r in rows):
        idx = [i for i, r in enumerate(rows) if r.dtype == dtype]
        send = rows[idx[0]].contiguous() if len(idx) == 1 else torch.cat([rows[i] for i in idx], dim=1)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        for i, part in zip(idx, recv.split([rows[i].shape[1] for i in idx], dim=1)):
            out[i] = part
    return out


def _seq_to_heads_plain(xs: List[torch.Tensor], group) -> List[torch.Tensor]:
    """[B, n, H, D] (local tokens) -> [B, P n, H/P, D] (rank r: heads r H/P .. (r+1) H/P - 1)."""
    _, size = cp_world(group)
    rows = [x.reshape(x.shape[0], x.shape[1], size, x.shape[2] // size, x.shape[3])
             .permute(2, 0, 1, 3, 4).reshape(size, -1) for x in xs]
    recv = _all_to_all_rows(rows, group)
    outs = []
    for x, r in zip(xs, recv):
        b, n, h, d = x.shape
        outs.append(r.reshape(size, b, n, h // size, d).permute(1, 0, 2, 3, 4).reshape(b, size * n, h // size, d))
    return outs


def _heads_to_seq_plain(xs: List[torch.Tensor], group) -> List[torch.Tensor]:
    """[B, N, h, D] (all tokens, h heads) -> [B, N/P, P h, D] (local tokens, all heads)."""
    _, size = cp_world(group)
    rows = [x.reshape(x.shape[0], size, x.shape[1] // size, x.shape[2], x.shape[3])
             .permute(1, 0, 2, 3, 4).reshape(size, -1) for x in xs]
    recv = _all_to_all_rows(rows, group)
    outs = []
    for x, r in zip(xs, recv):
        b, n, h, d = x.shape
        outs.append(r.reshape(size, b, n // size, h, d).permute(1, 2, 0, 3, 4).reshape(b, n // size, size * h, d))
    return outs


def _gather_plain(xs: List[torch.Tensor], group, dim: int) -> List[torch.Tensor]:
    """All-gather along ``dim`` (rank order); tensors of one dtype in one collective."""
    _, size = cp_world(group)
    out: List[Optional[torch.Tensor]] = [None] * len(xs)
    for dtype in dict.fromkeys(x.dtype for x in xs):
        idx = [i for i, x in enumerate(xs) if x.dtype == dtype]
        flat = torch.cat([xs[i].reshape(-1) for i in idx])
        got = [torch.empty_like(flat) for _ in range(size)]
        dist.all_gather(got, flat.contiguous(), group=group)
        sizes = [xs[i].numel() for i in idx]
        per_rank = [g.split(sizes) for g in got]
        for j, i in enumerate(idx):
            out[i] = torch.cat([pr[j].view(xs[i].shape) for pr in per_rank], dim=dim)
    return out


_PLAIN = {"s2h": _seq_to_heads_plain, "h2s": _heads_to_seq_plain}
_INVERSE = {"s2h": "h2s", "h2s": "s2h"}


class _AllToAll(torch.autograd.Function):
    """Ulysses all-to-all of several tensors; the first ``n_diff`` are differentiable.

    The rest (forward-AD tangents carried in the same collective) come out non-differentiable.
    backward: the inverse all-to-all of the cotangents; jvp (torch.func.jvp): the same
    all-to-all of the tangents.
    """

    @staticmethod
    def forward(group, mode, n_diff, *xs):
        return tuple(_PLAIN[mode](list(xs), group))

    @staticmethod
    def setup_context(ctx, inputs, output):
        group, mode, n_diff = inputs[:3]
        ctx.group, ctx.mode, ctx.n_diff, ctx.n = group, mode, n_diff, len(inputs) - 3
        if n_diff < len(output):
            ctx.mark_non_differentiable(*output[n_diff:])

    @staticmethod
    def backward(ctx, *grads):
        gs = _AllToAll.apply(ctx.group, _INVERSE[ctx.mode], ctx.n_diff, *grads[:ctx.n_diff])
        return (None, None, None, *gs, *([None] * (ctx.n - ctx.n_diff)))

    @staticmethod
    def jvp(ctx, _group, _mode, _n, *tangents):
        live = [i for i in range(ctx.n_diff) if tangents[i] is not None]
        moved = iter(_PLAIN[ctx.mode]([tangents[i] for i in live], ctx.group)) if live else iter(())
        outs = [next(moved) if i in live else None for i in range(ctx.n_diff)]
        return tuple(outs) + (None,) * (ctx.n - ctx.n_diff)


class _Gather(torch.autograd.Function):
    """All-gather along ``dim``; backward keeps the local chunk of the cotangent (no communication).

    The cotangent of the gathered tensor must be the same on every rank (a loss computed
    identically from the gathered output), so the local chunk is this rank's share.
    """

    @staticmethod
    def forward(group, dim, n_diff, *xs):
        return tuple(_gather_plain(list(xs), group, dim))

    @staticmethod
    def setup_context(ctx, inputs, output):
        group, dim, n_diff = inputs[:3]
        ctx.group, ctx.dim, ctx.n_diff, ctx.n = group, dim, n_diff, len(inputs) - 3
        ctx.lens = [x.shape[dim] for x in inputs[3:3 + n_diff]]
        if n_diff < len(output):
            ctx.mark_non_differentiable(*output[n_diff:])

    @staticmethod
    def backward(ctx, *grads):
        rank, _ = cp_world(ctx.group)
        gs = [g.narrow(ctx.dim, rank * n, n) for g, n in zip(grads[:ctx.n_diff], ctx.lens)]
        return (None, None, None, *gs, *([None] * (ctx.n - ctx.n_diff)))

    @staticmethod
    def jvp(ctx, _group, _dim, _n, *tangents):
        live = [i for i in range(ctx.n_diff) if tangents[i] is not None]
        moved = iter(_gather_plain([tangents[i] for i in live], ctx.group, ctx.dim)) if live else iter(())
        outs = [next(moved) if i in live else None for i in range(ctx.n_diff)]
        return tuple(outs) + (None,) * (ctx.n - ctx.n_diff)


def _with_tangents(fn, args, xs: List[torch.Tensor]) -> List[torch.Tensor]:
    """``fn.apply(*args, n_diff, *tensors)``, moving forward-AD tangents in the same collective.

    Outside torch.func, dual inputs are unpacked: primals and (detached) tangents go through
    one call, and the outputs are made dual again. Inside torch.func the Function's own jvp
    rule handles the tangents.
    """
    wrapped = any(torch._C._functorch.is_functorch_wrapped_tensor(x) for x in xs)
    parts = None if wrapped else [fwAD.unpack_dual(x) for x in xs]
    if parts is None or all(p.tangent is None for p in parts):
        return list(fn.apply(*args, len(xs), *xs))
    live = [i for i, p in enumerate(parts) if p.tangent is not None]
    outs = fn.apply(*args, len(xs), *[p.primal for p in parts], *[parts[i].tangent.detach() for i in live])
    prim, tang = list(outs[:len(xs)]), dict(zip(live, outs[len(xs):]))
    return [fwAD.make_dual(o, tang[i]) if i in tang else o for i, o in enumerate(prim)]


def _as_list(x: Tensors):
    if isinstance(x, torch.Tensor):
        return [x], True
    if isinstance(x, (list, tuple)):
        return list(x), False
    raise TypeError(f"expected a tensor or a list/tuple of tensors, got {type(x).__name__}")


def _to_bnhd(x, layout):
    return x.transpose(1, 2) if layout == "bhnd" and isinstance(x, torch.Tensor) and x.dim() == 4 else x


# --- public API ----------------------------------------------------------------------------------

def seq_to_heads(x: Tensors, group=None, *, layout: str = "bnhd", check: Optional[bool] = None):
    """Local sequence chunk with all heads -> full sequence with this rank's H/P heads.

    ``x``: [B, N/P, H, D] (``"bnhd"``) or [B, H, N/P, D] (``"bhnd"``), or a list of such
    tensors (moved in one collective per dtype). Returns [B, N, H/P, D] (resp. [B, H/P, N, D]);
    rank r gets heads r H/P .. (r+1) H/P - 1, the tokens in rank order. Differentiable in
    reverse mode (backward: :func:`heads_to_seq` of the gradient) and forward mode (dual
    inputs give dual outputs; tangents move in the same collective).
    """
    return _all_to_all(x, group, layout, check, "seq_to_heads", "s2h", _check_seq_to_heads)


def heads_to_seq(x: Tensors, group=None, *, layout: str = "bnhd", check: Optional[bool] = None):
    """Inverse of :func:`seq_to_heads`: [B, N, H/P, D] -> [B, N/P, H, D] (or the "bhnd" forms)."""
    return _all_to_all(x, group, layout, check, "heads_to_seq", "h2s", _check_heads_to_seq)


def _all_to_all(x: Tensors, group, layout: str, check, what: str, direction: str, checker):
    """The body of :func:`seq_to_heads` / :func:`heads_to_seq` (``direction`` "s2h" / "h2s")."""
    _check_layout(layout, what)
    xs, single = _as_list(x)
    _, size = cp_world(group)
    if size == 1:
        return x
    xs = [_to_bnhd(t, layout) for t in xs]
    checker(xs, [f"x[{i}]" if not single else "x" for i in range(len(xs))], group, size, check, what)
    outs = [_to_bnhd(o, layout) for o in _with_tangents(_AllToAll, (group, direction), xs)]
    return outs[0] if single else outs


def _autocast(q, k, v):
    """The cast :func:`rcm_core.attention.attention` applies, done before the all-to-all (one dtype, half the bytes)."""
    dev = q.device.type if isinstance(q, torch.Tensor) else "cpu"
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) and isinstance(q, torch.Tensor) \
            and q.is_floating_point():
        adt = torch.get_autocast_dtype(dev)
        return tuple(x.to(adt) if isinstance(x, torch.Tensor) and x.dtype in (torch.float32, torch.float16,
                                                                                torch.bfloat16) else x
                     for x in (q, k, v))
    return q, k, v


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *, layout: str = "bnhd",
                      scale: Optional[float] = None, check: Optional[bool] = None) -> torch.Tensor:
    """Self-attention over the full sequence from local sequence chunks (Ulysses CP).

    q, k, v: this rank's contiguous chunk of the tokens, all heads, [B, N/P, H, D] in
    ``layout`` (``"bnhd"`` or ``"bhnd"``); every rank of ``group`` must hold chunks of equal
    length (the global N divisible by P) and P must divide H. Returns this rank's chunk of
    ``softmax(scale Q K^T) V`` over all N tokens, in ``layout``. Forward-AD dual inputs give a
    dual output (tangents move in the same collectives; attention gets O and dO from one pass);
    exact backward. Collectives: one all-to-all for q, k, v (+ tangents), one for the output
    (+ tangent); the backward adds one each way. With P = 1 it is :func:`attention`.
    """
    _check_layout(layout, "ulysses_attention")
    _, size = cp_world(group)
    if size == 1:
        return attention(q, k, v, scale=scale, layout=layout)
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"ulysses_attention: scale must be finite, got {scale}")
    q, k, v = _autocast(q, k, v)
    qb, kb, vb = (_to_bnhd(x, layout) for x in (q, k, v))
    err = _local_4d((qb, kb, vb), ("q", "k", "v"), "ulysses_attention")
    if err is None:
        if not (qb.shape[0] == kb.shape[0] == vb.shape[0] and qb.shape[2] == kb.shape[2] == vb.shape[2]):
            err = (f"ulysses_attention: q, k, v batch or head counts differ ({layout}): q {tuple(q.shape)}, "
                   f"k {tuple(k.shape)}, v {tuple(v.shape)}")
        elif kb.shape[1] != vb.shape[1] or qb.shape[3] != kb.shape[3]:
            err = (f"ulysses_attention: k/v token counts or q/k head dims differ ({layout}): q {tuple(q.shape)}, "
                   f"k {tuple(k.shape)}, v {tuple(v.shape)}")
        elif not (qb.dtype == kb.dtype == vb.dtype):
            err = f"ulysses_attention: q, k, v dtypes differ: {qb.dtype}, {kb.dtype}, {vb.dtype}"
    _check_seq_to_heads([qb, kb, vb], ["q", "k", "v"], group, size, check, "ulysses_attention", err)
    qf, kf, vf = _with_tangents(_AllToAll, (group, "s2h"), [qb, kb, vb])
    o = attention(qf, kf, vf, scale=scale, layout="bnhd")
    (out,) = _with_tangents(_AllToAll, (group, "h2s"), [o])
    return _to_bnhd(out, layout)


def ulysses_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *,
                            layout: str = "bnhd", scale: Optional[float] = None) -> torch.Tensor:
    """Cross-attention under CP: local query chunk, full (replicated) keys and values; no communication.

    q: this rank's [B, N/P, H, D] chunk; k, v: all Nk context tokens (text, image context),
    the same on every rank and not split. Each query row's softmax runs over all keys, so the
    local result is exactly this rank's rows of the full cross-attention (as the reference rCM
    does). ``group`` is accepted for symmetry with :func:`ulysses_attention` and not used.
    """
    _check_layout(layout, "ulysses_cross_attention")
    return attention(q, k, v, scale=scale, layout=layout)


def split_sequence(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous chunk r of ``x`` along ``dim`` (``x`` the same on every rank).

    A view (``narrow``): reverse and forward mode pass through it; the gradient of ``x`` is
    this rank's chunk only (sum over the cp group for the full one). Use it on the patch
    embedding's output and, with the same ``dim`` of the flattened token axis, on RoPE
    frequencies.
    """
    rank, size = cp_world(group)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"split_sequence: x must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"split_sequence: dim {dim} out of range for shape {tuple(x.shape)}")
    n = x.shape[dim]
    if n % size:
        lo, hi = n - n % size, n - n % size + size
        raise ValueError(f"split_sequence: {n} tokens along dim {dim} (shape {tuple(x.shape)}) are not divisible by "
                         f"the cp size {size} (nearest multiples {lo}, {hi}); choose frames/height/width so that "
                         f"cp divides the token count")
    if size == 1:
        return x
    return x.narrow(dim, rank * (n // size), n // size)


def gather_sequence(x: torch.Tensor, group=None, dim: int = 1, *, check: Optional[bool] = None) -> torch.Tensor:
    """All-gather the ranks' chunks along ``dim`` (rank order), the inverse of :func:`split_sequence`.

    Backward: the local chunk of the gradient (no communication), which is this rank's share
    when the loss is computed identically from the gathered tensor on every rank; parameter
    gradients must then be summed over the cp group. Forward mode: the tangent is gathered in
    the same collective.
    """
    _, size = cp_world(group)
    err = None
    if not isinstance(x, torch.Tensor):
        err = f"gather_sequence: x must be a torch.Tensor, got {type(x).__name__}"
    elif not -x.dim() <= dim < x.dim():
        err = f"gather_sequence: dim {dim} out of range for shape {tuple(x.shape)}"
    if size == 1 or (err and not _want_check(check)):
        if err:
            raise ValueError(err)
        return x
    dim = dim % x.dim() if isinstance(x, torch.Tensor) else dim
    if _want_check(check):
        shapes = [tbl[0] for tbl in _all_shapes(group, [x], err, "gather_sequence")]
        if len(set(shapes)) > 1:
            lens = [s[dim] if len(s) > dim else None for s in shapes]
            raise ValueError(f"gather_sequence: local shapes differ across the cp group (dim {dim}: {lens}): "
                             + ", ".join(f"rank {r} {s}" for r, s in enumerate(shapes)))
    (out,) = _with_tangents(_Gather, (group, dim), [x])
    return out


set_group_attention(ulysses_attention)     # the attention op runs it for a CP self-attention

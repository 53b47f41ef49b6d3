"""What both updates share: autocast, micro-batch chunks, and the optimiser step across ranks (gradients
all-reduced, non-finite entries zeroed, the global norm, a step skipped on every rank together)."""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_dtensor(x) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(x, DTensor)


def _allreduce_grads(params) -> None:
    """Average the replicated parameters' gradients (FSDP-sharded ones are reduce-scattered by FSDP)."""
    rank, world = _world()
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None and not _is_dtensor(p.grad)]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(r)


def _sq_norm(tensors) -> float:
    """Sum of squares of (possibly sharded, possibly None) gradient tensors, sharded ones summed over ranks;
    one host sync per kind, not per tensor. Each tensor's norm comes from ``torch._foreach_norm`` (one fused
    pass, float32 accumulation, no float64 copy of the gradients: that copy was the largest cast of the critic
    and sCM steps in bench/step_profile.py's census); the per-tensor squares are summed in float64."""
    sharded, replicated = [], []
    for t in tensors:
        if t is None:
            continue
        if _is_dtensor(t):
            sharded.append(t.to_local())
        else:
            replicated.append(t)

    def total(ts):
        return torch.stack([n.double() for n in torch._foreach_norm(ts)]).square().sum()
    out = 0.0
    if sharded:
        sq = total(sharded)
        dist.all_reduce(sq)
        out += float(sq)
    if replicated:
        out += float(total(replicated))
    return out


def _grad_norm(params) -> float:
    """Global L2 norm of the gradients (sharded ones summed over ranks); no clipping."""
    return math.sqrt(_sq_norm(p.grad for p in params))


def _zero_nonfinite_grads(params) -> int:
    """Replace non-finite gradient entries by zero (as the reference does before every step); returns
    how many there were (summed over ranks for sharded gradients)."""
    count = 0
    sharded = None
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.to_local() if _is_dtensor(p.grad) else p.grad
        bad = (~torch.isfinite(g)).sum()
        if _is_dtensor(p.grad):
            sharded = bad if sharded is None else sharded + bad
        else:
            count += int(bad)
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    if sharded is not None:
        dist.all_reduce(sharded)
        count += int(sharded)
    return count


def _any_rank(flag: bool, device) -> bool:
    """True on every rank if ``flag`` is True on any (so all ranks skip a step together)."""
    if _world()[1] == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class _Update:
    """Mixin of :class:`rcm_core.trainer.RCMTrainer`: autocast, micro-batches and the optimiser step."""

    def _amp(self):
        if self._autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

    def _finish(self, opt, params, losses: dict, masks: dict, m: dict, name: str) -> bool:
        """Sanitise gradients and step ``opt`` unless a loss is non-finite for the whole batch.

        Returns whether the step was taken. Skipped steps leave weights, optimiser state and the
        EMA untouched (decided on all ranks together).
        """
        bad = any(not bool(mk.any()) for mk in masks.values()) or \
            any(not math.isfinite(float(v)) for v in losses.values())
        _allreduce_grads(params)
        m["grad_nonfinite"] = _zero_nonfinite_grads(params)
        m[f"grad_norm_{name}"] = _grad_norm(params)
        skip = _any_rank(bad, self.device)
        m["skipped"] = int(skip)
        if skip:
            opt.zero_grad(set_to_none=True)
            return False
        opt.step()
        return True

    def _chunks(self, b: int):
        """(start, stop) of the micro-batches of a rank's batch of ``b`` (one chunk without accumulation)."""
        mb = self.cfg.micro_batch or b
        return [(i, min(i + mb, b)) for i in range(0, b, mb)]

    @staticmethod
    def _per_sample_uncond(uncond, b: int):
        return uncond.expand(b, *uncond.shape[1:]) if uncond.shape[0] == 1 else uncond

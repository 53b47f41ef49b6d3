"""Apply memory/parallel strategies to an unmodified network from outside (torchtitan style).

    net = parallelize(net, ParallelConfig(activation_checkpointing="full"))

Activation checkpointing wraps the network's transformer blocks (``blocks`` or
``transformer_blocks``: Wan2.1, Cosmos-Predict2, the embedded VideoDiT). A
checkpointed block keeps only its inputs; its activations are recomputed in the
backward. ``"selective"`` checkpoints every ``ac_every``-th block (the rest keep
their activations), trading memory for the recomputation.

Forward-mode tangents: the fused sCM step pushes ``forward_ad`` tangents through
the student while recording its graph. PyTorch's checkpoint cannot do that (the
tangent ops save tensors that the recomputation does not), so a block that sees
dual inputs computes its output and tangent without recording a graph, and
:class:`_Recompute` re-runs the block's primal forward with grad in the backward (under the forward's autocast
state; blocks must be deterministic: no dropout).
"""
from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd import forward_ad as fwAD
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

__all__ = ["ParallelConfig", "parallelize", "transformer_blocks"]

_AC_MODES = ("none", "full", "selective")


@dataclass(frozen=True)
class ParallelConfig:
    activation_checkpointing: str = "none"      # none | full | selective
    ac_every: int = 2                           # selective: checkpoint blocks 0, k, 2k, ...

    def __post_init__(self):
        if self.activation_checkpointing not in _AC_MODES:
            raise ValueError(f"ParallelConfig.activation_checkpointing={self.activation_checkpointing!r}; "
                             f"known: {_AC_MODES}")
        if self.ac_every < 1:
            raise ValueError(f"ParallelConfig.ac_every must be >= 1, got {self.ac_every}")


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    for name in ("blocks", "transformer_blocks", "layers"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return blocks
    raise ValueError(f"{type(model).__name__} has no ModuleList of transformer blocks "
                     "(looked for .blocks, .transformer_blocks, .layers)")


class _Recompute(torch.autograd.Function):
    """Identity on an output computed without a graph; the backward recomputes it with one."""

    @staticmethod
    def forward(ctx, run, n, y, *flat):
        inputs, ctx.params = flat[:n], list(flat[n:])    # the block's inputs, then its parameters
        ctx.run = run
        ctx.others = [None if isinstance(x, torch.Tensor) else x for x in inputs]
        ctx.save_for_backward(*[x if isinstance(x, torch.Tensor) else None for x in inputs])
        return y.clone()

    @staticmethod
    def backward(ctx, gy):
        inputs = [o if x is None else x.detach().requires_grad_(x.requires_grad)
                  for x, o in zip(ctx.saved_tensors, ctx.others)]
        with torch.enable_grad():
            y = ctx.run(*inputs)
        wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad] + ctx.params
        got = iter(torch.autograd.grad(y, wrt, gy, allow_unused=True))
        grads = [next(got) if isinstance(x, torch.Tensor) and x.requires_grad else None for x in inputs]
        return (None, None, None, *grads, *got)


def _ac_forward(self, *args, **kwargs):
    """Forward of a checkpointed block (bound to the block, so deep copies stay correct)."""
    run = functools.partial(type(self).forward, self)
    flat, spec = pytree.tree_flatten((args, kwargs))
    wrapped = any(isinstance(x, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x) for x in flat)
    if not torch.is_grad_enabled() or wrapped:        # nothing to save (or inside torch.func): run as is
        return run(*args, **kwargs)
    parts = [fwAD.unpack_dual(x) if isinstance(x, torch.Tensor) else None for x in flat]
    if not any(p is not None and p.tangent is not None for p in parts):
        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    amp = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cuda", "cpu")]

    def run_flat(*leaves):               # the recomputation in the backward sees the same autocast state
        a, kw = pytree.tree_unflatten(list(leaves), spec)
        with contextlib.ExitStack() as stack:
            for d, enabled, dtype in amp:
                stack.enter_context(torch.autocast(d, dtype=dtype, enabled=enabled))
            return run(*a, **kw)
    with torch.no_grad():                     # output and tangent, no graph
        out = run_flat(*flat)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"checkpointed {type(self).__name__} returned {type(out).__name__}; expected one tensor")
    y, dy = fwAD.unpack_dual(out)
    primals = [x if p is None else p.primal for x, p in zip(flat, parts)]
    params = [p for p in self.parameters() if p.requires_grad]
    y = _Recompute.apply(run_flat, len(flat), y, *primals, *params)
    return y if dy is None else fwAD.make_dual(y, dy)


def _apply_ac(model: nn.Module, cfg: ParallelConfig) -> nn.Module:
    for i, block in enumerate(transformer_blocks(model)):
        if cfg.activation_checkpointing == "full" or i % cfg.ac_every == 0:
            block.forward = types.MethodType(_ac_forward, block)
    return model


def parallelize(model: nn.Module, cfg: ParallelConfig) -> nn.Module:
    """Apply ``cfg`` to ``model`` in place and return it (the model's code is not touched)."""
    if cfg.activation_checkpointing != "none":
        _apply_ac(model, cfg)
    return model

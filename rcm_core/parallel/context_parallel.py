"""Context parallelism applied to an unmodified network by hooks: the plans (where a network's token
sequence is split and gathered), :func:`apply_context_parallel`, the checks and the cp groups.

The collectives and the Ulysses attention are in :mod:`rcm_core.parallel.ulysses` (re-exported here, so
``rcm_core.context_parallel`` keeps every name it had); the cp state the hooks set and the attention op
reads is in :mod:`rcm_core.nets.base`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..nets.base import _STATE, active_self_attention_group, local_copy, transformer_blocks
from .ulysses import *  # noqa: F401,F403  (the collectives: one import path for all of CP)
from .ulysses import (CHECK_SHAPES, _LAYOUTS, _MAX_DIMS, _INVERSE, _PLAIN, _AllToAll, _Gather, _all_shapes,  # noqa: F401
                      _all_to_all, _all_to_all_rows, _as_list, _autocast, _check_heads_to_seq, _check_layout,
                      _check_seq_to_heads, _comm_device, _gather_plain, _heads_to_seq_plain, _local_4d, _seq_to_heads_plain,
                      _shape_row, _shape_table, _to_bnhd, _want_check, _with_tangents, Tensors, attention, split_sequence,
                      gather_sequence, ulysses_attention)

__all__ = ["seq_to_heads", "heads_to_seq", "ulysses_attention", "ulysses_cross_attention",
           "split_sequence", "gather_sequence", "cp_world", "apply_context_parallel", "local_copy"]


# ---- applying CP to an unmodified network (from outside, by hooks) ----------------------------------

@dataclass(frozen=True)
class CPPlan:
    """Where a network's token sequence is split and gathered, and which modules are self-attention.

    split_input: (module name, positional index) whose input is split along dim 1 (the first block).
    split_outputs: module name -> dim: outputs (a tensor or a tuple of tensors) split along ``dim``.
    block_args: positional index -> dim: block arguments split in every block (e.g. RoPE tables).
    gather_output: the module whose output is gathered along dim 1 (the per-token head).
    self_attention: the attribute name of the self-attention module inside each block.
    """
    split_input: tuple
    gather_output: str
    self_attention: str
    split_outputs: dict = field(default_factory=dict)
    block_args: dict = field(default_factory=dict)
    heads: Callable = None          # model -> number of attention heads


CP_PLANS = {
    # diffusers' own _cp_plan for Wan splits the rope outputs and blocks.0's hidden_states, gathers proj_out
    "WanTransformer3DModel": CPPlan(split_input=("blocks.0", 0), gather_output="proj_out", self_attention="attn1",
                                    split_outputs={"rope": 1},
                                    heads=lambda m: int(m.config.num_attention_heads)),
    "VideoDiT": CPPlan(split_input=("blocks.0", 0), gather_output="head", self_attention="self_attn",
                       block_args={3: 0}, heads=lambda m: int(m.cfg.heads)),
}


def plan_for(model: nn.Module) -> Optional[CPPlan]:
    """The CP plan of ``model``'s class (FSDP2 wraps the class in a subclass: the MRO is searched)."""
    for cls in type(model).__mro__:
        if cls.__name__ in CP_PLANS:
            return CP_PLANS[cls.__name__]
    return None


def _split(x, group, dim):
    if isinstance(x, (tuple, list)):
        return type(x)(_split(t, group, dim) for t in x)
    return split_sequence(x, group, dim) if isinstance(x, torch.Tensor) else x


def apply_context_parallel(model: nn.Module, group) -> nn.Module:
    """Make ``model`` run its token sequence split over the cp ``group`` (Ulysses), in place.

    Hooks only (the network's code is not touched): the first block's hidden states are split
    (rank r keeps chunk r), RoPE tables likewise, self-attention runs :func:`ulysses_attention`
    (through :func:`rcm_core.attention.attention`, which reads the active group), cross-attention
    stays local, and the per-token head's output is gathered, so the model returns the full
    output on every rank of the group. Backward and forward-mode tangents flow through the same
    collectives. Idempotent.
    """
    if getattr(model, "_rcm_cp_group", None) is not None:
        return model
    plan = plan_for(model)
    if plan is None:
        raise ValueError(f"context parallelism has no plan for {type(model).__name__}; supported: "
                         f"{sorted(CP_PLANS)}")
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    hooks = []                 # (module name, kind, handle id): what local_copy removes from a copy

    def add(module, kind, fn, **kw):
        h = getattr(module, f"register_forward_{kind}")(fn, **kw)
        hooks.append((names[id(module)], kind, h.id))
    name, idx = plan.split_input

    def split_input(module, args, kwargs):
        args = list(args)
        if len(args) > idx:
            args[idx] = split_sequence(args[idx], group, 1)
        else:
            key = "hidden_states" if "hidden_states" in kwargs else "x"
            kwargs[key] = split_sequence(kwargs[key], group, 1)
        return tuple(args), kwargs
    add(modules[name], "pre_hook", split_input, with_kwargs=True)
    for mod_name, dim in plan.split_outputs.items():
        add(modules[mod_name], "hook", lambda m, a, out, d=dim: _split(out, group, d))
    blocks = transformer_blocks(model)
    if plan.block_args:
        def split_args(module, args):
            return tuple(_split(a, group, plan.block_args[i]) if i in plan.block_args else a
                         for i, a in enumerate(args))
        for b in blocks:
            add(b, "pre_hook", split_args)
    for b in blocks:
        inner = getattr(b, "_checkpoint_wrapped_module", b)
        attn = getattr(inner, plan.self_attention)
        add(attn, "pre_hook", lambda m, a: setattr(_STATE, "group", group))
        add(attn, "hook", lambda m, a, out: setattr(_STATE, "group", None))
    add(modules[plan.gather_output], "hook", lambda m, a, out: gather_sequence(out, group, 1))
    model._rcm_cp_group = group
    model._rcm_cp_hooks = hooks
    return model


def check_context_parallel(cp: int, *, world: int, heads: int, tokens: int, where: str = "") -> None:
    """Raise a clear error when the CP degree ``cp`` does not fit the run (before any weights load)."""
    at = f" ({where})" if where else ""
    if cp < 1:
        raise ValueError(f"context_parallel must be >= 1, got {cp}{at}")
    if world % cp:
        raise ValueError(f"context_parallel={cp} does not divide the {world} ranks{at}: the mesh is "
                         f"data-parallel x cp; use a divisor of {world}")
    if heads % cp:
        raise ValueError(f"context_parallel={cp} does not divide the {heads} attention heads{at} (Ulysses "
                         f"splits heads); divisors: {[d for d in range(1, heads + 1) if heads % d == 0]}")
    if tokens % cp:
        raise ValueError(f"context_parallel={cp} does not divide the {tokens} tokens per sample{at}; "
                         f"divisors up to 16: {[d for d in range(1, 17) if tokens % d == 0]}")


def cp_groups(cp: int):
    """(this rank's cp group, dp index, dp size): consecutive ranks form a cp group (all ranks call)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, cp):
        g = dist.new_group(list(range(start, start + cp)))
        if start <= rank < start + cp:
            mine = g
    return mine, rank // cp, world // cp

"""The bottom of the network layer: what the attention op, LoRA and the parallel layer share.

Nothing here imports another rcm_core module, so :mod:`rcm_core.nets.attention`,
:mod:`rcm_core.nets.lora`, :mod:`rcm_core.parallel.fsdp` and :mod:`rcm_core.parallel.context_parallel`
all import it and none of them imports another one back:

* ``_STATE`` (thread-local): the cp group while a context-parallel network's self-attention runs (set by
  the hooks of :func:`rcm_core.parallel.context_parallel.apply_context_parallel`); ``_STATE.sparse``, the
  sliding-tile router while :func:`rcm_core.nets.sparse_attention.sparse_self_attention` is in force (the
  attention op hands it every call; it answers None for calls that stay dense); and
  :func:`set_group_attention`, by which the context-parallel module hands the attention op its Ulysses
  attention (the op calls it, never imports it);
* :func:`transformer_blocks`: a network's ModuleList of blocks (FSDP2 wrapping, CP hooks, LoRA targets);
* :func:`local_copy`: a deep copy of a network without its CP hooks.
"""
from __future__ import annotations

import copy
import threading
from typing import Callable, Optional

from torch import nn

_STATE = threading.local()
_GROUP_ATTENTION: dict = {}       # "fn": ulysses_attention(q, k, v, group, *, layout, scale), set on import of CP


def active_self_attention_group():
    """The cp group while a CP network's self-attention module runs (set by its hooks), else None."""
    return getattr(_STATE, "group", None)


def set_group_attention(fn: Callable) -> None:
    """Register the attention that runs across a cp group (rcm_core.parallel.context_parallel does, on import)."""
    _GROUP_ATTENTION["fn"] = fn


def group_attention() -> Optional[Callable]:
    return _GROUP_ATTENTION.get("fn")


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    for name in ("blocks", "transformer_blocks", "layers"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return blocks
    raise ValueError(f"{type(model).__name__} has no ModuleList of transformer blocks "
                     "(looked for .blocks, .transformer_blocks, .layers)")


def local_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without context parallelism (its hooks removed): it runs whole sequences
    locally, on one rank, without collectives. A plain deep copy fails under CP (a process group does not
    copy) and would keep the hooks. For a network without CP it is ``copy.deepcopy``."""
    group = getattr(model, "_rcm_cp_group", None)
    if group is None:
        return copy.deepcopy(model)
    m = copy.deepcopy(model, memo={id(group): None})
    for name, kind, hid in model._rcm_cp_hooks:
        sub = m.get_submodule(name)
        attrs = (("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs") if kind == "pre_hook" else
                 ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"))
        for attr in attrs:
            getattr(sub, attr).pop(hid, None)
    del m._rcm_cp_group, m._rcm_cp_hooks
    return m

"""The rCM trainer (now the package :mod:`rcm_core.train`); this module re-exports what was defined here.

Setting a name on this module (``monkeypatch.setattr(rcm_core.trainer, "_jvp", f)``) sets it in every
:mod:`rcm_core.train` module that binds it, where the code reads it.
"""
from __future__ import annotations

import sys
import types

from .train import checkpoint as _checkpoint, critic as _critic, schedule as _schedule, setup as _setup
from .train import student as _student, trainer as _trainer, update as _update
from .train.critic import CRITIC_REF_UPDATES
from .train.setup import _DTYPES, _has_blocks, _heads, _is_low_precision, _place, _tokens
from .train.student import _accumulate_delta, _jvp
from .train.trainer import RCMTrainer, _check_batch
from .train.update import _allreduce_grads, _any_rank, _grad_norm, _is_dtensor, _sq_norm, _world, _zero_nonfinite_grads

__all__ = ["RCMTrainer", "CRITIC_REF_UPDATES", "_DTYPES", "_accumulate_delta", "_allreduce_grads", "_any_rank",
           "_check_batch", "_grad_norm", "_has_blocks", "_heads", "_is_dtensor", "_is_low_precision", "_jvp", "_place",
           "_sq_norm", "_tokens", "_world", "_zero_nonfinite_grads"]

_PARTS = (_setup, _schedule, _update, _student, _critic, _checkpoint, _trainer)


class _Shim(types.ModuleType):
    """This module, forwarding an attribute set on it to the rcm_core.train modules that bind the name."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        for mod in _PARTS:
            if name in vars(mod):
                setattr(mod, name, value)


sys.modules[__name__].__class__ = _Shim

"""Parallelism: FSDP2 + activation checkpointing (``fsdp``) and Ulysses context parallelism (``ulysses``: the
collectives, ``context_parallel``: applied to a network by hooks). ``rcm_core.parallel`` itself keeps the API it
had as one module (``from rcm_core.parallel import parallelize``)."""
from .fsdp import *  # noqa: F401,F403
from .fsdp import __all__, _AC_MODES, _checkpoint_block, _Recompute  # noqa: F401

"""Apply memory/parallel strategies to an unmodified network from outside (torchtitan style).

    net = parallelize(net, ParallelConfig(activation_checkpointing="full", fsdp=True))

Works on the network's transformer blocks (``blocks`` or ``transformer_blocks``: Wan2.1,
Cosmos-Predict2, the embedded VideoDiT); the network's code is not touched.

* Activation checkpointing: a checkpointed block (``"full"``: all; ``"selective"``: every
  ``ac_every``-th) is wrapped by torch's ``checkpoint_wrapper`` (state-dict keys unchanged),
  keeps only its inputs, and recomputes its activations in the backward. ``"keep_attention"``: every
  block, but each block also keeps its self-attention outputs (O and its log-sum-exp, ~B*N*D*2 bytes a
  block in bf16) and the recomputation runs everything else: the backward skips the attention forward,
  about half of a Wan forward at 32K tokens (torchtitan's op-level selective AC, restricted to attention).
  Memory/time: BENCHMARKS.md.
* FSDP2 (``fsdp=True`` with torch.distributed initialised), as torchtitan applies it: each block
  is ``fully_shard``-ed, then the root (patch/time/text embeddings, head), so every parameter is
  a DTensor and one optimiser steps them all (CUDA AdamW's foreach path refuses a mix of plain
  tensors and DTensors). Mixed precision: ``param_dtype`` (e.g. bf16) for the all-gathered
  parameters and compute, gradients reduced in fp32. ``shard_size`` < world size gives HSDP:
  a 2-D mesh (replicate across groups, shard within a group of ``shard_size`` ranks, e.g. one
  node).

Forward-mode tangents: the fused sCM step pushes ``forward_ad`` tangents through the student
while recording its graph. PyTorch's checkpoint cannot do that (the tangent ops save tensors
that the recomputation does not), so a checkpointed block that sees dual inputs computes its
output and tangent without recording a graph, and :class:`_Recompute` re-runs the block's
primal forward with grad in the backward (under the forward's autocast state; blocks must be
deterministic: no dropout). FSDP's hooks cannot take dual tensors while a graph is being
recorded (an unchecked block fails in FSDP's unshard), but a checkpointed block computes its
tangent without a graph: so the fused tangent runs under FSDP when every block is checkpointed
(``activation_checkpointing="full"`` or ``"keep_attention"``; tested against data parallel), else the trainer computes
the tangent in a separate no-grad JVP pass (``fused_tangent=False``). A sharded block sits
inside the checkpoint wrapper.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.autograd import forward_ad as fwAD
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..nets.attention import KeptAttention, is_attention_forward_op, kept_attention
from ..nets.base import transformer_blocks

__all__ = ["ParallelConfig", "parallelize", "transformer_blocks", "is_sharded", "fsdp_mesh"]

_AC_MODES = ("none", "full", "selective", "keep_attention")


@dataclass(frozen=True)
class ParallelConfig:
    activation_checkpointing: str = "none"      # none | full | selective | keep_attention
    ac_every: int = 2                           # selective: checkpoint blocks 0, k, 2k, ...
    fsdp: bool = False                          # shard blocks and root over the ranks (FSDP2)
    shard_size: int = 0                         # FSDP: 0 = shard over all ranks; else HSDP groups of this size
    param_dtype: str = ""                       # FSDP mixed precision: "" = keep; "bfloat16" | "float16"

    def __post_init__(self):
        if self.activation_checkpointing not in _AC_MODES:
            raise ValueError(f"ParallelConfig.activation_checkpointing={self.activation_checkpointing!r}; "
                             f"known: {_AC_MODES}")
        if self.ac_every < 1:
            raise ValueError(f"ParallelConfig.ac_every must be >= 1, got {self.ac_every}")
        if self.shard_size < 0:
            raise ValueError(f"ParallelConfig.shard_size must be >= 0, got {self.shard_size}")
        if self.param_dtype not in ("", "bfloat16", "float16", "float32", "float64"):
            raise ValueError(f"ParallelConfig.param_dtype={self.param_dtype!r}")

    def checkpointed(self, i: int) -> bool:
        return self.activation_checkpointing in ("full", "keep_attention") or (
            self.activation_checkpointing == "selective" and i % self.ac_every == 0)


class _Recompute(torch.autograd.Function):
    """Identity on an output computed without a graph; the backward recomputes it with one.

    Parameter gradients either flow back as outputs of this node (``params`` given) or, for
    an FSDP-managed block (no ``params``), accumulate into ``.grad`` inside the recomputation
    so that FSDP's own hooks reduce-scatter them (as with reentrant checkpointing). ``anchor``
    (an empty tensor that requires grad when the block has trainable weights) keeps the node in
    the graph when no input requires grad: e.g. LoRA, where everything before the first adapted
    block is frozen, under FSDP.
    """

    @staticmethod
    def forward(ctx, run, n, y, anchor, *flat):
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
        leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        if ctx.params:
            got = iter(torch.autograd.grad(y, leaves + ctx.params, gy, allow_unused=True))
            grads = [next(got) if isinstance(x, torch.Tensor) and x.requires_grad else None for x in inputs]
            return (None, None, None, None, *grads, *got)
        torch.autograd.backward(y, gy)
        return (None, None, None, None, *[x.grad if isinstance(x, torch.Tensor) and x.requires_grad else None
                                          for x in inputs])


def _keep_attention_policy(ctx, op, *args, **kwargs):
    """Selective checkpointing policy of ``keep_attention``: keep the outputs of self-attention's fused forward
    (query and key of one shape), recompute everything else."""
    if is_attention_forward_op(op) and len(args) > 1 and isinstance(args[0], torch.Tensor) and \
            isinstance(args[1], torch.Tensor) and args[0].shape == args[1].shape:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _together(*contexts):
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


@contextlib.contextmanager
def _no_autocast_cache():
    before = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(before)


def _checkpoint_block(block: nn.Module, *args, keep_attention: bool = False, **kwargs):
    """``checkpoint_fn`` of the wrapper: torch's checkpoint, or the tangent-aware one for duals.

    The recomputation in the backward re-selects the LoRA adapter active in the forward
    (:func:`rcm_core.lora.recompute_context`; student, fake score and teacher share one network).
    ``keep_attention``: the block's self-attention outputs are kept from the forward and the recomputation
    runs everything else (torch's selective checkpointing of the SDPA/FA3 op for blocks without tangents;
    :class:`rcm_core.nets.attention.KeptAttention` for blocks with forward-AD tangents)."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    wrapped = any(isinstance(x, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x) for x in flat)
    if not torch.is_grad_enabled() or wrapped:        # nothing to save (or inside torch.func): run as is
        return block(*args, **kwargs)
    from ..nets.lora import recompute_context
    adapter = recompute_context(block)
    parts = [fwAD.unpack_dual(x) if isinstance(x, torch.Tensor) else None for x in flat]
    if not any(p is not None and p.tangent is not None for p in parts):
        if adapter is contextlib.nullcontext and not keep_attention:
            return checkpoint(block, *args, use_reentrant=False, **kwargs)

        def contexts():
            if not keep_attention:
                return contextlib.nullcontext(), adapter()
            # torch's selective checkpointing replays ops by their count, so the forward and the recomputation
            # must issue the same casts: without the autocast cache in both (a forward inside an autocast region
            # that had already cast these weights, e.g. an rCM rollout's earlier passes, would issue fewer)
            forward, recompute = create_selective_checkpoint_contexts(_keep_attention_policy)
            return _together(forward, _no_autocast_cache()), _together(recompute, _no_autocast_cache(), adapter())
        return checkpoint(block, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    amp = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cuda", "cpu")]

    def run_flat(*leaves):               # the recomputation in the backward sees the same autocast state
        a, kw = pytree.tree_unflatten(list(leaves), spec)
        with contextlib.ExitStack() as stack:
            for d, enabled, dtype in amp:
                stack.enter_context(torch.autocast(d, dtype=dtype, enabled=enabled))
            stack.enter_context(adapter())
            return block(*a, **kw)
    keep = KeptAttention() if keep_attention else None
    with torch.no_grad(), kept_attention(keep):          # output and tangent, no graph
        out = run_flat(*flat)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"checkpointed {type(block).__name__} returned {type(out).__name__}; expected one tensor")
    y, dy = fwAD.unpack_dual(out)
    primals = [x if p is None else p.primal for x, p in zip(flat, parts)]
    params = [] if isinstance(block, FSDPModule) else [p for p in block.parameters() if p.requires_grad]
    anchor = torch.empty(0, device=y.device, requires_grad=any(p.requires_grad for p in block.parameters()))
    run = run_flat
    if keep is not None:
        def run(*leaves):                     # the recomputation takes the kept self-attention outputs
            with kept_attention(keep, replay=True):
                return run_flat(*leaves)
    y = _Recompute.apply(run, len(flat), y, anchor, *primals, *params)
    return y if dy is None else fwAD.make_dual(y, dy)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


def fsdp_mesh(device_type: str, shard_size: int = 0):
    """1-D mesh over all ranks, or a 2-D ("replicate", "shard") mesh for HSDP with ``shard_size``."""
    from torch.distributed.device_mesh import init_device_mesh
    world = dist.get_world_size()
    if shard_size in (0, world):
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    if world % shard_size:
        raise ValueError(f"FSDP shard_size={shard_size} does not divide the {world} ranks")
    return init_device_mesh(device_type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh=None) -> nn.Module:
    """Apply ``cfg`` to ``model`` in place and return it.

    ``fsdp`` needs torch.distributed initialised (``mesh``: a DeviceMesh over the data-parallel
    ranks; default: :func:`fsdp_mesh` of ``cfg.shard_size``); with one rank it is a no-op.
    """
    if cfg.activation_checkpointing == "none" and not cfg.fsdp:
        return model
    blocks = transformer_blocks(model)
    shard = cfg.fsdp and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    kw = {}
    if shard:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        if mesh is None:
            mesh = fsdp_mesh(next(model.parameters()).device.type, cfg.shard_size)
        kw = {"mesh": mesh}
        if cfg.param_dtype:
            # inputs keep their dtype (autocast does the compute casts): a bf16 cast of the timestep
            # (up to 1000, bf16 steps of 4 there) would ruin the time embedding and its tangent
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.param_dtype),
                                                   reduce_dtype=torch.float32, cast_forward_inputs=False)
    for i, block in enumerate(blocks):
        if isinstance(block, CheckpointWrapper):
            continue
        if shard:
            fully_shard(block, reshard_after_forward=True, **kw)
        if cfg.checkpointed(i):
            blocks[i] = checkpoint_wrapper(block, checkpoint_fn=functools.partial(
                _checkpoint_block, keep_attention=cfg.activation_checkpointing == "keep_attention"))
    if shard and not isinstance(model, FSDPModule):
        fully_shard(model, reshard_after_forward=True, **kw)    # the root last: every parameter a DTensor
    return model

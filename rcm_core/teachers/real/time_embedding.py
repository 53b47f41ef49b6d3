"""FP32 time embedding inside diffusers transformers (Wan2.1, Cosmos-Predict2).

Under the trainer's bf16 autocast, diffusers computes the time embedding (timestep MLP and the
projection to the AdaLN modulation) in bf16. The published rCM computes it in FP32 (the paper's
"FP32 time embedding"). It matters most for the sCM tangent: the tangent w.r.t. t enters the
network only through the time embedding, and forward-mode AD through bf16 matmuls rounds it to
about 3 significant digits before it reaches the blocks.

    from rcm_core.real.time_embedding import install_fp32_time_embedding
    install_fp32_time_embedding(transformer)   # teacher; student and fake score are deep copies

As :mod:`rcm_core.real.attention` does for attention, the model's code is not touched: a patched
module gets an instance attribute ``forward`` (a picklable object, copied along by
``copy.deepcopy``) that runs its stock maths with autocast disabled, at least in float32. Weights
keep their dtype (state dict unchanged); bf16 weights are upcast for the matmul, so a frozen bf16
teacher also gets an FP32 time embedding. A float64 model stays in float64.

Patched modules:

* Wan (``WanTimeTextImageEmbedding``): ``timesteps_proj`` (sinusoid), ``time_embedder`` (MLP),
  ``time_proj`` (projection to the 6 x dim modulation). Diffusers' Wan consumes them in float32
  already (``scale_shift_table + temb.float()``, output norm in float32).
* Cosmos (``CosmosEmbedding`` = ``time_embed``): sinusoid, ``t_embedder`` MLP and ``norm``; and the
  modulation projections ``linear_1``/``linear_2`` of every ``CosmosAdaLayerNorm(Zero)`` (the
  per-block equivalent of Wan's ``time_proj``). Their float32 outputs meet bf16 activations by
  type promotion (shift/scale/gate in float32, as the reference's modulation).

Known limit: Wan casts ``temb`` to the dtype of its text input (``.type_as(encoder_hidden_states)``
inside ``WanTimeTextImageEmbedding``), and to the time embedder's weight dtype before it. With bf16
inputs (a frozen bf16 teacher gets bf16 text embeddings) ``temb`` is rounded to bf16 there before
``time_proj``; the student and fake score (float32 master weights and inputs under autocast) are
not affected.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["install_fp32_time_embedding", "uses_fp32_time_embedding"]

_COSMOS_ADALN = ("CosmosAdaLayerNorm", "CosmosAdaLayerNormZero")


def _at_least_fp32(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or float64 when any of ``dtypes`` is float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _up(x):
    """A floating tensor in at least float32 (other arguments unchanged)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(_at_least_fp32(x.dtype))
    return x


# ---- the patched maths, one function per kind of module ----------------------------------------

def _linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear`` in float32 whatever the weights' dtype (bf16 weights are upcast, not changed)."""
    dt = _at_least_fp32(x.dtype, module.weight.dtype)
    bias = module.bias.to(dt) if module.bias is not None else None
    return F.linear(x.to(dt), module.weight.to(dt), bias)


def _rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Diffusers' ``RMSNorm`` maths, without its cast to bf16 weights (``hidden_states.to(weight.dtype)``)."""
    x = _up(x)
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + module.eps)
    if module.weight is not None:
        x = x * module.weight.to(x.dtype)
        if getattr(module, "bias", None) is not None:
            x = x + module.bias.to(x.dtype)
    return x


def _stock(module: nn.Module, *args, **kwargs):
    """The module's own forward (a container or the sinusoid), with floating inputs in at least float32."""
    return type(module).forward(module, *(_up(a) for a in args), **{k: _up(v) for k, v in kwargs.items()})


def _cosmos_embedding(module: nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor):
    """``CosmosEmbedding``: its stock forward casts the sinusoid to ``hidden_states``' dtype
    (``.type_as(hidden_states)``, bf16 under autocast) and reads nothing else of ``hidden_states``;
    give it an empty tensor of the compute dtype instead of the (large) activations."""
    dtype_of = hidden_states.new_empty((0,), dtype=_at_least_fp32(hidden_states.dtype))
    return type(module).forward(module, dtype_of, timestep)


_KINDS = {"linear": _linear, "rms_norm": _rms_norm, "stock": _stock, "cosmos_embedding": _cosmos_embedding}


def _device_type(module: nn.Module, args, kwargs) -> str:
    for x in (*args, *kwargs.values(), *module.parameters()):
        if isinstance(x, torch.Tensor):
            return x.device.type
    return "cpu"


class _Fp32Forward:
    """The instance-level ``forward`` of a patched module: its kind's maths with autocast disabled.

    Holds the module itself (not a bound method), so ``copy.deepcopy`` of the model rebinds it
    to the copy and pickling stores only the module and the kind's name.
    """

    def __init__(self, module: nn.Module, kind: str):
        self.module, self.kind = module, kind

    def __call__(self, *args, **kwargs):
        device_type = _device_type(self.module, args, kwargs)
        off = (torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
               else contextlib.nullcontext())
        with off:
            return _KINDS[self.kind](self.module, *args, **kwargs)


# ---- which modules ----------------------------------------------------------------------------------

def _mlp(module: nn.Module, owner: str) -> list[tuple[nn.Module, str]]:
    """The container itself plus its Linear layers; any other module with weights is refused."""
    out = [(module, "stock")]
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            out.append((sub, "linear"))
        elif sub is not module and any(True for _ in sub.parameters(recurse=False)):
            raise NotImplementedError(f"{owner}: no FP32 rule for {name} ({type(sub).__name__}) in the time embedding")
    return out


def _targets(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, kind) for every module of ``model``'s time embedding."""
    out = []
    for module in model.modules():
        name = type(module).__name__
        if name == "WanTimeTextImageEmbedding":
            out += [(module.timesteps_proj, "stock"), *_mlp(module.time_embedder, name), (module.time_proj, "linear")]
        elif name == "CosmosEmbedding":
            out += [(module, "cosmos_embedding"), (module.time_proj, "stock"), *_mlp(module.t_embedder, name),
                    (module.norm, "rms_norm")]
        elif name in _COSMOS_ADALN:
            out += [(lin, "linear") for lin in (module.linear_1, module.linear_2) if isinstance(lin, nn.Linear)]
    return out


def _patched(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), _Fp32Forward)


def install_fp32_time_embedding(model: nn.Module) -> int:
    """Run ``model``'s time embedding in FP32 under autocast; returns how many modules now do.

    Idempotent (installing again changes nothing); state-dict keys and weights' dtypes are kept;
    forward-mode (dual tensors, ``torch.func.jvp``) and reverse-mode AD go through it as through
    the stock modules. Raises for a model without a known diffusers time embedding (Wan's
    ``WanTimeTextImageEmbedding``, Cosmos' ``CosmosEmbedding``) rather than silently doing nothing.
    """
    targets = _targets(model)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no diffusers time embedding to run in FP32; supported: "
            "WanTransformer3DModel (condition_embedder), CosmosTransformer3DModel (time_embed)")
    for module, kind in targets:
        if not _patched(module):
            module.forward = _Fp32Forward(module, kind)
    return len(targets)


def uses_fp32_time_embedding(model: nn.Module) -> bool:
    """True when ``model`` has a diffusers time embedding and all of it runs in FP32."""
    targets = _targets(model)
    return bool(targets) and all(_patched(m) for m, _ in targets)

"""LoRA distillation: the student and the fake score are low-rank adapters on the ONE frozen teacher network.

With ``DistillConfig.lora`` set (:class:`rcm_core.config.LoRAConfig`: rank, alpha, target modules), the
trainer keeps one copy of the teacher's weights. Every targeted ``nn.Linear`` gets named adapters::

    y = W x + b + (alpha / rank) * B_a (A_a x)        a = the adapter active for this call

``student`` and ``fake`` (the critic) train, each with its own AdamW; ``ema`` holds the power EMA of the
student's adapter; the teacher's forward runs with no adapter active (``y = W x + b``, exactly the
teacher). ``B`` starts at zero, so the student and the fake score start exactly equal to the teacher.
Which adapter applies is one attribute of the network (:func:`use_adapter`), set around each network
call by :class:`AdapterDenoiser`; activation checkpointing re-selects, in the backward's recomputation,
the adapter that was active in the forward (:func:`recompute_context`, used by
:mod:`rcm_core.parallel`).

Why torch-native and not peft. peft (checked with 0.21.2) passes forward-mode AD (dual tensors) and
``torch.func.jvp`` through its LoRA layers, but its adapter switch is made for inference/one adapter
at a time: ``set_adapter`` and ``enable_adapters(False)`` rewrite ``requires_grad`` of every adapter
weight of every layer (disabling the adapters for the teacher's forward freezes the student's and the
critic's weights; activating one freezes the others). Here the three roles switch several times
inside one training step, between a forward and its backward (activation checkpointing recomputes in
the backward; FSDP2 builds its gradient reduction from ``requires_grad``), so the switch must not
touch parameters and must be O(1): one attribute per network, read by the layers. The layer itself is
a few lines (:class:`LoRALinear`, a subclass of ``nn.Linear``: the base keeps its state-dict names, so
merged exports and the teacher's checkpoints share names) and is written once for all three roles,
for forward AD, ``torch.func`` and FSDP2 alike. peft stays the format: :func:`peft_state_dict` writes
the adapter with the keys diffusers' ``WanPipeline.load_lora_weights`` /
``WanTransformer3DModel.load_lora_adapter`` (and peft's ``set_peft_model_state_dict``) accept.
"""
from __future__ import annotations

import contextlib
import json
import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .denoiser import TrigFlowDenoiser

__all__ = ["STUDENT", "FAKE", "EMA", "LoRALinear", "add_adapters", "use_adapter", "active_adapter",
           "recompute_context", "adapter_parameters", "adapter_keys", "lora_layers", "canonical",
           "AdapterDenoiser", "AdapterEMA", "check_same_network", "merge_state_dict", "merged_module",
           "peft_state_dict", "adapter_safetensors", "default_targets", "select_adapter", "AdapterView"]

STUDENT, FAKE, EMA = "student", "fake", "ema"
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical(name: str) -> str:
    """A module/parameter name without the wrapper parts added by activation checkpointing/compile."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


class _Switch:
    """Which adapter the LoRA layers of one network apply (None: none, the base network)."""
    __slots__ = ("active",)

    def __init__(self):
        self.active: Optional[str] = None


class LoRALinear(nn.Linear):
    """``nn.Linear`` with named low-rank adapters; the one active in its network's switch is applied.

    Made from an existing ``nn.Linear`` in place (:func:`add_adapters`): ``weight`` and ``bias`` stay the
    same tensors under the same names; the adapters are ``lora_A.<name>.weight`` (rank x in) and
    ``lora_B.<name>.weight`` (out x rank), peft's layout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        name = self._lora_switch.active
        if name is None:
            return y
        return y + self.lora_B[name](self.lora_A[name](x)) * self.lora_scaling

    def _init_lora(self, switch: _Switch, scaling: float) -> None:
        self._lora_switch = switch
        self.lora_scaling = scaling
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", lora={list(self.lora_A)}, scaling={self.lora_scaling}"


def lora_layers(net: nn.Module) -> Iterator[Tuple[str, LoRALinear]]:
    """(canonical name, layer) of every LoRA layer of ``net``."""
    for name, m in net.named_modules():
        if isinstance(m, LoRALinear):
            yield canonical(name), m


def _switch(net: nn.Module) -> _Switch:
    sw = getattr(net, "_lora_switch", None)
    if sw is None:
        raise ValueError(f"{type(net).__name__} has no LoRA adapters (rcm_core.lora.add_adapters)")
    return sw


def active_adapter(net: nn.Module) -> Optional[str]:
    return _switch(net).active


@contextlib.contextmanager
def use_adapter(net: nn.Module, name: Optional[str]):
    """Within the block, ``net``'s LoRA layers apply adapter ``name`` (None: the base network only)."""
    sw = _switch(net)
    prev, sw.active = sw.active, name
    try:
        yield
    finally:
        sw.active = prev


def recompute_context(block: nn.Module):
    """A factory of context managers that re-select the adapter active in ``block`` now.

    Activation checkpointing recomputes a block in the backward, when another adapter (or none) may be
    active: the recomputation must see the forward's. Returns ``contextlib.nullcontext`` for a block
    without LoRA layers.
    """
    sw = next((m._lora_switch for m in block.modules() if isinstance(m, LoRALinear)), None)
    if sw is None:
        return contextlib.nullcontext
    name = sw.active

    @contextlib.contextmanager
    def again():
        prev, sw.active = sw.active, name
        try:
            yield
        finally:
            sw.active = prev
    return again


# ---- targets and checks --------------------------------------------------------------------------
def _patched(m: nn.Module) -> bool:
    """An instance-level forward (e.g. rcm_core.real's FP32 time embedding) would bypass LoRALinear.forward."""
    return "forward" in m.__dict__


def default_targets(net: nn.Module) -> List[str]:
    """Every plain ``nn.Linear`` inside the transformer blocks (attention q/k/v/out, FFN, ...), except
    layers with an instance-level forward (the FP32 time-embedding/modulation path)."""
    from .base import transformer_blocks
    try:
        blocks = transformer_blocks(net)
    except ValueError:
        raise ValueError(f"LoRA: {type(net).__name__} has no transformer blocks to take the default targets "
                         f"from; set LoRAConfig.target_modules (linear layers: {_some_linears(net)})") from None
    ids = {id(m) for m in blocks.modules()}
    return [canonical(n) for n, m in net.named_modules()
            if id(m) in ids and type(m) is nn.Linear and not _patched(m)]


def _some_linears(net: nn.Module, k: int = 8) -> str:
    names = [canonical(n) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "") if names else "none"


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the module's name is the target or ends with '.' + target."""
    return name == target or name.endswith("." + target)


def find_targets(net: nn.Module, target_modules: tuple) -> List[Tuple[str, nn.Linear]]:
    """(canonical name, module) of the layers LoRA goes on; clear errors for names that match nothing
    or match a layer LoRA cannot take."""
    modules = [(canonical(n), m) for n, m in net.named_modules() if n]
    if not target_modules:
        wanted = set(default_targets(net))
        found = [(n, m) for n, m in modules if n in wanted]
        if not found:
            raise ValueError(f"LoRA: no nn.Linear inside the transformer blocks of {type(net).__name__}; set "
                             f"LoRAConfig.target_modules (linear layers: {_some_linears(net)})")
        return found
    found, unmatched = [], []
    for t in target_modules:
        hits = [(n, m) for n, m in modules if _matches(n, t)]
        if not hits:
            unmatched.append(t)
        found += hits
    if unmatched:
        raise ValueError(f"LoRAConfig.target_modules {unmatched} match no module of {type(net).__name__}; "
                         f"linear layers there include: {_some_linears(net)}")
    out, seen = [], set()
    for n, m in found:
        if n in seen:
            continue
        seen.add(n)
        if type(m) is not nn.Linear:
            raise ValueError(f"LoRA: target {n!r} is a {type(m).__name__}; LoRA here adapts nn.Linear layers only "
                             f"(linear layers: {_some_linears(net)})")
        if _patched(m):
            raise ValueError(f"LoRA: target {n!r} has an instance-level forward (e.g. the FP32 time embedding "
                             "installed by rcm_core.real); leave it out of LoRAConfig.target_modules")
        out.append((n, m))
    return out


def check_rank(targets, rank: int) -> None:
    """The rank must not exceed min(in, out) of any targeted layer (a larger one adds nothing but cost)."""
    for n, m in targets:
        if rank > min(m.in_features, m.out_features):
            raise ValueError(f"LoRAConfig.rank={rank} is larger than layer {n!r} allows: it is {m.in_features} -> "
                             f"{m.out_features}, so the rank must be <= {min(m.in_features, m.out_features)}")


def check_same_network(teacher_net: nn.Module, other: nn.Module, what: str) -> None:
    """With LoRA the student and the fake score ARE the teacher's network plus adapters: a ``student_net``
    or ``fake_net`` given must be the teacher's architecture with the teacher's weights."""
    a, b = teacher_net.state_dict(), other.state_dict()
    if type(teacher_net) is not type(other) or set(a) != set(b):
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"LoRA: {what} ({type(other).__name__}) has another architecture than the teacher "
                         f"({type(teacher_net).__name__}): missing {missing[:4]}, unexpected {extra[:4]}; with "
                         "DistillConfig.lora the student and fake score are adapters on the teacher's own network "
                         "(pass no student_net/fake_net, or train without lora)")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"LoRA: {what} has another architecture than the teacher: {k} is "
                             f"{tuple(b[k].shape)}, the teacher's {tuple(a[k].shape)}")
    for k in a:
        if not torch.equal(a[k].detach().cpu().to(b[k].dtype), b[k].detach().cpu()):
            raise ValueError(f"LoRA: {what} has the teacher's architecture but other weights (first: {k}); with "
                             "DistillConfig.lora the student starts from the teacher's frozen weights (pass no "
                             f"{what}, or train without lora)")


# ---- adapters ------------------------------------------------------------------------------------
def _init_A(shape, seed: int, name: str, dtype, device) -> torch.Tensor:
    """Kaiming-uniform (a = sqrt 5, as nn.Linear and peft), from a stream of (seed, layer name)."""
    import zlib
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
    bound = 1.0 / math.sqrt(shape[1])
    return ((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(device, dtype)


def add_adapters(net: nn.Module, cfg, names, seed: int = 0, dtype: Optional[torch.dtype] = None) -> List[str]:
    """Put adapters ``names`` of ``cfg`` (:class:`LoRAConfig`) on ``net``'s target layers, in place.

    ``A`` random (per adapter and layer, from ``seed``), ``B`` zero: every adapter starts as the identity
    change. Adapter weights are in ``dtype`` (default: the layer's). Returns the adapted layers' names.
    """
    targets = find_targets(net, tuple(cfg.target_modules))
    check_rank(targets, cfg.rank)
    if getattr(net, "_lora_switch", None) is not None:
        raise ValueError(f"{type(net).__name__} already has LoRA adapters")
    sw = _Switch()
    net._lora_switch = sw
    for lname, m in targets:
        m.__class__ = LoRALinear
        m._init_lora(sw, cfg.scaling)
        dt = dtype or m.weight.dtype
        for i, a in enumerate(names):
            A = nn.Linear(m.in_features, cfg.rank, bias=False, device=m.weight.device, dtype=dt)
            B = nn.Linear(cfg.rank, m.out_features, bias=False, device=m.weight.device, dtype=dt)
            with torch.no_grad():
                A.weight.copy_(_init_A(A.weight.shape, seed + 7919 * i, lname, dt, m.weight.device))
                B.weight.zero_()
            m.lora_A[a], m.lora_B[a] = A, B
    return [n for n, _ in targets]


def _is_key_of(key: str, adapter: str) -> bool:
    return f".lora_A.{adapter}." in key or f".lora_B.{adapter}." in key


def adapter_parameters(net: nn.Module, adapter: Optional[str]) -> List[Tuple[str, nn.Parameter]]:
    """(canonical name, parameter) of ``adapter``'s weights; ``None``: the base network's (no adapter)."""
    out = []
    for n, p in net.named_parameters():
        n = canonical(n)
        if adapter is None and ".lora_A." not in n and ".lora_B." not in n:
            out.append((n, p))
        elif adapter is not None and _is_key_of(n, adapter):
            out.append((n, p))
    return out


def adapter_keys(net: nn.Module, adapter: str) -> List[str]:
    return [n for n, _ in adapter_parameters(net, adapter)]


@torch.no_grad()
def copy_adapter(net: nn.Module, src: str, dst: str) -> None:
    for _, m in lora_layers(net):
        m.lora_A[dst].weight.copy_(m.lora_A[src].weight)
        m.lora_B[dst].weight.copy_(m.lora_B[src].weight)


class AdapterDenoiser(TrigFlowDenoiser):
    """A :class:`TrigFlowDenoiser` of the shared network with adapter ``adapter`` active during its calls
    (None: the teacher). Its ``parameters()`` are that adapter's weights (the base's for None), so
    optimisers, gradient norms and all-reduces see exactly what this role trains."""

    def __init__(self, net, param, call=None, dtype=None, adapter: Optional[str] = None):
        super().__init__(net, param, call, dtype=dtype)
        self.adapter = adapter

    def _net(self, x, timestep, cond):
        with use_adapter(self.net, self.adapter):
            return super()._net(x, timestep, cond)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for n, p in adapter_parameters(self.net, self.adapter):
            yield (prefix + "." if prefix else "") + "net." + n, p


class AdapterEMA:
    """Power EMA (:class:`rcm_core.ema.PowerEMA`'s maths) of the student's adapter, held in the network's
    ``ema`` adapter: the EMA student is the shared base with ``ema`` active."""

    def __init__(self, net: nn.Module, sigma_rel: float, src: str = STUDENT, dst: str = EMA):
        from ..method.losses import ema_exponent
        self.net, self.src, self.dst = net, src, dst
        self.sigma_rel = sigma_rel
        self.gamma = ema_exponent(sigma_rel)
        self.num_updates = 0
        src_p = dict(adapter_parameters(net, src))
        self.pairs = [(p, src_p[n.replace(f".lora_A.{dst}.", f".lora_A.{src}.").replace(f".lora_B.{dst}.", f".lora_B.{src}.")])
                      for n, p in adapter_parameters(net, dst)]
        for p, _ in self.pairs:
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, module=None) -> float:
        """One EMA step from the student's adapter (``module`` is ignored: the pairs are fixed)."""
        from ..method.losses import power_ema_beta
        self.num_updates += 1
        beta = power_ema_beta(self.num_updates, self.gamma)
        for e, p in self.pairs:
            e.lerp_(p.detach().to(e.dtype), 1 - beta)
        return beta

    def parameters(self):
        return [e for e, _ in self.pairs]


# ---- merging and export ------------------------------------------------------------------------------
def _layer_of(key: str) -> str:
    return key.split(".lora_", 1)[0]


def merge_state_dict(sd: Dict[str, torch.Tensor], adapter: str, scaling: float) -> Dict[str, torch.Tensor]:
    """The base network's state dict (the teacher's names) with ``adapter`` merged into the weights:
    ``W + scaling * B @ A`` (computed in float64; at least float32 out). Every other adapter is dropped."""
    out = {k: v for k, v in sd.items() if ".lora_A." not in k and ".lora_B." not in k}
    for k in sd:
        if f".lora_A.{adapter}." not in k:
            continue
        layer = _layer_of(k)
        A, B = sd[k], sd[f"{layer}.lora_B.{adapter}.weight"]
        W = sd[f"{layer}.weight"]
        merged = W.double() + scaling * (B.double() @ A.double())
        out[f"{layer}.weight"] = merged.to(torch.promote_types(W.dtype, torch.float32))
    return out


@torch.no_grad()
def merged_module(net: nn.Module, adapter: str) -> nn.Module:
    """A standalone copy of ``net`` with ``adapter`` merged in and no LoRA layers left (plain
    ``nn.Linear``; the teacher's state-dict names). Not for FSDP-sharded networks. Under context
    parallelism the copy is local (whole sequences, no collectives; :func:`rcm_core.context_parallel.local_copy`),
    as the full fine-tuning EMA student is."""
    from .base import local_copy
    m = local_copy(net)
    for _, layer in lora_layers(m):
        W = layer.weight
        delta = layer.lora_scaling * (layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double())
        W.copy_((W.double() + delta).to(W.dtype))
        del layer.lora_A, layer.lora_B, layer._lora_switch, layer.lora_scaling
        layer.__class__ = nn.Linear
    if "_lora_switch" in m.__dict__:
        del m._lora_switch
    return m


def peft_state_dict(sd: Dict[str, torch.Tensor], adapter: str, scaling: float,
                    prefix: Optional[str] = "transformer") -> Dict[str, torch.Tensor]:
    """``adapter``'s weights in the peft/diffusers LoRA format: ``<prefix>.<layer>.lora_A.weight`` and
    ``...lora_B.weight`` (float32, or the adapter's dtype if wider), with the scaling folded into B (so the file means the same under any
    loader's default ``lora_alpha = rank``). ``prefix=None``: peft's plain keys (``<layer>.lora_A.weight``)."""
    out = {}
    pre = f"{prefix}." if prefix else ""
    for k, v in sd.items():
        for ab in ("A", "B"):
            tag = f".lora_{ab}.{adapter}.weight"
            if k.endswith(tag):
                w = v.detach().double() * (scaling if ab == "B" else 1.0)
                dt = torch.promote_types(v.dtype, torch.float32)
                out[f"{pre}{k[:-len(tag)]}.lora_{ab}.weight"] = w.to(dt).cpu().contiguous()
    return out


def adapter_safetensors(sd: Dict[str, torch.Tensor], adapter: str, cfg, prefix: Optional[str] = "transformer") -> bytes:
    """:func:`peft_state_dict` as safetensors bytes, with diffusers' ``lora_adapter_metadata`` (rank,
    alpha = rank since the scaling is folded into B, target modules)."""
    from safetensors.torch import save
    weights = peft_state_dict(sd, adapter, cfg.scaling, prefix)
    layers = sorted({k[len(prefix) + 1 if prefix else 0:].rsplit(".lora_", 1)[0] for k in weights})
    meta = {"r": cfg.rank, "lora_alpha": cfg.rank, "target_modules": layers, "lora_dropout": 0.0,
            "bias": "none", "init_lora_weights": True}
    if prefix:               # as diffusers' save_lora_weights packs it: the loader strips "<prefix>."
        meta = {f"{prefix}.{k}": v for k, v in meta.items()}
    return save(weights, metadata={"lora_adapter_metadata": json.dumps(meta),
                                   "format": "pt", "rcm.lora": json.dumps({"rank": cfg.rank, "alpha": cfg.alpha,
                                                                           "scaling_folded_into_B": cfg.scaling})})


def select_adapter(sd: Dict[str, torch.Tensor], adapter: str) -> Dict[str, torch.Tensor]:
    """The entries of ``adapter`` in a state dict of the shared network."""
    return {k: v for k, v in sd.items() if _is_key_of(k, adapter)}


class AdapterView(nn.Module):
    """The shared network called with ``adapter`` active (e.g. the EMA student under FSDP, where a merged
    copy would need the full weights gathered)."""

    def __init__(self, net: nn.Module, adapter: Optional[str]):
        super().__init__()
        self.net, self.adapter = net, adapter

    def forward(self, *args, **kwargs):
        with use_adapter(self.net, self.adapter):
            return self.net(*args, **kwargs)

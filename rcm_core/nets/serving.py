"""Serving options for a frozen student network (issue 23): FP8 linear layers, a compiled, fixed-shape
forward and sliding-tile sparse self-attention, as data (:class:`ServingOptions`) applied from outside the
network (:func:`apply_serving_options`).

    opts = ServingOptions.resolve(meta.get("serving"), os.environ, model_config)   # registered < env < call
    check_serving_options(opts, device, scales)      # clear errors before anything loads onto the GPU
    apply_serving_options(denoiser, opts, scales)    # in place: Fp8Linear layers, compiled blocks, sparse calls

* ``fp8``: ``off``; ``dynamic`` (one activation scale per token row, measured at run time: no calibration,
  an extra amax pass per linear); ``static`` (one calibrated scale per layer, stored with the registered model:
  the ``fp8_scales`` artifact, see :func:`rcm_core.nets.fp8.activation_scales`). E4M3 weights with one scale per output row
  either way (:mod:`rcm_core.nets.fp8`). Needs FP8 tensor cores (sm89+); refused elsewhere, naming the device.
* ``compile``: ``off``; ``default``, ``max-autotune-no-cudagraphs`` or ``reduce-overhead`` (the last captures
  CUDA graphs): ``torch.compile`` of each transformer block with static shapes, as torchtitan compiles its
  blocks (identical blocks share one compiled graph; the first call at a new size pays the compile, measured
  separately as the first-call latency in ``bench/serving.py``).
* ``sparse``: ``off``; or ``sta:t<F>x<H>x<W>:w<F>x<H>x<W>`` (e.g. ``sta:t3x8x8:w3x3x5``): every forward of the
  served denoiser runs its self-attention as sliding-tile attention (tile in tokens, window in tiles, odd;
  :mod:`rcm_core.nets.sparse_attention`, flex_attention on CUDA), the token grid taken from each call's latent
  shape; cross-attention stays dense. Opt-in; its quality on real weights is not measured yet. Stored in
  ``meta.json`` only when on (versions registered before it keep their settings). To wire it into an entry
  point, pass ``sparse`` like ``fp8`` / ``compile`` (``model_config={"sparse": "sta:t3x8x8:w3x3x5"}``, a
  ``--sparse`` flag handed to ``resolve``'s call level); ``RCM_SPARSE`` already overrides the registered value.
* ``overlap``: ``off`` or ``on``: a request of several clips decodes each clip on a worker thread and CUDA
  stream while the next one samples (:mod:`rcm_core.nets.overlap`); the network is not changed. Opt-in until
  measured on a GPU; stored in ``meta.json`` only when on.

Scales are calibrated on the network's own activations (the student's, while it samples the eval prompts at
1, 2 and 4 steps in the flow's evaluate step): the layers quantised are the student's, so its activation
ranges are the ones that matter (the issue's "teacher's own activations" is the teacher's case of the same
rule).
"""
from __future__ import annotations

import math
import os
import types
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from .library_logs import typing_truce      # re-exported: callers import it from here

__all__ = ["ServingOptions", "FP8_MODES", "COMPILE_MODES", "OVERLAP_MODES", "check_serving_options", "apply_serving_options",
           "parse_variant", "variant_label",
           "check_scales", "compile_blocks", "raised_recompile_limit", "RECOMPILE_LIMIT", "sparse_forward",
           "typing_truce", "ENV"]

FP8_MODES = ("off", "dynamic", "static")
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs", "reduce-overhead")
OVERLAP_MODES = ("off", "on")
# environment overrides of a registered setting
ENV = {"fp8": "RCM_FP8", "compile": "RCM_COMPILE", "sparse": "RCM_SPARSE", "overlap": "RCM_OVERLAP"}
_KEYS = tuple(ENV)                                           # the options: ServingOptions' fields


@dataclass(frozen=True)
class ServingOptions:
    """How a loaded student runs. Stored in a registered version's ``meta.json`` (``serving``), overridden by
    ``RCM_FP8`` / ``RCM_COMPILE`` / ``RCM_SPARSE`` / ``RCM_OVERLAP`` and by the load call
    (``mlflow.pyfunc.load_model(uri, model_config={...})``, the generate CLI's ``--fp8`` / ``--compile`` /
    ``--sparse`` / ``--overlap``)."""
    fp8: str = "off"
    compile: str = "off"
    sparse: str = "off"
    overlap: str = "off"

    def __post_init__(self):
        for key, known in (("fp8", FP8_MODES), ("compile", COMPILE_MODES), ("overlap", OVERLAP_MODES)):
            if getattr(self, key) not in known:
                raise ValueError(f"serving option {key}={getattr(self, key)!r}: known values are {', '.join(known)}")
        self.sliding_tile          # parses sparse: ValueError naming the option on a bad value

    @property
    def sliding_tile(self):
        """The ``sparse`` option parsed: a :class:`rcm_core.nets.sparse_attention.SlidingTile`, or None (off)."""
        from .sparse_attention import parse_sliding_tile
        return parse_sliding_tile(self.sparse, "sparse")

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "ServingOptions":
        d = dict(d or {})
        unknown = sorted(set(d) - set(_KEYS))
        if unknown:
            raise ValueError(f"serving options {unknown}: unknown (known: {', '.join(_KEYS)})")
        return cls(**{k: str(v) for k, v in d.items()})

    @classmethod
    def resolve(cls, registered: Optional[Mapping[str, Any]] = None, env: Optional[Mapping[str, str]] = None,
                call: Optional[Mapping[str, Any]] = None) -> "ServingOptions":
        """The registered settings, then the environment (``RCM_FP8``, ``RCM_COMPILE``, ``RCM_SPARSE``,
        ``RCM_OVERLAP``), then the call's (``model_config``; keys other than the options are ignored here), later
        ones winning."""
        env = os.environ if env is None else env
        merged = dict(registered or {})
        merged.update({k: env[v] for k, v in ENV.items() if env.get(v)})
        merged.update({k: v for k, v in (call or {}).items() if k in _KEYS and v is not None})
        return cls.from_dict(merged)

    def to_dict(self) -> Dict[str, str]:
        """The settings; ``sparse`` and ``overlap`` only when on (the settings of versions registered before them
        are unchanged)."""
        d = asdict(self)
        for key in ("sparse", "overlap"):
            if d[key] == "off":
                del d[key]
        return d

    @property
    def changes_network(self) -> bool:
        """Whether an option other than ``overlap`` (which changes the request loop) is off its default."""
        return replace(self, overlap="off") != type(self)()

    @property
    def label(self) -> str:
        return (f"fp8={self.fp8}, compile={self.compile}" + (f", sparse={self.sparse}" if self.sparse != "off" else "")
                + (f", overlap={self.overlap}" if self.overlap != "off" else ""))


VARIANT_HELP = ("fp8-dynamic, fp8-static, compile, compile-<mode>, sta:t<F>x<H>x<W>:w<F>x<H>x<W>, overlap, joined "
                "with + (e.g. fp8-static+compile); bf16 = no option")


def parse_variant(variant: str, network_only: bool = False) -> ServingOptions:
    """A serving variant written as the benchmarks and the evaluate step take it (``fp8-static+compile``,
    ``sta:t3x8x8:w3x3x5``; :data:`VARIANT_HELP`) as :class:`ServingOptions`; ``ValueError`` naming the part
    it cannot read. ``network_only`` (evaluate, which compares samples): ``overlap`` is refused, as it changes
    how a request's clips are decoded, not the samples."""
    opts: Dict[str, str] = {}
    for part in str(variant).split("+"):
        if part == "bf16":
            continue
        if part.startswith("fp8-"):
            opts["fp8"] = part[4:]
        elif part == "compile":
            opts["compile"] = "default"
        elif part.startswith("compile-"):
            opts["compile"] = part[8:]
        elif part.startswith("sta:"):
            opts["sparse"] = part
        elif part == "overlap" and network_only:
            raise ValueError(f"serving variant {variant!r}: overlap changes how a request's clips are decoded, not "
                             "the samples, so sampling it measures nothing new; time it with bench/serving.py --clips")
        elif part == "overlap":
            opts["overlap"] = "on"
        else:
            raise ValueError(f"serving variant {variant!r}: cannot read {part!r} (known: {VARIANT_HELP})")
    try:
        return ServingOptions(**opts)
    except ValueError as e:
        raise ValueError(f"serving variant {variant!r}: {e}") from None


def variant_label(variant: str) -> str:
    """``variant`` as a metric-name part: ``:`` -> ``-`` (``sta:t3x8x8:w3x3x5`` -> ``sta-t3x8x8-w3x3x5``)."""
    return str(variant).replace(":", "-")


def check_scales(scales: Any, where: str = "fp8_scales") -> Dict[str, float]:
    """A {layer name: activation scale} map, every scale a positive finite float; else ``ValueError`` naming
    ``where`` and the first bad entry."""
    if not isinstance(scales, Mapping) or not scales:
        raise ValueError(f"{where}: FP8 static scales must be a non-empty {{layer name: scale}} map, got "
                         f"{type(scales).__name__}{'' if scales else ' (empty)'}")
    out = {}
    for k, v in scales.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = float("nan")
        if not (math.isfinite(f) and f > 0):
            raise ValueError(f"{where}: the scale of layer {k!r} is {v!r}; scales are positive finite numbers "
                             "(amax / 448 of the layer's input)")
        out[str(k)] = f
    return out


def check_serving_options(opts: ServingOptions, device, scales: Optional[Mapping[str, float]] = None) -> None:
    """Raise before anything is loaded: FP8 on a device without FP8 tensor cores (naming it), static FP8 without
    scales, CUDA graphs off a GPU."""
    if opts.fp8 != "off":
        from .fp8 import check_fp8_device
        check_fp8_device(device)
    if opts.fp8 == "static":
        if scales is None:
            raise ValueError("serving option fp8=static needs the FP8 activation scales stored with the model "
                             "(artifact fp8_scales); this model has none: use fp8=dynamic, or register a version "
                             "with scales (flow runs calibrate them in evaluate)")
        check_scales(scales)
    if opts.compile == "reduce-overhead" and torch.device(device).type != "cuda":
        raise ValueError(f"serving option compile=reduce-overhead captures CUDA graphs; this model runs on "
                         f"{torch.device(device).type}: use compile=default or off")


def apply_serving_options(denoiser: nn.Module, opts: ServingOptions,
                          scales: Optional[Mapping[str, float]] = None) -> nn.Module:
    """Apply ``opts`` to ``denoiser`` (a :class:`rcm_core.nets.denoiser.TrigFlowDenoiser`; its ``net`` is changed
    in place) and return it. FP8 layers compute in the denoiser's dtype (bf16 on a GPU)."""
    from .fp8 import quantize_fp8

    net = denoiser.net
    dtype = denoiser.dtype
    denoiser._dtype = dtype                     # the FP8 weights are buffers: keep the dtype the net had
    device = next(iter(net.parameters())).device
    check_serving_options(opts, device, scales)
    if opts.fp8 != "off":
        quantize_fp8(net, calibration=check_scales(scales) if opts.fp8 == "static" else None, out_dtype=dtype)
    if opts.compile != "off":
        compile_blocks(net, opts.compile)
    if opts.sparse != "off":
        sparse_forward(denoiser, opts.sliding_tile)
    return denoiser


def sparse_forward(denoiser: nn.Module, sliding_tile) -> nn.Module:
    """Make every network call of ``denoiser`` (a TrigFlowDenoiser) run sliding-tile self-attention
    (``sliding_tile``: a :class:`rcm_core.nets.sparse_attention.SlidingTile`; None: dense again), the token grid
    taken from the latent of each call. Wraps ``denoiser.call``; applying it again replaces the wrap."""
    from .sparse_attention import sparse_self_attention, token_grid

    inner = getattr(denoiser.call, "_rcm_dense_call", denoiser.call)
    if sliding_tile is None:
        denoiser.call = inner
        return denoiser

    def call(net, x, timestep, cond):
        grid = token_grid(net, x.shape)
        try:
            spec = sliding_tile.spec(grid)
        except ValueError as e:
            raise ValueError(f"serving option sparse={sliding_tile.label} on latents {tuple(x.shape)} (token grid "
                             f"{grid}): {e}") from e
        with sparse_self_attention(spec):
            return inner(net, x, timestep, cond)
    call._rcm_dense_call = inner
    call._rcm_sparse = sliding_tile
    denoiser.call = call
    return denoiser


def compile_blocks(net: nn.Module, mode: str = "default", nograd_only: bool = False) -> int:
    """``torch.compile`` each transformer block's forward (static shapes; ``mode`` as :data:`COMPILE_MODES`) for
    no-grad passes; returns how many. A compiled block drops forward-mode tangents silently (measured:
    ``bench/compile_fwad_probe.py``), so a call with ``forward_ad`` dual inputs raises instead; with
    ``nograd_only`` (a trained network's blocks: :attr:`rcm_core.config.DistillConfig.compile_nograd`) such calls,
    calls with gradients enabled and calls inside ``torch.func`` run the block eagerly instead, and only the
    no-grad passes (rollouts, score evaluations) take the compiled graph. A checkpointed block
    (``CheckpointWrapper``) has its inner block compiled, so checkpointing still wraps it.

    Deep copies stay correct (an EMA copy, a copy for export): the block's ``forward`` becomes a method bound to
    the block, which a deep copy rebinds to the copy, and each copy compiles its own forward on first use."""
    from .base import transformer_blocks

    if mode not in COMPILE_MODES[1:]:
        raise ValueError(f"compile mode {mode!r}: known {', '.join(COMPILE_MODES[1:])}")
    typing_truce()
    blocks = transformer_blocks(net)
    for block in blocks:
        block = getattr(block, "_checkpoint_wrapped_module", block)
        eager = block.__dict__.get("forward")      # e.g. the fused block ops' forward: kept for the eager calls
        if getattr(eager, "__func__", None) is not _compiled_block_forward:
            block._rcm_eager_forward = eager
        block.forward = types.MethodType(_compiled_block_forward, block)
        block._rcm_compiled = mode
        block._rcm_compile_nograd_only = nograd_only
    return len(blocks)


def _compiled_block_forward(block: nn.Module, *args, **kwargs):
    """The ``forward`` :func:`compile_blocks` installs: the block's class forward, compiled once per block."""
    from torch.autograd import forward_ad as fwAD

    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    dual = any(fwAD.unpack_dual(a).tangent is not None for a in tensors)
    if block._rcm_compile_nograd_only and (dual or torch.is_grad_enabled() or any(
            torch._C._functorch.is_functorch_wrapped_tensor(a) for a in tensors)):
        eager = block.__dict__.get("_rcm_eager_forward")
        return eager(*args, **kwargs) if eager is not None else type(block).forward(block, *args, **kwargs)
    if dual:
        raise RuntimeError("a compiled block got forward-AD dual inputs: torch.compile drops their "
                           "tangents; compiled blocks are for no-grad passes only")
    compiled = block.__dict__.get("_rcm_compiled_fn")
    # (id of the owner, compiled forward bound to it): a deep copy copies the id as is, so it compiles its own
    # (the old id cannot be reused while the old block lives, and the old compiled forward keeps it alive)
    if compiled is None or compiled[0] != id(block):
        mode = block._rcm_compiled
        fn = torch.compile(type(block).forward.__get__(block), dynamic=False,
                           **({} if mode == "default" else {"mode": mode}))
        compiled = block.__dict__["_rcm_compiled_fn"] = (id(block), fn)
    with raised_recompile_limit():
        return compiled[1](*args, **kwargs)


RECOMPILE_LIMIT = 64      # dynamo's recompile limit while compiled blocks or a compiled VAE decoder run


def raised_recompile_limit(limit: int = RECOMPILE_LIMIT):
    """Dynamo's recompile limit raised to ``limit`` while compiled code runs. Frames shared by many compiled modules
    recompile once per variant, and past dynamo's default of 8 the rest ran eager: the Wan VAE decoder's up blocks
    per call kind (H200: 1.09 s instead of 0.81 s); the attention processor's frame per block and per self/cross
    call in the compiled teacher (H200, bench_real --teacher-compile, 2026-12-05), when a graph break in the
    attention op (since removed) split every block."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"   # older PyTorch
    return cfg.patch(**{name: max(getattr(cfg, name), limit)})

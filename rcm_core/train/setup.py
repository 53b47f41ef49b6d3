"""Building the trainer's networks: teacher, student and fake score (full fine-tuning copies or LoRA adapters on
one shared network), FSDP2 sharding, context parallelism, optimisers and the EMA."""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch

from ..method.config import DistillConfig
from ..nets.attention import check_attention_request
from ..nets.rope import check_rope_request
from ..nets.block_ops import check_norm_request
from ..nets.denoiser import TrigFlowDenoiser
from ..nets.library_logs import cast_quietly
from ..nets.norms import install_matched_norms
from ..method.ema import PowerEMA
from ..parallel.fsdp import ParallelConfig, fsdp_mesh, is_sharded, parallelize
from .update import _world

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _heads(net: torch.nn.Module, cfg) -> int:
    from ..parallel.context_parallel import CP_PLANS, plan_for
    plan = plan_for(net)
    if plan is None:
        raise ValueError(f"DistillConfig.context_parallel={cfg.context_parallel}: no context-parallel plan for "
                         f"{type(net).__name__}; supported: {sorted(CP_PLANS)}")
    return plan.heads(net)


def _tokens(net: torch.nn.Module, latent_shape) -> int:
    """Tokens per sample: the latent grid over the patch size (1 when unknown: not checked here)."""
    if latent_shape is None:
        return 1
    patch = getattr(getattr(net, "config", None), "patch_size", None) or getattr(getattr(net, "cfg", None), "patch", None)
    if patch is None:
        return 1
    return math.prod(n // p for n, p in zip(latent_shape[1:], patch))


def _place(net: torch.nn.Module, dtype, device: torch.device, mesh, sharded: bool) -> torch.nn.Module:
    """``net`` in ``dtype`` (None: as it is) on ``device``. A network that FSDP2 will shard over ``mesh`` stays
    where it is (the host, for a teacher loaded there): ``fully_shard`` moves each block to the mesh's device and
    keeps only this rank's shard, so the whole network (14B in fp32: 56 GB) never sits on one GPU."""
    if mesh is not None and sharded and next(net.parameters()).device.type != device.type:
        return net if dtype is None else cast_quietly(net, dtype)
    return net.to(device) if dtype is None else cast_quietly(net, device, dtype)    # deliberate: no diffusers warning


def _has_blocks(net: torch.nn.Module) -> bool:
    from ..nets.base import transformer_blocks
    try:
        transformer_blocks(net)
        return True
    except ValueError:
        return False


def _is_low_precision(net: torch.nn.Module) -> bool:
    return any(p.dtype in (torch.bfloat16, torch.float16) for p in net.parameters())


class _Setup:
    """Mixin of :class:`rcm_core.trainer.RCMTrainer`: its constructor (see the class for the arguments)."""

    def __init__(self, teacher, config: DistillConfig, device: str | torch.device = "cpu",
                 log_fn: Optional[Callable[[int, dict], None]] = None,
                 student_net: Optional[torch.nn.Module] = None, fake_net: Optional[torch.nn.Module] = None,
                 student_param=None):
        self.cfg = config.validate()
        self.device = torch.device(device)
        # attention settings asked for in the environment that cannot run here fail now, not as a slow fallback
        check_attention_request(self.device, _DTYPES[self.cfg.dtype])
        check_rope_request()
        check_norm_request()
        if self.cfg.teacher_fp8:
            from ..nets.fp8 import check_fp8_device
            check_fp8_device(self.device)
        rank, world = _world()
        # context parallel: consecutive ranks share a sample; the data-parallel index keys its randomness
        self.cp_group, self.dp_rank, self.dp_size = None, rank, world
        if self.cfg.context_parallel > 1:
            from ..parallel.context_parallel import check_context_parallel, cp_groups
            check_context_parallel(self.cfg.context_parallel, world=world, heads=_heads(teacher.net, self.cfg),
                                   tokens=_tokens(teacher.net, getattr(teacher, "latent_shape", None)),
                                   where="DistillConfig.context_parallel")
            self.cp_group, self.dp_rank, self.dp_size = cp_groups(self.cfg.context_parallel)
        self.log_fn = log_fn
        self.latent_shape = getattr(teacher, "latent_shape", None)
        param, call = teacher.param, getattr(teacher, "call", None)
        # one source of truth for CFG: the config's when set, else the teacher's (1.0 = no guidance)
        self.guidance = float(self.cfg.guidance if self.cfg.guidance is not None
                              else getattr(teacher, "guidance", None) or 1.0)
        net_dtype = torch.float32 if self.cfg.dtype in ("bfloat16", "float16") else _DTYPES[self.cfg.dtype]
        self._autocast_dtype = _DTYPES[self.cfg.dtype] if self.cfg.dtype in ("bfloat16", "float16") else None

        fsdp_mp = self.cfg.dtype if self.cfg.fsdp and self.cfg.dtype in ("bfloat16", "float16") else ""
        pcfg = ParallelConfig(self.cfg.activation_checkpointing, self.cfg.ac_every, self.cfg.fsdp,
                              shard_size=self.cfg.fsdp_shard_size, param_dtype=fsdp_mp)
        mesh = None
        if self.cfg.fsdp and _world()[1] > 1:          # one mesh for student, fake score and EMA
            mesh = fsdp_mesh(self.device.type, self.cfg.fsdp_shard_size)

        def clone(src, trainable: bool):
            # trainable copies keep fp32 master weights under autocast; a frozen bf16/fp16 teacher
            # stays as loaded (half the memory; diffusers keeps its norms/time embedding in fp32)
            net = copy.deepcopy(src)
            keep = not trainable and self._autocast_dtype is not None and _is_low_precision(net)
            net = _place(net, None if keep else net_dtype, self.device, mesh, trainable or _has_blocks(net))
            if self._autocast_dtype is not None:        # fp32 norm weights meet bf16 inputs: the fused kernel
                install_matched_norms(net)
            if trainable:
                net = parallelize(net, pcfg, mesh)
            elif self.cfg.fsdp and _has_blocks(net):   # the frozen teacher is sharded too (its forward gathers)
                net = parallelize(net.requires_grad_(False), ParallelConfig(fsdp=True), mesh)
            p = (student_param or param) if trainable else param
            # the compute dtype is the config's (also for a network without parameters); a frozen
            # low-precision teacher computes in the dtype of most of its weights
            return TrigFlowDenoiser(net.train(trainable).requires_grad_(trainable), p, call,
                                    dtype=None if keep else net_dtype)

        # Student and fake score start from the teacher's weights unless given other networks
        # (of the same parameterisation and call signature). LoRA: adapters on one copy of the teacher.
        if self.cfg.lora is not None:
            self._build_lora(teacher, param, call, net_dtype, pcfg, mesh, student_net, fake_net, student_param)
        else:
            self.teacher = clone(teacher.net, False)
            if self.cfg.teacher_fp8:            # its no-grad passes in FP8 (the device was checked above)
                from ..nets.fp8 import quantize_fp8
                quantize_fp8(self.teacher.net)
            if self.cfg.teacher_compile or self.cfg.compile_nograd:   # no-grad passes only (duals raise there)
                from ..nets.serving import compile_blocks
                compile_blocks(self.teacher.net)
            self.student = clone(student_net if student_net is not None else teacher.net, True)
            self.fake = clone(fake_net if fake_net is not None else teacher.net, True) if self.cfg.uses_dmd else None
        betas = tuple(self.cfg.betas)
        adamw = dict(betas=betas, weight_decay=self.cfg.weight_decay, foreach=self.cfg.optimizer_foreach)
        self.opt_student = torch.optim.AdamW(self.student.parameters(), lr=self.cfg.lr_student, **adamw)
        self.opt_fake = (torch.optim.AdamW(self.fake.parameters(), lr=self.cfg.lr_fake, **adamw)
                         if self.fake is not None else None)
        self.sharded = is_sharded(self.student.net)
        if self.cfg.lora is not None:      # the EMA of the student's adapter, in the shared network's "ema" adapter
            from ..nets.lora import AdapterEMA
            self.ema = AdapterEMA(self.student.net, self.cfg.ema_sigma_rel)
        elif self.sharded:   # the EMA is sharded like the student (a deep copy of an FSDP module is not)
            ema_net = _place(copy.deepcopy(student_net if student_net is not None else teacher.net), net_dtype,
                             self.device, mesh, True)
            if self._autocast_dtype is not None:
                install_matched_norms(ema_net)
            self.ema = PowerEMA(parallelize(ema_net, ParallelConfig(fsdp=True), mesh), self.cfg.ema_sigma_rel,
                                copy_module=False)
        else:
            self.ema = PowerEMA(self.student.net, self.cfg.ema_sigma_rel)
        if self.cfg.compile_nograd:          # after the EMA's copy: the rollouts and score evaluations compiled
            from ..nets.serving import compile_blocks
            for den in (self.student, self.fake):
                if den is not None:
                    compile_blocks(den.net, nograd_only=True)
        if self.cp_group is not None:        # the EMA (a copy made above) stays whole: sampling is local
            from ..parallel.context_parallel import apply_context_parallel
            for den in (self.teacher, self.student, self.fake):
                if den is not None:
                    apply_context_parallel(den.net, self.cp_group)
        # CP ranks hold their own tokens' share of each gradient: the loss is scaled by cp so that the
        # average over all ranks (FSDP, or the replicated all-reduce) is the data-parallel mean
        self._bwd_scale = float(self.cfg.context_parallel)
        self._net_dtype = net_dtype
        self.step = 0
        self.rank = rank
        self.gen = torch.Generator(device=self.device)
        # critic diagnostics: the mean loss of its first CRITIC_REF_UPDATES updates (the reference level) and a
        # smoothed loss relative to it; saved with the checkpoint
        self.critic_ref: Optional[float] = None
        self._critic_first: list = []
        self.critic_rel_smooth: Optional[float] = None
        self._reseed()

    def _build_lora(self, teacher, param, call, net_dtype, pcfg, mesh, student_net, fake_net, student_param) -> None:
        """LoRA (``cfg.lora``): ONE copy of the teacher network, frozen, with adapters ``student``, ``fake``
        (critic; rcm/dmd only) and ``ema``; teacher, student and fake score are views of it that switch
        the active adapter around each call (rcm_core/lora.py). Activation checkpointing and FSDP2 are
        applied once, to the shared network (the base sharded once)."""
        from ..nets.lora import (EMA, FAKE, STUDENT, AdapterDenoiser, adapter_parameters, add_adapters, check_same_network,
                            copy_adapter)
        for what, other in (("student_net", student_net), ("fake_net", fake_net)):
            if other is not None:
                check_same_network(teacher.net, other, what)
        if student_param is not None and student_param != param:
            raise ValueError(f"LoRA: student_param={student_param} differs from the teacher's {param}; with "
                             "DistillConfig.lora the student is the teacher's network (plus an adapter)")
        net = copy.deepcopy(teacher.net)
        keep = self._autocast_dtype is not None and _is_low_precision(net)   # a frozen bf16 base stays bf16
        net = _place(net, None if keep else net_dtype, self.device, mesh, True)
        if self._autocast_dtype is not None:
            install_matched_norms(net)
        net.requires_grad_(False).eval()
        roles = [STUDENT] + ([FAKE] if self.cfg.uses_dmd else [])
        # adapters keep fp32 master weights under autocast (as full fine-tuning's trainable copies)
        self.lora_layers = add_adapters(net, self.cfg.lora, roles + [EMA], seed=self.cfg.seed, dtype=net_dtype)
        copy_adapter(net, STUDENT, EMA)
        for _, p in adapter_parameters(net, EMA):
            p.requires_grad_(False)
        net = parallelize(net, pcfg, mesh)
        dt = None if keep else net_dtype
        self.teacher = AdapterDenoiser(net, param, call, dtype=dt, adapter=None)
        self.student = AdapterDenoiser(net, param, call, dtype=dt, adapter=STUDENT)
        self.fake = AdapterDenoiser(net, param, call, dtype=dt, adapter=FAKE) if self.cfg.uses_dmd else None

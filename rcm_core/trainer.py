"""The rCM trainer: student (sCM + DMD), fake score (critic), EMA, checkpoints.

Usable as a library::

    trainer = RCMTrainer(teacher, DistillConfig.preset("embedded"))
    for batch in batches:                       # dict(latents, cond, uncond)
        metrics = trainer.train_step(batch)
    trainer.save_checkpoint("runs/ckpt.pt")     # any fsspec URL

``teacher`` is a :class:`rcm_core.teachers.Teacher` (or anything with ``net``,
``param`` and ``call``). Student and fake score start from the teacher's
weights. With torch.distributed initialised, gradients are all-reduced
(averaged) across ranks after each backward; each rank draws its own times and
noise (seeded by rank).
"""
from __future__ import annotations

import copy
import io
import math
import time
import warnings
from contextlib import nullcontext
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .config import DistillConfig
from .denoiser import TrigFlowDenoiser, guided
from .ema import PowerEMA
from .parallel import ParallelConfig, fsdp_mesh, is_sharded, parallelize
from .losses import (critic_loss, critic_updates_before, dcm_loss, dcm_times, dmd_direction, dmd_loss,
                     lr_warmup_factor, nan_mask,
                     normalize_tangent, rollout_steps, scm_loss, scm_target, student_update, student_updates_before,
                     t_lognormal, t_shifted_rf, tangent_warmup_ratio)
from .rng import SampleRNG, stream_seed
from .sampling import sample_student, student_rollout
from .stages import StagePosition, locate
from .trigflow import expand_like, noisy_sample

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_dtensor(x) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(x, DTensor)


def _allreduce_grads(params) -> None:
    """Average the replicated parameters' gradients (FSDP-sharded ones are reduce-scattered by FSDP)."""
    rank, world = _world()
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None and not _is_dtensor(p.grad)]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for g, r in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(r)


def _heads(net: torch.nn.Module, cfg) -> int:
    from .context_parallel import CP_PLANS, plan_for
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
        return net if dtype is None else net.to(dtype)
    return net.to(device) if dtype is None else net.to(device, dtype)


def _has_blocks(net: torch.nn.Module) -> bool:
    from .parallel import transformer_blocks
    try:
        transformer_blocks(net)
        return True
    except ValueError:
        return False


def _is_low_precision(net: torch.nn.Module) -> bool:
    return any(p.dtype in (torch.bfloat16, torch.float16) for p in net.parameters())


def _grad_norm(params) -> float:
    """Global L2 norm of the gradients (sharded ones summed over ranks); no clipping."""
    sharded = replicated = None
    for p in params:
        if p.grad is None:
            continue
        if _is_dtensor(p.grad):
            sq = p.grad.to_local().double().pow(2).sum()
            sharded = sq if sharded is None else sharded + sq
        else:
            sq = p.grad.double().pow(2).sum()
            replicated = sq if replicated is None else replicated + sq
    total = 0.0
    if sharded is not None:
        dist.all_reduce(sharded)
        total += float(sharded)
    if replicated is not None:
        total += float(replicated)
    return math.sqrt(total)


def _zero_nonfinite_grads(params) -> int:
    """Replace non-finite gradient entries by zero (as the reference does before every step); returns
    how many there were (summed over ranks for sharded gradients)."""
    count = 0
    sharded = None
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.to_local() if _is_dtensor(p.grad) else p.grad
        bad = (~torch.isfinite(g)).sum()
        if _is_dtensor(p.grad):
            sharded = bad if sharded is None else sharded + bad
        else:
            count += int(bad)
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    if sharded is not None:
        dist.all_reduce(sharded)
        count += int(sharded)
    return count


def _sq_norm(tensors) -> float:
    """Sum of squares of a list of (possibly sharded, possibly None) gradient tensors, over all ranks' shards."""
    sharded, total = None, 0.0
    for t in tensors:
        if t is None:
            continue
        if _is_dtensor(t):
            sq = t.to_local().double().pow(2).sum()
            sharded = sq if sharded is None else sharded + sq
        else:
            total += float(t.double().pow(2).sum())
    if sharded is not None:
        dist.all_reduce(sharded)
        total += float(sharded)
    return total


def _accumulate_delta(acc: list, params, before: list) -> None:
    """acc[k] += p.grad - before[k]: what the last backward added to each gradient."""
    for k, p in enumerate(params):
        if p.grad is None:
            continue
        d = p.grad.detach() - before[k] if before[k] is not None else p.grad.detach().clone()
        acc[k] = d if acc[k] is None else acc[k] + d


# the critic's reference loss is the mean of its first this many updates
CRITIC_REF_UPDATES = 5


def _any_rank(flag: bool, device) -> bool:
    """True on every rank if ``flag`` is True on any (so all ranks skip a step together)."""
    if _world()[1] == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _jvp(f, primals, tangents):
    """(f(primals), J_f tangents) by forward-mode AD with dual tensors (``torch.autograd.forward_ad``).

    Used under no_grad for the separate tangent pass. Unlike ``torch.func.jvp`` the network sees
    plain (dual) tensors, so FSDP's parameter all-gathers work inside it, and the attention op
    gets O and dO from one fused pass.
    """
    from torch.autograd import forward_ad as fwAD
    with fwAD.dual_level():
        out = f(*[fwAD.make_dual(p, d) for p, d in zip(primals, tangents)])
        y, j = fwAD.unpack_dual(out)
    if j is None:
        raise RuntimeError("the student's output carries no tangent: is an input detached inside the network?")
    return y, j


def _check_batch(batch: dict, latent_shape: Optional[tuple]) -> tuple:
    for key in ("latents", "cond", "uncond"):
        if key not in batch:
            raise KeyError(f"batch is missing {key!r}; expected keys latents, cond, uncond")
        if not isinstance(batch[key], torch.Tensor) or not batch[key].is_floating_point():
            raise TypeError(f"batch[{key!r}] must be a floating-point tensor, got "
                            f"{getattr(batch[key], 'dtype', type(batch[key]).__name__)}")
    x0, cond, uncond = batch["latents"], batch["cond"], batch["uncond"]
    if latent_shape is not None and tuple(x0.shape[1:]) != tuple(latent_shape):
        raise ValueError(f"batch['latents'] has shape {tuple(x0.shape)}; the teacher expects (B, *{tuple(latent_shape)})")
    if cond.dim() != 3 or cond.shape[0] != x0.shape[0]:
        raise ValueError(f"batch['cond'] must be (B={x0.shape[0]}, tokens, dim), got {tuple(cond.shape)}")
    if uncond.dim() != 3 or uncond.shape[0] not in (1, x0.shape[0]) or uncond.shape[1:] != cond.shape[1:]:
        raise ValueError(f"batch['uncond'] must be (1 or B, {cond.shape[1]}, {cond.shape[2]}), got {tuple(uncond.shape)}")
    return x0, cond, uncond


class RCMTrainer:
    """rCM distillation of ``teacher`` (student, fake score, EMA, optimisers, schedule).

    Arguments:
        teacher: a :class:`rcm_core.teachers.Teacher` or anything with ``net`` (nn.Module), ``param``
            (:class:`Parameterization`), optionally ``call`` (``call(net, x, timestep, cond)``),
            ``guidance`` (its CFG weight) and ``latent_shape`` (needed by :meth:`generate`).
        config: the :class:`DistillConfig`; ``config.guidance`` overrides ``teacher.guidance`` when set
            (the one place to switch CFG off: guidance 1.0), ``config.dtype`` is the compute dtype.
        device: where the networks live.
        log_fn: called as ``log_fn(step, metrics)`` after every step.
        student_net / fake_net: networks to start the student / fake score from instead of copies of
            ``teacher.net`` (same call signature).
        student_param: the :class:`Parameterization` of ``student_net`` AND ``fake_net`` when it differs
            from the teacher's (e.g. a student that predicts F directly).

    Attributes: ``student``, ``fake`` and ``teacher`` (:class:`TrigFlowDenoiser` wrappers; ``.net`` is the
    network), ``ema`` (:class:`PowerEMA`), ``opt_student`` / ``opt_fake``, ``step``, ``guidance``.
    """

    def __init__(self, teacher, config: DistillConfig, device: str | torch.device = "cpu",
                 log_fn: Optional[Callable[[int, dict], None]] = None,
                 student_net: Optional[torch.nn.Module] = None, fake_net: Optional[torch.nn.Module] = None,
                 student_param=None):
        self.cfg = config.validate()
        self.device = torch.device(device)
        rank, world = _world()
        # context parallel: consecutive ranks share a sample; the data-parallel index keys its randomness
        self.cp_group, self.dp_rank, self.dp_size = None, rank, world
        if self.cfg.context_parallel > 1:
            from .context_parallel import check_context_parallel, cp_groups
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
            self.student = clone(student_net if student_net is not None else teacher.net, True)
            self.fake = clone(fake_net if fake_net is not None else teacher.net, True) if self.cfg.uses_dmd else None
        betas = tuple(self.cfg.betas)
        adamw = dict(betas=betas, weight_decay=self.cfg.weight_decay, foreach=self.cfg.optimizer_foreach)
        self.opt_student = torch.optim.AdamW(self.student.parameters(), lr=self.cfg.lr_student, **adamw)
        self.opt_fake = (torch.optim.AdamW(self.fake.parameters(), lr=self.cfg.lr_fake, **adamw)
                         if self.fake is not None else None)
        self.sharded = is_sharded(self.student.net)
        if self.cfg.lora is not None:      # the EMA of the student's adapter, in the shared network's "ema" adapter
            from .lora import AdapterEMA
            self.ema = AdapterEMA(self.student.net, self.cfg.ema_sigma_rel)
        elif self.sharded:   # the EMA is sharded like the student (a deep copy of an FSDP module is not)
            ema_net = _place(copy.deepcopy(student_net if student_net is not None else teacher.net), net_dtype,
                             self.device, mesh, True)
            self.ema = PowerEMA(parallelize(ema_net, ParallelConfig(fsdp=True), mesh), self.cfg.ema_sigma_rel,
                                copy_module=False)
        else:
            self.ema = PowerEMA(self.student.net, self.cfg.ema_sigma_rel)
        if self.cp_group is not None:        # the EMA (a copy made above) stays whole: sampling is local
            from .context_parallel import apply_context_parallel
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
        from .lora import (EMA, FAKE, STUDENT, AdapterDenoiser, adapter_parameters, add_adapters, check_same_network,
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

    # ---- helpers ---------------------------------------------------------------------
    def _reseed(self) -> None:
        """The step-level stream (a random rollout length: the same on every rank) is a function of
        (seed, step); each sample's draws come from :class:`SampleRNG` streams of (seed, step, global
        sample index). A resumed run, on any number of ranks and with any micro-batch size, draws
        exactly what the uninterrupted one would, and no two samples share noise."""
        self.gen.manual_seed(stream_seed(self.cfg.seed, "step", self.step))

    def _amp(self):
        if self._autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

    def _sample_rng(self, b: int, offset: Optional[int]) -> SampleRNG:
        """Streams of this rank's ``b`` samples: global indices offset .. offset + b - 1 (default rank * b)."""
        offset = self.dp_rank * b if offset is None else offset
        return SampleRNG(self.cfg.seed, self.step, range(offset, offset + b), self.device)

    @property
    def warmup_steps(self) -> int:
        """H of the joint schedule (student every iteration before it); 0 for DMD and for staged runs."""
        return 0 if self.cfg.method == "dmd" or self.cfg.stages else self.cfg.tangent_warmup_steps

    def stage(self, step: Optional[int] = None) -> Optional[StagePosition]:
        """Where ``step`` is in the staged schedule (None: not staged)."""
        if not self.cfg.stages:
            return None
        return locate(self.step if step is None else step, self.cfg.stages, self.cfg.student_update_freq)

    def method(self, step: Optional[int] = None) -> str:
        """The method trained at ``step``: the phase's in a staged run, else the config's."""
        pos = self.stage(step)
        return pos.method if pos is not None else self.cfg.method

    def is_student_step(self, step: Optional[int] = None) -> bool:
        step = self.step if step is None else step
        pos = self.stage(step)
        if pos is not None:
            return pos.student_step
        return not self.cfg.uses_dmd or student_update(step, self.warmup_steps, self.cfg.student_update_freq)

    def sample_t_D(self, rng: SampleRNG) -> torch.Tensor:
        """t_D ~ p_D, one per sample of ``rng``."""
        c = self.cfg
        if c.dmd_time == "rf_shift":
            return t_shifted_rf(rng.rand(), c.dmd_shift)
        return t_lognormal(rng.randn(), c.dmd_P_mean, c.dmd_P_std)

    def updates_before(self, step: Optional[int] = None) -> int:
        """The own update count (0-based index of this update) of the network trained at ``step``.

        Student: step before the warm-up H, then H + (step - H) // K; critic: step - that - 1. The
        rollout length and the learning-rate warm-up follow each network's own count, as the
        reference does, so both networks see every rollout length whatever K is.
        """
        step = self.step if step is None else step
        pos = self.stage(step)
        if pos is not None:
            return pos.student_updates_before if pos.student_step else pos.critic_updates_before
        if not self.cfg.uses_dmd:
            return step
        h, k = self.warmup_steps, self.cfg.student_update_freq
        if self.is_student_step(step):
            return student_updates_before(step, h, k)
        return critic_updates_before(step, h, k)

    def rollout_steps(self, step: Optional[int] = None) -> int:
        """Rollout length n of the update at ``step``: cycled over each network's own updates, or random."""
        c = self.cfg
        if c.rollout_cycle:
            return rollout_steps(self.updates_before(step), c.rollout_max_steps)
        return int(torch.randint(1, c.rollout_max_steps + 1, (1,), generator=self.gen, device=self.device))

    def rollout(self, cond: torch.Tensor, shape: tuple, keep_graph: bool, rng: SampleRNG, n: int):
        """Student backward simulation of ``n`` steps from pure noise of per-sample ``shape``."""
        c = self.cfg
        b = cond.shape[0]
        if c.rollout_fixed_times:
            fixed = list(c.rollout_fixed_times) + [c.rollout_fixed_times[-1]] * c.rollout_max_steps
            t_hat = [torch.full((b,), fixed[k], dtype=torch.float64, device=self.device) for k in range(n)]
        else:
            t_hat = [self.sample_t_D(rng) for _ in range(n)]
        noise = rng.randn(shape)
        return student_rollout(self.student, cond, noise, n, t_hat, c.rollout_t_max, keep_graph=keep_graph,
                               randn=lambda x: rng.randn(x.shape[1:]))

    @staticmethod
    def _ode_tangents(x_t, t, F_T):
        """Tangents (dx, dt) = (cos t sin t F_T, cos t sin t): d/dt along the teacher's PF-ODE, scaled."""
        cs = torch.cos(t) * torch.sin(t)
        return expand_like(cs, x_t) * F_T, cs

    def tangent(self, x_t, t, F_T, cond):
        """F_theta^-(x_t, t) and J = cos t sin t dF_theta/dt along the teacher's PF-ODE (no grad)."""
        dx, cs = self._ode_tangents(x_t, t, F_T)
        with torch.no_grad(), self._amp():
            if self.cfg.time_derivative == "jvp":
                return _jvp(lambda x, tt: self.student(x, tt, cond), (x_t, t), (dx, cs))
            h = self.cfg.fd_step                                   # semi-continuous
            F_minus, J_x = _jvp(lambda x: self.student(x, t, cond), (x_t,), (dx,))
            F_h = self.student(x_t, t + h, cond)
            return F_minus, J_x + expand_like(cs, x_t) * (F_h - F_minus) / h

    def student_with_tangent(self, x_t, t, F_T, cond):
        """F_theta(x_t, t) with its graph, and J, from one forward pass (forward-AD dual inputs).

        The student's forward is recorded for the backward while the tangents
        (cos t sin t F_T, cos t sin t) are pushed through it, so F_theta^- and J cost
        one tangent pass on top of the forward the loss needs anyway.
        """
        dx, cs = self._ode_tangents(x_t, t, F_T)
        with self._amp():
            F_theta, J = _jvp(lambda x, tt: self.student(x, tt, cond), (x_t, t), (dx, cs))
        return F_theta, F_theta.detach(), J.detach()

    # ---- the two updates ----------------------------------------------------------------
    def _dcm_term(self, x0, cond, uncond, rng: SampleRNG, b: int):
        """Discrete-time CM (NVlabs/rcm ``_student_dcm_step``): times (t_0, t_1) from :func:`dcm_times`, one
        teacher Euler step in TrigFlow x_1 = x_0 - (t_0 - t_1) F_T (CFG), target sg f_theta(x_1, t_1)."""
        c = self.cfg
        t, t_prev = dcm_times(rng.rand(), c.dcm_total_steps, c.dcm_shift)
        x_t = noisy_sample(x0, rng.randn(x0.shape[1:]), t)
        with torch.no_grad(), self._amp():
            F_T = guided(self.teacher, x_t, t, cond, uncond, self.guidance)
            x_prev = x_t - expand_like(t - t_prev, x_t) * F_T
            target = self.student.x0(x_prev, t_prev, cond)
        mask = nan_mask(target)
        sel = mask if bool(mask.any()) else torch.ones_like(mask)   # keep a graph on every rank
        with self._amp():
            x0_theta = self.student.x0(x_t[sel], t[sel], cond[sel])
        keep = mask[sel]
        if not bool(keep.any()):
            return x0_theta[keep].sum(), mask                      # zero loss, graph kept
        return dcm_loss(x0_theta[keep], target[sel][keep]) * keep.sum() / b, mask

    def _scm_term(self, x0, cond, uncond, m: dict, rng: SampleRNG, b: int):
        """sCM (or discrete CM) loss of the student on this (micro-)batch, normalised by the rank's batch
        ``b``; returns (loss, finite-sample mask)."""
        c = self.cfg
        if self.method() == "dcm":
            return self._dcm_term(x0, cond, uncond, rng, b)
        t = t_lognormal(rng.randn(), c.P_mean, c.P_std)
        x_t = noisy_sample(x0, rng.randn(x0.shape[1:]), t)
        with torch.no_grad(), self._amp():
            F_T = guided(self.teacher, x_t, t, cond, uncond, self.guidance)
        fused = c.fused_tangent and c.time_derivative == "jvp"
        if fused:
            F_theta, F_minus, J = self.student_with_tangent(x_t, t, F_T, cond)
        else:
            F_minus, J = self.tangent(x_t, t, F_T, cond)
        # r follows the student's own updates (= the iteration during the joint schedule's warm-up)
        r = tangent_warmup_ratio(self.updates_before(), c.tangent_warmup_steps)

        def target(F_m):
            return normalize_tangent(scm_target(F_m, F_T, J, x_t, t, r, warmup_scales_jvp=c.warmup_scales_jvp),
                                     c.tangent_norm_c)

        g = target(F_minus)
        mask = nan_mask(g, F_minus)
        # the loss's graph covers the finite samples only (a NaN sample would poison the weight grads);
        # with none finite, the full batch keeps a graph (zero loss) so every rank runs its backward
        sel = mask if bool(mask.any()) else torch.ones_like(mask)
        if not fused or not bool(sel.all()):
            with self._amp():
                F_theta = self.student(x_t[sel], t[sel], cond[sel])
        # F^- = sg(F_theta) of the back-propagated pass, in g and in the loss, as the reference does (its JVP
        # pass's output is discarded). The fused pass has it exactly; a separate no-grad JVP pass gives only J:
        # on the GPU its F comes from another attention kernel (the tangent kernel vs SDPA/FA3), and in bf16 the
        # difference was as large as g (tests/test_fsdp.py's bf16 check).
        F_sg = F_theta.detach()
        if not fused:
            F_m = F_minus.clone()
            F_m[sel] = F_sg.to(F_m.dtype)
            g = target(F_m)
            mask = mask & nan_mask(g)
        keep = mask[sel]
        l_cm = scm_loss(F_theta[keep], F_sg[keep], g[sel][keep], b)
        m["tangent_ratio"] = r
        m.setdefault("_g_norms", []).append(
            torch.linalg.vector_norm(g[mask].flatten(1), dim=1).detach())
        return l_cm, mask

    def _dmd_term(self, cond, uncond, shape, rng: SampleRNG, n: int):
        """DMD loss of the student's ``n``-step rollout (mean over this micro-batch); returns (loss, mask)."""
        with self._amp():
            G, _ = self.rollout(cond, shape, keep_graph=True, rng=rng, n=n)
        t_D = self.sample_t_D(rng)
        x_D = noisy_sample(G.detach(), rng.randn(shape), t_D)
        with torch.no_grad(), self._amp():
            x0_fake = self.fake.x0(x_D, t_D, cond)
            x0_real = guided(self.teacher, x_D, t_D, cond, uncond, self.guidance, want="x0")
        mask = nan_mask(G.detach(), x0_fake, x0_real)
        # per-sample norm of the direction (x0_fake - x0_real) / w: the diagnostics' DMD gradient on the outputs
        norms = torch.linalg.vector_norm(dmd_direction(G, x0_fake, x0_real)[mask].flatten(1), dim=1)
        return dmd_loss(G, x0_fake, x0_real, mask=mask), mask, norms

    def _set_lr(self, opt, base_lr: float) -> float:
        lr = base_lr * lr_warmup_factor(self.updates_before(), self.cfg.lr_warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        return lr

    def _finish(self, opt, params, losses: dict, masks: dict, m: dict, name: str) -> bool:
        """Sanitise gradients and step ``opt`` unless a loss is non-finite for the whole batch.

        Returns whether the step was taken. Skipped steps leave weights, optimiser state and the
        EMA untouched (decided on all ranks together).
        """
        bad = any(not bool(mk.any()) for mk in masks.values()) or \
            any(not math.isfinite(float(v)) for v in losses.values())
        _allreduce_grads(params)
        m["grad_nonfinite"] = _zero_nonfinite_grads(params)
        m[f"grad_norm_{name}"] = _grad_norm(params)
        skip = _any_rank(bad, self.device)
        m["skipped"] = int(skip)
        if skip:
            opt.zero_grad(set_to_none=True)
            return False
        opt.step()
        return True

    def _chunks(self, b: int):
        """(start, stop) of the micro-batches of a rank's batch of ``b`` (one chunk without accumulation)."""
        mb = self.cfg.micro_batch or b
        return [(i, min(i + mb, b)) for i in range(0, b, mb)]

    @staticmethod
    def _per_sample_uncond(uncond, b: int):
        return uncond.expand(b, *uncond.shape[1:]) if uncond.shape[0] == 1 else uncond

    def student_step(self, x0, cond, uncond, rng: Optional[SampleRNG] = None) -> dict:
        """One student update. The sCM and the DMD terms are back-propagated one after the other into
        the same gradients (two backward passes, one optimiser step), as the reference does, so their
        graphs never coexist in memory; with ``micro_batch`` each micro-batch does both, gradients
        accumulating (the losses are means over the rank's whole batch)."""
        c, b = self.cfg, x0.shape[0]
        rng = rng if rng is not None else self._sample_rng(b, None)
        m = {"kind": "student", "lr_student": self._set_lr(self.opt_student, c.lr_student)}
        uncond = self._per_sample_uncond(uncond, b)
        self.opt_student.zero_grad(set_to_none=True)
        losses, masks = {}, {}
        method = self.method()
        cm = method in ("rcm", "scm", "dcm") and c.loss_scale > 0
        dmd = method in ("rcm", "dmd") and c.loss_scale_dmd > 0 and self.step >= self.warmup_steps
        n = self.rollout_steps() if dmd else 0
        params = list(self.student.parameters())
        # the DMD/sCM ratio on the weights: the DMD backward's share of the gradients, kept apart
        split = cm and dmd and c.grad_ratio_every > 0 and self.updates_before() % c.grad_ratio_every == 0
        dmd_grads = [None] * len(params) if split else None
        dmd_norms = []
        for i, j in self._chunks(b):
            r = rng.subset(i, j)
            if cm:
                l_cm, mask = self._scm_term(x0[i:j], cond[i:j], uncond[i:j], m, r, b)
                losses["cm"] = losses.get("cm", 0.0) + float(l_cm.detach())
                masks.setdefault("cm", []).append(mask)
                if l_cm.requires_grad:
                    (c.loss_scale * self._bwd_scale * l_cm).backward()
                del l_cm
            if dmd:
                l_dmd, mask, norms = self._dmd_term(cond[i:j], uncond[i:j], x0.shape[1:], r, n)
                losses["dmd"] = losses.get("dmd", 0.0) + float(l_dmd.detach()) * (j - i) / b
                masks.setdefault("dmd", []).append(mask)
                dmd_norms.append(norms)
                before = [p.grad.detach().clone() if p.grad is not None else None for p in params] if split else None
                if l_dmd.requires_grad:
                    (c.loss_scale_dmd * self._bwd_scale * l_dmd * ((j - i) / b)).backward()
                del l_dmd
                if split:
                    _accumulate_delta(dmd_grads, params, before)
                    del before
        masks = {k: torch.cat(v) for k, v in masks.items()}
        if "cm" in losses:
            m["nan_masked"] = int(b - masks["cm"].sum())
            m["nan_masked_frac"] = m["nan_masked"] / b
            m["loss_cm"] = losses["cm"]
            gns = m.pop("_g_norms", None)
            if gns is not None:
                gn = torch.cat(gns)
                m["g_norm"] = float(gn.mean()) if gn.numel() else float("nan")
        if dmd:
            m["rollout_steps"] = n
            m["dmd_nan_masked"] = int(b - masks["dmd"].sum())
            m["dmd_nan_masked_frac"] = m["dmd_nan_masked"] / b
            m["loss_dmd"] = losses["dmd"]
            dn = torch.cat(dmd_norms)
            if cm and "g_norm" in m and dn.numel():
                # per sample: d(loss_scale_dmd L_DMD)/dG = 2 loss_scale_dmd (x0_fake - x0_real) / w / b and
                # d(loss_scale L_sCM)/dF_theta = -2 loss_scale g / b; their mean norms' ratio
                m["dmd_scm_ratio_out"] = c.loss_scale_dmd * float(dn.mean()) / (c.loss_scale * m["g_norm"])
        if split:
            total = [p.grad for p in params]
            d_sq = _sq_norm(dmd_grads)
            s_sq = _sq_norm([None if t is None else (t - d if d is not None else t) for t, d in zip(total, dmd_grads)])
            m["grad_norm_dmd"], m["grad_norm_scm"] = math.sqrt(d_sq), math.sqrt(s_sq)
            m["dmd_scm_ratio_w"] = math.sqrt(d_sq / s_sq) if s_sq > 0 else float("inf")
            del dmd_grads, total
        pos = self.stage()
        m["stage"] = pos.index if pos is not None else 0
        m["stage_method"] = method
        if self._finish(self.opt_student, params, losses, masks, m, "student"):
            self.ema.update(self.student.net)
        m["loss"] = c.loss_scale * losses.get("cm", 0.0) + c.loss_scale_dmd * losses.get("dmd", 0.0)
        return m

    def critic_step(self, x0, cond, uncond, rng: Optional[SampleRNG] = None) -> dict:
        b = x0.shape[0]
        rng = rng if rng is not None else self._sample_rng(b, None)
        n = self.rollout_steps()
        m = {"kind": "critic", "lr_fake": self._set_lr(self.opt_fake, self.cfg.lr_fake), "rollout_steps": n}
        self.opt_fake.zero_grad(set_to_none=True)
        total, masks = 0.0, []
        for i, j in self._chunks(b):
            r = rng.subset(i, j)
            with torch.no_grad(), self._amp():
                G, _ = self.rollout(cond[i:j], x0.shape[1:], keep_graph=False, rng=r, n=n)
            t_D = self.sample_t_D(r)
            x_D = noisy_sample(G, r.randn(x0.shape[1:]), t_D)
            with self._amp():
                x0_fake = self.fake.x0(x_D, t_D, cond[i:j])
            mask = nan_mask(G, x0_fake.detach())
            l_fake = critic_loss(G, x0_fake, t_D, mask=mask) * ((j - i) / b)
            (self._bwd_scale * l_fake).backward()
            total += float(l_fake.detach())
            masks.append(mask)
            del x0_fake, l_fake
        mask = torch.cat(masks)
        m["critic_nan_masked"] = int(b - mask.sum())
        m["loss_fake"] = m["loss"] = total
        pos = self.stage()
        m["stage"] = pos.index if pos is not None else 0
        m["stage_method"] = pos.method if pos is not None else self.cfg.method
        self._critic_diagnostics(total, m)
        self._finish(self.opt_fake, list(self.fake.parameters()), {"fake": total}, {"fake": mask}, m, "fake")
        return m

    def _critic_diagnostics(self, loss: float, m: dict) -> None:
        """``critic_loss_rel``: the critic's loss over the mean of its first CRITIC_REF_UPDATES losses;
        ``critic_behind`` = 1 while its smoothed value exceeds ``critic_lag_warn`` (the fake score no longer
        tracks the student's samples: more critic updates per student update, a higher critic LR or a lower
        student LR help); a warning when that starts."""
        if not math.isfinite(loss):
            return
        if self.critic_ref is None:
            self._critic_first.append(loss)
            if len(self._critic_first) < CRITIC_REF_UPDATES:
                return
            self.critic_ref = max(sum(self._critic_first) / len(self._critic_first), 1e-30)
        rel = loss / self.critic_ref
        was = self.critic_rel_smooth is not None and self.critic_rel_smooth > self.cfg.critic_lag_warn
        self.critic_rel_smooth = rel if self.critic_rel_smooth is None else 0.9 * self.critic_rel_smooth + 0.1 * rel
        behind = self.critic_rel_smooth > self.cfg.critic_lag_warn
        m["critic_loss_rel"], m["critic_behind"] = rel, float(behind)
        if behind and not was and self.rank == 0:
            warnings.warn(f"step {self.step}: the critic falls behind - its smoothed loss is "
                          f"{self.critic_rel_smooth:.2f}x its start (critic_lag_warn={self.cfg.critic_lag_warn}); "
                          "consider more critic updates per student update (student_update_freq), a higher lr_fake "
                          "or a lower lr_student", RuntimeWarning, stacklevel=2)

    def train_step(self, batch: dict, sample_offset: Optional[int] = None) -> dict:
        """One update of the student or the critic (by the schedule), on ``batch`` = dict(latents, cond,
        uncond): this rank's rows of the global batch, global sample indices ``sample_offset`` ..
        (default rank * rows), which key each sample's random draws. Returns its metrics; a step whose
        loss is non-finite for the whole batch is skipped (``skipped`` = 1) without touching the
        weights, the optimiser state or the EMA."""
        x0, cond, uncond = _check_batch(batch, self.latent_shape)
        x0 = x0.to(self.device, torch.float64)
        cond, uncond = cond.to(self.device), uncond.to(self.device)
        self._reseed()
        rng = self._sample_rng(x0.shape[0], sample_offset)
        t0 = time.perf_counter()
        step_fn = self.student_step if self.is_student_step() else self.critic_step
        m = step_fn(x0, cond, uncond, rng)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        m["step"] = self.step
        m["step_time_s"] = time.perf_counter() - t0
        m["samples_per_s"] = x0.shape[0] / m["step_time_s"]
        if not math.isfinite(m["loss"]) or m.get("skipped"):
            m["nonfinite_loss"] = 1
        self.step += 1
        if self.log_fn is not None:
            self.log_fn(self.step, m)
        return m

    # ---- sampling with the EMA student ------------------------------------------------------
    @property
    def student_ema(self) -> torch.nn.Module:
        """The EMA student as a network. LoRA: a standalone copy with the EMA adapter merged into the
        teacher's weights (the teacher's state-dict names); under FSDP the shared network with the EMA
        adapter active (:class:`rcm_core.lora.AdapterView`; :meth:`ema_state_dict` gives merged weights)."""
        if self.cfg.lora is None:
            return self.ema.module
        from .lora import EMA, AdapterView, merged_module
        return AdapterView(self.student.net, EMA) if self.sharded else merged_module(self.student.net, EMA)

    def ema_denoiser(self) -> TrigFlowDenoiser:
        if self.cfg.lora is not None:        # the shared base with the EMA adapter active: no copy
            from .lora import EMA, AdapterDenoiser
            return AdapterDenoiser(self.student.net, self.student.param, self.student.call,
                                   dtype=self.student._dtype, adapter=EMA)
        return TrigFlowDenoiser(self.ema.module, self.student.param, self.student.call, dtype=self.student.dtype)

    @torch.no_grad()
    def generate(self, cond: torch.Tensor, steps: int = 4, seed: int = 0) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(seed)
        noise = torch.randn((cond.shape[0], *self.latent_shape), generator=g, device=self.device, dtype=torch.float64)
        return sample_student(self.ema_denoiser(), cond.to(self.device), noise, steps, self.cfg.sigma_max,
                              self.cfg.mid_t, generator=g)

    # ---- checkpoints ---------------------------------------------------------------------------
    # Two formats (rcm_core/checkpoint.py): "dcp", a directory written collectively, each rank its own
    # shards, loadable on any number of ranks (the default when sharded); "file", one torch.save file of
    # full tensors (the default otherwise, and the only format before DCP). Loading detects which.
    def _model_sd(self, net, part: Optional[str] = None) -> dict:
        if self.cfg.lora is not None:
            return self._adapter_sd(net, part)
        if not self.sharded:
            return net.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _optim_sd(self, net, opt) -> Optional[dict]:
        if not self.sharded:
            return opt.state_dict()
        if not opt.state:      # never stepped: get_optimizer_state_dict would create a state (a zero-lr step)
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _adapter_sd(self, net, adapter: str) -> dict:
        """LoRA: adapter ``adapter``'s weights as full tensors (canonical names; under FSDP each adapter
        weight is all-gathered: a collective, every rank gets them; the base is never gathered)."""
        from .lora import adapter_parameters
        out = {}
        for n, p in adapter_parameters(net, adapter):
            out[n] = (p.full_tensor().cpu() if _is_dtensor(p) else p).detach()
        return out

    def _load_adapter(self, net, adapter: str, sd: dict) -> None:
        """LoRA: set adapter ``adapter``'s weights from full tensors (names as :meth:`_adapter_sd`)."""
        from .lora import adapter_parameters
        params = dict(adapter_parameters(net, adapter))
        if set(sd) != set(params):
            missing, extra = sorted(set(params) - set(sd)), sorted(set(sd) - set(params))
            raise ValueError(f"LoRA checkpoint: adapter {adapter!r} does not fit this network: missing {missing[:4]}, "
                             f"unexpected {extra[:4]} (another LoRAConfig.target_modules?)")
        with torch.no_grad():
            for n, p in params.items():
                v = sd[n]
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"LoRA checkpoint: {n} is {tuple(v.shape)}, this network's {tuple(p.shape)} "
                                     "(another LoRAConfig.rank?)")
                if _is_dtensor(p):
                    from torch.distributed.tensor import distribute_tensor
                    v = distribute_tensor(v.to(p.device, p.dtype), p.device_mesh, p.placements)
                p.copy_(v)

    def _check_lora(self, saved_cfg: Optional[dict], where: str) -> None:
        """A checkpoint loads only into a trainer with the same LoRA setting (or both without)."""
        from .config import LoRAConfig
        saved = (saved_cfg or {}).get("lora")
        saved = LoRAConfig.from_dict(saved) if isinstance(saved, dict) else saved
        if saved != self.cfg.lora:
            raise ValueError(f"checkpoint {where} was trained with lora={saved}; this trainer has "
                             f"lora={self.cfg.lora} (LoRA and full checkpoints do not load into each other)")

    def _ckpt_parts(self) -> dict:
        """What a checkpoint holds: name -> (network, its optimiser or None). LoRA: the shared network
        for each part, of which the part's adapter (named as the part) is saved."""
        ema_net = self.student.net if self.cfg.lora is not None else self.ema.module
        parts = {"student": (self.student.net, self.opt_student), "ema": (ema_net, None)}
        if self.fake is not None:
            parts["fake"] = (self.fake.net, self.opt_fake)
        return parts

    def _dcp_state(self, opt_parts) -> dict:
        """The tensors of a DCP checkpoint: this rank's shards (DTensors) under FSDP, plain tensors
        otherwise; canonical FQNs; the optimiser states of ``opt_parts`` (e.g. ``["opt_student"]``)
        flattened to per-parameter keys so that they reshard."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        flat = StateDictOptions(flatten_optimizer_state_dict=True)
        sd = {}
        for name, (net, opt) in self._ckpt_parts().items():
            sd[name] = get_model_state_dict(net)
            if self.cfg.lora is not None:               # only this part's adapter (the base is the teacher's)
                from .lora import select_adapter
                sd[name] = select_adapter(sd[name], name)
            if opt is not None and f"opt_{name}" in opt_parts:
                sd[f"opt_{name}"] = get_optimizer_state_dict(net, opt, options=flat)
        return sd

    def _load_dcp(self, url: str, storage_options: Optional[dict]) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        from .checkpoint import load_dcp, read_meta
        meta = read_meta(url, storage_options)
        self._check_lora(meta.get("config"), url)
        parts = self._ckpt_parts()
        saved = sorted(p for p in meta["parts"] if not p.startswith("opt_"))
        if saved != sorted(parts):
            raise ValueError(f"checkpoint {url} holds {saved} (method {meta['config'].get('method')!r}); this "
                             f"trainer has {sorted(parts)} (method {self.cfg.method!r})")
        state = self._dcp_state([p for p in meta["parts"] if p.startswith("opt_")])
        load_dcp(state, url, storage_options, collective=self.sharded)
        flat = StateDictOptions(flatten_optimizer_state_dict=True)
        for name, (net, opt) in parts.items():
            set_model_state_dict(net, state[name], options=StateDictOptions(strict=self.cfg.lora is None))
            if opt is not None and f"opt_{name}" in state:
                set_optimizer_state_dict(net, opt, state[f"opt_{name}"], options=flat)
            elif opt is not None:
                opt.state.clear()                     # saved before its first step
        self.ema.num_updates = int(meta["ema"]["num_updates"])
        self.step = int(meta["step"])
        self._load_diag_state(meta.get("diagnostics"))
        self._reseed()

    def _diag_state(self) -> dict:
        return {"critic_ref": self.critic_ref, "critic_first": list(self._critic_first),
                "critic_rel_smooth": self.critic_rel_smooth}

    def _load_diag_state(self, d: Optional[dict]) -> None:
        """The critic diagnostics' state (checkpoints written before they existed: start afresh)."""
        d = d or {}
        self.critic_ref = d.get("critic_ref")
        self._critic_first = list(d.get("critic_first") or [])
        self.critic_rel_smooth = d.get("critic_rel_smooth")

    def ema_state_dict(self) -> dict:
        """The EMA student's full weights (with FSDP: a collective; the full dict lands on rank 0). LoRA: the
        EMA adapter merged into the teacher's weights, under the teacher's names (see also
        :func:`rcm_core.checkpoint.lora_safetensors` for the adapter alone)."""
        if self.cfg.lora is None:
            return self._model_sd(self.ema.module)
        from .lora import EMA, merge_state_dict
        full = self.student.net.state_dict()
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            full = get_model_state_dict(self.student.net, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
        return merge_state_dict(full, EMA, self.cfg.lora.scaling)

    def lora_state_dict(self, adapter: str = "ema") -> dict:
        """LoRA: one adapter's weights as full tensors (``ema``: the EMA student's; collective under FSDP)."""
        if self.cfg.lora is None:
            raise ValueError("lora_state_dict: this trainer does full fine-tuning (DistillConfig.lora is None)")
        return self._adapter_sd(self.student.net, adapter)

    def state_dict(self) -> dict:
        """The whole training state as full (unsharded) tensors; with FSDP call it on every rank
        (collective): rank 0 gets the state, the other ranks empty parts. LoRA: the adapters (student,
        fake, ema) and their optimisers only; the base is the teacher's."""
        lora = self.cfg.lora is not None
        return {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "diagnostics": self._diag_state(),
            "student": self._model_sd(self.student.net, "student"),
            "fake": self._model_sd(self.fake.net, "fake") if self.fake is not None else None,
            "ema": {"module": self._model_sd(self.student.net, "ema") if lora else self.ema_state_dict(),
                    "num_updates": self.ema.num_updates,
                    "sigma_rel": self.ema.sigma_rel},
            "opt_student": self._optim_sd(self.student.net, self.opt_student),
            "opt_fake": self._optim_sd(self.fake.net, self.opt_fake) if self.opt_fake is not None else None,
        }

    def load_state_dict(self, sd: dict) -> None:
        """Inverse of :meth:`state_dict`; with FSDP every rank passes the full state."""
        self._check_lora(sd.get("config"), "state dict")
        if self.cfg.lora is not None:
            from .lora import adapter_keys
            for name, (net, opt) in self._ckpt_parts().items():
                self._load_adapter(net, name, sd["ema"]["module"] if name == "ema" else sd[name])
                if opt is not None:
                    self._load_optim(net, opt, sd[f"opt_{name}"], names=adapter_keys(net, name))
            self.ema.num_updates = int(sd["ema"]["num_updates"])
        elif self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.student.net, sd["student"], options=full)
            set_model_state_dict(self.ema.module, sd["ema"]["module"], options=full)
            if self.fake is not None:
                set_model_state_dict(self.fake.net, sd["fake"], options=full)
            self._load_optim(self.student.net, self.opt_student, sd["opt_student"])
            if self.fake is not None:
                self._load_optim(self.fake.net, self.opt_fake, sd["opt_fake"])
            self.ema.num_updates = int(sd["ema"]["num_updates"])
        else:
            self.student.net.load_state_dict(sd["student"])
            if self.fake is not None:
                self.fake.net.load_state_dict(sd["fake"])
                self._load_optim(self.fake.net, self.opt_fake, sd["opt_fake"])
            self.ema.load_state_dict(sd["ema"])
            self._load_optim(self.student.net, self.opt_student, sd["opt_student"])
        self.step = int(sd["step"])
        self._load_diag_state(sd.get("diagnostics"))
        self._reseed()

    def _load_optim(self, net, opt, osd: Optional[dict], names: Optional[list] = None) -> None:
        """An optimiser from a single-file checkpoint's full state: ``opt.state_dict()`` of a non-sharded
        run (parameters by index), a sharded run's gathered state (by canonical name), or None (saved
        before its first step). Either loads into a sharded or a non-sharded trainer. ``names``: the
        canonical names of the optimiser's parameters in order (default: all of ``net``'s; LoRA: the adapter's)."""
        by_index = osd is not None and all(isinstance(i, int) for g in osd["param_groups"] for i in g["params"])
        if by_index and not self.sharded:
            opt.load_state_dict(osd)
            return
        if osd is None or not osd.get("state"):
            opt.state.clear()
            return
        if by_index:        # indices count the parameters in order, as named_parameters() lists them
            names = names or [n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
                              for n, _ in net.named_parameters()]
            osd = {"state": {names[i]: v for i, v in osd["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(net, opt, osd, options=StateDictOptions(full_state_dict=True))

    def save_checkpoint(self, url: str, storage_options: Optional[dict] = None, format: str = "auto") -> None:
        """Write the whole training state to ``url`` (any fsspec URL); it appears only once complete.

        ``format``: ``"auto"`` (``"dcp"`` when sharded, else ``"file"``), ``"dcp"`` (a directory; with FSDP
        every rank must call it and writes its own shards, nothing is gathered) or ``"file"`` (one file of
        full tensors; with FSDP every rank must call it, the state is gathered and rank 0 writes).
        Without FSDP the calling process writes (call it on one rank).
        """
        from .checkpoint import DCP, FILE, save_dcp
        fmt = (DCP if self.sharded else FILE) if format == "auto" else format
        if fmt not in (DCP, FILE):
            raise ValueError(f"save_checkpoint(format={format!r}); known: 'auto', 'dcp', 'file'")
        if fmt == DCP:
            opt_parts = [f"opt_{n}" for n, (_, opt) in self._ckpt_parts().items() if opt is not None and opt.state]
            meta = {"step": self.step, "config": self.cfg.to_dict(), "sharded": self.sharded,
                    "ema": {"num_updates": self.ema.num_updates, "sigma_rel": self.ema.sigma_rel},
                    "diagnostics": self._diag_state(),
                    "parts": sorted(self._ckpt_parts()) + opt_parts}
            save_dcp(self._dcp_state(opt_parts), url, meta, storage_options, collective=self.sharded)
            return
        from .io import atomic_write_bytes
        sd = self.state_dict()
        if self.sharded and _world()[0] != 0:
            return
        buf = io.BytesIO()
        torch.save(sd, buf)
        atomic_write_bytes(url, buf.getvalue(), storage_options)

    def load_checkpoint(self, url: str, storage_options: Optional[dict] = None) -> None:
        """Load a checkpoint of either format (detected). A DCP directory loads on any number of ranks
        (with FSDP every rank calls it, each reads the shards it needs); a single file loads into FSDP
        too (every rank reads it). An unfinished DCP save raises IncompleteCheckpointError."""
        from .checkpoint import DCP, detect_format
        if detect_format(url, storage_options) == DCP:
            self._load_dcp(url, storage_options)
            return
        from .io import read_bytes
        sd = torch.load(io.BytesIO(read_bytes(url, storage_options)), map_location=self.device, weights_only=False)
        self.load_state_dict(sd)

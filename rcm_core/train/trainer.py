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

import math
import time
from typing import Optional

import torch

from ..nets.denoiser import TrigFlowDenoiser
from ..method.sampling import sample_student
from .checkpoint import _Checkpoints
from .critic import _CriticStep
from .schedule import _Schedule
from .setup import _Setup
from .student import _StudentStep
from .update import _Update


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


class RCMTrainer(_Setup, _Schedule, _Update, _StudentStep, _CriticStep, _Checkpoints):
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
        from ..nets.lora import EMA, AdapterView, merged_module
        return AdapterView(self.student.net, EMA) if self.sharded else merged_module(self.student.net, EMA)

    def ema_denoiser(self) -> TrigFlowDenoiser:
        if self.cfg.lora is not None:        # the shared base with the EMA adapter active: no copy
            from ..nets.lora import EMA, AdapterDenoiser
            return AdapterDenoiser(self.student.net, self.student.param, self.student.call,
                                   dtype=self.student._dtype, adapter=EMA)
        return TrigFlowDenoiser(self.ema.module, self.student.param, self.student.call, dtype=self.student.dtype)

    @torch.no_grad()
    def generate(self, cond: torch.Tensor, steps: int = 4, seed: int = 0) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(seed)
        noise = torch.randn((cond.shape[0], *self.latent_shape), generator=g, device=self.device, dtype=torch.float64)
        return sample_student(self.ema_denoiser(), cond.to(self.device), noise, steps, self.cfg.sigma_max,
                              self.cfg.mid_t, generator=g)

"""The trainer's counters and schedule: which network an iteration updates, each network's own update count,
the stage of a staged run, rollout lengths, t_D, learning-rate warm-up and the random streams."""
from __future__ import annotations

from typing import Optional

import torch

from ..method.losses import (critic_updates_before, lr_warmup_factor, rollout_steps, student_update, student_updates_before,
                      t_lognormal, t_shifted_rf)
from ..method.rng import SampleRNG, stream_seed
from ..method.stages import StagePosition, locate


class _Schedule:
    """Mixin of :class:`rcm_core.trainer.RCMTrainer`: counters, schedule and random streams."""

    def _reseed(self) -> None:
        """The step-level stream (a random rollout length: the same on every rank) is a function of
        (seed, step); each sample's draws come from :class:`SampleRNG` streams of (seed, step, global
        sample index). A resumed run, on any number of ranks and with any micro-batch size, draws
        exactly what the uninterrupted one would, and no two samples share noise."""
        self.gen.manual_seed(stream_seed(self.cfg.seed, "step", self.step))

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

    def _set_lr(self, opt, base_lr: float) -> float:
        lr = base_lr * lr_warmup_factor(self.updates_before(), self.cfg.lr_warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        return lr

"""The critic (fake score) update and its diagnostics: the loss relative to its start, and a warning when the
critic falls behind the student."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from ..method.losses import critic_loss, nan_mask
from ..method.rng import SampleRNG
from ..method.trigflow import noisy_sample


# the critic's reference loss is the mean of its first this many updates
CRITIC_REF_UPDATES = 5


class _CriticStep:
    """Mixin of :class:`rcm_core.trainer.RCMTrainer`: the critic update and its diagnostics."""

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

    def _diag_state(self) -> dict:
        return {"critic_ref": self.critic_ref, "critic_first": list(self._critic_first),
                "critic_rel_smooth": self.critic_rel_smooth}

    def _load_diag_state(self, d: Optional[dict]) -> None:
        """The critic diagnostics' state (checkpoints written before they existed: start afresh)."""
        d = d or {}
        self.critic_ref = d.get("critic_ref")
        self._critic_first = list(d.get("critic_first") or [])
        self.critic_rel_smooth = d.get("critic_rel_smooth")

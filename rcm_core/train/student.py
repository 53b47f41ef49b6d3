"""The student update: the sCM (or discrete CM) term with its tangent along the teacher's PF-ODE, the DMD term
on the student's rollout, and the split of the weight gradients into the two terms' shares."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..nets.denoiser import guided
from ..method.losses import (dcm_loss, dcm_times, dmd_direction, dmd_loss, nan_mask, normalize_tangent, scm_loss,
                      scm_target, t_lognormal, tangent_warmup_ratio)
from ..method.rng import SampleRNG
from ..method.sampling import student_rollout
from ..method.trigflow import expand_like, noisy_sample
from .update import _sq_norm


def _accumulate_delta(acc: list, params, before: list) -> None:
    """acc[k] += p.grad - before[k]: what the last backward added to each gradient."""
    for k, p in enumerate(params):
        if p.grad is None:
            continue
        d = p.grad.detach() - before[k] if before[k] is not None else p.grad.detach().clone()
        acc[k] = d if acc[k] is None else acc[k] + d


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


class _StudentStep:
    """Mixin of :class:`rcm_core.trainer.RCMTrainer`: rollout, tangents and the student update."""

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
        d = dmd_direction(G, x0_fake, x0_real)
        # per-sample norm of the direction (x0_fake - x0_real) / w: the diagnostics' DMD gradient on the outputs
        norms = torch.linalg.vector_norm(d[mask].flatten(1), dim=1)
        return dmd_loss(G, x0_fake, x0_real, mask=mask, direction=d), mask, norms

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

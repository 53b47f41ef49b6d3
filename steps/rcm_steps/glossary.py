"""What every metric the pipeline logs means and which direction is better (the cards' glossaries).

MLflow names carry a prefix: ``train/<name>`` (distill, per step), ``eval/<model>/<name>`` (evaluate; model
``teacher``, ``student_<k>``: k sampling steps, or ``serve_<variant>_<k>``: the student with a serving option,
``--eval_serving``), ``curate/<name>``, ``cache/<name>``. :func:`term` strips it,
:func:`markdown` writes a table for the cards. ``tests/test_flow_distill.py`` checks that every metric a
smoke run logs is here.
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

__all__ = ["TRAIN", "EVAL", "DATA", "GLOSSARY", "term", "markdown"]

# name -> (meaning, better)
TRAIN: Dict[str, Tuple[str, str]] = {
    "student_loss": ("the student's training loss, loss_scale x loss_cm + loss_scale_dmd x loss_dmd (logged on "
                     "student steps only); a surrogate whose gradient is the update, not a quality score: judge "
                     "quality by eval/*", "lower, but read eval/*"),
    "critic_loss": ("the fake score's (critic's) denoising loss on the student's samples, "
                    "||G - x0_fake||^2 / sin^2 t_D per sample (logged on critic steps only)",
                    "lower: the critic follows the student"),
    "loss_cm": ("the consistency term before loss_scale: sCM ||F_theta - F^- - g||^2 per sample (dcm: "
                "||f(x_t0) - sg f(x_t1)||^2); at the current weights it is ||g||^2, so it tracks the tangent's size",
                "informational"),
    "loss_dmd": ("the DMD term before loss_scale_dmd: ||(x0_fake - x0_teacher) / w||^2 per sample, w = mean|G - "
                 "x0_teacher|: how much critic and teacher disagree on the student's samples", "lower"),
    "g_norm": ("mean per-sample norm of the normalised sCM tangent target g / (||g|| + tangent_norm_c); near 1 while "
               "the raw tangent is large against tangent_norm_c", "informational"),
    "tangent_ratio": ("the tangent warm-up ratio r = min(1, student updates / tangent_warmup_steps) in the sCM "
                      "target", "reaches 1 after the warm-up"),
    "dmd_scm_ratio_out": ("DMD vs sCM gradient norm on the student's outputs, per sample (loss_scale_dmd ||dmd "
                          "direction|| / (loss_scale g_norm)); the balance of the two terms", "~0.4 (the best "
                          "measured); >> 1: DMD dominates, << 0.01: DMD does nothing"),
    "dmd_scm_ratio_w": ("DMD vs sCM gradient norm on the student's weights, grad_norm_dmd / grad_norm_scm (every "
                        "grad_ratio_every updates)", "as dmd_scm_ratio_out"),
    "grad_norm_dmd": ("L2 norm of the DMD term's share of the student's weight gradient", "informational"),
    "grad_norm_scm": ("L2 norm of the sCM term's share of the student's weight gradient", "informational"),
    "grad_norm_student": ("global L2 norm of the student's gradient before its optimiser step (no clipping)",
                          "steady; spikes warn of instability"),
    "grad_norm_fake": ("global L2 norm of the fake score's gradient before its step", "steady"),
    "critic_loss_rel": ("the critic's loss over the mean of its first 5 losses", "lower; above critic_lag_warn "
                        "(default 3) the critic falls behind"),
    "critic_behind": ("1 while the smoothed critic_loss_rel exceeds critic_lag_warn (a warning names remedies)",
                      "0"),
    "nan_masked": ("samples whose sCM target was non-finite and were left out of the step", "0"),
    "nan_masked_frac": ("nan_masked over the batch", "0"),
    "dmd_nan_masked": ("samples whose DMD term was non-finite and were left out", "0"),
    "dmd_nan_masked_frac": ("dmd_nan_masked over the batch", "0"),
    "critic_nan_masked": ("samples whose critic loss was non-finite and were left out", "0"),
    "nan_count_total": ("nan_masked summed over the run so far", "0"),
    "grad_nonfinite": ("non-finite gradient entries set to zero before the optimiser step", "0"),
    "skipped": ("1 when the loss was non-finite for the whole batch and the step left the weights alone", "0"),
    "nonfinite_loss": ("1 when the step's loss was non-finite (or the step was skipped)", "0"),
    "lr_student": ("the student's learning rate (after the linear warm-up)", "schedule"),
    "lr_fake": ("the fake score's learning rate (after the linear warm-up)", "schedule"),
    "rollout_steps": ("steps of the student rollout that made the DMD / critic samples (1-4, cycling)",
                      "schedule"),
    "stage": ("index of the current phase of a staged schedule (DistillConfig.stages)", "schedule"),
    "step_time_s": ("seconds of this training step", "lower"),
    "samples_per_s": ("training samples per second, all ranks together", "higher"),
    "resumed_from_step": ("the checkpoint step a retried or resumed attempt started from", "informational"),
    "wall_s": ("seconds the whole training took (this attempt)", "lower"),
}

EVAL: Dict[str, Tuple[str, str]] = {
    "digit_acc": ("embedded teacher: share of clips the digit classifier reads as the prompt's digit", "higher"),
    "direction_acc": ("embedded teacher: share of clips whose digit drifts in the prompt's direction", "higher"),
    "fd_data": ("Frechet distance of classifier features to real held-out clips", "lower"),
    "fd_teacher": ("Frechet distance of features to the teacher's samples (embedded: classifier features; real "
                   "teachers: pooled decoded pixels)", "lower"),
    "fd_teacher_latent": ("Frechet distance of pooled latents to the teacher's", "lower"),
    "latent_rmse_teacher": ("RMS latent distance to the teacher's sample from the same noise", "lower"),
    "diversity": ("mean pairwise feature distance between the seeds of one prompt, averaged over prompts",
                  "close to the teacher's"),
    "diversity_rel": ("diversity over the teacher's; below 1: less varied (mode collapse)", "~1"),
    "nfe": ("network evaluations per sample (teacher: steps x 2 for CFG)", "lower"),
    "sec_per_sample": ("wall-clock seconds per sample, decode excluded", "lower"),
    "speedup": ("the teacher's sec_per_sample over this model's", "higher"),
    "eval_prompts": ("eval prompts used", "count"),
    "seeds_per_prompt": ("seeds (noises) per eval prompt", "count"),
    "gates_passed": ("1 when the student passed the evaluation gates (--gates)", "1"),
    "rel_l2_student": ("serving variant (serve_<variant>_<k>, --eval_serving): relative L2 distance of its latents "
                       "to the plain student's at k steps, same noise", "lower"),
    "speedup_student": ("serving variant: the plain student's sec_per_sample over the variant's, same steps",
                        "higher"),
    "first_call_s": ("serving variant: seconds of its first call (one batch: compilation, autotuning)", "lower"),
    "peak_gib": ("serving variant: peak GPU memory while it sampled, GiB", "lower"),
}

DATA: Dict[str, Tuple[str, str]] = {
    "raw": ("prompts read from --prompts", "count"), "kept": ("prompts left after cleaning", "count"),
    "train": ("training prompts", "count"), "eval": ("held-out eval prompts", "count"),
    "duplicate": ("prompts dropped as duplicates", "count"), "empty": ("empty prompts dropped", "count"),
    "too_short": ("prompts dropped as too short", "count"),
    "too_long": ("prompts over --max_prompt_chars (dropped with --long_prompts drop)", "count"),
    "too_many_tokens": ("prompts over the teacher's token limit (dropped with --long_prompts drop)", "count"),
    "truncated": ("prompts cut to the limit (--long_prompts truncate)", "count"),
    "total": ("teacher samples in the cache", "count"),
    "computed_shards": ("cache shards computed by this run", "count"),
    "skipped_shards": ("cache shards already there and verified (not recomputed)", "count"),
    "repaired_shards": ("damaged cache shards recomputed", "0"),
    "seconds": ("seconds the step took", "lower"),
    "latent_mean": ("mean of the cached teacher latents", "informational"),
    "latent_std": ("standard deviation of the cached teacher latents", "informational"),
}

GLOSSARY: Dict[str, Tuple[str, str]] = {**DATA, **EVAL, **TRAIN}


def term(metric: str) -> str:
    """The glossary name of an MLflow metric: ``eval/student_4/fd_teacher`` -> ``fd_teacher``."""
    return metric.rsplit("/", 1)[-1]


def markdown(names: Iterable[str], title: str = "Metrics") -> str:
    """A Markdown table (metric, meaning, better) of ``names`` (MLflow names or bare; each once, in order)."""
    seen, rows = set(), []
    for n in names:
        t = term(n)
        if t in seen:
            continue
        seen.add(t)
        meaning, better = GLOSSARY.get(t, ("(not documented)", ""))
        rows.append(f"| `{t}` | {meaning.replace('|', chr(92) + '|')} | {better} |")
    return f"### {title}\n\n| metric | meaning | better |\n|---|---|---|\n" + "\n".join(rows)

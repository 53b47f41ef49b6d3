"""Distillation configuration: data, not code (rcm-algorithm.md section 5).

``DistillConfig.preset(name)`` gives the paper's defaults for Wan2.1 1.3B / 14B
and Cosmos-Predict2, and toy-sized defaults for the embedded teacher.
``from_dict`` rejects unknown keys; ``validate`` rejects non-finite and
out-of-range hyperparameters, naming the field.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .stages import Stage, describe, parse_stages, stage_iterations

METHODS = ("rcm", "scm", "dmd", "dcm")
MOE_STUDENTS = ("one", "two")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA distillation (rcm_core/lora.py): student and fake score are adapters on the one frozen teacher.

    ``target_modules``: module names or name suffixes (peft's rule: a module matches a target when its
    name is the target or ends with ``"." + target``), e.g. ``("to_q", "to_k", "to_v", "to_out.0")``;
    ``()`` = every ``nn.Linear`` inside the transformer blocks. ``alpha``: the update is scaled by
    ``alpha / rank`` (None: alpha = rank, scaling 1). ``dropout`` must be 0: the sCM tangent and
    activation checkpointing need a deterministic network.
    """
    rank: int = 16
    alpha: Optional[float] = None
    target_modules: tuple = ()
    dropout: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DistillConfig.lora keys: {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "target_modules" in d:
            tm = d["target_modules"]
            d["target_modules"] = (tm,) if isinstance(tm, str) else tuple(tm or ())
        return cls(**d).validate()

    @property
    def scaling(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank) / self.rank

    def validate(self) -> "LoRAConfig":
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"DistillConfig.lora.rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise ValueError(f"DistillConfig.lora.alpha must be a finite number > 0 or None, got {self.alpha!r}")
        if not isinstance(self.target_modules, tuple) or not all(
                isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"DistillConfig.lora.target_modules must be a tuple of module names, "
                             f"got {self.target_modules!r}")
        if self.dropout != 0:
            raise ValueError(f"DistillConfig.lora.dropout={self.dropout}: only 0 is supported (the sCM tangent and "
                             "activation checkpointing's recomputation need a deterministic network)")
        return self


@dataclass
class DistillConfig:
    method: str = "rcm"                  # rcm | scm | dmd | dcm (discrete-time CM)
    # sCM time distribution p_G: sigma = exp(N(P_mean, P_std^2))
    P_mean: float = 0.7
    P_std: float = 1.6
    tangent_warmup_steps: int = 1000     # H
    # False (reference): r scales only the sin terms of g, J stays whole; True: r also scales J
    warmup_scales_jvp: bool = False
    tangent_norm_c: float = 0.1
    loss_scale: float = 100.0            # sCM
    loss_scale_dmd: float = 1.0
    # teacher CFG weight distilled into the student; None: the teacher's own (Teacher.guidance)
    guidance: Optional[float] = None
    # time derivative: "jvp" (forward-mode AD) or "semi_continuous" (t-part by finite difference)
    time_derivative: str = "jvp"
    fd_step: float = 1e-4
    # "jvp" only: compute J in the same forward pass that records the student's graph
    # (forward-AD dual inputs; attention gives O and dO from one fused kernel pass) instead of a
    # separate no-grad JVP pass followed by the student's forward.
    fused_tangent: bool = True
    # memory: activation checkpointing of the student's and fake score's transformer blocks
    # ("none" | "full" | "selective": every ac_every-th block | "keep_attention": every block, its self-attention
    # outputs kept so the backward's recomputation skips attention), applied by rcm_core.parallel.parallelize
    activation_checkpointing: str = "none"
    ac_every: int = 2
    # the frozen teacher's no-grad passes (sCM target CFG pair, DMD real score, dCM's Euler step) with its
    # transformer blocks' linears in FP8 E4M3 (rcm_core.nets.fp8; dynamic per-token activation scales); needs
    # FP8 tensor cores (compute capability >= 8.9). Opt-in: its error on g and the DMD gradient is measured
    # by the bench before it may become a default (issue 22)
    teacher_fp8: bool = False
    # the frozen teacher's transformer blocks under torch.compile (rcm_core.nets.serving.compile_blocks) for its
    # no-grad passes; same conditions as teacher_fp8 (a teacher of its own, not sharded). Not for the student:
    # a compiled block drops forward-AD tangents (bench/compile_fwad_probe.py). Opt-in until measured
    teacher_compile: bool = False
    # every network's no-grad passes through compiled blocks: the teacher's (as teacher_compile), the student's
    # rollout and the fake score's DMD evaluation; passes with gradients or tangents run the same blocks eagerly
    # (rcm_core.nets.serving.compile_blocks(nograd_only=True)). Not with lora / fsdp / context_parallel. Opt-in
    # until measured on a GPU (bench_real.py --compile-nograd)
    compile_nograd: bool = False
    # FSDP2: shard the student's, fake score's and EMA's transformer blocks (weights, grads, AdamW
    # states) over all ranks; with fused_tangent it needs activation_checkpointing="full"
    fsdp: bool = False
    # FSDP: 0 = shard over all ranks; else HSDP: shard within groups of this many ranks (e.g. the GPUs
    # of one node), replicate across groups (the reference's fsdp_shard_size)
    fsdp_shard_size: int = 0
    # Ulysses context parallelism: each sample's token sequence split over this many ranks (consecutive
    # ranks form a group; the world is data-parallel x cp); must divide the head and token counts
    context_parallel: int = 1
    # discrete-time CM (dCM) as NVlabs/rcm defines it (cm_type="dcm"): RF times s and s - 1/dcm_total_steps,
    # s uniform, both shifted by dcm_shift; one teacher Euler step in TrigFlow between them
    dcm_total_steps: int = 48
    dcm_shift: float = 5.0
    # DMD / critic time distribution p_D
    dmd_time: str = "rf_shift"           # rf_shift (Wan) | lognormal (Cosmos)
    dmd_shift: float = 5.0
    dmd_P_mean: float = 0.0
    dmd_P_std: float = 1.6
    # student rollout (backward simulation)
    rollout_max_steps: int = 4           # N_max
    rollout_cycle: bool = True           # release: n = effective_step mod N_max + 1; False: n ~ U{1..N_max}
    rollout_fixed_times: tuple | None = None   # e.g. (1.5, 1.4, 1.0); None: t_hat ~ p_D
    rollout_t_max: float = math.pi / 2
    # schedule and optimisation
    student_update_freq: int = 5         # K
    lr_student: float = 2e-6
    lr_fake: float = 4e-7
    betas: tuple = (0.0, 0.999)
    weight_decay: float = 0.01
    # AdamW's implementation: None - torch's default (foreach on CUDA: fast, but sqrt(v) of a whole parameter
    # group is one new fp32 list, trainable params x 4 B at the step's peak); False - per tensor (no such
    # temporary). The memory planner (rcm_steps.teacher.plan_mesh) picks False when only that fits.
    optimizer_foreach: Optional[bool] = None
    # linear learning-rate warm-up over each network's own first updates (reference: 100, from 1e-6)
    lr_warmup_steps: int = 100
    ema_sigma_rel: float = 0.05
    batch_size: int = 256
    # gradient accumulation: each rank processes its rows in micro-batches of this many samples (0: all at
    # once); results do not depend on it (nor on the GPU count) for a given global batch
    micro_batch: int = 0
    iterations: int = 10_000
    # few-step sampling of the student
    sigma_max: float = 80.0
    mid_t: tuple = (1.3, 1.0, 0.6)
    seed: int = 0
    dtype: str = "float32"               # float32 | bfloat16 (networks); conversions stay float64
    # staged schedule (rcm_core/stages.py): phases (method, student_updates) run in order, e.g.
    # (("dcm", 100), ("scm", 300), ("rcm", 600)); () = one method for the whole run. With stages, method is
    # "rcm" and iterations must equal the phases' iterations (dcm/scm: 1 per update, rcm/dmd: K per update).
    stages: tuple = ()
    # diagnostics: the DMD/sCM gradient ratio on the student's WEIGHTS every this many student steps (0: off;
    # it keeps two copies of the gradients while the DMD term back-propagates, which the memory planner does
    # not count: the real teachers' presets set 0); the ratio on the outputs is logged at every student step (free)
    grad_ratio_every: int = 1
    # warn when the critic's smoothed loss, relative to its first updates, exceeds this (it falls behind)
    critic_lag_warn: float = 3.0
    # LoRA distillation (LoRAConfig or its dict, e.g. {"rank": 64}): student and fake score are adapters
    # on the one frozen teacher network; None: full fine-tuning of copies of the teacher
    lora: Optional[LoRAConfig] = None
    # a teacher made of timestep experts (Wan2.2 A14B): "one" - the student and the fake score are ONE network
    # started from the low-noise expert (rcm_core.teachers.expert_student; BENCHMARKS.md "Wan2.2 A14B student:
    # one network or two"); "two" - copies of both experts switched at the teacher's boundary. No effect on a
    # one-network teacher. With lora, the adapters sit on the teacher's own network: "two" only.
    moe_student: str = "one"

    def __post_init__(self):
        if isinstance(self.lora, Mapping):
            self.lora = LoRAConfig.from_dict(self.lora)
        if self.stages and not all(isinstance(x, Stage) for x in self.stages):
            self.stages = parse_stages(self.stages)

    # ---- construction -------------------------------------------------------
    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DistillConfig":
        d = dict(d)
        if "dcm_delta" in d:      # configs saved before the release's dCM (a fixed TrigFlow step); no longer used
            warnings.warn(f"DistillConfig.dcm_delta={d.pop('dcm_delta')} is ignored: dCM now follows NVlabs/rcm "
                          "(dcm_total_steps, dcm_shift)", DeprecationWarning, stacklevel=2)
        unknown = sorted(set(d) - cls.field_names())
        if unknown:
            raise ValueError(f"unknown DistillConfig keys: {unknown}; known: {sorted(cls.field_names())}")
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**d).validate()

    @classmethod
    def preset(cls, name: str, **overrides) -> "DistillConfig":
        if name not in PRESETS:
            raise ValueError(f"no DistillConfig preset {name!r}; known: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stages"] = [[st.method, st.updates] for st in self.stages]     # JSON-friendly, from_dict reads it back
        return d

    def replace(self, **kw) -> "DistillConfig":
        return DistillConfig.from_dict({**self.to_dict(), **kw})

    # ---- checks --------------------------------------------------------------
    def validate(self) -> "DistillConfig":
        if self.method not in METHODS:
            raise ValueError(f"DistillConfig.method={self.method!r}; known: {METHODS}")
        self.stages = parse_stages(self.stages)
        if self.stages:
            if self.method != "rcm":
                raise ValueError(f"DistillConfig.stages is an rCM schedule: method must be 'rcm' (got "
                                 f"{self.method!r}); for one method alone leave stages empty")
            critic = [st.method for st in self.stages if st.method in ("rcm", "dmd")]
            if critic and self.loss_scale_dmd <= 0:
                raise ValueError(f"DistillConfig.stages has {critic[0]!r} phases but loss_scale_dmd="
                                 f"{self.loss_scale_dmd}: a DMD phase needs loss_scale_dmd > 0 (or use 'scm' phases)")
            need = stage_iterations(self.stages, self.student_update_freq)
            if self.iterations != need:
                raise ValueError(f"DistillConfig.stages ({describe(self.stages, self.student_update_freq)}) add up "
                                 f"to {need} iterations, but iterations={self.iterations}: set iterations={need} "
                                 "or change the phases")
        if self.time_derivative not in ("jvp", "semi_continuous"):
            raise ValueError(f"DistillConfig.time_derivative={self.time_derivative!r}; known: jvp, semi_continuous")
        if self.activation_checkpointing not in ("none", "full", "selective", "keep_attention"):
            raise ValueError(f"DistillConfig.activation_checkpointing={self.activation_checkpointing!r}; "
                             "known: none, full, selective, keep_attention")
        if self.ac_every < 1:
            raise ValueError(f"DistillConfig.ac_every must be >= 1, got {self.ac_every}")
        if self.fsdp and self.fused_tangent and self.time_derivative == "jvp" and \
                self.activation_checkpointing not in ("full", "keep_attention"):
            raise ValueError("DistillConfig.fsdp with fused_tangent=True needs activation_checkpointing='full' "
                             "or 'keep_attention' (every block checkpointed): "
                             "a checkpointed block computes its tangent without recording a graph, which FSDP's "
                             "hooks accept; an unchecked block would carry forward-AD tangents through FSDP's "
                             "unshard while recording (it fails). Use activation_checkpointing='full' or "
                             "fused_tangent=False (a separate no-grad JVP pass)")
        if self.teacher_compile and (self.lora is not None or self.fsdp):
            raise ValueError("DistillConfig.teacher_compile=True needs a teacher of its own: not with lora (one shared "
                             "network, whose student passes carry tangents a compiled block would drop; "
                             f"lora={'set' if self.lora is not None else 'None'}), not with fsdp (fsdp={self.fsdp})")
        if self.compile_nograd and (self.lora is not None or self.fsdp or self.context_parallel > 1):
            raise ValueError("DistillConfig.compile_nograd=True compiles each network's own blocks: not with lora (one "
                             f"shared network switching adapters; lora={'set' if self.lora is not None else 'None'}), "
                             f"fsdp (fsdp={self.fsdp}) or context_parallel (context_parallel={self.context_parallel})")
        if self.teacher_fp8 and (self.lora is not None or self.fsdp or self.dtype not in ("bfloat16", "float16")):
            raise ValueError("DistillConfig.teacher_fp8=True needs a teacher of its own in bf16/fp16: not with lora "
                             f"(one shared network; lora={'set' if self.lora is not None else 'None'}), not with fsdp "
                             f"(sharded weights; fsdp={self.fsdp}), dtype bfloat16/float16 (dtype={self.dtype!r})")
        if self.dmd_time not in ("rf_shift", "lognormal"):
            raise ValueError(f"DistillConfig.dmd_time={self.dmd_time!r}; known: rf_shift, lognormal")
        if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"DistillConfig.dtype={self.dtype!r}")
        if self.moe_student not in MOE_STUDENTS:
            raise ValueError(f"DistillConfig.moe_student={self.moe_student!r}; known: {MOE_STUDENTS} (a Wan2.2 A14B "
                             "teacher's student: one network from the low-noise expert, or both experts)")
        if self.optimizer_foreach is not None and not isinstance(self.optimizer_foreach, bool):
            raise ValueError(f"DistillConfig.optimizer_foreach must be true, false or null (torch's default), "
                             f"got {self.optimizer_foreach!r}")
        if self.lora is not None:
            if not isinstance(self.lora, LoRAConfig):
                raise ValueError(f"DistillConfig.lora must be a LoRAConfig, a dict of its fields or None, "
                                 f"got {type(self.lora).__name__}")
            self.lora.validate()
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            vals = v if isinstance(v, tuple) else (v,)
            for x in vals:
                if isinstance(x, bool) or not isinstance(x, (int, float)):
                    continue
                if not math.isfinite(x):
                    raise ValueError(f"DistillConfig.{f.name} must be finite, got {v}")
        integers = ("rollout_max_steps", "student_update_freq", "tangent_warmup_steps", "lr_warmup_steps",
                    "batch_size", "iterations", "micro_batch", "context_parallel", "fsdp_shard_size", "ac_every",
                    "seed", "dcm_total_steps", "grad_ratio_every")
        for name in integers:          # counts: a float such as 0.5 or 1.5 is a mistake, not a rounding request
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"DistillConfig.{name} must be an integer, got {v!r}")
        positive = ("context_parallel", "P_std", "tangent_norm_c", "dmd_shift", "dmd_P_std", "rollout_max_steps", "student_update_freq",
                    "batch_size", "sigma_max", "fd_step", "dcm_total_steps", "dcm_shift", "critic_lag_warn")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"DistillConfig.{name} must be > 0, got {getattr(self, name)}")
        nonneg = ("tangent_warmup_steps", "loss_scale", "loss_scale_dmd", "lr_student", "lr_fake",
                  "weight_decay", "iterations", "ema_sigma_rel", "lr_warmup_steps", "fsdp_shard_size", "micro_batch",
                  "grad_ratio_every")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ValueError(f"DistillConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.guidance is not None and (isinstance(self.guidance, bool) or self.guidance < 0):
            raise ValueError(f"DistillConfig.guidance must be >= 0 (1 = no CFG) or None (the teacher's), "
                             f"got {self.guidance}")
        for name in ("tangent_warmup_steps", "lr_warmup_steps"):
            if self.iterations > 0 and getattr(self, name) > self.iterations:
                raise ValueError(f"DistillConfig.{name}={getattr(self, name)} is longer than the run "
                                 f"(iterations={self.iterations}); shorten the warm-up or train longer")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"DistillConfig.betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("mid_t", "rollout_fixed_times"):
            ts = getattr(self, name) or ()
            if any(isinstance(x, bool) or not isinstance(x, numbers.Real) or not 0 < x < math.pi / 2 for x in ts) \
                    or any(a <= b for a, b in zip(ts, ts[1:])):
                raise ValueError(f"DistillConfig.{name} must be decreasing times in (0, pi/2), each strictly below the "
                                 f"one before, got {ts}")
        return self

    # ---- derived ---------------------------------------------------------------
    @property
    def methods(self) -> tuple:
        """The methods this run trains with: its phases' (staged) or its method."""
        return tuple(dict.fromkeys(st.method for st in self.stages)) or (self.method,)

    @property
    def uses_dmd(self) -> bool:
        """A fake score (critic) is trained at some point of the run."""
        return any(m in ("rcm", "dmd") for m in self.methods) and self.loss_scale_dmd > 0

    @property
    def uses_consistency(self) -> bool:
        return any(m in ("rcm", "scm", "dcm") for m in self.methods) and self.loss_scale > 0


# Two families of presets for each Wan2.1 size:
#   "wan2.1-1.3b", "wan2.1-14b" (the defaults): the values the public release ships (NVlabs/rcm,
#       rcm/configs/experiments/rcm/wan2pt1_t2v.py, called EXP below, and its defaults), with the source
#       of each value in PRESET_SOURCES. "wan2.1-1.3b-nvlabs", "wan2.1-14b-nvlabs": the same presets under
#       their earlier names (run configs saved before the release became the default name them).
#   "wan2.1-1.3b-paper", "wan2.1-14b-paper", "cosmos-predict2": the paper's values (arXiv 2510.08431;
#       rcm-algorithm.md sections 2-6).
#   Release (default) vs paper: EMA sigma_rel 0.10 vs 0.05; sampler mid times (1.5, 1.4, 1.0) vs
#       (1.3, 1.0, 0.6); 14B only: tangent warm-up 0 vs 200 steps, sigma_max 200 vs 80. Both: LR warm-up
#       100 updates (the release's; the paper states none).
#   Clip length is no preset field: the teacher's default clip (rcm_core.real.specs: 480 x 832 x 81 pixel
#       frames = 21 latent frames) is the release's 14B training clip (EXP: state_t=21); the release trains
#       1.3B on state_t=20 latent frames = 77 pixel frames ((20 - 1) * 4 + 1: pixel clips subsampled to 77,
#       latent clips cut to their first 20), which the project leaves to the frames option (--frames 77).
# The teacher's CFG weight is not part of a preset: it comes from the teacher (Teacher.guidance: Wan 5.0,
# Cosmos 4.5) unless DistillConfig.guidance overrides it.
# Project settings (not from either source): dtype, activation checkpointing and FSDP. Real teachers
# train with every block checkpointed: without it Wan2.1-1.3B at 480p x 81 frames runs out of
# memory on an 80 GiB H100 even for a plain fwd+bwd step (BENCHMARKS.md). Wan2.1-1.3B keeps each block's
# self-attention output ("keep_attention"; H200: plain -12 %, sCM -5 %, rCM student -6 %, critic -9 % against
# "full"; the run's peak, the critic step's 58.3 GiB, unchanged; BENCHMARKS.md); the larger networks stay on
# "full" until measured (a 14B block keeps 335 MB at 32K tokens, 13 GB for 40 blocks). Wan2.1-1.3B's replicated
# training state (~50 GiB) fits one 80 GiB GPU; the 14B and Cosmos-Predict2 (2B: ~76 GB replicated)
# shard with FSDP2. The fused sCM tangent works under FSDP2 when every block is checkpointed.
_WAN_13B_PAPER = dict(P_mean=0.7, P_std=1.6, tangent_warmup_steps=1000, student_update_freq=5,
                      lr_student=2e-6, lr_fake=4e-7, dmd_time="rf_shift", dmd_shift=5.0, sigma_max=80.0,
                      mid_t=(1.3, 1.0, 0.6), ema_sigma_rel=0.05, lr_warmup_steps=100, batch_size=256,
                      iterations=10_000, dtype="bfloat16", activation_checkpointing="keep_attention",
                      grad_ratio_every=0)
_WAN_14B_PAPER = dict(_WAN_13B_PAPER, P_mean=1.5, tangent_warmup_steps=200, student_update_freq=10,
                      lr_student=1e-6, lr_fake=1e-7, batch_size=64, fsdp=True, activation_checkpointing="full")
# the release: the paper's values but for these (PRESET_SOURCES["wan2.1-1.3b"] / ["wan2.1-14b"] say where)
_WAN_13B_RELEASE = dict(_WAN_13B_PAPER, ema_sigma_rel=0.10, mid_t=(1.5, 1.4, 1.0), lr_warmup_steps=100)
_WAN_14B_RELEASE = dict(_WAN_14B_PAPER, tangent_warmup_steps=0, sigma_max=200.0, ema_sigma_rel=0.10,
                        mid_t=(1.5, 1.4, 1.0), lr_warmup_steps=100)
PRESETS: dict[str, dict] = {
    "wan2.1-1.3b": _WAN_13B_RELEASE,
    "wan2.1-14b": _WAN_14B_RELEASE,
    "wan2.1-1.3b-paper": _WAN_13B_PAPER,
    "wan2.1-14b-paper": _WAN_14B_PAPER,
    "wan2.1-1.3b-nvlabs": _WAN_13B_RELEASE,      # earlier names of the defaults
    "wan2.1-14b-nvlabs": _WAN_14B_RELEASE,
    "cosmos-predict2": dict(P_mean=-0.8, P_std=1.6, tangent_warmup_steps=0, student_update_freq=5,
                            lr_student=1e-6, lr_fake=2e-7, dmd_time="lognormal",
                            dmd_P_mean=0.0, dmd_P_std=1.6, batch_size=256, iterations=10_000, dtype="bfloat16",
                            activation_checkpointing="full", fsdp=True, grad_ratio_every=0),
    # The embedded toy teacher: same algorithm, learning rates and lengths for minutes on a CPU.
    "embedded": dict(P_mean=0.0, P_std=1.6, tangent_warmup_steps=20, student_update_freq=2,
                     lr_student=1e-4, lr_fake=1e-4, dmd_time="rf_shift", dmd_shift=2.0, lr_warmup_steps=10,
                     batch_size=32, iterations=400, ema_sigma_rel=0.05, dtype="float32"),
}
# Wan2.2: no published rCM recipe (the paper and NVlabs/rcm cover Wan2.1 and Cosmos-Predict2). The presets take
# the default (release) Wan2.1 values of the closest configuration and the project's memory settings:
#   "wan2.2-ti2v-5b": the "wan2.1-1.3b" values (time distributions, K=5, tangent warm-up 1000, lr 2e-6 / 4e-7,
#       EMA 0.10, mid times (1.5, 1.4, 1.0), sigma_max 80); its
#       704 x 1280 x 121 latents (31 x 44 x 80 at 16x/4x, 27,280 tokens) are the size of Wan2.1's 480p x 81
#       (32,760); 5B parameters do not fit one 80 GiB GPU replicated (~190 GB of training state): FSDP2.
#   "wan2.2-t2v-a14b": each expert is a Wan2.1-14B network: the "wan2.1-14b" values (P_mean 1.5, K=10, no tangent
#       warm-up, sigma_max 200, lr 1e-6 / 1e-7, EMA 0.10, mid times (1.5, 1.4, 1.0), batch 64, FSDP2).
#       (Before the release became the default both took the paper's values: pass those as overrides to get them.)
#       The student is ONE network started from the low-noise expert
#       (DistillConfig.moe_student="one", the default; "two": both experts, rcm_core.denoiser.TimestepExperts;
#       BENCHMARKS.md "Wan2.2 A14B student: one network or two").
# The CFG weights (5.0; A14B 4.0 high-noise / 3.0 low-noise expert) and sampler shifts (5.0; 12.0) are the
# teachers' (rcm_core.real.specs, from Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py and wan_t2v_A14B.py).
PRESETS["wan2.2-ti2v-5b"] = dict(_WAN_13B_RELEASE, fsdp=True, activation_checkpointing="full")
PRESETS["wan2.2-t2v-a14b"] = dict(_WAN_14B_RELEASE)
PRESETS["cosmos-predict2-2b"] = PRESETS["cosmos-predict2"]
PRESETS["cosmos-predict2-14b"] = PRESETS["cosmos-predict2"]

_EXP = "NVlabs/rcm rcm/configs/experiments/rcm/wan2pt1_t2v.py"
_RELEASE_COMMON = {
    "loss_scale": f"{_EXP}: model.config.loss_scale=100.0",
    "loss_scale_dmd": f"{_EXP}: model.config.loss_scale_dmd=1.0",
    "P_mean": f"{_EXP}: p_G=LogNormal(p_mean=0.7 | 1.5 for 14B, p_std=1.6)",
    "P_std": f"{_EXP}: p_G=LogNormal(p_std=1.6)",
    "dmd_time": f"{_EXP}: p_D=UniformShift(shift=5.0)",
    "dmd_shift": f"{_EXP}: p_D=UniformShift(shift=5.0)",
    "rollout_max_steps": f"{_EXP}: max_simulation_steps_fake=4",
    "rollout_fixed_times": "rcm/models/t2v_model_distill_rcm.py: dmd_fix_timesteps=False (times drawn from p_D)",
    "betas": f"{_EXP}: optimizer betas=(0.0, 0.999)",
    "weight_decay": f"{_EXP}: optimizer weight_decay=0.01",
    "ema_sigma_rel": "rcm/configs/defaults/ema.py: PowerEMAConfig(rate=0.10)",
    "mid_t": "rcm/models/t2v_model_distill_rcm.py: backward_timesteps=[1.5, 1.4, 1.0]; "
             "rcm/inference/wan2pt1_t2v_rcm_infer.py: mid_t=[1.5, 1.4, 1.0]",
    "lr_warmup_steps": "rcm/configs/defaults/scheduler.py: LambdaLinearScheduler(warm_up_steps=[100], "
                       "f_start=[1e-6], f_max=f_min=[1.0])",
    "tangent_norm_c": "rcm/models/t2v_model_distill_rcm.py: g / (||g|| + 0.1)",
}
# Where each value of the release presets (the Wan2.1 defaults) comes from (file: key=value in NVlabs/rcm).
PRESET_SOURCES: dict[str, dict[str, str]] = {
    "wan2.1-1.3b": dict(_RELEASE_COMMON, **{
        "lr_student": f"{_EXP}: WAN2PT1_1PT3B optimizer.lr=2e-6",
        "lr_fake": f"{_EXP}: WAN2PT1_1PT3B optimizer_fake_score.lr=4e-7",
        "student_update_freq": f"{_EXP}: WAN2PT1_1PT3B student_update_freq=5",
        "tangent_warmup_steps": f"{_EXP}: WAN2PT1_1PT3B tangent_warmup=1000",
        "sigma_max": f"{_EXP}: WAN2PT1_1PT3B sigma_max=80",
    }),
    "wan2.1-14b": dict(_RELEASE_COMMON, **{
        "lr_student": f"{_EXP}: WAN2PT1_14B optimizer.lr=1e-6",
        "lr_fake": f"{_EXP}: WAN2PT1_14B optimizer_fake_score.lr=1e-7",
        "student_update_freq": f"{_EXP}: WAN2PT1_14B student_update_freq=10",
        "tangent_warmup_steps": f"{_EXP}: WAN2PT1_14B tangent_warmup=0",
        "sigma_max": f"{_EXP}: WAN2PT1_14B sigma_max=200 (the model's few-step sampler; "
                     "rcm/inference/wan2pt1_t2v_rcm_infer.py's --sigma_max defaults to 80 for both sizes)",
    }),
}
PRESET_SOURCES["wan2.1-1.3b-nvlabs"] = PRESET_SOURCES["wan2.1-1.3b"]
PRESET_SOURCES["wan2.1-14b-nvlabs"] = PRESET_SOURCES["wan2.1-14b"]

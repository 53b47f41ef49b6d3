"""``RCMScheduler``: the rCM student's few-step sampler as a diffusers scheduler.

The project's sampler (:func:`rcm_core.sampling.sample_student`) works in TrigFlow time
(``x_t = cos t x0 + sin t eps``): ``t_0 = arctan(sigma_max)``, then the mid times ``mid_t``;
at each time ``x0 = f(x, t_i)`` and ``x = cos t_{i+1} x0 + sin t_{i+1} eps_i`` with fresh noise.
A diffusers pipeline holds its latents in the transformer's own space instead; this scheduler
does the same step there:

* ``prediction_type="flow"`` (``WanPipeline``): latents are rectified-flow ``x_s = x_t / (cos t +
  sin t)`` at ``s = sin t / (cos t + sin t)``, the transformer predicts ``v = eps - x0`` at timestep
  ``timestep_scale * s``: ``x0 = x_s - s v``, then ``x_{s'} = ((cos t' x0 + sin t' eps) / (cos t' + sin t'))``
  ``= (1 - s') x0 + s' eps``.
* ``prediction_type="edm"`` (``Cosmos2TextToImagePipeline``): latents are ``x_t / cos t = x0 + sigma eps``
  (``sigma = tan t``), the pipeline hands over ``(x - x0_hat) / sigma``: ``x0 = x - sigma out``, then
  ``x0 + tan t' eps``.

The last step returns ``x0``. All arithmetic is float64 (float32 on MPS); the returned latents are
float32, or float64 when the model output or the latents are.

Why not a stock scheduler: ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` has this
step's formula, but (1) its sigmas come from ``shift`` and a linspace starting at 1.0 - no config
field holds an arbitrary list (``sigma_max`` 80 is ``s_0 = 80/81``, the mid times are free), and the
Wan pipeline only passes ``num_inference_steps``; (2) it computes in float32 (``sample.to(float32)``);
(3) the Wan pipeline does not pass its generator to ``step``, so its renoising noise is not
reproducible from the pipeline's generator. LCM/TCD schedulers are not rectified flow.

Noise: ``step(..., generator=g)`` draws the renoising noise from ``g``; pipelines that do not pass
one (``WanPipeline``) use the generator set by :meth:`RCMScheduler.set_noise_generator`, else the
global torch RNG. Draws are float64 ``randn`` of the latents' shape, one per step after the
first, in step order - the same draws as ``sample_student(..., generator=g)``.

Start: the sampler starts from ``x_t0 = eps``, i.e. latents ``eps * init_noise_sigma``
(``1 / (cos t0 + sin t0)``, 0.9877 for sigma_max 80, in "flow"; ``1 / cos t0`` in "edm").
``WanPipeline`` does not scale its initial noise, so for the exact sampler pass
``latents=pipe.scheduler.init_noise_sigma * noise`` (``rcm_core.export.initial_latents``); without it
the first step sees ``eps`` itself: the sampler from ``eps * (cos t0 + sin t0)``.

The config is checked when the scheduler is built (``from_pretrained`` / ``from_config`` too):
``num_inference_steps`` in 1-4 and no more than ``len(mid_t) + 1``; the times ``arctan(sigma_max) >
mid_t[0] > mid_t[1] > ... > 0`` strictly decreasing (so the sigmas ``tan t``).

This module needs only ``torch`` and ``diffusers``. Exported pipelines name it in
``model_index.json`` as ``["rcm_core.scheduler", "RCMScheduler"]``: ``import rcm_core.scheduler``
before ``DiffusionPipeline.from_pretrained`` (diffusers resolves a non-diffusers class only from an
imported module), or pass ``scheduler=RCMScheduler.from_pretrained(path, subfolder="scheduler")``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["RCMScheduler", "RCMSchedulerOutput", "check_sampler", "MAX_STEPS", "PREDICTION_TYPES"]

MAX_STEPS = 4
PREDICTION_TYPES = ("flow", "edm")


@dataclass
class RCMSchedulerOutput(BaseOutput):
    """``prev_sample``: the latents for the next step (after the last step: the clean sample);
    ``pred_original_sample``: this step's x0 estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


def check_sampler(sigma_max: float, mid_t: Sequence[float], num_inference_steps: int,
                  prediction_type: str = "flow", timestep_scale: float = 1000.0) -> List[float]:
    """Validate a sampler config; returns the TrigFlow times ``[arctan(sigma_max), *mid_t]``.

    Raises ValueError naming the field: steps outside 1-4 (or beyond ``len(mid_t) + 1``), a
    non-positive / non-finite ``sigma_max``, times that do not strictly decrease (sigmas ``tan t``
    non-decreasing) or leave (0, pi/2), an unknown ``prediction_type``.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"RCMScheduler config: prediction_type {prediction_type!r}; known: {PREDICTION_TYPES} "
                         "(flow: rectified-flow latents and velocity, WanPipeline; edm: x0 + sigma eps, Cosmos2)")
    try:
        steps = int(num_inference_steps)
    except (TypeError, ValueError):
        raise ValueError(f"RCMScheduler config: num_inference_steps {num_inference_steps!r} is not an integer") from None
    if steps != num_inference_steps or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"RCMScheduler config: num_inference_steps {num_inference_steps!r} outside 1-{MAX_STEPS} "
                         f"(the rCM student samples in 1 to {MAX_STEPS} steps)")
    try:
        sm = float(sigma_max)
        mids = [float(t) for t in (mid_t or ())]
        scale = float(timestep_scale)
    except (TypeError, ValueError):
        raise ValueError(f"RCMScheduler config: sigma_max {sigma_max!r}, mid_t {mid_t!r} and timestep_scale "
                         f"{timestep_scale!r} must be numbers") from None
    if not (math.isfinite(sm) and sm > 0):
        raise ValueError(f"RCMScheduler config: sigma_max {sigma_max!r} must be a finite number > 0")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"RCMScheduler config: timestep_scale {timestep_scale!r} must be a finite number > 0")
    if steps - 1 > len(mids):
        raise ValueError(f"RCMScheduler config: num_inference_steps {steps} needs {steps - 1} mid times, mid_t has "
                         f"{len(mids)} ({mids})")
    times = [math.atan(sm), *mids]
    bad = [i for i in range(1, len(times)) if not times[i] < times[i - 1]]
    if bad or any(not (0.0 < t < math.pi / 2) for t in times):
        sig = ", ".join(f"{math.tan(t):.6g}" if 0 < t < math.pi / 2 else f"(t={t})" for t in times)
        raise ValueError(
            f"RCMScheduler config: the sigmas must strictly decrease and stay positive: sigma_max {sm:g} "
            f"(t={times[0]:.6g}) then mid_t {mids} give sigmas tan t = [{sig}]"
            + (f"; t[{bad[0]}]={times[bad[0]]:.6g} is not below t[{bad[0] - 1}]={times[bad[0] - 1]:.6g}" if bad
               else "; every time must lie in (0, pi/2)"))
    return times


def _t(value: float, device=None, dtype=torch.float64) -> torch.Tensor:
    """A one-element float64 tensor (the scalar arithmetic of the project's sampler, op for op)."""
    return torch.full((1,), float(value), dtype=dtype, device=device)


class RCMScheduler(SchedulerMixin, ConfigMixin):
    """The rCM few-step sampler (see the module doc).

    Config: ``sigma_max`` (TrigFlow/EDM sigma of the first step), ``mid_t`` (TrigFlow times of the
    later steps), ``num_inference_steps`` (the default number of steps, 1-4), ``prediction_type``
    ("flow" | "edm"), ``timestep_scale`` (the transformer's timestep is ``timestep_scale * s``:
    1000 for Wan2.1, 1 for Cosmos-Predict2), ``num_train_timesteps`` (diffusers pipelines read it).
    """

    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(self, sigma_max: float = 80.0, mid_t: Sequence[float] = (1.3, 1.0, 0.6),
                 num_inference_steps: int = 4, prediction_type: str = "flow", timestep_scale: float = 1000.0,
                 num_train_timesteps: int = 1000):
        # kept apart from the config: Cosmos2's pipeline writes its own sigma_max into the config
        self._times = check_sampler(sigma_max, mid_t, num_inference_steps, prediction_type, timestep_scale)
        self._kind = prediction_type
        self._scale = float(timestep_scale)
        self._noise_generator = None
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None
        self.set_timesteps(int(num_inference_steps))

    # ---- what pipelines read ----------------------------------------------------------------------
    @property
    def init_noise_sigma(self) -> float:
        """Scale of the initial latents relative to unit noise (the sampler starts from ``x_t0 = eps``)."""
        t0 = self._times[0]
        return 1.0 / (math.cos(t0) + math.sin(t0)) if self._kind == "flow" else 1.0 / math.cos(t0)

    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    @property
    def trigflow_times(self) -> List[float]:
        """The TrigFlow times of the current schedule, ending with 0."""
        return list(self._run_times)

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def set_noise_generator(self, generator: Union[torch.Generator, List[torch.Generator], None]) -> "RCMScheduler":
        """The generator(s) ``step`` draws the renoising noise from when the pipeline passes none
        (``WanPipeline`` never does). Pass the pipeline's generator to continue its draws; None: the
        global torch RNG."""
        self._noise_generator = generator
        return self

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      sigmas=None, timesteps=None, **_ignored) -> None:
        """Schedule ``num_inference_steps`` steps (1-4; default the config's).

        ``sigmas`` / ``timesteps`` given by a pipeline (Cosmos2 passes a placeholder ``linspace(0, 1, n)``)
        set only the number of steps: the times are the config's, the ones the student was distilled for.
        """
        n = num_inference_steps
        if n is None:
            given = sigmas if sigmas is not None else timesteps
            n = len(given) if given is not None else int(self.config.num_inference_steps)
        limit = min(MAX_STEPS, len(self._times))
        if int(n) != n or not 1 <= int(n) <= limit:
            raise ValueError(f"RCMScheduler: {n!r} inference steps; this student samples in 1 to {limit} steps "
                             f"(sigma_max {self.config.sigma_max}, mid_t {list(self.config.mid_t)})")
        n = int(n)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        dtype = torch.float32 if dev.type == "mps" else torch.float64
        self.num_inference_steps = n
        self._run_times = [*self._times[:n], 0.0]
        steps, sig = [], []
        for t in self._run_times:
            tt = _t(t)
            # sigmas: RF s = sin t / (cos t + sin t) ("flow") or tan t ("edm"), ending with 0
            sig.append(float(torch.sin(tt) / (torch.cos(tt) + torch.sin(tt))) if self._kind == "flow"
                       else float(torch.tan(tt)))
            if t > 0:
                # the timestep exactly as the project computes c_noise (rcm_core.trigflow.rf_preconditioning)
                steps.append(float(self._scale * torch.sin(tt) / (torch.cos(tt) + torch.sin(tt))))
        self.timesteps = torch.tensor(steps, dtype=dtype, device=dev)
        self.sigmas = torch.tensor(sig, dtype=dtype, device=dev)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        sched = self.timesteps if schedule_timesteps is None else schedule_timesteps
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        d = (sched.double().cpu() - value).abs()
        i = int(torch.argmin(d))
        if float(d[i]) > 1e-6 * max(1.0, abs(value)):
            raise ValueError(f"RCMScheduler: timestep {value} is not one of this schedule's {sched.tolist()}")
        return i

    def _init_step_index(self, timestep) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    # ---- the step ---------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep: Union[float, torch.Tensor], sample: torch.Tensor,
             generator: Union[torch.Generator, List[torch.Generator], None] = None,
             return_dict: bool = True) -> Union[RCMSchedulerOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """One rCM step: x0 from the model output, then (unless last) renoise to the next time."""
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise ValueError(f"RCMScheduler: step {i + 1} of a {self.num_inference_steps}-step schedule; call "
                             "set_timesteps before sampling again")
        dev = sample.device
        wide = torch.float32 if dev.type == "mps" else torch.float64
        out_dtype = torch.promote_types(torch.promote_types(sample.dtype, model_output.dtype), torch.float32)
        x = sample.to(wide)
        out = model_output.to(wide)
        t, t_next = _t(self._run_times[i], dev, wide), _t(self._run_times[i + 1], dev, wide)
        cos, sin = torch.cos(t), torch.sin(t)
        if self._kind == "flow":
            x0 = x + (-sin / (cos + sin)) * out            # x_s - s v (c_skip x_t + c_out v)
        else:
            x0 = x - (sin / cos) * out                     # x - sigma eps_hat
        if float(t_next) > 0:
            gen = generator if generator is not None else self._noise_generator
            eps = randn_tensor(tuple(x.shape), generator=gen, device=dev, dtype=wide)
            cn, sn = torch.cos(t_next), torch.sin(t_next)
            x_t = cn * x0 + sn * eps                       # TrigFlow x_{t'} as the project's noisy_sample
            prev = (1 / (cn + sn)) * x_t if self._kind == "flow" else x_t / cn
        else:
            prev = x0
        self._step_index = i + 1
        prev, x0 = prev.to(out_dtype), x0.to(out_dtype)
        if not return_dict:
            return prev, x0
        return RCMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

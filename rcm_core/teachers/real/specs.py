"""Declarations of the real teachers (Wan2.1 T2V 1.3B/14B, Cosmos-Predict2 2B/14B T2I).

Everything the loader needs to know about a teacher without its weights: the
diffusers / transformers classes, the architecture numbers the weights must match,
the parameterisation, guidance, sampler, default resolution and DistillConfig preset.

Parameterisations (derived from diffusers 0.42 pipelines, see tests):

* Wan2.1 (``pipeline_wan.py``): rectified flow, the transformer sees
  ``x_s = (1 - s) x0 + s eps`` at timestep ``1000 s`` and predicts ``v = eps - x0``.
* Cosmos-Predict2 (``pipeline_cosmos2_text2image.py``): EDM latents ``x = x0 + sigma eps``
  (sigma_data = 1) with ``current_t = sigma / (1 + sigma)``, ``c_in = 1 - current_t``,
  ``c_skip = 1 - current_t``, ``c_out = -current_t`` and the transformer called at
  timestep ``current_t``. Since ``c_in x = (1 - s) x0 + s eps`` with ``s = current_t``, and
  ``x0_hat = (1 - s) x - s net = x_s - s net``, the network predicts the RF velocity
  ``eps - x0`` at timestep ``1 * s``. In TrigFlow time (sigma = tan t, same SNR) this is
  the ``"rf"`` kind with ``timestep_scale = 1.0``: no new kind is needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

# Wan's standard negative prompt, as shipped in Wan2.1 (wan/configs/shared_config.py).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# diffusers' Cosmos-Predict2 default negative prompt (pipeline_cosmos2_text2image.DEFAULT_NEGATIVE_PROMPT).
COSMOS_NEGATIVE_PROMPT = (
    "The video captures a series of frames showing ugly scenes, static with no motion, motion blur, "
    "over-saturation, shaky footage, low resolution, grainy texture, pixelated images, poorly lit areas, "
    "underexposed and overexposed scenes, poor color balance, washed out colors, choppy sequences, jerky "
    "movements, low frame rate, artifacting, color banding, unnatural transitions, outdated special effects, "
    "fake elements, unconvincing visuals, poorly edited content, jump cuts, visual noise, and flickering. "
    "Overall, the video is of poor quality."
)


@dataclass(frozen=True)
class RealTeacherSpec:
    name: str
    family: str                          # "wan" | "cosmos"
    hf_id: str                           # Hugging Face repo in diffusers layout
    transformer_class: str               # diffusers class name
    transformer_config: dict             # architecture numbers the checkpoint must match
    text_encoder_class: str              # transformers class name
    text_len: int                        # tokens per prompt (padding / truncation length)
    vae_class: str
    param_kind: str
    timestep_scale: float
    guidance: float
    negative_prompt: str
    sample_steps: int
    shift: float
    solver: str
    preset: str                          # DistillConfig preset
    task: str                            # "t2v" | "t2i"
    frames: int                          # default pixel frames (1 for images)
    height: int
    width: int
    fps: int = 16
    notes: dict = field(default_factory=dict)
    # Wan generation: "wan2.1" (also Cosmos), "wan2.2-ti2v" (Wan2.2 VAE, z_dim 48, 16x spatial, per-token
    # timesteps in the pipeline) or "wan2.2-a14b" (two experts, transformer / transformer_2)
    variant: str = ""
    vae_config: dict = field(default_factory=dict)     # VAE numbers a checkpoint must match (z_dim, patch_size)
    guidance_2: Optional[float] = None   # CFG weight of the low-noise expert (WanPipeline guidance_scale_2)
    boundary_ratio: Optional[float] = None   # expert switch: transformer at timesteps >= ratio * 1000

    @property
    def is_video(self) -> bool:
        return self.task == "t2v"


_WAN_COMMON = dict(patch_size=[1, 2, 2], attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                   freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                   rope_max_seq_len=1024)
_COSMOS_COMMON = dict(in_channels=16, out_channels=16, attention_head_dim=128, mlp_ratio=4.0, text_embed_dim=1024,
                      adaln_lora_dim=256, max_size=[128, 240, 240], patch_size=[1, 2, 2], concat_padding_mask=True)


def _wan(size: str, heads: int, ffn_dim: int, layers: int) -> RealTeacherSpec:
    """Wan2.1 text-to-video at 480p x 81 frames: everything but the transformer's size is shared."""
    return RealTeacherSpec(
        name=f"wan2.1-{size}", family="wan", hf_id=f"Wan-AI/Wan2.1-T2V-{size.upper()}-Diffusers",
        transformer_class="WanTransformer3DModel",
        transformer_config=dict(_WAN_COMMON, num_attention_heads=heads, ffn_dim=ffn_dim, num_layers=layers),
        text_encoder_class="UMT5EncoderModel", text_len=512, vae_class="AutoencoderKLWan",
        param_kind="rf", timestep_scale=1000.0, guidance=5.0, negative_prompt=WAN_NEGATIVE_PROMPT,
        sample_steps=50, shift=5.0, solver="unipc", preset=f"wan2.1-{size}", task="t2v",
        frames=81, height=480, width=832, variant="wan2.1", vae_config=dict(z_dim=16))


def _cosmos(size: str, heads: int, layers: int) -> RealTeacherSpec:
    """Cosmos-Predict2 text-to-image at 768 x 1360: everything but the transformer's size is shared."""
    return RealTeacherSpec(
        name=f"cosmos-predict2-{size}", family="cosmos", hf_id=f"nvidia/Cosmos-Predict2-{size.upper()}-Text2Image",
        transformer_class="CosmosTransformer3DModel",
        transformer_config=dict(_COSMOS_COMMON, num_attention_heads=heads, num_layers=layers,
                                rope_scale=[1.0, 4.0, 4.0], extra_pos_embed_type=None),
        text_encoder_class="T5EncoderModel", text_len=512, vae_class="AutoencoderKLWan",
        param_kind="rf", timestep_scale=1.0, guidance=4.5, negative_prompt=COSMOS_NEGATIVE_PROMPT,
        sample_steps=35, shift=1.0, solver="euler", preset="cosmos-predict2", task="t2i",
        frames=1, height=768, width=1360,
        notes={"guidance_convention": "project CFG uncond + w (cond - uncond); diffusers' Cosmos2 pipeline uses "
                                      "cond + g (cond - uncond), i.e. w = g + 1"})


# Wan2.2 (Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py, wan_t2v_A14B.py; diffusers
# scripts/convert_wan_to_diffusers.py for the diffusers layout):
# * TI2V-5B: 24 heads x 128, ffn 14336, 30 layers, in/out 48 channels; the Wan2.2 VAE (z_dim 48, patchify 2,
#   vae_stride (4, 16, 16)); 121 frames at 704 x 1280 (model card: 720P = 1280 x 704), 24 fps, 50 steps,
#   sample_shift 5.0 (the diffusers scheduler's flow_shift is 5.0 too), guide scale 5.0; the diffusers
#   pipeline has expand_timesteps=True (per-token timesteps; for text-to-video all equal to t).
# * T2V-A14B: two Wan2.1-14B-shaped experts, high noise in ``transformer``, low noise in ``transformer_2``,
#   switched at boundary 0.875 (WanPipeline: transformer at timesteps >= 0.875 * 1000); 81 frames at
#   720 x 1280, 16 fps, 40 steps, sample_shift 12.0 (the converted diffusers repo's scheduler keeps
#   flow_shift 3.0: the project follows the release config), guide scale (low 3.0, high 4.0).
_WAN22_VAE = dict(z_dim=48, patch_size=2, is_residual=True)


def _wan22_ti2v_5b() -> RealTeacherSpec:
    return RealTeacherSpec(
        name="wan2.2-ti2v-5b", family="wan", hf_id="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        transformer_class="WanTransformer3DModel",
        transformer_config=dict(_WAN_COMMON, in_channels=48, out_channels=48, num_attention_heads=24,
                                ffn_dim=14336, num_layers=30),
        text_encoder_class="UMT5EncoderModel", text_len=512, vae_class="AutoencoderKLWan",
        param_kind="rf", timestep_scale=1000.0, guidance=5.0, negative_prompt=WAN_NEGATIVE_PROMPT,
        sample_steps=50, shift=5.0, solver="unipc", preset="wan2.2-ti2v-5b", task="t2v",
        frames=121, height=704, width=1280, fps=24, variant="wan2.2-ti2v", vae_config=dict(_WAN22_VAE))


def _wan22_t2v_a14b() -> RealTeacherSpec:
    return RealTeacherSpec(
        name="wan2.2-t2v-a14b", family="wan", hf_id="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        transformer_class="WanTransformer3DModel",
        transformer_config=dict(_WAN_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
        text_encoder_class="UMT5EncoderModel", text_len=512, vae_class="AutoencoderKLWan",
        param_kind="rf", timestep_scale=1000.0, guidance=4.0, guidance_2=3.0, boundary_ratio=0.875,
        negative_prompt=WAN_NEGATIVE_PROMPT, sample_steps=40, shift=12.0, solver="unipc",
        preset="wan2.2-t2v-a14b", task="t2v", frames=81, height=720, width=1280, fps=16, variant="wan2.2-a14b",
        vae_config=dict(z_dim=16))


SPECS = {spec.name: spec for spec in (
    _wan("1.3b", heads=12, ffn_dim=8960, layers=30),
    _wan("14b", heads=40, ffn_dim=13824, layers=40),
    _wan22_ti2v_5b(),
    _wan22_t2v_a14b(),
    _cosmos("2b", heads=16, layers=28),
    _cosmos("14b", heads=40, layers=36),
)}

# Architecture numbers compared between a checkpoint's transformer/config.json and a spec
# (others, e.g. rope details, are taken from the checkpoint as is).
CHECKED_KEYS = {
    "wan": ("num_attention_heads", "attention_head_dim", "num_layers", "in_channels", "out_channels", "ffn_dim",
            "text_dim", "patch_size"),
    "cosmos": ("num_attention_heads", "attention_head_dim", "num_layers", "in_channels", "out_channels",
               "text_embed_dim", "patch_size"),
}

FAMILY_OF_CLASS = {"WanTransformer3DModel": "wan", "CosmosTransformer3DModel": "cosmos"}
# the diffusers pipelines (model_index.json ``_class_name``) a teacher directory may be, and what they are
PIPELINE_CLASSES = {"WanPipeline": "Wan2.1 / Wan2.2 text-to-video",
                    "Cosmos2TextToImagePipeline": "Cosmos-Predict2 text-to-image"}


def _hidden(cfg: dict) -> int:
    return int(cfg.get("num_attention_heads", 0)) * int(cfg.get("attention_head_dim", 0))


def transformer_params(family: str, cfg: dict) -> int:
    """Approximate transformer parameter count from the architecture config (no weights, no diffusers).

    Per block: self- and cross-attention (4 d^2 each) plus the MLP (2 d ffn); close enough (a few %)
    to place a checkpoint among the known sizes.
    """
    d, layers = _hidden(cfg), int(cfg.get("num_layers", 0))
    ffn = int(cfg.get("ffn_dim", 0)) if family == "wan" else int(float(cfg.get("mlp_ratio", 4.0)) * d)
    return layers * (8 * d * d + 2 * d * ffn)


def _base_variant(family: str) -> str:
    return "wan2.1" if family == "wan" else ""


def matching_spec(transformer_config: dict, variant: Optional[str] = None) -> Optional[RealTeacherSpec]:
    """The known spec of ``variant`` (default: the family's first generation, Wan2.1) whose architecture
    numbers (:data:`CHECKED_KEYS`) the config matches exactly, else None.

    The transformer config alone cannot tell Wan2.2-A14B from Wan2.1-14B (same expert architecture): the
    variant comes from the directory (:func:`rcm_core.real.loading.detect_variant`).
    """
    family = FAMILY_OF_CLASS.get(transformer_config.get("_class_name", ""))
    if family is None:
        return None
    variant = _base_variant(family) if variant is None else variant
    for spec in SPECS.values():
        if spec.family == family and spec.variant == variant and all(
                _as_list(transformer_config.get(k)) == _as_list(spec.transformer_config[k])
                for k in CHECKED_KEYS[family] if k in spec.transformer_config):
            return spec
    return None


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def spec_for_config(transformer_config: dict, name: Optional[str] = None,
                    variant: Optional[str] = None) -> Optional[RealTeacherSpec]:
    """The spec of a checkpoint, from its ``transformer/config.json`` (None: not a supported class).

    The family comes from ``_class_name``. A config that matches a known teacher's architecture
    numbers exactly (:func:`matching_spec`) is that teacher. Any other size is a custom teacher of
    the family, named ``name`` (the directory's label; default ``<family>-custom``): its sampler
    settings are the family's, and its DistillConfig preset that of the known size nearest in
    parameter count (computed from the config; ``notes["preset_reason"]`` says so). ``variant``
    (``"wan2.1"``, ``"wan2.2-ti2v"``, ``"wan2.2-a14b"``; default the family's first): only specs of that
    Wan generation are candidates, so a Wan2.2 directory is never labelled Wan2.1 (or the reverse).
    """
    from dataclasses import replace

    family = FAMILY_OF_CLASS.get(transformer_config.get("_class_name", ""))
    if family is None:
        return None
    variant = _base_variant(family) if variant is None else variant
    known = matching_spec(transformer_config, variant)
    if known is not None:
        return known
    n = transformer_params(family, transformer_config)
    ranked = sorted((abs(math.log(max(n, 1) / transformer_params(family, s.transformer_config))), s.name)
                    for s in SPECS.values() if s.family == family and s.variant == variant)
    if not ranked:
        raise ValueError(f"no known {family} teacher of variant {variant!r}")
    nearest = SPECS[ranked[0][1]]
    arch = {k: transformer_config.get(k) for k in CHECKED_KEYS[family] if k in transformer_config}
    what = variant or family
    reason = (f"custom {what} size (~{n / 1e6:.3g}M transformer parameters from config.json, no known "
              f"{what} teacher has this architecture): DistillConfig preset {nearest.preset!r} of the "
              f"nearest known size, {nearest.name}")
    return replace(nearest, name=name or f"{family}-custom", hf_id="", transformer_config=arch,
                   notes={**nearest.notes, "size": "custom", "preset_reason": reason})

"""Load real teachers (Wan2.1, Cosmos-Predict2) from diffusers-layout weights, offline.

Weights come from a local directory in diffusers layout::

    <root>/model_index.json
    <root>/transformer/{config.json, diffusion_pytorch_model*.safetensors}
    <root>/text_encoder/{config.json, model*.safetensors}
    <root>/tokenizer/{tokenizer_config.json, tokenizer.json | spiece.model}
    <root>/vae/{config.json, diffusion_pytorch_model.safetensors}

found (in order) from the ``weights=`` argument, ``$RCM_WEIGHTS_<NAME>`` (e.g.
``RCM_WEIGHTS_WAN2_1_1_3B``), ``$RCM_WEIGHTS_ROOT/<repo name>``, or the Hugging Face
cache (``local_files_only=True``: nothing is downloaded).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from ...nets.denoiser import Parameterization
from ..base import Teacher
from .attention import install_rcm_attention
from ...nets.block_ops import install_fused_block_ops
from ...nets.library_logs import cast_quietly, count_tokens
from .time_embedding import install_fp32_time_embedding
# the weights on disk (rcm_core.teachers.real.layout); all re-exported, so rcm_core.real.loading keeps every name
from .layout import (LAYOUT_HELP, RealTeacherError, _check_spec_config, _COMPONENTS, _download_help,  # noqa: F401
                     _env_name, _expected_state, _has_weights, _lists_component, _norm, _read_json, _RECOPY,
                     _ST_BYTES, _weight_files, check_layout, check_pipeline_class, check_weights, detect_variant,
                     is_diffusers_dir, read_safetensors_header, resolve_weights, UnsupportedTeacherError, vae_factors)
from .specs import FAMILY_OF_CLASS, SPECS, RealTeacherSpec, spec_for_config

__all__ = ["RealTeacherError", "resolve_weights", "check_layout", "load_real_teacher", "load_teacher_from_path",
           "inspect_real_teacher", "inspect_teacher_path",
           "is_diffusers_dir", "RealTextEncoder", "LatentCodec", "check_resolution", "latent_shape_for",
           "diffusers_rf_call", "cosmos_call", "read_safetensors_header", "check_weights", "teacher_dir_label",
           "small_size", "cpu_default_size", "detect_variant", "vae_factors"]

def diffusers_rf_call(net, x, timestep, cond):
    return net(hidden_states=x, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]


def _ensure_cosmos_resize() -> None:
    """diffusers' Cosmos resizes its padding mask with torchvision; shim it when torchvision is absent."""
    import diffusers.models.transformers.transformer_cosmos as tc
    if hasattr(tc, "transforms"):
        return

    class _Functional:
        @staticmethod
        def resize(x, size, interpolation=None):
            return torch.nn.functional.interpolate(x, size=list(size), mode="nearest")

    class _Transforms:
        functional = _Functional
        class InterpolationMode:  # noqa: N801
            NEAREST = "nearest"

    tc.transforms = _Transforms


def cosmos_call(net, x, timestep, cond):
    """Cosmos-Predict2 as its text-to-image pipeline calls it (all-zero padding mask)."""
    kw = {}
    if net.config.concat_padding_mask:
        _ensure_cosmos_resize()
        kw["padding_mask"] = x.new_zeros(1, 1, x.shape[-2], x.shape[-1])
    return net(hidden_states=x, timestep=timestep, encoder_hidden_states=cond, return_dict=False, **kw)[0]


# ---- text ----------------------------------------------------------------------------

class RealTextEncoder:
    """Prompts -> (B, max_length, D) float32 embeddings, padding zeroed (as the diffusers pipelines).

    Prompts longer than ``max_length`` tokens are truncated, said once per encoder (one warning naming the
    first such prompt and how many there were in that call).
    """

    def __init__(self, tokenizer, model, max_length: int, device="cpu"):
        self.tokenizer, self.model, self.max_length, self.device = tokenizer, model, int(max_length), device
        self.said_truncation = False

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [re.sub(r"\s+", " ", p).strip() for p in prompts]
        if not self.said_truncation:
            counts = [count_tokens(self.tokenizer, p) for p in prompts]
            long = [(i, n) for i, n in enumerate(counts) if n > self.max_length]
            if long:
                self.said_truncation = True
                i, n = long[0]
                warnings.warn(f"{len(long)} prompt(s) longer than the text encoder's limit of {self.max_length} "
                              f"tokens: truncated to {self.max_length} tokens (the end is ignored; said once per "
                              f"encoder), e.g. prompt {i} of {n} tokens: {prompts[i][:60]!r}...", UserWarning,
                              stacklevel=3)
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        emb = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return emb * mask[..., None].to(emb.dtype)

    encode = __call__


# ---- VAE and resolutions ---------------------------------------------------------------

def _factors(vae_config: dict, transformer_config: dict) -> tuple[int, int, int]:
    t_vae, s_vae = vae_factors(vae_config)
    p = transformer_config.get("patch_size", [1, 2, 2])
    return t_vae * p[0], s_vae * p[1], s_vae * p[2] if len(p) > 2 else s_vae * p[1]


def check_resolution(frames: int, height: int, width: int, *, vae_config: dict, transformer_config: dict,
                     video: bool = True) -> None:
    """Raise ValueError, naming the nearest valid size, unless the VAE and patch factors divide the size."""
    t_vae = vae_factors(vae_config)[0]
    _, fh, fw = _factors(vae_config, transformer_config)
    problems = []
    near_h = max(fh, int(round(height / fh)) * fh)
    near_w = max(fw, int(round(width / fw)) * fw)
    if height % fh or height <= 0:
        problems.append(f"height {height} is not a multiple of {fh} (VAE x patch); nearest valid {near_h}")
    if width % fw or width <= 0:
        problems.append(f"width {width} is not a multiple of {fw} (VAE x patch); nearest valid {near_w}")
    if video:
        pt = transformer_config.get("patch_size", [1, 2, 2])[0]
        step = t_vae * pt
        near_f = max(1, int(round((frames - 1) / step)) * step + 1)
        if frames < 1 or (frames - 1) % step:
            problems.append(f"frames {frames} is not {step}k+1 (VAE temporal factor {t_vae}); nearest valid {near_f}")
    elif frames != 1:
        problems.append(f"frames {frames}: this teacher is text-to-image, frames must be 1")
    if problems:
        raise ValueError("unsupported resolution: " + "; ".join(problems)
                         + f". Nearest valid size: {near_f if video else 1} x {near_h} x {near_w} (frames x H x W)")


def latent_shape_for(frames: int, height: int, width: int, *, vae_config: dict, transformer_config: dict,
                     video: bool = True) -> tuple:
    check_resolution(frames, height, width, vae_config=vae_config, transformer_config=transformer_config, video=video)
    t_vae, s_vae = vae_factors(vae_config)
    return (int(vae_config.get("z_dim", 16)), (frames - 1) // t_vae + 1, height // s_vae, width // s_vae)


class LatentCodec:
    """Normalised latents (unit std, VAE latents_mean/std) <-> pixels in [0, 1]."""

    def __init__(self, vae, video: bool = True):
        self.vae, self.video = vae, video
        c = vae.config
        z = int(c.z_dim)
        self.mean = torch.tensor(c.latents_mean, dtype=torch.float64).view(1, z, 1, 1, 1)
        self.std = torch.tensor(c.latents_std, dtype=torch.float64).view(1, z, 1, 1, 1)
        if self.mean.numel() != z or self.std.numel() != z:
            raise RealTeacherError(f"VAE config: latents_mean/std have {self.mean.numel()}/{self.std.numel()} "
                                   f"entries, z_dim is {z}")

    def _dt(self):
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T, h, w) normalised latents -> (B, 3, F, H, W) video (or (B, 3, H, W) image) in [0, 1]."""
        dev = next(self.vae.parameters()).device
        raw = latents.to(torch.float64).cpu() * self.std + self.mean
        x = self.vae.decode(raw.to(dev, self._dt()), return_dict=False)[0]
        x = ((x.float() + 1) / 2).clamp(0, 1)
        return x if self.video else x[:, :, 0]

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1], (B, 3, F, H, W) or (B, 3, H, W) -> normalised latents (mode of the posterior)."""
        if pixels.dim() == 4:
            pixels = pixels[:, :, None]
        dev = next(self.vae.parameters()).device
        post = self.vae.encode((pixels * 2 - 1).to(dev, self._dt())).latent_dist
        return ((post.mode().to(torch.float64).cpu() - self.mean) / self.std).float()


# ---- assembling a Teacher -------------------------------------------------------------

def _version(root: Path) -> str:
    h = hashlib.sha256()
    for sub in ("transformer", "text_encoder", "vae"):
        for f in sorted((root / sub).glob("*")):
            if f.is_file():
                h.update(f"{sub}/{f.name}:{f.stat().st_size}".encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _load(what: str, root: Path, fn):
    try:
        return fn()
    except RealTeacherError:
        raise
    except Exception as e:
        raise RealTeacherError(f"could not load the {what} from {root / what}: {type(e).__name__}: {e}") from e


def _prepare(name_or_spec, weights, strict_config, frames, height, width, transformer_weights=True):
    """Locate and check a checkpoint (files, configs, resolution) without loading weights."""
    spec = SPECS[name_or_spec] if isinstance(name_or_spec, str) else name_or_spec
    root = resolve_weights(spec, weights)
    cfg = check_layout(root, transformer_weights=transformer_weights)
    if strict_config:
        if cfg["transformer"].get("_class_name") != spec.transformer_class:
            _check_spec_config(spec, cfg, root)          # names the class mismatch
    elif cfg["transformer"].get("_class_name") != spec.transformer_class:
        raise RealTeacherError(f"{root}: transformer {cfg['transformer'].get('_class_name')!r} does not match "
                               f"{spec.transformer_class!r}")
    variant = detect_variant(root, cfg)
    if variant != spec.variant and not strict_config:
        # a spec derived from transformer/config.json alone (e.g. spec_for_config without the directory): the
        # checkpoint's own generation decides (A14B's experts look like Wan2.1-14B, TI2V's like a custom Wan2.1)
        spec = spec_for_config(cfg["transformer"], name=spec.name, variant=variant)
    if variant != spec.variant:
        raise RealTeacherError(f"{root}: a {variant or spec.family} checkpoint, teacher {spec.name!r} is "
                               f"{spec.variant or spec.family} ({_variant_evidence(variant)}); wrong checkpoint for "
                               "this teacher?")
    if strict_config:
        _check_spec_config(spec, cfg, root)
    vae_cfg, tcfg = cfg["vae"], cfg["transformer"]
    frames = spec.frames if frames is None else int(frames)
    height = spec.height if height is None else int(height)
    width = spec.width if width is None else int(width)
    latent_shape = latent_shape_for(frames, height, width, vae_config=vae_cfg, transformer_config=tcfg,
                                    video=spec.is_video)
    return spec, root, cfg, (frames, height, width), latent_shape


def _variant_evidence(variant: str) -> str:
    return {"wan2.2-a14b": "model_index.json lists transformer_2 with a boundary_ratio",
            "wan2.2-ti2v": "vae/config.json is the Wan2.2 VAE: patch_size set",
            "wan2.1": "one transformer, a Wan2.1 VAE without patch_size"}.get(variant, "transformer/config.json")


def small_size(vae_config: dict, transformer_config: dict, video: bool = True) -> tuple:
    """A small valid (frames, height, width): 2 latent frames (1 frame for images) and 4 x 4 patches.

    For CPU runs without a size given (Wan2.1's VAE: 5 x 64 x 64 pixels -> latents 2 x 8 x 8).
    """
    t_vae, s_vae = vae_factors(vae_config)
    p = list(transformer_config.get("patch_size", [1, 2, 2])) + [2, 2]
    frames = t_vae * int(p[0]) + 1 if video else 1
    return frames, 4 * s_vae * int(p[1]), 4 * s_vae * int(p[2])


def cpu_default_size(name_or_path: str | os.PathLike) -> dict:
    """The small size :func:`small_size` of a real teacher (name or directory) and its own default size."""
    spec, root = _locate(name_or_path)
    vae_cfg = _read_json(root / "vae" / "config.json", "vae config")
    tcfg = _read_json(root / "transformer" / "config.json", "transformer config")
    f, h, w = small_size(vae_cfg, tcfg, video=spec.is_video)
    return {"frames": f, "height": h, "width": w, "default": (spec.frames, spec.height, spec.width),
            "name": spec.name}


def _locate(name_or_path) -> tuple:
    if isinstance(name_or_path, str) and name_or_path in SPECS:
        spec = SPECS[name_or_path]
        return spec, resolve_weights(spec)
    return _spec_of_path(name_or_path), Path(name_or_path)


def inspect_real_teacher(name_or_spec: str | RealTeacherSpec, *, weights: Optional[str | os.PathLike] = None,
                         frames: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
                         text_len: Optional[int] = None, strict_config: bool = True, **_ignored) -> dict:
    """What :func:`load_real_teacher` would load, checked but without reading any weights.

    Runs the same checks as the loader up to the weights (layout, configs, every safetensors
    header of the transformer, text encoder and VAE with tensor names and shapes against their
    configs, the tokenizer, resolution) and returns the teacher's description:
    name, version, latent shape, sampler defaults, preset and the transformer config
    (with ``_class_name``, usable by :func:`rcm_core.real.memory.estimate_memory`).
    """
    import transformers

    spec, root, cfg, (frames, height, width), latent_shape = _prepare(name_or_spec, weights, strict_config,
                                                                      frames, height, width)
    tensors = check_weights(spec, root, cfg)
    _load("tokenizer", root, lambda: transformers.AutoTokenizer.from_pretrained(root / "tokenizer"))
    return {"name": spec.name, "version": _version(root), "latent_shape": [int(x) for x in latent_shape],
            "steps": spec.sample_steps, "shift": spec.shift, "guidance": spec.guidance, "solver": spec.solver,
            "preset": spec.preset, "root": str(root), "family": spec.family, "task": spec.task,
            "frames": frames, "height": height, "width": width, "text_len": int(text_len or spec.text_len),
            "label": teacher_dir_label(root), "size": spec.notes.get("size", "known"),
            "preset_reason": spec.notes.get("preset_reason", f"known teacher {spec.name}"),
            "pipeline": cfg["model_index"].get("_class_name"), "tensors": tensors, "variant": spec.variant,
            "experts": 2 if "transformer_2" in cfg else 1,
            "transformer_config": dict(cfg["transformer"])}


def inspect_teacher_path(path: str | os.PathLike, **kw) -> dict:
    """:func:`inspect_real_teacher` for ``--teacher <dir>`` (architecture detected from the checkpoint)."""
    return inspect_real_teacher(_spec_of_path(path), weights=path, strict_config=False, **kw)


def load_real_teacher(name_or_spec: str | RealTeacherSpec, device: str | torch.device = "cpu", *,
                      weights: Optional[str | os.PathLike] = None, dtype: torch.dtype = torch.bfloat16,
                      frames: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
                      text_len: Optional[int] = None, strict_config: bool = True,
                      transformer_state: Optional[dict] = None) -> Teacher:
    """A :class:`Teacher` for a registered real teacher (``wan2.1-1.3b`` ...) from local weights.

    ``transformer_state``: build the transformer from ``transformer/config.json`` and load these
    weights (a distilled student's) instead of the checkpoint's, which then need not be there
    (a registered model version carries the text encoder, tokenizer, VAE and configs only). For a two-expert
    checkpoint (Wan2.2 A14B) a state with ``transformer.*`` / ``transformer_2.*`` names is a two-expert student
    (switched at the boundary, as the teacher); one with a single transformer's names is a one-network student
    (``DistillConfig.moe_student="one"``): ``net`` is then that one network, built from
    ``transformer_2/config.json``.

    ``strict_config`` checks the transformer's architecture numbers against the spec (off for
    ``--teacher <path>``, where the spec is detected from the checkpoint). The project attention
    processor is installed on the transformer (so student and fake score, deep copies, get it too).
    """
    import diffusers
    import transformers

    spec, root, cfg, (frames, height, width), latent_shape = _prepare(name_or_spec, weights, strict_config,
                                                                      frames, height, width,
                                                                      transformer_weights=transformer_state is None)
    tcfg = cfg["transformer"]

    tcls = getattr(diffusers, spec.transformer_class)
    check_weights(spec, root, cfg)
    subs = ("transformer", "transformer_2") if "transformer_2" in cfg else ("transformer",)
    one_of_two = (transformer_state is not None and len(subs) == 2
                  and not any(k.startswith(("transformer.", "transformer_2.")) for k in transformer_state))
    if one_of_two:
        # a one-network student of a two-expert teacher (DistillConfig.moe_student="one"): one transformer, built
        # from the low-noise expert's config (both experts share one architecture), no switch
        subs = ("transformer_2",)
    states = _split_state(transformer_state, subs) if transformer_state is not None else None
    nets = []
    for sub in subs:
        if states is None:
            net = _load(sub, root, lambda sub=sub: tcls.from_pretrained(root, subfolder=sub, torch_dtype=dtype))
        else:
            net = _load(sub, root, lambda sub=sub: _from_state(tcls, cfg[sub], states[sub], dtype))
        install_rcm_attention(net)
        install_fused_block_ops(net)          # Triton norms/residuals on CUDA (RCM_NORM_KERNEL=0: none)
        install_fp32_time_embedding(net)      # as the reference rCM (survives the deep copies too)
        nets.append(net.to(device).eval().requires_grad_(False))
    if len(nets) == 1:
        net = nets[0]
    else:   # Wan2.2 A14B: high-noise expert `transformer`, low-noise `transformer_2`, switched as WanPipeline does
        from ...nets.denoiser import TimestepExperts
        boundary = float(cfg["model_index"]["boundary_ratio"])
        g2 = spec.guidance_2 if spec.guidance_2 is not None else spec.guidance
        net = TimestepExperts(nets[0], nets[1], boundary_timestep=boundary * 1000.0,
                              expert_guidance=(spec.guidance, g2)).eval().requires_grad_(False)

    ecls = getattr(transformers, spec.text_encoder_class)
    enc = _load("text_encoder", root, lambda: ecls.from_pretrained(root / "text_encoder", torch_dtype=dtype))
    enc = enc.to(device).eval().requires_grad_(False)
    tok = _load("tokenizer", root, lambda: transformers.AutoTokenizer.from_pretrained(root / "tokenizer"))
    vcls = getattr(diffusers, spec.vae_class)
    vae = _load("vae", root, lambda: vcls.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32))
    vae = vae.to(device).eval().requires_grad_(False)

    text = RealTextEncoder(tok, enc, text_len or spec.text_len, device)
    codec = LatentCodec(vae, video=spec.is_video)
    call = diffusers_rf_call if spec.family == "wan" else cosmos_call
    return Teacher(
        name=spec.name, version=_version(root), net=net, param=Parameterization(spec.param_kind, spec.timestep_scale),
        encode_text=text, decode=codec.decode, latent_shape=latent_shape, negative_prompt=spec.negative_prompt,
        guidance=spec.guidance, sample_steps=spec.sample_steps, shift=spec.shift, solver=spec.solver,
        preset=spec.preset, call=call,
        meta={"root": str(root), "hf_id": spec.hf_id, "family": spec.family, "task": spec.task,
              "label": teacher_dir_label(root), "size": spec.notes.get("size", "known"),
              "frames": frames, "height": height, "width": width, "fps": spec.fps, "text_len": text.max_length,
              "transformer_config": {k: v for k, v in tcfg.items() if not k.startswith("_")},
              "codec": codec, "text_encoder": text, "variant": spec.variant,
              "vae_factors": list(vae_factors(cfg["vae"])),
              "expand_timesteps": bool(cfg["model_index"].get("expand_timesteps", False)),
              **({"boundary_ratio": float(cfg["model_index"]["boundary_ratio"]), "guidance_2": spec.guidance_2,
                  "experts": ["transformer", "transformer_2"]} if len(nets) > 1 else {}),
              **({"student_layout": "one network of a two-expert teacher",
                  "boundary_ratio_teacher": float(cfg["model_index"]["boundary_ratio"])} if one_of_two else {}),
              **spec.notes})


def _split_state(state: dict, subs: tuple) -> dict:
    """A student's state dict per transformer: as is for one; ``transformer.*`` / ``transformer_2.*`` for two."""
    if len(subs) == 1:
        return {subs[0]: state}
    out = {sub: {k[len(sub) + 1:]: v for k, v in state.items() if k.startswith(sub + ".")} for sub in subs}
    stray = [k for k in state if not any(k.startswith(sub + ".") for sub in subs)]
    if stray or not all(out.values()):
        raise RealTeacherError(f"a two-expert (Wan2.2 A14B) student's weights need the prefixes {list(subs)}; got "
                               f"{len(stray)} other names, e.g. {stray[:3]}")
    return out


def _from_state(cls, tcfg: dict, state: dict, dtype):
    """The transformer built from its config (parameters allocated empty) with ``state`` loaded."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - diffusers' [torch] extra installs accelerate
        init_empty_weights = None
    conf = {k: v for k, v in tcfg.items() if not k.startswith("_")}
    if init_empty_weights is not None:
        with init_empty_weights(include_buffers=False):
            net = cls.from_config(conf)
        res = net.load_state_dict(state, strict=True, assign=True)
    else:
        net = cls.from_config(conf)
        res = net.load_state_dict(state, strict=True)
    del res
    return cast_quietly(net, dtype)          # deliberate: no "should be kept in float32" warning (module doc)


def teacher_dir_label(path: str | os.PathLike) -> str:
    """A short name for a teacher directory: ``_name_or_path`` of its model_index.json, the repository
    name of a Hugging Face cache snapshot (``models--Org--Repo/snapshots/<hash>``), else the folder name."""
    root = Path(path)
    base = ""
    try:
        idx = json.loads((root / "model_index.json").read_text())
        base = str(idx.get("_name_or_path") or "").rstrip("/").split("/")[-1]
    except (OSError, ValueError, AttributeError):
        pass
    if not base:
        parts = Path(os.path.abspath(root)).parts
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            base = parts[-3].split("--")[-1]
        else:
            base = parts[-1] if parts else ""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "teacher"


def missing_index_help(root: Path) -> str:
    """Why ``root`` is not a teacher directory (it has no model_index.json) and what to pass instead."""
    root = Path(root)
    if not root.exists():
        return f"teacher directory {root} does not exist"
    if not root.is_dir():
        return f"teacher {root} is a file, not a directory in diffusers layout"
    head = f"teacher directory {root} has no model_index.json, so it is not a checkpoint in diffusers layout"
    cfg = root / "config.json"
    hint = ""
    if cfg.is_file():
        try:
            cls = json.loads(cfg.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            cls = None
        if cls in FAMILY_OF_CLASS or any(root.glob("diffusion_pytorch_model*")):
            hint = (f" It looks like a component folder ({cls or 'weights'}): pass the checkpoint's top directory, "
                    f"{root.parent}, which holds model_index.json.")
    elif any(root.glob("*.pth")) or any(root.glob("*.pt")):
        hint = (" It holds .pth/.pt files: the original (non-diffusers) release. Download the -Diffusers repository "
                "instead, e.g. `huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir ...`.")
    elif (root / "transformer").is_dir():
        hint = (" It has transformer/ but no model_index.json: copy model_index.json from the same Hugging Face "
                "repository (it names the pipeline and its components).")
    return head + "." + hint + f" Expected: {LAYOUT_HELP}."


def _spec_of_path(path: str | os.PathLike) -> RealTeacherSpec:
    root = Path(path)
    if not (root / "model_index.json").is_file():
        raise RealTeacherError(missing_index_help(root))
    index = _read_json(root / "model_index.json", "pipeline index")
    check_pipeline_class(root, index)          # Stable Diffusion, Flux...: named, with the supported pipelines
    tcfg = _read_json(root / "transformer" / "config.json", "transformer config")
    if tcfg.get("_class_name") not in FAMILY_OF_CLASS:
        raise UnsupportedTeacherError(f"{root / 'transformer' / 'config.json'}: _class_name "
                                      f"{tcfg.get('_class_name')!r} is not a supported teacher architecture; "
                                      f"supported: {sorted(FAMILY_OF_CLASS)}")
    cfg = {"model_index": index, "transformer": tcfg, "vae": _read_json(root / "vae" / "config.json", "vae config")}
    if _lists_component(index, "transformer_2") or (root / "transformer_2").is_dir():
        cfg["transformer_2"] = _read_json(root / "transformer_2" / "config.json", "transformer_2 config (the "
                                          "low-noise expert of a Wan2.2 A14B checkpoint)")
    variant = detect_variant(root, cfg)
    spec = spec_for_config(tcfg, name=teacher_dir_label(root), variant=variant)
    if spec is None:  # pragma: no cover - the class was checked above
        raise RealTeacherError(f"{root / 'transformer' / 'config.json'}: unsupported transformer")
    if spec.boundary_ratio is not None and float(index["boundary_ratio"]) != spec.boundary_ratio:
        from dataclasses import replace
        spec = replace(spec, boundary_ratio=float(index["boundary_ratio"]),
                       notes={**spec.notes, "boundary_ratio": f"{index['boundary_ratio']} from model_index.json"})
    return spec


def load_teacher_from_path(path: str | os.PathLike, device: str | torch.device = "cpu", **kw) -> Teacher:
    """``--teacher <dir>``: detect Wan2.1 / Cosmos-Predict2 from transformer/config.json and load."""
    return load_real_teacher(_spec_of_path(path), device, weights=Path(path), strict_config=False, **kw)

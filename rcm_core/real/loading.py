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

from ..denoiser import Parameterization
from ..teachers import Teacher
from .attention import install_rcm_attention
from .specs import CHECKED_KEYS, FAMILY_OF_CLASS, SPECS, RealTeacherSpec, spec_for_config

__all__ = ["RealTeacherError", "resolve_weights", "check_layout", "load_real_teacher", "load_teacher_from_path",
           "inspect_real_teacher", "inspect_teacher_path",
           "is_diffusers_dir", "RealTextEncoder", "LatentCodec", "check_resolution", "latent_shape_for",
           "diffusers_rf_call", "cosmos_call"]

LAYOUT_HELP = ("model_index.json; transformer/{config.json, diffusion_pytorch_model.safetensors (or sharded "
               "*.safetensors + .index.json)}; text_encoder/{config.json, model.safetensors (or sharded)}; "
               "tokenizer/{tokenizer_config.json, tokenizer.json or spiece.model}; "
               "vae/{config.json, diffusion_pytorch_model.safetensors}")


class RealTeacherError(RuntimeError):
    """A real teacher's weights are missing or do not match what is expected."""


# ---- locating weights -----------------------------------------------------------------

def _env_name(name: str) -> str:
    return "RCM_WEIGHTS_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def _download_help(spec: RealTeacherSpec) -> str:
    base = spec.hf_id.split("/")[-1]
    return (f"on a machine with network run\n    huggingface-cli download {spec.hf_id} --local-dir /models/{base}\n"
            f"copy /models/{base} here and set RCM_WEIGHTS_ROOT=/models (or {_env_name(spec.name)}=/models/{base}, "
            f"or pass the directory as --teacher); or run `huggingface-cli download {spec.hf_id}` without "
            f"--local-dir to fill the Hugging Face cache (HF_HOME) and copy that cache.")


def resolve_weights(spec: RealTeacherSpec, weights: Optional[str | os.PathLike] = None) -> Path:
    tried = []
    cands = []
    if weights is not None:
        cands.append(("weights argument", Path(weights)))
    if os.environ.get(_env_name(spec.name)):
        cands.append((_env_name(spec.name), Path(os.environ[_env_name(spec.name)])))
    if os.environ.get("RCM_WEIGHTS_ROOT"):
        cands.append(("RCM_WEIGHTS_ROOT", Path(os.environ["RCM_WEIGHTS_ROOT"]) / spec.hf_id.split("/")[-1]))
    for label, p in cands:
        if (p / "model_index.json").is_file():
            return p
        tried.append(f"{p} ({label}): " + ("no model_index.json" if p.is_dir() else "no such directory"))
    try:
        from huggingface_hub import snapshot_download
        # cache_dir read at call time (huggingface_hub reads HF_HOME only when imported)
        p = Path(snapshot_download(spec.hf_id, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE")))
        if (p / "model_index.json").is_file():
            return p
        tried.append(f"Hugging Face cache {p}: no model_index.json")
    except Exception as e:  # LocalEntryNotFoundError, offline errors, missing hub
        tried.append(f"Hugging Face cache ({spec.hf_id}, local_files_only): {type(e).__name__}")
    raise RealTeacherError(
        f"teacher {spec.name!r}: weights not found (nothing is downloaded). Looked in:\n  - " + "\n  - ".join(tried)
        + f"\nExpected a directory in diffusers layout: {LAYOUT_HELP}.\nTo get them, {_download_help(spec)}")


def is_diffusers_dir(path) -> bool:
    try:
        return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()
    except (TypeError, OSError):
        return False


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise RealTeacherError(f"missing {path} ({what}); expected layout: {LAYOUT_HELP}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RealTeacherError(f"{path} ({what}) is not valid JSON: {e}") from e


def _has_weights(folder: Path, stem: str) -> bool:
    return any(folder.glob(f"{stem}*.safetensors")) or any(folder.glob(f"{stem}*.bin"))


def check_layout(root: Path) -> dict:
    """Check files and configs of a diffusers-layout directory; returns the configs."""
    root = Path(root)
    index = _read_json(root / "model_index.json", "pipeline index")
    cfg = {"model_index": index}
    for sub, stem in (("transformer", "diffusion_pytorch_model"), ("text_encoder", "model"),
                      ("vae", "diffusion_pytorch_model")):
        cfg[sub] = _read_json(root / sub / "config.json", f"{sub} config")
        if not _has_weights(root / sub, stem):
            raise RealTeacherError(f"missing weights in {root / sub}: expected {stem}.safetensors (or sharded "
                                   f"{stem}-0000x-of-0000y.safetensors with {stem}.safetensors.index.json)")
    tok = root / "tokenizer"
    if not ((tok / "tokenizer.json").is_file() or (tok / "spiece.model").is_file()):
        raise RealTeacherError(f"missing tokenizer in {tok}: expected tokenizer.json or spiece.model "
                               "(plus tokenizer_config.json)")
    cls = cfg["transformer"].get("_class_name")
    if cls not in FAMILY_OF_CLASS:
        raise RealTeacherError(f"{root / 'transformer' / 'config.json'}: _class_name {cls!r} is not a supported "
                               f"teacher architecture; supported: {sorted(FAMILY_OF_CLASS)}")
    return cfg


def _check_spec_config(spec: RealTeacherSpec, cfg: dict, root: Path) -> None:
    tcfg = cfg["transformer"]
    if tcfg.get("_class_name") != spec.transformer_class:
        raise RealTeacherError(f"{root}: transformer is {tcfg.get('_class_name')!r}, teacher {spec.name!r} "
                               f"expects {spec.transformer_class!r} (wrong checkpoint for this teacher?)")
    bad = [f"{k}={tcfg.get(k)!r} (expected {spec.transformer_config[k]!r})" for k in CHECKED_KEYS[spec.family]
           if k in spec.transformer_config and _norm(tcfg.get(k)) != _norm(spec.transformer_config[k])]
    if bad:
        raise RealTeacherError(f"{root / 'transformer' / 'config.json'} does not match teacher {spec.name!r}: "
                               + ", ".join(bad) + f". Is this {spec.hf_id}?")
    te = cfg["text_encoder"].get("architectures") or []
    if te and spec.text_encoder_class not in te:
        raise RealTeacherError(f"{root / 'text_encoder' / 'config.json'}: architectures {te}, teacher {spec.name!r} "
                               f"expects {spec.text_encoder_class}")


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _check_transformer_weights(cls, tcfg: dict, folder: Path) -> None:
    """Compare the checkpoint's tensor names and shapes with the config's model, before loading."""
    from safetensors import safe_open

    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        return   # .bin checkpoints: rely on diffusers' own checks
    with torch.device("meta"):
        model = cls.from_config({k: v for k, v in tcfg.items() if not k.startswith("_")})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                found[k] = tuple(sf.get_slice(k).get_shape())
    missing = sorted(set(expected) - set(found))
    mism = [f"{k}: checkpoint {found[k]} vs config {expected[k]}" for k in sorted(set(expected) & set(found))
            if found[k] != expected[k]]
    if missing or mism:
        msg = [f"{folder}: weights do not match transformer/config.json"]
        if mism:
            msg.append(f"{len(mism)} shape mismatches, e.g. " + "; ".join(mism[:3]))
        if missing:
            msg.append(f"{len(missing)} tensors missing, e.g. " + ", ".join(missing[:3]))
        raise RealTeacherError(". ".join(msg))


# ---- calling the transformers --------------------------------------------------------

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

    Prompts longer than ``max_length`` tokens are truncated with a warning.
    """

    def __init__(self, tokenizer, model, max_length: int, device="cpu"):
        self.tokenizer, self.model, self.max_length, self.device = tokenizer, model, int(max_length), device

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [re.sub(r"\s+", " ", p).strip() for p in prompts]
        for i, p in enumerate(prompts):
            n = len(self.tokenizer(p, add_special_tokens=True, truncation=False)["input_ids"])
            if n > self.max_length:
                warnings.warn(f"prompt {i} has {n} tokens, more than the text encoder's limit of {self.max_length}; "
                              f"truncated to {self.max_length} tokens (the end of the prompt is ignored): "
                              f"{p[:60]!r}...", UserWarning, stacklevel=2)
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        emb = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return emb * mask[..., None].to(emb.dtype)

    encode = __call__


# ---- VAE and resolutions ---------------------------------------------------------------

def _factors(vae_config: dict, transformer_config: dict) -> tuple[int, int, int]:
    td = vae_config.get("temperal_downsample", [False, True, True])
    t_vae, s_vae = 2 ** sum(bool(x) for x in td), 2 ** len(td)
    p = transformer_config.get("patch_size", [1, 2, 2])
    return t_vae * p[0], s_vae * p[1], s_vae * p[2] if len(p) > 2 else s_vae * p[1]


def check_resolution(frames: int, height: int, width: int, *, vae_config: dict, transformer_config: dict,
                     video: bool = True) -> None:
    """Raise ValueError, naming the nearest valid size, unless the VAE and patch factors divide the size."""
    t_vae = 2 ** sum(bool(x) for x in vae_config.get("temperal_downsample", [False, True, True]))
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
    td = vae_config.get("temperal_downsample", [False, True, True])
    t_vae, s_vae = 2 ** sum(bool(x) for x in td), 2 ** len(td)
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


def _prepare(name_or_spec, weights, strict_config, frames, height, width):
    """Locate and check a checkpoint (files, configs, resolution) without loading weights."""
    spec = SPECS[name_or_spec] if isinstance(name_or_spec, str) else name_or_spec
    root = resolve_weights(spec, weights)
    cfg = check_layout(root)
    if strict_config:
        _check_spec_config(spec, cfg, root)
    elif cfg["transformer"].get("_class_name") != spec.transformer_class:
        raise RealTeacherError(f"{root}: transformer {cfg['transformer'].get('_class_name')!r} does not match "
                               f"{spec.transformer_class!r}")
    vae_cfg, tcfg = cfg["vae"], cfg["transformer"]
    frames = spec.frames if frames is None else int(frames)
    height = spec.height if height is None else int(height)
    width = spec.width if width is None else int(width)
    latent_shape = latent_shape_for(frames, height, width, vae_config=vae_cfg, transformer_config=tcfg,
                                    video=spec.is_video)
    return spec, root, cfg, (frames, height, width), latent_shape


def inspect_real_teacher(name_or_spec: str | RealTeacherSpec, *, weights: Optional[str | os.PathLike] = None,
                         frames: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
                         text_len: Optional[int] = None, strict_config: bool = True, **_ignored) -> dict:
    """What :func:`load_real_teacher` would load, checked but without reading any weights.

    Runs the same checks as the loader up to the weights (layout, configs, tensor names and
    shapes of the transformer checkpoint, resolution) and returns the teacher's description:
    name, version, latent shape, sampler defaults, preset and the transformer config
    (with ``_class_name``, usable by :func:`rcm_core.real.memory.estimate_memory`).
    """
    import diffusers

    spec, root, cfg, (frames, height, width), latent_shape = _prepare(name_or_spec, weights, strict_config,
                                                                      frames, height, width)
    _check_transformer_weights(getattr(diffusers, spec.transformer_class), cfg["transformer"], root / "transformer")
    return {"name": spec.name, "version": _version(root), "latent_shape": [int(x) for x in latent_shape],
            "steps": spec.sample_steps, "shift": spec.shift, "guidance": spec.guidance, "solver": spec.solver,
            "preset": spec.preset, "root": str(root), "family": spec.family, "task": spec.task,
            "frames": frames, "height": height, "width": width, "text_len": int(text_len or spec.text_len),
            "transformer_config": dict(cfg["transformer"])}


def inspect_teacher_path(path: str | os.PathLike, **kw) -> dict:
    """:func:`inspect_real_teacher` for ``--teacher <dir>`` (architecture detected from the checkpoint)."""
    return inspect_real_teacher(_spec_of_path(path), weights=path, strict_config=False, **kw)


def load_real_teacher(name_or_spec: str | RealTeacherSpec, device: str | torch.device = "cpu", *,
                      weights: Optional[str | os.PathLike] = None, dtype: torch.dtype = torch.bfloat16,
                      frames: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
                      text_len: Optional[int] = None, strict_config: bool = True) -> Teacher:
    """A :class:`Teacher` for a registered real teacher (``wan2.1-1.3b`` ...) from local weights.

    ``strict_config`` checks the transformer's architecture numbers against the spec (off for
    ``--teacher <path>``, where the spec is detected from the checkpoint). The project attention
    processor is installed on the transformer (so student and fake score, deep copies, get it too).
    """
    import diffusers
    import transformers

    spec, root, cfg, (frames, height, width), latent_shape = _prepare(name_or_spec, weights, strict_config,
                                                                      frames, height, width)
    tcfg = cfg["transformer"]

    tcls = getattr(diffusers, spec.transformer_class)
    _check_transformer_weights(tcls, tcfg, root / "transformer")
    net = _load("transformer", root, lambda: tcls.from_pretrained(root, subfolder="transformer", torch_dtype=dtype))
    install_rcm_attention(net)
    net = net.to(device).eval().requires_grad_(False)

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
              "frames": frames, "height": height, "width": width, "fps": spec.fps, "text_len": text.max_length,
              "transformer_config": {k: v for k, v in tcfg.items() if not k.startswith("_")},
              "codec": codec, "text_encoder": text, **spec.notes})


def _spec_of_path(path: str | os.PathLike) -> RealTeacherSpec:
    root = Path(path)
    tcfg = _read_json(root / "transformer" / "config.json", "transformer config") \
        if (root / "model_index.json").is_file() else _read_json(root / "model_index.json", "pipeline index")
    spec = spec_for_config(tcfg)
    if spec is None:
        raise RealTeacherError(f"{root / 'transformer' / 'config.json'}: _class_name {tcfg.get('_class_name')!r} is "
                               f"not a supported teacher architecture; supported: {sorted(FAMILY_OF_CLASS)}")
    return spec


def load_teacher_from_path(path: str | os.PathLike, device: str | torch.device = "cpu", **kw) -> Teacher:
    """``--teacher <dir>``: detect Wan2.1 / Cosmos-Predict2 from transformer/config.json and load."""
    return load_real_teacher(_spec_of_path(path), device, weights=Path(path), strict_config=False, **kw)

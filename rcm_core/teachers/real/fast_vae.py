"""Faster VAE decode for evaluation and serving: the decode is shared by teacher and student.

With a 4-step student the VAE decode becomes a large part of the end-to-end time
(Wan2.1 1.3B at 480p x 81 frames on an H100: DiT 2.8 s, fp32 decode 3.2 s), so the
end-to-end speed-up depends on it. :func:`prepare_vae_for_decode` applies, from
outside and without touching diffusers' code:

* ``dtype``: bf16 weights and activations (the decode is memory-bound);
* ``channels_last``: NDHWC (``channels_last_3d``) weights, which cuDNN's Hopper conv3d
  kernels prefer;
* ``cudnn_benchmark``: cuDNN picks the fastest conv3d algorithm per shape (timed once);
* ``compile``: ``torch.compile`` of the decoder (fuses the norm/SiLU/residual
  element-wise work; costs a compilation on first use). Dynamo breaks the decoder's graph and
  compiles the up blocks' shared ``forward`` once per block and per call kind (first frame, first
  chunk, steady chunks, a shorter last chunk): 28 recompiles for Wan2.1, past dynamo's default
  ``recompile_limit`` of 8, after which the rest ran eager (H200, chunk 5: 1.09 s instead of
  0.81 s), so :func:`decode` raises the limit to ``RECOMPILE_LIMIT`` while it runs;
* ``chunk``: latent frames per decoder call (``AutoencoderKLWan`` without tiling; default 1 =
  diffusers' own ``vae.decode``). diffusers decodes one latent frame at a time through a causal
  feature cache (the last ``CACHE_T = 2`` frames of every causal conv's input); :func:`decode`
  instead decodes latent frame 0 alone (``first_chunk``) and then ``chunk`` frames per call.
  Equivalent: the causal convs see the same cached frames followed by the chunk, the upsample3d
  time conv's first-chunk ``"Rep"`` marker and zero padding, the per-frame attention and RMS
  norms, and Wan2.2's ``DupUp3D``/``first_chunk`` give the same frames (float64: equal to about
  1e-15, tests/test_fast_vae.py); bigger chunks give cuDNN bigger conv3d problems and fewer cache
  cat/pad copies per output frame. Memory: activations grow with the chunk (Wan2.1 480 x 832 x
  81, bf16, H100: peak 5.1 GiB at chunk 1, about +2 GiB per chunk frame, 13.4 GiB at chunk 5).
  The largest tensor should stay under 2**31 elements, cuDNN's 32-bit indexing limit (a conv3d
  here has batch 1, so PyTorch cannot split it): for Wan2.1 at 480 x 832 the full-resolution
  activations are 4*chunk output frames x 96 channels x 480 x 832 = chunk x 153.4 M elements, and
  a causal conv's input with its 2 cached frames (4*chunk + 2) x 96 x 480 x 832, so chunk <= 13
  (torch 2.11 + cuDNN 9.19 on an H100 ran chunk 20, 3.1 G elements, without error; older stacks
  may refuse such convs). Latents of T frames need no chunk above T - 1.

:func:`decode_error` reports the relative difference of a prepared VAE against the
fp32 reference on the same latents, so a faster variant is only used with its
measured error.
"""
from __future__ import annotations

import contextlib
import copy
import numbers

import torch

from ...nets.library_logs import cast_quietly, typing_truce
from ...nets.serving import RECOMPILE_LIMIT, raised_recompile_limit

__all__ = ["prepare_vae_for_decode", "decode", "decode_error", "RECOMPILE_LIMIT"]



def _check_chunk(chunk) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ValueError(f"prepare_vae_for_decode: chunk (latent frames per decoder call) must be an int >= 1, "
                         f"got {chunk!r}")
    return int(chunk)


def prepare_vae_for_decode(vae, dtype: torch.dtype = torch.bfloat16, channels_last: bool = True,
                           compile: bool = False, cudnn_benchmark: bool = True, inplace: bool = False,
                           chunk: int = 1):
    """A decode-ready copy of ``vae`` (or ``vae`` itself with ``inplace``); see the module doc for the options."""
    chunk = _check_chunk(chunk)
    vae = vae if inplace else copy.deepcopy(vae)
    vae = cast_quietly(vae, dtype=dtype).eval().requires_grad_(False)     # deliberate: no "kept in float32"
    if channels_last:
        for p in vae.parameters():
            if p.dim() == 5:                      # conv3d kernels
                p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    vae._rcm_channels_last = channels_last
    vae._rcm_cudnn_benchmark = cudnn_benchmark
    vae._rcm_decode_chunk = chunk
    vae._rcm_compiled = compile
    if compile:
        typing_truce()                  # inductor beside Metaflow's vendored typing_extensions (see there)
        vae.decoder = torch.compile(vae.decoder, dynamic=False)
    return vae


def _chunked_wan_decode(vae, z: torch.Tensor, chunk: int):
    """``AutoencoderKLWan.decode(z).sample`` with ``chunk`` latent frames per decoder call after the first
    frame, or None where diffusers would tile (then ``vae.decode`` as is). In the VAE's dtype."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan, unpatchify

    if not isinstance(vae, AutoencoderKLWan):
        return None
    height, width = z.shape[-2:]
    if vae.use_tiling and (width > vae.tile_sample_min_width // vae.spatial_compression_ratio
                           or height > vae.tile_sample_min_height // vae.spatial_compression_ratio):
        return None
    if hasattr(vae, "_hf_hook") and hasattr(vae._hf_hook, "pre_forward"):   # as diffusers' @apply_forward_hook
        vae._hf_hook.pre_forward(vae)
    if vae.use_slicing and z.shape[0] > 1:                                    # as diffusers' decode
        return torch.cat([_one(vae, zi, chunk, unpatchify) for zi in z.split(1)])
    return _one(vae, z, chunk, unpatchify)


def _one(vae, z: torch.Tensor, chunk: int, unpatchify) -> torch.Tensor:
    """diffusers' ``AutoencoderKLWan._decode`` (untiled) except for the chunking, and one cat at the end."""
    num_frame = z.shape[2]
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i, j in [(0, 1)] + [(s, min(s + chunk, num_frame)) for s in range(1, num_frame, chunk)]:
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i:j], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                first_chunk=(i == 0)))
    out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    if vae.config.patch_size is not None:
        out = unpatchify(out, patch_size=vae.config.patch_size)
    out = torch.clamp(out, min=-1.0, max=1.0)
    vae.clear_cache()
    return out


def _recompile_limit(vae):
    """Dynamo's recompile limit raised to RECOMPILE_LIMIT for a compiled decoder, else nothing."""
    if not getattr(vae, "_rcm_compiled", False):
        return contextlib.nullcontext()
    return raised_recompile_limit(RECOMPILE_LIMIT)


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, T, H, W) in the VAE's normalised space -> pixels in [-1, 1] (float32)."""
    z = latents.to(next(vae.parameters()).dtype)
    if z.dim() == 5 and getattr(vae, "_rcm_channels_last", False):
        z = z.contiguous(memory_format=torch.channels_last_3d)
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = getattr(vae, "_rcm_cudnn_benchmark", old)   # autotuned conv3d algorithms
    try:
        with _recompile_limit(vae):
            chunk = getattr(vae, "_rcm_decode_chunk", 1)
            out = _chunked_wan_decode(vae, z, chunk) if chunk > 1 and z.dim() == 5 else None
            if out is None:
                out = vae.decode(z, return_dict=False)[0]
        return out.float()
    finally:
        torch.backends.cudnn.benchmark = old


def decode_error(vae, reference_vae, latents: torch.Tensor) -> float:
    """||decode(vae) - decode(reference)|| / ||decode(reference)|| on the same latents."""
    a, b = decode(vae, latents), decode(reference_vae, latents)
    return float((a - b).norm() / b.norm().clamp_min(1e-12))

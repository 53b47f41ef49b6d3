"""rcm_core.real.fast_vae's chunked Wan VAE decode (issue 13): ``chunk`` latent frames per decoder call give the
same pixels as diffusers' own frame-by-frame ``AutoencoderKLWan.decode`` (the independent reference), in float64
on the CPU, for Wan2.1-style (two time upsamples, attention, upsample2d) and Wan2.2-style (residual up blocks with
DupUp3D, patchify 2) tiny VAEs."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from rcm_core.real import fast_vae  # noqa: E402


def _wan21():
    """Wan2.1's layout (dim_mult 1,2,4,4 -> 1,2,2,2; time upsample in two of three up steps, mid attention)."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                      temperal_downsample=[False, True, True],
                                      latents_mean=[0.0] * 4, latents_std=[1.0] * 4).double().eval()


def _wan22():
    """Wan2.2's layout: residual up blocks (DupUp3D shortcut, first_chunk), patchify 2, two time upsamples."""
    torch.manual_seed(1)
    return diffusers.AutoencoderKLWan(base_dim=4, decoder_base_dim=6, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                      temperal_downsample=[True, True], is_residual=True, in_channels=12,
                                      out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=8,
                                      latents_mean=[0.0] * 4, latents_std=[1.0] * 4).double().eval()


VAES = {"wan2.1": _wan21, "wan2.2": _wan22}
_cache = {}


def _vae(name):
    if name not in _cache:
        _cache[name] = VAES[name]()
    return _cache[name]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(VAES))
@pytest.mark.parametrize("T", [1, 2, 6])
def test_chunked_decode_equals_diffusers(name, T):
    vae = _vae(name)
    g = torch.Generator().manual_seed(T)
    z = torch.randn(1, 4, T, 4, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref = vae.decode(z).sample
    assert ref.shape[2] == 1 + 4 * (T - 1) and ref.abs().max() > 0.01
    for chunk in sorted({2, 3, 5, max(T - 1, 1), T + 2}):
        fast = fast_vae.prepare_vae_for_decode(vae, torch.float64, channels_last=False, cudnn_benchmark=False,
                                               chunk=chunk)
        with torch.no_grad():
            out = fast_vae._chunked_wan_decode(fast, z, chunk)
        assert out.dtype == torch.float64 and out.shape == ref.shape
        assert _rel(out, ref) < 1e-12, (name, T, chunk, _rel(out, ref))
        assert fast._feat_map == [None] * len(fast._feat_map)          # cache cleared afterwards, as diffusers


def test_decode_with_chunk_channels_last_batch_and_slicing():
    """The public decode(): float32 out, channels_last_3d weights and latents, batch 2 with and without slicing."""
    vae = _vae("wan2.1")
    z = torch.randn(2, 4, 6, 4, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        ref = vae.decode(z).sample
    for slicing in (False, True):
        fast = fast_vae.prepare_vae_for_decode(vae, torch.float64, channels_last=True, cudnn_benchmark=False, chunk=4)
        if slicing:
            fast.enable_slicing()
        out = fast_vae.decode(fast, z)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert _rel(out.double(), ref) < 1e-6
    one = fast_vae.prepare_vae_for_decode(vae, torch.float64, channels_last=False)      # default chunk=1: vae.decode
    assert one._rcm_decode_chunk == 1 and torch.equal(fast_vae.decode(one, z), ref.float())
    assert fast_vae.decode_error(fast, vae, z) < 1e-6


def test_tiled_vae_keeps_diffusers_decode():
    """A VAE whose latents diffusers would tile: chunk is not applied (vae.decode's tiled path, same result)."""
    vae = _vae("wan2.1")
    fast = fast_vae.prepare_vae_for_decode(vae, torch.float64, channels_last=False, chunk=3)
    fast.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
                       tile_sample_stride_width=8)
    z = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert fast_vae._chunked_wan_decode(fast, z, 3) is None
    with torch.no_grad():
        ref = fast.decode(z).sample
    assert torch.equal(fast_vae.decode(fast, z), ref.float())


@pytest.mark.parametrize("bad", [0, -2, 2.0, 1.5, "3", None, True])
def test_bad_chunk_raises(bad):
    with pytest.raises(ValueError, match="chunk"):
        fast_vae.prepare_vae_for_decode(_vae("wan2.1"), torch.float64, chunk=bad)


def test_compiled_decoder_gets_a_higher_recompile_limit_while_decoding():
    """compile=True (with a chunk): the decoder is torch.compile'd (lazily, nothing compiled here) and decode()
    lifts dynamo's recompile limit to RECOMPILE_LIMIT only while it runs."""
    import torch._dynamo

    fast = fast_vae.prepare_vae_for_decode(_vae("wan2.1"), torch.float64, compile=True, chunk=5)
    assert fast._rcm_compiled and fast._rcm_decode_chunk == 5 and hasattr(fast.decoder, "_orig_mod")
    before = torch._dynamo.config.recompile_limit
    with fast_vae._recompile_limit(fast):
        assert torch._dynamo.config.recompile_limit == max(before, fast_vae.RECOMPILE_LIMIT)
    assert torch._dynamo.config.recompile_limit == before
    plain = fast_vae.prepare_vae_for_decode(_vae("wan2.1"), torch.float64, chunk=5)
    with fast_vae._recompile_limit(plain):
        assert torch._dynamo.config.recompile_limit == before

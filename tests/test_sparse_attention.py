"""Sliding-tile (block-sparse) self-attention for serving (issue 23, item 3): rcm_core.nets.sparse_attention.

Expected values come from this file: a per-token mask built from 3-D token coordinates with STA's border
clamping written out below, and float64 dense softmax attention with that mask. The flex_attention path runs
on the CPU here, compiled (torch's inductor CPU template honours the BlockMask's block tables: a block left
out of them is skipped, so a wrong table shows in the output); the CUDA flex kernel runs in the gpu-marked test.
"""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from rcm_core.nets import sparse_attention as sa
from rcm_core.nets.serving import ServingOptions, apply_serving_options
from rcm_core.nets.sparse_attention import (SlidingTile, TileSpec, block_tables, density, from_tiles,
                                            sliding_tile_attention, sparse_self_attention, tile_permutation,
                                            to_tiles, token_grid)

# (grid, tile, window): divisible and not (the last tile partial along one or more axes), windows clamped at
# the borders, windows covering an axis
CASES = [((3, 5, 6), (2, 2, 4), (1, 3, 1)),
         ((4, 6, 5), (2, 3, 2), (3, 1, 3)),
         ((5, 4, 7), (1, 2, 3), (3, 3, 1)),
         ((6, 4, 8), (1, 2, 2), (3, 1, 3))]


# ---- the test's own mask and attention ----------------------------------------------------------------------

def sta_centre(i: int, n: int, w: int):
    """STA's clamping: the window of query tile i (w tiles, odd) is shifted inward so it stays in the n tiles;
    None where the window covers the axis."""
    half = w // 2
    if w >= n:
        return None
    return min(max(i, half), n - 1 - half)


def expected_mask(grid, tile, window) -> torch.Tensor:
    """(N, N) bool, raster order (frame-major), token by token."""
    coords = list(itertools.product(*(range(g) for g in grid)))
    n_tiles = [math.ceil(g / t) for g, t in zip(grid, tile)]
    m = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for a, qc in enumerate(coords):
        for b, kc in enumerate(coords):
            ok = True
            for ax in range(3):
                qt, kt = qc[ax] // tile[ax], kc[ax] // tile[ax]
                c = sta_centre(qt, n_tiles[ax], window[ax])
                if c is not None and abs(c - kt) > window[ax] // 2:
                    ok = False
            m[a, b] = ok
    return m


def masked_attention64(q, k, v, mask=None, scale=None):
    """float64 softmax attention on (B, H, N, D), keys outside ``mask`` excluded."""
    q, k, v = (x.to(torch.float64) for x in (q, k, v))
    s = scale if scale is not None else q.shape[-1] ** -0.5
    sc = s * q @ k.transpose(-1, -2)
    if mask is not None:
        sc = sc.masked_fill(~mask, float("-inf"))
    return torch.softmax(sc, -1) @ v


def by_hand(mask):
    """An ``attention`` for the embedded DiT: this file's masked attention where query and key lengths are the
    mask's (self-attention), dense float64 otherwise (cross-attention)."""
    def attention(q, k, v, *, scale=None, layout="bnhd"):
        qb, kb, vb = (z.transpose(1, 2) for z in (q, k, v))
        sq = qb.shape[2] == kb.shape[2] == mask.shape[0]
        return masked_attention64(qb, kb, vb, mask if sq else None, scale).transpose(1, 2).to(q.dtype)
    return attention


def qkv(n, dtype=torch.float64, b=2, h=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3)]


# ---- the mask, the reference path, density -------------------------------------------------------------------

@pytest.mark.parametrize("grid,tile,window", CASES)
def test_reference_path_attends_exactly_the_sta_mask(grid, tile, window):
    spec = TileSpec(grid, tile, window)
    mask = expected_mask(grid, tile, window)
    assert torch.equal(sa.sliding_tile_mask(spec), mask)
    q, k, v = qkv(spec.tokens)
    want = masked_attention64(q, k, v, mask, scale=0.3)
    got = sliding_tile_attention(q, k, v, spec, scale=0.3, backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # bnhd layout, and chunks smaller than the sequence
    old, sa._CHUNK = sa._CHUNK, 7
    try:
        got = sliding_tile_attention(*(x.transpose(1, 2) for x in (q, k, v)), spec, scale=0.3, layout="bnhd")
    finally:
        sa._CHUNK = old
    torch.testing.assert_close(got.transpose(1, 2), want, rtol=0, atol=1e-12)


def test_a_window_covering_the_grid_is_dense_attention():
    spec = TileSpec((3, 4, 6), (1, 2, 2), (5, 3, 5))       # tiles (3, 2, 3): every window covers its axis
    assert density(spec) == 1.0
    q, k, v = qkv(spec.tokens, seed=1)
    torch.testing.assert_close(sliding_tile_attention(q, k, v, spec), masked_attention64(q, k, v),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("grid,tile,window", CASES)
def test_density_counts_the_attended_pairs(grid, tile, window):
    mask = expected_mask(grid, tile, window)
    assert density(TileSpec(grid, tile, window)) == pytest.approx(mask.sum().item() / mask.numel(), abs=1e-15)


def test_density_of_the_wan_grid_is_the_product_of_clamped_windows():
    # (21, 30, 52) with tile (3, 8, 8): tiles (7, 4, 7), the last row / column tile partial (6 of 8, 4 of 8)
    spec = TileSpec(sa.WAN_480P_GRID, (3, 8, 8), (3, 3, 3))
    per_axis = []
    for g, t, w in zip(spec.grid, spec.tile, spec.window):
        n = math.ceil(g / t)
        per_axis.append(sum(1 for a in range(g) for b in range(g)
                            if (c := sta_centre(a // t, n, w)) is None or abs(c - b // t) <= w // 2))
    assert density(spec) == pytest.approx(math.prod(per_axis) / spec.tokens ** 2, rel=1e-12)
    assert 0.1 < density(spec) < 0.2


# ---- the tile-major order and the block tables ---------------------------------------------------------------

def tile_major_tokens(grid, tile):
    """Raster index of the token at each tile-major position (None for padding), computed independently."""
    n_tiles = [math.ceil(g / t) for g, t in zip(grid, tile)]
    out = []
    for tc in itertools.product(*(range(n) for n in n_tiles)):
        for lc in itertools.product(*(range(t) for t in tile)):
            f, h, w = (tc[a] * tile[a] + lc[a] for a in range(3))
            out.append((f * grid[1] + h) * grid[2] + w if f < grid[0] and h < grid[1] and w < grid[2] else None)
    return out


@pytest.mark.parametrize("grid,tile,window", CASES)
def test_tile_permutation_round_trips_and_is_tile_major(grid, tile, window):
    spec = TileSpec(grid, tile, window)
    gather, valid, inverse = tile_permutation(spec)
    ref = tile_major_tokens(grid, tile)
    assert valid.tolist() == [r is not None for r in ref]
    assert gather[valid].tolist() == [r for r in ref if r is not None]
    x = torch.randn(2, 3, spec.tokens, 5)
    tiled = to_tiles(x, spec)
    assert tiled.shape[2] == spec.padded_tokens == len(ref)
    assert torch.equal(from_tiles(tiled, spec), x)
    assert torch.equal(from_tiles(to_tiles(x.transpose(1, 2), spec, dim=1), spec, dim=1), x.transpose(1, 2))
    assert torch.equal(inverse[gather[valid]], torch.nonzero(valid).squeeze(1))


@pytest.mark.parametrize("grid,tile,window", CASES + [((3, 8, 8), (2, 4, 8), (1, 1, 1))])
@pytest.mark.parametrize("block", [16, 64])
def test_block_tables_list_every_needed_block_and_no_other(grid, tile, window, block):
    """Tables at ``block`` tokens against the mask in tile-major order, where a position attends by its tile
    (padded queries as their tile's, never a padded key, nothing past the last tile)."""
    spec = TileSpec(grid, tile, window)
    n_tiles = [math.ceil(g / t) for g, t in zip(grid, tile)]
    tiles = list(itertools.product(*(range(n) for n in n_tiles)))
    T = math.prod(tile)
    allowed = torch.tensor([[all(sta_centre(a[x], n_tiles[x], window[x]) is None
                                 or abs(sta_centre(a[x], n_tiles[x], window[x]) - b[x]) <= window[x] // 2
                                 for x in range(3)) for b in tiles] for a in tiles])
    ref = tile_major_tokens(grid, tile)
    length = math.ceil(len(ref) / block) * block
    real = torch.tensor([r is not None for r in ref] + [False] * (length - len(ref)))
    pos_tile = torch.arange(length) // T
    in_seq = pos_tile < len(tiles)
    pt = pos_tile.clamp(max=len(tiles) - 1)
    m = allowed[pt[:, None], pt[None, :]] & in_seq[:, None] & real[None, :]
    # on real positions this is the raster mask, permuted
    idx = torch.tensor([r for r in ref if r is not None])
    assert torch.equal(m[real][:, real], expected_mask(grid, tile, window)[idx[:, None], idx[None, :]])
    nb = length // block
    blocks = m.reshape(nb, block, nb, block).permute(0, 2, 1, 3)
    some, full = blocks.any(-1).any(-1), blocks.all(-1).all(-1)
    kv_num, kv_idx, full_num, full_idx, got_len = block_tables(spec, block)
    assert got_len == length
    got_full = torch.zeros(nb, nb, dtype=torch.bool)
    got_part = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        got_full[i, full_idx[0, 0, i, :full_num[0, 0, i]].long()] = True
        got_part[i, kv_idx[0, 0, i, :kv_num[0, 0, i]].long()] = True
    assert torch.equal(got_full, full)                   # computed without the mask
    assert torch.equal(got_part, some & ~full)           # computed with it; every other block skipped


# ---- the flex_attention path ---------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,tile,window", [((3, 8, 8), (2, 4, 8), (1, 1, 1))])     # 64-token tiles, padded
def test_flex_path_compiled_on_the_cpu_matches_the_mask(grid, tile, window):
    """Tiles of whole blocks (the mask function: the keys' validity only). Tiles that blocks straddle run in
    :func:`test_compiled_blocks_follow_the_context` (one compile per case keeps this file under a minute)."""
    spec = TileSpec(grid, tile, window)
    q, k, v = qkv(spec.tokens, dtype=torch.float32, b=1, h=2, seed=3)
    want = masked_attention64(q, k, v, expected_mask(grid, tile, window))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = sliding_tile_attention(q, k, v, spec, backend="flex")
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("grid,tile,window", [((21, 30, 52), (3, 8, 8), (3, 3, 5)),    # Wan2.1 480p, padded
                                              ((6, 16, 16), (2, 8, 8), (1, 1, 3))])    # 128-token tiles
def test_flex_path_on_cuda_matches_the_reference_in_bf16(grid, tile, window):
    spec = TileSpec(grid, tile, window)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, spec.tokens, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    with torch.no_grad():
        got = sliding_tile_attention(q, k, v, spec, layout="bnhd")        # auto: flex on CUDA
        ref = sliding_tile_attention(q, k, v, spec, layout="bnhd", backend="reference")
    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 1e-2, err


# ---- the network under the context ---------------------------------------------------------------------------

def tiny_dit():
    from rcm_core.teachers.embedded.dit import VideoDiT, VideoDiTConfig

    torch.manual_seed(0)
    net = VideoDiT(VideoDiTConfig(dim=24, heads=2, layers=2, ffn_dim=48, text_dim=16, freq_dim=16))
    with torch.no_grad():                 # random weights everywhere (the head is zero-initialised)
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    return net.double().eval().requires_grad_(False)


def dit_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 4, 8, 12, generator=g, dtype=torch.float64)      # grid (4, 4, 6) with patch (1, 2, 2)
    return x, torch.tensor([300.0, 700.0], dtype=torch.float64), torch.randn(2, 5, 16, generator=g,
                                                                            dtype=torch.float64)


def test_token_grid_from_the_embedded_dit_and_a_diffusers_config():
    from rcm_core.nets.denoiser import TrigFlowDenoiser

    net = tiny_dit()
    assert token_grid(net, (1, 1, 4, 8, 12)) == (4, 4, 6)
    assert token_grid(TrigFlowDenoiser(net), (1, 1, 4, 8, 12)) == (4, 4, 6)

    class Wanish(torch.nn.Module):
        config = {"patch_size": [1, 2, 2]}
    assert token_grid(Wanish(), (1, 16, 21, 60, 104)) == sa.WAN_480P_GRID
    with pytest.raises(ValueError, match=r"not divisible by Wanish's patch \(1, 2, 2\)"):
        token_grid(Wanish(), (1, 16, 21, 61, 104))
    with pytest.raises(ValueError, match="Linear declares no patch size"):
        token_grid(torch.nn.Linear(2, 2), (1, 1, 2, 2, 2))


def test_under_the_context_self_attention_is_sparse_and_cross_attention_dense(monkeypatch):
    import rcm_core.teachers.embedded.dit as dit

    net = tiny_dit()
    x, t, ctx = dit_inputs()
    grid = token_grid(net, x.shape)
    with torch.no_grad():
        dense = net(x, t, ctx)
        with sparse_self_attention(TileSpec(grid, (1, 2, 2), (7, 3, 5))):      # windows cover the grid
            full = net(x, t, ctx)
        spec = TileSpec(grid, (1, 2, 2), (1, 1, 1))
        calls = []
        real = sa.sliding_tile_attention
        monkeypatch.setattr(sa, "sliding_tile_attention",
                            lambda q, k, v, s, **kw: calls.append((q.shape[1], k.shape[1])) or real(q, k, v, s, **kw))
        with sparse_self_attention(spec):
            assert sa.active_sparse_spec() == spec
            sparse = net(x, t, ctx)
        assert sa.active_sparse_spec() is None

        # the same network with this file's masked attention for the self-attention calls, dense otherwise
        monkeypatch.setattr(dit, "attention", by_hand(expected_mask(grid, (1, 2, 2), (1, 1, 1))))
        want = net(x, t, ctx)
    assert calls == [(96, 96)] * 2                   # the 2 blocks' self-attention; cross-attention (5 keys) dense
    torch.testing.assert_close(full, dense, rtol=0, atol=1e-10)
    assert (sparse - dense).abs().max() > 1e-3
    torch.testing.assert_close(sparse, want, rtol=0, atol=1e-10)


def test_tangents_and_grad_are_refused():
    from torch.autograd import forward_ad as fwAD

    spec = TileSpec((2, 2, 2), (1, 1, 1), (1, 1, 1))
    q, k, v = qkv(spec.tokens)
    with pytest.raises(RuntimeError, match="q requires grad.*serving option"):
        sliding_tile_attention(q.requires_grad_(), k, v, spec)
    q = q.detach()
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match="k carries a forward-AD tangent"):
            sliding_tile_attention(q, fwAD.make_dual(k, torch.ones_like(k)), v, spec)
    with pytest.raises(RuntimeError, match="inside a torch.func transform"):
        torch.func.jvp(lambda vv: sliding_tile_attention(q, k, vv, spec), (v,), (torch.ones_like(v),))
    # the network's self-attention under the context, with the weights requiring grad and grad mode on
    net = tiny_dit().requires_grad_(True)
    x, t, ctx = dit_inputs()
    with sparse_self_attention(TileSpec(token_grid(net, x.shape), (1, 2, 2), (1, 1, 1))):
        with pytest.raises(RuntimeError, match="requires grad"):
            net(x, t, ctx)


def test_tile_spec_errors_name_the_field():
    with pytest.raises(ValueError, match=r"TileSpec.window must be odd.*\(3, 2, 3\)"):
        TileSpec((4, 4, 4), (1, 1, 1), (3, 2, 3))
    with pytest.raises(ValueError, match=r"TileSpec.tile \(1, 8, 1\) is larger than the grid .* axis H"):
        TileSpec((4, 4, 4), (1, 8, 1), (1, 1, 1))
    with pytest.raises(ValueError, match="TileSpec.grid must be 3 positive ints"):
        TileSpec((4, 0, 4), (1, 1, 1), (1, 1, 1))
    with pytest.raises(ValueError, match="TileSpec.tile must be 3 positive ints"):
        TileSpec((4, 4, 4), (1, 1), (1, 1, 1))
    with pytest.raises(ValueError, match="TileSpec.window must be 3 positive ints"):
        TileSpec((4, 4, 4), (1, 1, 1), (1.5, 1, 1))
    with pytest.raises(ValueError, match="must have the grid's 8 tokens"):
        sliding_tile_attention(*qkv(9), TileSpec((2, 2, 2), (1, 1, 1), (1, 1, 1)))


# ---- the serving option --------------------------------------------------------------------------------------

def test_serving_option_parses_resolves_and_names_bad_values():
    opts = ServingOptions(sparse="sta:t3x8x8:w3x3x5")
    assert opts.sliding_tile == SlidingTile((3, 8, 8), (3, 3, 5))
    assert opts.label == "fp8=off, compile=off, sparse=sta:t3x8x8:w3x3x5"
    assert opts.to_dict() == {"fp8": "off", "compile": "off", "sparse": "sta:t3x8x8:w3x3x5"}
    assert ServingOptions().to_dict() == {"fp8": "off", "compile": "off"} and ServingOptions().sliding_tile is None
    assert ServingOptions.from_dict(opts.to_dict()) == opts
    reg = {"sparse": "sta:t1x2x2:w1x1x1"}
    assert ServingOptions.resolve(reg, {}, {}).sparse == "sta:t1x2x2:w1x1x1"
    assert ServingOptions.resolve(reg, {"RCM_SPARSE": "off"}, {}).sparse == "off"
    assert ServingOptions.resolve(reg, {"RCM_SPARSE": "off"}, {"sparse": "sta:t3x8x8:w3x3x5"}) == opts
    assert ServingOptions.resolve(reg, {}, {"sparse": None}).sparse == "sta:t1x2x2:w1x1x1"
    for bad in ("on", "sta:t3x8:w3x3x3", "sta:t3x8x8:w2x3x3", "sta:t0x8x8:w3x3x3", "sta:t3x8x8"):
        with pytest.raises(ValueError, match=rf"serving option sparse='{bad}'"):
            ServingOptions(sparse=bad)
    with pytest.raises(ValueError, match=r"serving option sparse='sta:t3x8x8:w4x3x3'"):
        ServingOptions.resolve(None, {"RCM_SPARSE": "sta:t3x8x8:w4x3x3"}, {})
    with pytest.raises(ValueError, match=r"\['sparsity'\].*unknown \(known: fp8, compile, sparse, overlap\)"):
        ServingOptions.from_dict({"sparsity": "on"})


def test_serving_option_makes_every_denoiser_call_sparse(monkeypatch):
    from rcm_core.nets.denoiser import TrigFlowDenoiser

    x, _, ctx = dit_inputs()
    tt = torch.tensor([0.4, 1.1], dtype=torch.float64)
    with torch.no_grad():
        plain = TrigFlowDenoiser(tiny_dit())(x, tt, ctx)
        den = apply_serving_options(TrigFlowDenoiser(tiny_dit()), ServingOptions(sparse="sta:t1x2x2:w1x1x1"))
        got = den(x, tt, ctx)
        seen = []
        real = sa.sliding_tile_attention
        monkeypatch.setattr(sa, "sliding_tile_attention",
                            lambda q, k, v, spec, **kw: seen.append(spec) or real(q, k, v, spec, **kw))
        x2 = torch.randn(1, 1, 2, 4, 6, dtype=torch.float64)      # another size: the grid follows the latent
        den(x2, tt[:1], ctx[:1])
        assert seen == [TileSpec((2, 2, 3), (1, 2, 2), (1, 1, 1))] * 2
        assert (got - plain).abs().max() > 1e-3
        # the same denoiser with this file's masked attention for self-attention: equal
        import rcm_core.teachers.embedded.dit as dit
        monkeypatch.setattr(dit, "attention", by_hand(expected_mask((4, 4, 6), (1, 2, 2), (1, 1, 1))))
        want = TrigFlowDenoiser(tiny_dit())(x, tt, ctx)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        monkeypatch.undo()
        # applied again with sparse off: dense
        from rcm_core.nets.serving import sparse_forward
        torch.testing.assert_close(sparse_forward(den, None)(x, tt, ctx), plain, rtol=0, atol=1e-12)
        # a latent smaller than the tile names the option
        den = apply_serving_options(den, ServingOptions(sparse="sta:t3x2x2:w1x1x1"))
        with pytest.raises(ValueError, match=r"serving option sparse=sta:t3x2x2:w1x1x1 on latents \(1, 1, 2, 4, 6\)"
                                             r".*TileSpec.tile"):
            den(x2, tt[:1], ctx[:1])


def test_compiled_blocks_follow_the_context(monkeypatch):
    """Serving's compile and sparse together: compiled blocks run sparse inside the context, through flex_attention
    traced in the block's graph (forced here on the CPU), and dense outside it (dynamo guards on the thread's
    sparse state). Tiles of 36 tokens on a grid they do not divide: blocks straddle tiles, padded keys inside
    tiles and past the last one (tail to whole blocks). Expected: the eager network with this file's mask."""
    import functools

    import rcm_core.teachers.embedded.dit as dit
    from rcm_core.nets.serving import compile_blocks

    def net32():
        torch.manual_seed(0)
        net = dit.VideoDiT(dit.VideoDiTConfig(dim=32, heads=2, layers=2, ffn_dim=48, text_dim=16, freq_dim=16))
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0.0, 0.3)
        return net.eval().requires_grad_(False)
    x, t, ctx = (z.float() for z in dit_inputs())
    eager, net = net32(), net32()
    compile_blocks(net)
    grid = token_grid(net, x.shape)
    spec = TileSpec(grid, (3, 3, 4), (1, 1, 1))              # tiles (2, 2, 2), 288 tile-major tokens, 320 in blocks
    with torch.no_grad():
        dense_eager = eager(x, t, ctx)
        monkeypatch.setattr(sa, "sliding_tile_attention", functools.partial(sa.sliding_tile_attention, backend="flex"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with sparse_self_attention(spec):
                sparse = net(x, t, ctx)
            dense = net(x, t, ctx)
        monkeypatch.setattr(dit, "attention", by_hand(expected_mask(grid, spec.tile, spec.window)))
        want = eager(x, t, ctx)
    torch.testing.assert_close(sparse, want, rtol=0, atol=2e-5)
    torch.testing.assert_close(dense, dense_eager, rtol=0, atol=2e-5)
    assert (sparse - dense).abs().max() > 1e-2

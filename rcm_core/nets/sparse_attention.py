"""Sliding-tile (block-sparse) self-attention for serving the frozen student (issue 23, item 3).

The video DiT's self-attention runs over a token grid (F, H, W) in raster order (frame-major, then row,
then column: what ``Conv3d`` patchify + ``flatten(2)`` produce, in diffusers' Wan and the embedded VideoDiT).
Sliding-tile attention (STA, FastVideo) cuts the grid into tiles of ``tile = (tf, th, tw)`` tokens; every
query of a tile attends to the keys of the ``window = (wf, wh, ww)`` tiles around it (odd, in tiles), the
window shifted inward at the borders so that it never leaves the grid (STA's clamping): along an axis of
``n`` tiles, a query tile ``i`` attends to key tiles ``j`` with ``|c - j| <= w // 2`` where
``c = min(max(i, w // 2), n - 1 - w // 2)``; a window of ``w >= n`` tiles covers the whole axis. The mask is
the product of the three axes' masks and constant over a (query tile, key tile) pair, so in a tile-major
token order it is block sparse and whole blocks are skipped.

* CUDA: ``torch.nn.attention.flex_attention`` (compiled) on q, k, v permuted to tile-major order (padded
  where the grid is not divisible by the tile: padded keys are masked, padded queries' outputs dropped),
  with a ``BlockMask`` built from the tile structure (:func:`block_tables`), cached per (spec, device).
* elsewhere: the exact reference, dense attention with the equivalent boolean mask in raster order, chunked
  over queries (a chunk x N block of scores at a time), accumulated in float32 (float64 for float64 inputs).
  ``backend="flex"`` forces the flex path on any device (the CPU tests run it compiled; eager flex
  materialises the whole score matrix).

Primal only: q, k, v with forward-AD tangents, inside ``torch.func`` transforms or requiring grad are
refused. Sparse attention is a serving option of the frozen student, never for training or distillation.

Networks keep calling :func:`rcm_core.nets.attention.attention`; a forward runs sparse inside

    spec = TileSpec(token_grid(denoiser, x.shape), tile=(3, 8, 8), window=(3, 3, 5))
    with sparse_self_attention(spec):
        out = denoiser(x, t, cond)

which sets ``rcm_core.nets.base._STATE.sparse``; the op then routes the calls whose query and key lengths both
equal the grid's token count (self-attention; also the local attention inside context parallelism's
Ulysses all-to-all, which sees whole sequences) here, and every other call (cross-attention to the text or
image tokens) stays dense.

Serving (:mod:`rcm_core.nets.serving`): option ``sparse`` (``"off"`` or ``"sta:t3x8x8:w3x3x5"``, env
``RCM_SPARSE``): :func:`rcm_core.nets.serving.apply_serving_options` wraps the denoiser's network call in
:func:`sparse_self_attention` with the grid of each call's latent. To wire it into an entry point (generate
CLI, pyfunc ``model_config``), pass the key through like ``fp8`` / ``compile``: ``ServingOptions.resolve``
already reads ``sparse`` from the registered settings, ``RCM_SPARSE`` and the call, and
``apply_serving_options`` applies it (two-expert students are refused by the pyfunc's layout check, as for
the other options).

Its quality on real weights is not measured yet; ``bench/sparse_attention.py`` measures its speed and its
attention-output error against dense attention on random inputs.
"""
from __future__ import annotations

import contextlib
import functools
import math
import re
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .base import _STATE

__all__ = ["TileSpec", "SlidingTile", "parse_sliding_tile", "sliding_tile_attention", "sliding_tile_mask",
           "tile_permutation", "to_tiles", "from_tiles", "density", "block_tables", "token_grid",
           "sparse_self_attention", "active_sparse_spec", "SPARSE_BACKENDS", "WAN_480P_GRID",
           "WAN_480P_TILE"]

SPARSE_BACKENDS = ("auto", "flex", "reference")
WAN_480P_GRID = (21, 30, 52)        # Wan2.1 at 480x832x81: latent 21x60x104, patch (1, 2, 2)
# The tile for that grid: (3, 8, 8) = 192 tokens -> tiles (7, 4, 7); the frames divide exactly, rows and
# columns are padded to 32 and 56 (37632 tile-major tokens, +15 %). 192 is a multiple of the 64-token block
# (:func:`_block_size`), so every block lies in one tile: whole blocks are skipped or computed unmasked, and
# only blocks holding padded keys evaluate the mask. No tile of a multiple of 64 tokens divides (21, 30, 52)
# (30 and 52 hold 2 and 4 as powers of two), so some padding is unavoidable; (2, 8, 8) = 128 tokens (128-token
# blocks, flex's default kernel tiles) pads the frames too (+20 %); (1, 8, 8) pads as (3, 8, 8) with 3x the
# tiles. Windows (3, 3, 3) / (3, 3, 5) / (5, 3, 5) attend 14.6 / 24.4 / 40.6 % of the pairs (:func:`density`)
# and compute 18 / 30 / 50 % of the dense work (padding included: bench/sparse_attention.py, column work).
WAN_480P_TILE = (3, 8, 8)
# Query rows per chunk of the reference path (a chunk x N block of scores at a time).
_CHUNK = 1024

Int3 = Tuple[int, int, int]


def _int3(name: str, value) -> Int3:
    try:
        out = tuple(int(x) for x in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or any(x != y for x, y in zip(out, value)) or any(x <= 0 for x in out):
        raise ValueError(f"TileSpec.{name} must be 3 positive ints (frames, height, width), got {value!r}")
    return out


@dataclass(frozen=True)
class TileSpec:
    """Sliding-tile attention over a token grid: ``grid`` (F, H, W) tokens, ``tile`` (tf, th, tw) tokens,
    ``window`` (wf, wh, ww) tiles (odd; a window of at least an axis' tile count covers that axis)."""
    grid: Int3
    tile: Int3
    window: Int3

    def __post_init__(self):
        for name in ("grid", "tile", "window"):
            object.__setattr__(self, name, _int3(name, getattr(self, name)))
        even = [w for w in self.window if w % 2 == 0]
        if even:
            raise ValueError(f"TileSpec.window must be odd along every axis (a window centred on the query "
                             f"tile), got {self.window}")
        big = [a for a, (t, g) in enumerate(zip(self.tile, self.grid)) if t > g]
        if big:
            raise ValueError(f"TileSpec.tile {self.tile} is larger than the grid {self.grid} along axis "
                             f"{'FHW'[big[0]]}: use a tile no larger than the grid")

    @property
    def tokens(self) -> int:
        """Tokens of the grid (the self-attention sequence length)."""
        return math.prod(self.grid)

    @property
    def tiles(self) -> Int3:
        """Tiles per axis (the last one partial where the grid is not divisible by the tile)."""
        return tuple(-(-g // t) for g, t in zip(self.grid, self.tile))

    @property
    def tile_tokens(self) -> int:
        return math.prod(self.tile)

    @property
    def padded_tokens(self) -> int:
        """Tokens in tile-major order, padding included."""
        return math.prod(self.tiles) * self.tile_tokens

    @property
    def label(self) -> str:
        return "sta:t{}x{}x{}:w{}x{}x{}".format(*self.tile, *self.window)


# --- the serving option's value ---------------------------------------------------------------------------

_SPEC_RE = re.compile(r"^sta:t(\d+)x(\d+)x(\d+):w(\d+)x(\d+)x(\d+)$")


@dataclass(frozen=True)
class SlidingTile:
    """Tile and window without a grid (the serving option); :meth:`spec` binds them to a call's grid."""
    tile: Int3
    window: Int3

    def spec(self, grid) -> TileSpec:
        return TileSpec(grid, self.tile, self.window)

    @property
    def label(self) -> str:
        return "sta:t{}x{}x{}:w{}x{}x{}".format(*self.tile, *self.window)


def parse_sliding_tile(value: str, option: str = "sparse") -> Optional[SlidingTile]:
    """``"off"`` -> None; ``"sta:t3x8x8:w3x3x5"`` -> tile (3, 8, 8) tokens, window (3, 3, 5) tiles. Anything
    else raises ``ValueError`` naming ``option``."""
    if value == "off":
        return None
    m = _SPEC_RE.match(str(value).strip())
    if not m:
        raise ValueError(f"serving option {option}={value!r}: expected 'off' or 'sta:t<F>x<H>x<W>:w<F>x<H>x<W>' "
                         "(tile in tokens, window in tiles, odd), e.g. 'sta:t3x8x8:w3x3x5'")
    n = [int(x) for x in m.groups()]
    tile, window = tuple(n[:3]), tuple(n[3:])
    if any(x <= 0 for x in n) or any(w % 2 == 0 for w in window):
        raise ValueError(f"serving option {option}={value!r}: tile sizes must be positive and window sizes odd "
                         f"positive (got tile {tile}, window {window})")
    return SlidingTile(tile, window)


# --- the mask ---------------------------------------------------------------------------------------------

def _axis_allowed(n_tiles: int, window: int, device=None) -> torch.Tensor:
    """(n, n) bool: query tile i attends to key tile j along one axis (STA's clamped window)."""
    i = torch.arange(n_tiles, device=device)
    half = window // 2
    if window >= n_tiles:
        return torch.ones(n_tiles, n_tiles, dtype=torch.bool, device=device)
    centre = i.clamp(half, n_tiles - 1 - half)
    return (centre[:, None] - i[None, :]).abs() <= half


def _token_tiles(spec: TileSpec, device=None) -> torch.Tensor:
    """(N, 3) tile coordinates of the grid's tokens in raster order."""
    axes = [torch.arange(g, device=device) // t for g, t in zip(spec.grid, spec.tile)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def sliding_tile_mask(spec: TileSpec, rows: Optional[slice] = None, device=None) -> torch.Tensor:
    """(Nq, N) bool: which keys each query attends to, tokens in raster order (``rows``: a slice of queries)."""
    tiles = _token_tiles(spec, device)
    q = tiles if rows is None else tiles[rows]
    mask = None
    for a in range(3):
        allowed = _axis_allowed(spec.tiles[a], spec.window[a], device)
        m = allowed[q[:, a][:, None], tiles[:, a][None, :]]
        mask = m if mask is None else mask & m
    return mask


def density(spec: TileSpec) -> float:
    """Fraction of the grid's (query, key) token pairs attended (1.0: dense). The mask is a product over the
    axes, so the count is the product of the per-axis counts over token coordinates."""
    count = 1
    for g, t, n, w in zip(spec.grid, spec.tile, spec.tiles, spec.window):
        ti = torch.arange(g) // t
        count *= int(_axis_allowed(n, w)[ti[:, None], ti[None, :]].sum())
    return count / spec.tokens ** 2


# --- the tile-major order -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _permutation_cpu(spec: TileSpec) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    (F, H, W), (tf, th, tw), (nf, nh, nw) = spec.grid, spec.tile, spec.tiles
    # padded grid coordinates, enumerated tile-major: (tile f, tile h, tile w, in-tile f, in-tile h, in-tile w)
    a = [torch.arange(n) for n in (nf, nh, nw, tf, th, tw)]
    cf, ch, cw, lf, lh, lw = torch.meshgrid(*a, indexing="ij")
    f, h, w = (cf * tf + lf).reshape(-1), (ch * th + lh).reshape(-1), (cw * tw + lw).reshape(-1)
    valid = (f < F) & (h < H) & (w < W)
    raster = (f * H + h) * W + w
    gather = torch.where(valid, raster, torch.zeros_like(raster))
    inverse = torch.empty(spec.tokens, dtype=torch.long)
    inverse[raster[valid]] = torch.nonzero(valid).squeeze(1)
    return gather, valid, inverse


def tile_permutation(spec: TileSpec, device=None):
    """``(gather, valid, inverse)``: position p of the tile-major order holds raster token ``gather[p]`` where
    ``valid[p]`` (padding elsewhere, gathering token 0, never attended); raster token i sits at ``inverse[i]``.
    Lengths: ``spec.padded_tokens`` (gather, valid) and ``spec.tokens`` (inverse)."""
    gather, valid, inverse = _permutation_cpu(spec)
    return gather.to(device), valid.to(device), inverse.to(device)


def to_tiles(x: torch.Tensor, spec: TileSpec, dim: int = 2) -> torch.Tensor:
    """``x`` with its token axis ``dim`` (raster order, ``spec.tokens`` long) in tile-major order, padded."""
    gather, _, _ = tile_permutation(spec, x.device)
    return x.index_select(dim, gather)


def from_tiles(x: torch.Tensor, spec: TileSpec, dim: int = 2) -> torch.Tensor:
    """Inverse of :func:`to_tiles`: raster order, padding dropped."""
    _, _, inverse = tile_permutation(spec, x.device)
    return x.index_select(dim, inverse)


# --- the flex path --------------------------------------------------------------------------------------------

def _block_size(spec: TileSpec) -> int:
    """The BlockMask's block (query and key) in tokens: 128 where it divides the tile's token count, else 64
    (flex's Hopper kernel then runs 64 x 64 blocks). A tile of a multiple of 64 tokens makes every block lie in
    one tile: whole blocks are skipped or computed without evaluating the mask; other tiles run correctly,
    with the blocks that straddle tiles partially masked (slower)."""
    return 128 if spec.tile_tokens % 128 == 0 else 64


def block_tables(spec: TileSpec, block: int):
    """``(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, length)`` of the BlockMask at
    ``block`` tokens, from the tile structure (the tile-major sequence padded to ``length``, a multiple of
    ``block``). Full blocks: every (query, key) pair attended and no padded key; partial: some pair attended
    (the mask function decides per pair). Computed at units of gcd(tile tokens, block), each inside one tile
    and one block."""
    T, n_t = spec.tile_tokens, math.prod(spec.tiles)
    length = -(-n_t * T // block) * block
    g = math.gcd(T, block)
    n_units = length // g
    allowed = None                      # (n_t, n_t) tile pairs: product of the axes' masks
    for a in range(3):
        ax = _axis_allowed(spec.tiles[a], spec.window[a])
        idx = torch.stack(torch.meshgrid(*[torch.arange(n) for n in spec.tiles], indexing="ij"), -1).reshape(-1, 3)
        m = ax[idx[:, a][:, None], idx[:, a][None, :]]
        allowed = m if allowed is None else allowed & m
    unit_tile = torch.arange(n_units) * g // T
    in_seq = unit_tile < n_t
    ut = unit_tile.clamp(max=n_t - 1)
    pairs = allowed[ut[:, None], ut[None, :]] & in_seq[:, None] & in_seq[None, :]
    _, valid, _ = _permutation_cpu(spec)
    valid = torch.cat([valid, torch.zeros(length - valid.numel(), dtype=torch.bool)]).reshape(n_units, g)
    key_any, key_all = valid.any(1), valid.all(1)
    per = block // g
    nb = length // block
    some = (pairs & key_any[None, :]).reshape(nb, per, nb, per).any(3).any(1)
    full = (pairs & key_all[None, :]).reshape(nb, per, nb, per).all(3).all(1)
    partial = some & ~full

    def pack(m):
        num = m.sum(1).to(torch.int32)
        order = torch.argsort(m.to(torch.int8), dim=1, descending=True, stable=True).to(torch.int32)
        return num[None, None], order[None, None]
    return (*pack(partial), *pack(full), length)


def _mask_mod(spec: TileSpec):
    """The flex mask function, evaluated in partial blocks only. Where every block lies inside one tile (the
    tile's token count a multiple of the block) the tables already decide the tile pairs and partial blocks
    are those with padded keys: the mask is the keys' validity, shared by all windows on a (grid, tile) (one
    compiled kernel for them). Otherwise the whole sliding-tile rule."""
    if spec.tile_tokens % _block_size(spec) == 0:
        return _key_mask_mod(spec.grid, spec.tile)
    return _tile_mask_mod(spec)


@functools.lru_cache(maxsize=32)
def _key_mask_mod(grid: Int3, tile: Int3):
    """True for real (not padded) keys, on tile-major positions."""
    (F, H, W), (tf, th, tw) = grid, tile
    nh, nw = -(-H // th), -(-W // tw)
    T = tf * th * tw

    def mask_mod(b, h, q_idx, kv_idx):
        kt, local = kv_idx // T, kv_idx % T
        kf, kh, kw = kt // (nh * nw), (kt // nw) % nh, kt % nw
        lf, lh, lw = local // (th * tw), (local // tw) % th, local % tw
        return (kf * tf + lf < F) & (kh * th + lh < H) & (kw * tw + lw < W)
    return mask_mod


def _tile_mask_mod(spec: TileSpec):
    """The whole sliding-tile rule on tile-major positions (integer arithmetic only: no captured tensors)."""
    (F, H, W), (tf, th, tw), (nf, nh, nw), (wf, wh, ww) = spec.grid, spec.tile, spec.tiles, spec.window
    T, n_t = spec.tile_tokens, nf * nh * nw

    def axis_ok(qi, ki, n, w):
        if w >= n:
            return qi >= 0
        c = qi.clamp(w // 2, n - 1 - w // 2)
        return (c - ki).abs() <= w // 2

    def mask_mod(b, h, q_idx, kv_idx):
        qt, kt = q_idx // T, kv_idx // T
        local = kv_idx % T
        kf, kh, kw = kt // (nh * nw), (kt // nw) % nh, kt % nw
        qf, qh, qw = qt // (nh * nw), (qt // nw) % nh, qt % nw
        lf, lh, lw = local // (th * tw), (local // tw) % th, local % tw
        key_real = (kt < n_t) & (kf * tf + lf < F) & (kh * th + lh < H) & (kw * tw + lw < W)
        return (key_real & (qt < n_t) & axis_ok(qf, kf, nf, wf) & axis_ok(qh, kh, nh, wh)
                & axis_ok(qw, kw, nw, ww))
    return mask_mod


@functools.lru_cache(maxsize=32)
def _block_mask(spec: TileSpec, device: str):
    from torch.nn.attention.flex_attention import BlockMask

    block = _block_size(spec)
    kv_num, kv_idx, full_num, full_idx, length = block_tables(spec, block)
    dev = torch.device(device)
    return BlockMask.from_kv_blocks(kv_num.to(dev), kv_idx.to(dev), full_num.to(dev), full_idx.to(dev),
                                    BLOCK_SIZE=block, mask_mod=_mask_mod(spec), seq_lengths=(length, length))


_FLEX = {}


def _flex():
    """``torch.compile(flex_attention)``, made once (eager flex materialises the whole score matrix)."""
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        from .library_logs import typing_truce
        typing_truce()
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _flex_attention(q, k, v, spec: TileSpec, s: float):
    """(B, H, N, D) raster-order q, k, v -> output, through flex_attention in tile-major order."""
    bm = _block_mask(spec, str(q.device))
    length = bm.seq_lengths[0]
    gather, _, inverse = tile_permutation(spec, q.device)
    pad = length - gather.numel()
    if pad:
        gather = torch.cat([gather, gather.new_zeros(pad)])      # tail padding to whole blocks (masked keys)
    qt, kt, vt = (x.index_select(2, gather) for x in (q, k, v))
    block = _block_size(spec)
    opts = {"BLOCK_M": 64, "BLOCK_N": 64} if block == 64 and q.is_cuda else None
    if torch.compiler.is_compiling():        # inside a compiled region (serving's compiled blocks): traced there
        from torch.nn.attention.flex_attention import flex_attention as flex
    else:
        flex = _flex()
    out = flex(qt, kt, vt, block_mask=bm, scale=s, kernel_options=opts)
    return out.index_select(2, inverse)


# --- the reference path ---------------------------------------------------------------------------------------

def _reference_attention(q, k, v, spec: TileSpec, s: float):
    """Exact masked attention on (B, H, N, D) raster-order tensors, chunked over query rows."""
    acc = torch.promote_types(q.dtype, torch.float32)
    kt, vv = k.to(acc).transpose(-1, -2), v.to(acc)
    outs = []
    for i in range(0, q.shape[2], _CHUNK):
        rows = slice(i, i + _CHUNK)
        sc = s * (q[:, :, rows].to(acc) @ kt)
        sc = sc.masked_fill(~sliding_tile_mask(spec, rows, q.device), float("-inf"))
        outs.append(torch.softmax(sc, dim=-1) @ vv)
    return torch.cat(outs, 2).to(q.dtype)


# --- the entry point ------------------------------------------------------------------------------------------

def _check_primal(*xs) -> None:
    from torch.autograd import forward_ad as fwAD

    F = torch._C._functorch
    for name, x in zip("qkv", xs):
        why = ("is inside a torch.func transform" if F.is_functorch_wrapped_tensor(x) else
               "carries a forward-AD tangent" if fwAD.unpack_dual(x).tangent is not None else
               "requires grad" if x.requires_grad else "")
        if why:
            raise RuntimeError(f"sliding_tile_attention: {name} {why}; sparse attention is a serving option for "
                               "the frozen student (no-grad forwards only), never for training or distillation. "
                               "Run the forward under torch.no_grad(), outside sparse_self_attention, or with "
                               "serving option sparse=off")


def sliding_tile_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: TileSpec, *,
                           scale: Optional[float] = None, layout: str = "bhnd", backend: str = "auto"
                           ) -> torch.Tensor:
    """Sliding-tile self-attention over ``spec.grid`` (tokens in raster order); q, k, v as
    :func:`rcm_core.nets.attention.attention` takes them (``layout`` "bhnd" or "bnhd", N = ``spec.tokens``).
    ``backend``: ``auto`` (flex on CUDA, the reference elsewhere), ``flex`` or ``reference``."""
    from .attention import _to_bhnd, check_attention_inputs

    check_attention_inputs(q, k, v, layout)
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"sliding_tile_attention: backend must be one of {SPARSE_BACKENDS}, got {backend!r}")
    _check_primal(q, k, v)
    n_ax = 2 if layout == "bhnd" else 1
    if not (q.shape[n_ax] == k.shape[n_ax] == spec.tokens):
        raise ValueError(f"sliding_tile_attention: q and k must have the grid's {spec.tokens} tokens "
                         f"({spec.grid}), got q {tuple(q.shape)}, k {tuple(k.shape)} ({layout})")
    s = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qb, kb, vb = (_to_bhnd(x, layout) for x in (q, k, v))
    flex = backend == "flex" or (backend == "auto" and q.is_cuda)
    o = _flex_attention(qb, kb, vb, spec, s) if flex else _reference_attention(qb, kb, vb, spec, s)
    return o if layout == "bhnd" else o.transpose(1, 2)


# --- the network's self-attention under a context -----------------------------------------------------------

def token_grid(model, latent_shape) -> Int3:
    """The self-attention token grid (F, H, W) of ``model`` (a TrigFlowDenoiser or its net: diffusers' Wan /
    Cosmos / two experts via ``config.patch_size``, the embedded VideoDiT via ``cfg.patch``) on latents of
    ``latent_shape`` (B, C, T, H, W)."""
    net = getattr(model, "net", model)
    net = getattr(net, "_orig_mod", net)
    cfg, config = getattr(net, "cfg", None), getattr(net, "config", None)
    patch = getattr(cfg, "patch", None) if cfg is not None else None
    if patch is None and config is not None:
        patch = config.get("patch_size") if isinstance(config, dict) else getattr(config, "patch_size", None)
    if patch is None:
        raise ValueError(f"token_grid: {type(net).__name__} declares no patch size (looked for .cfg.patch and "
                         ".config.patch_size)")
    patch = tuple(int(p) for p in patch)
    shape = tuple(int(x) for x in latent_shape)
    if len(shape) != 5 or len(patch) != 3:
        raise ValueError(f"token_grid: expected a 5-D latent shape (B, C, T, H, W) and a 3-D patch, got latent "
                         f"{shape} and patch {patch} ({type(net).__name__})")
    bad = [n for n, p in zip(shape[2:], patch) if n % p]
    if bad:
        raise ValueError(f"token_grid: latent {shape} is not divisible by {type(net).__name__}'s patch {patch}")
    return tuple(n // p for n, p in zip(shape[2:], patch))


@functools.lru_cache(maxsize=64)
def _router(spec: TileSpec):
    """The hook :func:`rcm_core.nets.attention.attention` calls: sparse for self-attention over the grid,
    None (dense) for anything else. One per spec (cached): a compiled block guards on it, and a new function
    per forward would recompile it every call."""
    def route(q, k, v, scale: float, layout: str):
        n_ax = 2 if layout == "bhnd" else 1
        if q.shape[n_ax] == k.shape[n_ax] == spec.tokens:
            return sliding_tile_attention(q, k, v, spec, scale=scale, layout=layout)
        return None
    route.spec = spec
    return route


@contextlib.contextmanager
def sparse_self_attention(spec: Optional[TileSpec]):
    """Inside, the network's self-attention calls (query and key lengths = ``spec.tokens``) run sliding-tile
    attention; cross-attention stays dense. ``None``: dense (a no-op). Nests; per thread."""
    prev = getattr(_STATE, "sparse", None)
    _STATE.sparse = None if spec is None else _router(spec)
    try:
        yield spec
    finally:
        _STATE.sparse = prev


def active_sparse_spec() -> Optional[TileSpec]:
    """The TileSpec in force for this thread's attention calls, or None."""
    route = getattr(_STATE, "sparse", None)
    return None if route is None else route.spec

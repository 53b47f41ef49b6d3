"""A small video DiT with Wan2.1's structure (the embedded teacher's network).

Structure (as in Wan2.1's ``WanModel``, scaled down):

* 3D patchify: ``Conv3d(in_channels, dim, kernel=stride=patch)``, ``patch = (1, 2, 2)``.
* Text: ``Linear -> GELU(tanh) -> Linear`` on the context ``(B, L, text_dim)``.
* Time: sinusoids of the timestep (RF time ``1000 s``) -> ``Linear -> SiLU -> Linear``
  (``time_embedding``) -> ``SiLU -> Linear(dim, 6 dim)`` (``time_projection``), all in
  float32 or wider even when the model runs in bf16/fp16 ("high-precision time").
* Blocks: per-block learned modulation table ``(1, 6, dim)`` added to the global
  time projection -> shift/scale/gate for self-attention and FFN;
  ``x += gate1 * SelfAttn(LN(x) * (1 + scale1) + shift1)`` with RMSNorm on q and k
  and 3D RoPE; ``x += CrossAttn(LN_affine(x), text)`` (queries from video tokens,
  keys/values from text, RMSNorm on q/k); ``x += gate2 * FFN(LN(x) * (1 + scale2) + shift2)``
  with a GELU(tanh) FFN.
* Head: its own ``(1, 2, dim)`` modulation table (shift/scale) + the time embedding,
  ``Linear(dim, C * prod(patch))``, unpatchify.

Every attention goes through :func:`rcm_core.attention.attention` (layout ``bnhd``).
No in-place ops on activations, so ``torch.func.jvp`` / forward-mode AD works w.r.t.
both ``x`` and ``timestep``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from rcm_core.nets.attention import attention

__all__ = ["VideoDiTConfig", "VideoDiT", "sinusoidal_embedding", "rope_freqs", "apply_rope",
           "rope_split"]


@dataclass
class VideoDiTConfig:
    in_channels: int = 1
    out_channels: int = 1
    patch: Tuple[int, int, int] = (1, 2, 2)
    dim: int = 96
    heads: int = 4
    layers: int = 4
    ffn_dim: int = 384
    text_dim: int = 64
    freq_dim: int = 64
    rope_theta: float = 10000.0
    qk_norm: bool = True
    eps: float = 1e-6
    # dtype of the time path: "float32" means max(float32, model dtype) -- float32 for
    # bf16/fp16/fp32 models, float64 for a float64 model (used by the exact JVP tests).
    time_dtype: str = "float32"

    def __post_init__(self):
        self.patch = tuple(int(p) for p in self.patch)
        if len(self.patch) != 3:
            raise ValueError(f"VideoDiTConfig.patch must have 3 entries (t, h, w), got {self.patch}")
        if self.dim % self.heads:
            raise ValueError(f"VideoDiTConfig: dim {self.dim} not divisible by heads {self.heads}")
        d = self.dim // self.heads
        if d % 2 or any(s <= 0 or s % 2 for s in rope_split(d)):
            raise ValueError(f"VideoDiTConfig: head dim {d} cannot be split into even t/h/w RoPE parts "
                             f"({rope_split(d)}); use a head dim that is a multiple of 6 plus even, e.g. 24, 32")
        if self.freq_dim % 2:
            raise ValueError(f"VideoDiTConfig.freq_dim must be even, got {self.freq_dim}")
        if self.time_dtype not in ("float32", "float64"):
            raise ValueError(f"VideoDiTConfig.time_dtype must be 'float32' or 'float64', got {self.time_dtype!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["patch"] = list(self.patch)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "VideoDiTConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"VideoDiTConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**d)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan-style sinusoids ``[cos, sin]`` of ``t`` (B,), computed in t's dtype."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=t.dtype) / half)
    a = t[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=1)


def rope_split(head_dim: int) -> Tuple[int, int, int]:
    """Wan2.1's split of the head dim over (t, h, w): d - 4(d//6), 2(d//6), 2(d//6)."""
    k = head_dim // 6
    return head_dim - 4 * k, 2 * k, 2 * k


def rope_freqs(grid: Tuple[int, int, int], head_dim: int, theta: float = 10000.0,
               device=None, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``(N, head_dim // 2)`` for a (f, h, w) token grid (row-major)."""
    parts = []
    axes = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float64) for n in grid],
                          indexing="ij")
    for pos, d in zip(axes, rope_split(head_dim)):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float64) / d)
        parts.append(pos.reshape(-1, 1) * inv[None])
    ang = torch.cat(parts, dim=1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` (B, N, H, D) by the angles of each token."""
    xr = x.unflatten(-1, (-1, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight.to(x.dtype)


class _Attn(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: Optional[int] = None, qk_norm: bool = True,
                 eps: float = 1e-6):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x, ctx=None, rope=None):
        ctx = x if ctx is None else ctx
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).unflatten(-1, (self.heads, self.head_dim))
        k = self.norm_k(self.k(ctx)).unflatten(-1, (self.heads, self.head_dim))
        v = self.v(ctx).unflatten(-1, (self.heads, self.head_dim))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = attention(q, k, v, layout="bnhd")
        return self.o(o.flatten(-2))


class Block(nn.Module):
    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = _Attn(d, cfg.heads, qk_norm=cfg.qk_norm, eps=cfg.eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = _Attn(d, cfg.heads, qk_norm=cfg.qk_norm, eps=cfg.eps)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d ** 0.5)

    def forward(self, x, e, ctx, rope):
        # e: (B, 6, dim) time projection in the time dtype; modulation in that dtype too.
        m = (self.modulation.to(e.dtype) + e).to(x.dtype)
        sh1, sc1, g1, sh2, sc2, g2 = m.unbind(1)
        y = self.self_attn(self.norm1(x) * (1 + sc1[:, None]) + sh1[:, None], rope=rope)
        x = x + y * g1[:, None]
        x = x + self.cross_attn(self.norm3(x), ctx=ctx)
        y = self.ffn(self.norm2(x) * (1 + sc2[:, None]) + sh2[:, None])
        return x + y * g2[:, None]


class Head(nn.Module):
    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(d, cfg.out_channels * math.prod(cfg.patch))
        self.modulation = nn.Parameter(torch.randn(1, 2, d) / d ** 0.5)

    def forward(self, x, e):
        m = (self.modulation.to(e.dtype) + e[:, None]).to(x.dtype)
        sh, sc = m.unbind(1)
        return self.head(self.norm(x) * (1 + sc[:, None]) + sh[:, None])


class VideoDiT(nn.Module):
    """``forward(x (B,C,T,H,W), timestep (B,), context (B,L,text_dim)) -> (B,C,T,H,W)``.

    Predicts the rectified-flow velocity ``v = eps - x0`` for ``x_s = (1-s) x0 + s eps``
    at ``timestep = 1000 s``.
    """

    def __init__(self, cfg: Optional[VideoDiTConfig] = None, **kw):
        super().__init__()
        if cfg is None:
            cfg = VideoDiTConfig(**kw)
        elif kw:
            raise ValueError("VideoDiT: pass either a config or keyword arguments, not both")
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch, stride=cfg.patch)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                            nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.head = Head(cfg)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in self.text_embedding.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for m in self.time_embedding.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    # -- validation -----------------------------------------------------------------
    def _check(self, x, timestep, context):
        cfg = self.cfg
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            raise ValueError(f"VideoDiT: x must be 5-D (B, C, T, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        b, c, t, h, w = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"VideoDiT: x has {c} channels, config in_channels={cfg.in_channels}")
        for name, n, p in (("T", t, cfg.patch[0]), ("H", h, cfg.patch[1]), ("W", w, cfg.patch[2])):
            if n % p:
                raise ValueError(f"VideoDiT: x {name}={n} not divisible by patch {p} (x shape {tuple(x.shape)})")
        if not isinstance(timestep, torch.Tensor) or timestep.shape != (b,):
            raise ValueError(f"VideoDiT: timestep must have shape ({b},) matching x's batch, got "
                             f"{tuple(timestep.shape) if isinstance(timestep, torch.Tensor) else type(timestep).__name__}")
        if not isinstance(context, torch.Tensor) or context.dim() != 3:
            raise ValueError(f"VideoDiT: context must be 3-D (B, L, {cfg.text_dim}), got "
                             f"{tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__}")
        if context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(f"VideoDiT: context shape {tuple(context.shape)} does not match "
                             f"(B={b}, L, text_dim={cfg.text_dim})")

    # -- time path (high precision) ---------------------------------------------------
    def _time(self, timestep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pdt = self.time_embedding[0].weight.dtype
        tdt = torch.promote_types(torch.promote_types(pdt, torch.float32), timestep.dtype
                                  if timestep.is_floating_point() else torch.float32)
        if self.cfg.time_dtype == "float64":
            tdt = torch.float64
        if not torch.is_floating_point(timestep):
            timestep = timestep.float()
        with torch.autocast(device_type=timestep.device.type, enabled=False):
            t = timestep.to(tdt)
            s = sinusoidal_embedding(t, self.cfg.freq_dim)
            l1, l2 = self.time_embedding[0], self.time_embedding[2]
            e = F.linear(s, l1.weight.to(tdt), l1.bias.to(tdt))
            e = F.linear(F.silu(e), l2.weight.to(tdt), l2.bias.to(tdt))
            lp = self.time_projection[1]
            e0 = F.linear(F.silu(e), lp.weight.to(tdt), lp.bias.to(tdt)).unflatten(1, (6, self.cfg.dim))
        return e, e0

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self._check(x, timestep, context)
        cfg = self.cfg
        b, c, t, h, w = x.shape
        pt, ph, pw = cfg.patch
        grid = (t // pt, h // ph, w // pw)
        wdt = self.patch_embedding.weight.dtype
        tok = self.patch_embedding(x.to(wdt)).flatten(2).transpose(1, 2)  # (B, N, dim)
        ctx = self.text_embedding(context.to(wdt))
        e, e0 = self._time(timestep)
        rope = rope_freqs(grid, cfg.head_dim, cfg.rope_theta, device=x.device,
                          dtype=torch.promote_types(wdt, torch.float32))
        for blk in self.blocks:
            tok = blk(tok, e0, ctx, rope)
        out = self.head(tok, e)  # (B, N, C * pt * ph * pw)
        co = cfg.out_channels
        out = out.reshape(b, *grid, pt, ph, pw, co)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, co, t, h, w)
        return out.to(x.dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

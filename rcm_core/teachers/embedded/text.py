"""The project's own frozen text encoder (no download, deterministic everywhere).

* Tokenizer: lower-case, split on anything that is not a letter or digit, append an
  end-of-sequence token ``</s>`` (as T5 does, so the empty prompt is not all zeros),
  truncate to ``max_tokens`` (with a warning naming the prompt), pad.
* Token embedding: each word gets a vector from a ``torch.Generator`` seeded with
  ``zlib.crc32(word)`` (stable across processes; unknown words still get a stable
  embedding), scaled to unit RMS.
* Positional sinusoids are added, then two fixed, seeded residual mixing layers
  (LayerNorm -> Linear -> GELU -> Linear) make the output look like a real encoder's
  (contextual, not one-hot-like). Padded positions are zero in the output, as with
  Wan2.1's padded umT5 context.

All maths runs in float64 on the CPU and is cast to float32 at the end, so the
output is identical across processes on a machine and agrees to float32 rounding
across machines.
"""
from __future__ import annotations

import math
import re
import warnings
import zlib
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

__all__ = ["TextEncoder", "tokenize", "EOS", "PAD"]

EOS = "</s>"
PAD = "<pad>"
_SPLIT = re.compile(r"[^0-9a-z]+")
_MIX_SEED = 20251008


def tokenize(prompt: str, max_tokens: int = 16) -> Tuple[List[str], bool]:
    """Word-level tokens of ``prompt`` (plus ``</s>``), and whether it was truncated."""
    if not isinstance(prompt, str):
        raise TypeError(f"tokenize: prompt must be str, got {type(prompt).__name__}")
    words = [w for w in _SPLIT.split(prompt.lower()) if w] + [EOS]
    truncated = len(words) > max_tokens
    return words[:max_tokens], truncated


def _word_vector(word: str, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{word}|{dim}".encode("utf-8")))
    v = torch.randn(dim, generator=g, dtype=torch.float64)
    return v / v.pow(2).mean().sqrt()


class TextEncoder(nn.Module):
    """Frozen encoder: ``encode(list[str]) -> (B, max_tokens, dim)`` float32."""

    def __init__(self, dim: int = 64, max_tokens: int = 16, seed: int = _MIX_SEED):
        super().__init__()
        if dim % 2:
            raise ValueError(f"TextEncoder: dim must be even, got {dim}")
        self.dim, self.max_tokens, self.seed = int(dim), int(max_tokens), int(seed)
        g = torch.Generator().manual_seed(self.seed)
        pos = torch.arange(self.max_tokens, dtype=torch.float64)[:, None]
        freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        pe = torch.zeros(self.max_tokens, dim, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos * freqs)
        pe[:, 1::2] = torch.cos(pos * freqs)
        self.register_buffer("pos", pe, persistent=False)
        hid = 2 * dim
        for i in range(2):
            w1 = torch.randn(hid, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
            w2 = torch.randn(dim, hid, generator=g, dtype=torch.float64) / math.sqrt(hid)
            self.register_buffer(f"w1_{i}", w1, persistent=False)
            self.register_buffer(f"w2_{i}", w2, persistent=False)
        self._cache: Dict[str, torch.Tensor] = {}
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: always eval
        return super().train(False)

    def _embed(self, word: str) -> torch.Tensor:
        if word == PAD:
            return torch.zeros(self.dim, dtype=torch.float64)
        v = self._cache.get(word)
        if v is None:
            v = self._cache[word] = _word_vector(word, self.dim)
        return v

    def tokenize(self, prompts: Sequence[str]) -> Tuple[List[List[str]], torch.Tensor]:
        toks, masks = [], []
        for p in prompts:
            words, truncated = tokenize(p, self.max_tokens)
            if truncated:
                warnings.warn(f"TextEncoder: prompt truncated to {self.max_tokens} tokens: {p!r}",
                              stacklevel=3)
            masks.append([1.0] * len(words) + [0.0] * (self.max_tokens - len(words)))
            toks.append(words + [PAD] * (self.max_tokens - len(words)))
        return toks, torch.tensor(masks, dtype=torch.float64)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError("TextEncoder.encode expects a list of prompts, got a single str")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("TextEncoder.encode: empty prompt list")
        toks, mask = self.tokenize(prompts)
        x = torch.stack([torch.stack([self._embed(w) for w in ws]) for ws in toks])
        x = x + self.pos.cpu().double()
        m = mask[..., None]
        for i in range(2):
            w1, w2 = (getattr(self, f"w{j}_{i}").cpu().double() for j in (1, 2))
            # contextual mixing: add the masked mean over tokens before the MLP
            ctx = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
            h = nn.functional.layer_norm(x + ctx, (self.dim,))
            x = x + nn.functional.gelu(h @ w1.T, approximate="tanh") @ w2.T
        x = nn.functional.layer_norm(x, (self.dim,)) * m
        return x.to(torch.float32).to(self.pos.device)

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode(prompts)

    def negative(self, batch: int = 1) -> torch.Tensor:
        """The empty / negative prompt embedding, ``encode([""])`` repeated."""
        return self.encode([""]).expand(batch, -1, -1).clone()

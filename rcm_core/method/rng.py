"""Per-sample random streams: what a sample draws depends only on (seed, step, its global index).

The trainer draws every random number of a training sample (its time, noise, rollout times and
renoising noise, DMD time and noise) from that sample's own generator. So a run gives the same
result whatever the number of GPUs, the micro-batch size (gradient accumulation) or the place of a
resume, as long as the global batch is the same: rank r's rows are global samples r*b .. r*b+b-1.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def stream_seed(*key) -> int:
    """A 63-bit seed from a tuple of ints/strings (SHA-256; independent streams for distinct keys)."""
    digest = hashlib.sha256(":".join(str(k) for k in ("rcm", *key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SampleRNG:
    """One generator per sample of a batch, seeded by (seed, step, global sample index)."""

    def __init__(self, seed: int, step: int, indices: Sequence[int], device: torch.device | str = "cpu",
                 _gens=None):
        self.device = torch.device(device)
        self.indices = list(indices)
        if _gens is None:
            _gens = []
            for i in self.indices:
                g = torch.Generator(device=self.device)
                g.manual_seed(stream_seed(seed, step, i))
                _gens.append(g)
        self.gens = _gens

    def __len__(self) -> int:
        return len(self.gens)

    def subset(self, start: int, stop: int) -> "SampleRNG":
        """The streams of rows start..stop-1 (shared, not copied: drawing from it advances them)."""
        return SampleRNG(0, 0, self.indices[start:stop], self.device, _gens=self.gens[start:stop])

    def randn(self, shape: Sequence[int] = ()) -> torch.Tensor:
        """(B, *shape) standard normal, float64; row i from sample i's stream."""
        return torch.stack([torch.randn(tuple(shape), generator=g, device=self.device, dtype=torch.float64)
                            for g in self.gens])

    def rand(self) -> torch.Tensor:
        """(B,) uniform in [0, 1), float64."""
        return torch.stack([torch.rand((), generator=g, device=self.device, dtype=torch.float64)
                            for g in self.gens])

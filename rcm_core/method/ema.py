"""Power EMA of the student's weights (EDM2 style, relative std sigma_rel)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .losses import ema_exponent, power_ema_beta


class PowerEMA:
    """ema <- beta_t ema + (1 - beta_t) theta with beta_t = (1 - 1/t)^(gamma + 1)."""

    def __init__(self, module: nn.Module, sigma_rel: float = 0.05, copy_module: bool = True):
        """``copy_module=False``: ``module`` already is the EMA's own copy (e.g. sharded like the student)."""
        self.sigma_rel = sigma_rel
        self.gamma = ema_exponent(sigma_rel)
        self.module = (copy.deepcopy(module) if copy_module else module).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> float:
        self.num_updates += 1
        beta = power_ema_beta(self.num_updates, self.gamma)
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1 - beta)
        for e, b in zip(self.module.buffers(), module.buffers()):
            e.copy_(b)
        return beta

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "sigma_rel": self.sigma_rel}

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd["module"])
        self.num_updates = int(sd["num_updates"])

"""An exponential moving average (EMA) of a module's weights, the usual companion of diffusion training."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``module`` holds the average: after each optimiser step, w_ema <- decay w_ema + (1 - decay) w.

    It is a frozen copy of the trained module (same class and config, so it saves and samples like
    it), in fp32 whatever the trained module's dtype.
    """

    def __init__(self, trained: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(trained).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, trained: nn.Module) -> None:
        averages = [p for p in self.module.parameters()]
        current = [p.detach().float() for p in trained.parameters()]
        torch._foreach_lerp_(averages, current, 1.0 - self.decay)

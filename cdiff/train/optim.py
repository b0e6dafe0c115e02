"""The optimiser and learning-rate schedule of the paper: AdamW, linear warm-up, then cosine."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cdiff.train.config import OptimConfig


@dataclass
class WarmupCosine:
    """lr factor at scheduler step ``n``: n / warmup during warm-up, then 0.5 (1 + cos(pi p)) with
    p the fraction of the remaining steps done (diffusers' "cosine" schedule, which the release
    uses), or 1 after warm-up for ``cosine=False``. A plain object, so LambdaLR saves its fields."""

    warmup: int
    total: int
    cosine: bool = True

    def __call__(self, n: int) -> float:
        if n < self.warmup:
            return n / self.warmup
        if not self.cosine:
            return 1.0
        progress = (n - self.warmup) / max(1, self.total - self.warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def adamw(parameters, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``parameters`` with the fused implementation (one kernel for all tensors)."""
    return torch.optim.AdamW(
        parameters, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay, fused=True
    )


def warmup_cosine(optimizer, config: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = WarmupCosine(config.warmup_steps, total_steps, cosine=config.schedule == "cosine")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

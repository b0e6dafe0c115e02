"""The optimiser and the learning-rate schedules: AdamW, linear warm-up, then cosine (C-DiffSET's
paper and release), constant, or S2O-NPDE's linear decay over the second half."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cdiff.train.config import OptimConfig


@dataclass
class WarmupCosine:
    """lr factor at scheduler step ``n``: n / warmup during warm-up, then 0.5 (1 + cos(pi p)) with
    p the fraction of the remaining steps done (diffusers' "cosine" schedule, which the release
    uses), or 1 after warm-up for ``cosine=False``."""

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


@dataclass
class WarmupLinearDecay:
    """lr factor at scheduler step ``n``: n / warmup during warm-up, then 1 up to ``total`` / 2,
    then linearly to 0 at ``total`` (S2O-NPDE's schedule, CycleGAN's "linear" policy). The paper
    steps it once per epoch; counted in steps (total = epochs x steps per epoch) it is the same
    line, reached at every epoch's start, decaying within the epoch instead of in stairs."""

    warmup: int
    total: int

    def __call__(self, n: int) -> float:
        from cdiff.npde.training import lr_factor

        return n / self.warmup if n < self.warmup else lr_factor(n, self.total)


def adamw(parameters, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``parameters`` with the fused implementation (one kernel for all tensors)."""
    return torch.optim.AdamW(
        parameters, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay, fused=True
    )


class LRSchedule:
    """Sets every group's lr to its base lr x ``factor(n)`` after n scheduler steps.

    Its state is n alone: the base lrs and the factor come from the config, so a run resumed with
    --force and a new lr or length follows the new schedule from the step it stopped at.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor):
        self.optimizer, self.factor, self.steps = optimizer, factor, 0
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self._apply()

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(self.steps)

    def step(self) -> None:
        self.steps += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self._apply()


def lr_schedule(optimizer, config: OptimConfig, total_steps: int) -> LRSchedule:
    """The schedule ``config.schedule`` names, over ``total_steps`` (train.steps)."""
    if config.schedule == "linear_decay":
        return LRSchedule(optimizer, WarmupLinearDecay(config.warmup_steps, total_steps))
    return LRSchedule(optimizer, WarmupCosine(config.warmup_steps, total_steps, cosine=config.schedule == "cosine"))

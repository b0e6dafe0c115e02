"""What a model provides to be trained by cdiff.train.loop: a *task* and its *phases*.

One phase is one optimiser's update: C-DiffSET has one (cdiff.train.cdiffset); S2O-NPDE, a GAN,
has a generator phase and a discriminator phase (cdiff.train.s2o_npde). With several phases the
log names each one's loss and gradient norm ``loss_<phase>``, ``grad_norm_<phase>``, and its
terms by their own names. Which task trains which ``model.kind`` is the table in cdiff.train.kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass(frozen=True)
class Phase:
    name: str
    optimizer: str  # key of task.optimizers
    modules: tuple[str, ...]  # keys of task.modules whose gradients this phase makes, clips and steps
    loss: Callable  # (batch dict) -> (scalar loss, {name: scalar tensor} for the log)


class Task(Protocol):
    """A model in training, as the loop sees it. Built as ``Task(config, device, checkpoint)``:
    from the checkpoint folder when resuming, else from the config's ``[model]`` section."""

    modules: dict[str, nn.Module]  # the trained modules, by name (saved by the task)
    wrapped: dict[str, nn.Module]  # set by the loop: the same modules, in DDP when distributed;
    #                                the phases' losses must call these
    optimizers: dict[str, torch.optim.Optimizer]  # by name; saved and restored by name
    schedulers: dict[str, object]  # lr schedules, by name; saved and restored by name
    phases: list[Phase]  # run in order each step, each with its own optimiser
    best_metric: str  # the validation metric to maximise ("psnr")
    single_process: bool  # True: the model trains in one process, and torchrun is refused (a class attribute)

    def training_samples(self) -> tuple[Dataset, Callable | None]:
        """The items of the data stream, and their augmentation ``(sample, generator) -> sample`` or None."""

    def after_step(self) -> None:
        """Called after every optimiser step (the EMA)."""

    def validate(self, step: int) -> tuple[dict[str, float], list[torch.Tensor]]:
        """On rank 0: mean metrics, and image columns for the validation grid."""

    def save(self, folder: Path) -> None:
        """Write the model files of a checkpoint into ``folder``."""

"""What a run writes for people to read: log.jsonl, TensorBoard scalars, console lines, PNG grids.

log.jsonl holds one JSON object per line, each with ``kind``:
- "train": averages over the last ``train.log_every`` steps: ``step``, ``loss`` and the model's
  own terms (C-DiffSET: ``loss_residual`` and ``loss_logvar``, see cdiff.train.cdiffset;
  ``mean_variance``; S2O-NPDE: per phase ``loss_generator``, ``loss_discriminator`` and their
  terms, see cdiff.train.s2o_npde), ``lr``, ``grad_norm`` (before clipping; per phase, as the
  loss), ``images_per_s`` (all processes), ``peak_memory_mb`` (CUDA: the most allocated in the
  window; CPU: the process's peak resident memory), ``skipped_nonfinite`` (so far), ``seconds``
  since the run (or resume) began;
- "val": ``step``, the metrics (C-DiffSET: ``psnr``, ``ssim``, ``scc``), ``best``, ``grid``;
- "event": ``event`` ("start", "resume", "nonfinite", "checkpoint", "end") and its details.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cdiff.data.imageio import to_uint8, write_png


class Log:
    """Appends to ``RUN_DIR/log.jsonl`` and, when tensorboard is installed, ``RUN_DIR/tensorboard/``.

    Only rank 0 makes one (``enabled=False`` elsewhere makes every call a no-op).
    """

    def __init__(self, path: Path, enabled: bool, console: bool = True):
        self.enabled, self.console = enabled, console
        self.began = time.perf_counter()
        self.file = open(path, "a", buffering=1) if enabled else None
        self.board = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is optional (the "train" extra)
                SummaryWriter = None
            if SummaryWriter is not None:
                self.board = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, kind: str, **values) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, **values, "seconds": round(time.perf_counter() - self.began, 3)}
        self.file.write(json.dumps(record) + "\n")
        if self.board is not None and "step" in values:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.board.add_scalar(f"{kind}/{key}", value, values["step"])
        if self.console and (kind != "train" or not sys.stderr.isatty()):  # on a terminal, the bar shows it
            print(f"cdiff train: {kind} " + " ".join(f"{k}={_short(v)}" for k, v in values.items()), file=sys.stderr)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _as_rgb(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1 or 3, h, w) in [-1, 1] -> (B, 3, H, W), nearest-neighbour upsampling."""
    images = images.detach().float().cpu()
    if images.shape[-2:] != size:
        images = F.interpolate(images, size=size, mode="nearest")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def write_grid(path: Path, columns: list[torch.Tensor]) -> Path:
    """One PNG: a row per image, the ``columns`` ((B, C, h, w) in [-1, 1], C 1 or 3) side by side."""
    size = tuple(columns[0].shape[-2:])
    rows = torch.cat([_as_rgb(c, size) for c in columns], dim=-1)  # (B, 3, H, W * columns)
    grid = torch.cat(list(rows), dim=-2)  # (3, H * B, W * columns)
    write_png(path, to_uint8(np.ascontiguousarray(grid.permute(1, 2, 0).numpy())))
    return path

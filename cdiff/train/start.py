"""The model a C-DiffSET run starts from: a checkpoint's (a resume), ``model.init`` (+ ``model.unet``),
or, for CPU trials, cdiff's tiny stack with seeded random weights."""

from __future__ import annotations

from pathlib import Path

import torch

from cdiff.load import load_pipeline
from cdiff.pipeline import Pipeline

MODEL_FILE = "model.safetensors"  # the native model file of a checkpoint folder
TINY = "tiny"  # model.init for the tiny stack


def start_pipeline(model, checkpoint: Path | None = None) -> Pipeline:
    """The model to train, in fp32 on the CPU, from ``model`` (a [model] section,
    cdiff.train.cdiffset.CDiffSETConfig): a checkpoint's, else ``model.init`` (+ ``model.unet``)."""
    if checkpoint is not None:
        return load_pipeline(checkpoint / MODEL_FILE, dtype=torch.float32)
    if model.init == TINY:
        from cdiff.testing import tiny_pipeline

        return tiny_pipeline(model.tiny_seed)
    for path in (model.init, model.unet):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"model file not found: {path}")
    return load_pipeline(model.init, unet=model.unet or None, pad_to_77=model.pad_to_77, surgery=True,
                         dtype=torch.float32)

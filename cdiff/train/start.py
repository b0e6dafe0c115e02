"""The model a C-DiffSET run starts from: a checkpoint's (a resume), ``model.init`` (+ ``model.unet``),
or, for CPU trials, cdiff's tiny stack with seeded random weights. With ``model.fresh_unet``, the
U-Net of ``model.init`` is replaced by one of its config with seeded random weights (training
from scratch on a model's trained VAE and prompt embedding)."""

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
    pipeline = load_pipeline(model.init, unet=model.unet or None, pad_to_77=model.pad_to_77, surgery=True,
                             dtype=torch.float32)
    if model.fresh_unet:
        pipeline.unet = fresh_unet(pipeline.unet.config, pipeline.vae.config.latent_channels, model.tiny_seed)
    return pipeline


def fresh_unet(config, latent_channels: int, seed: int):
    """A U-Net of ``config`` with seeded random weights (PyTorch's initialisation), its variance
    channels zero as the C-DiffSET surgery leaves them, so the C-Diff loss starts as plain L2."""
    from cdiff.unet import UNet

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet(config)
    with torch.no_grad():
        unet.conv_out.weight[latent_channels:].zero_()
        unet.conv_out.bias[latent_channels:].zero_()
    return unet.eval()

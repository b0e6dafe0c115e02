"""The model a C-DiffSET run starts from: a checkpoint's (a resume), ``model.init`` (+ ``model.unet``)
made into the U-Net of the run's stage, or, for CPU trials, cdiff's tiny stack with seeded random
weights. With ``model.fresh_unet``, that U-Net is replaced by one of its config with seeded random
weights (training from scratch on a model's trained VAE and prompt embedding).

The U-Net each stage starts from (C = 4, the VAE's latent channels; cdiff.surgery):

    stage 1   C-in/C-out (SD 2.1)                -> conv_in widened: 2C-in/C-out
              2C-in/C-out                         -> as it is (e.g. a stage-1 U-Net trained further)
              2C-in/(C+1)-out, variance all zero  -> that channel dropped: what `cdiff convert` made
                                                     from SD 2.1 in one step, exactly SD 2.1 widened
    stage 2   2C-in/C-out (stage 1's, a released sd21ft-<dataset>) -> + the zero variance channel
              2C-in/(C+1)-out (C-DiffSET, or `cdiff convert`'s start) -> as it is

Any other U-Net is refused in one error naming the file and its shape.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from cdiff.load import load_pipeline
from cdiff.pipeline import Pipeline
from cdiff.surgery import add_variance_channel, drop_zero_variance_channel, widen_conv_in
from cdiff.zoo import resolve

MODEL_FILE = "model.safetensors"  # the native model file of a checkpoint folder
TINY = "tiny"  # model.init for the tiny stack


def _shape(unet) -> str:
    return f"{unet.config.in_channels}-in/{unet.config.out_channels}-out"


def stage1_unet(unet, source):
    """Stage 1's starting U-Net (2C-in/C-out) from ``unet`` (read from ``source``), or an error."""
    c_in, c_out = unet.config.in_channels, unet.config.out_channels
    if c_in == c_out:
        return widen_conv_in(unet)
    if c_in == 2 * c_out:
        return unet
    if c_in == 2 * (c_out - 1):
        try:
            return drop_zero_variance_channel(unet)
        except ValueError as err:
            raise ValueError(f"{source}: a stage-1 start, but {err}") from None
    raise ValueError(f"{source}: stage 1 starts from SD 2.1's U-Net (4-in/4-out) or an 8-in/4-out one; this one is "
                     f"{_shape(unet)}")


def stage2_unet(unet, source):
    """Stage 2's starting U-Net (2C-in/(C+1)-out) from ``unet`` (read from ``source``), or an error."""
    c_in, c_out = unet.config.in_channels, unet.config.out_channels
    if c_in == 2 * c_out:
        return add_variance_channel(unet)
    if c_in == 2 * (c_out - 1):
        return unet
    hint = (" (SD 2.1 itself: train stage 1 first, model.stages = [1, 2], or make cdiff's one-step start with "
            "'cdiff convert')" if c_in == c_out else "")
    raise ValueError(f"{source}: stage 2 starts from an 8-in/4-out U-Net (stage 1's, e.g. a released "
                     f"sd21ft-<dataset>) or an 8-in/5-out one (C-DiffSET); this one is {_shape(unet)}{hint}")


STAGE_UNET = {1: stage1_unet, 2: stage2_unet}


def start_pipeline(model, checkpoint: Path | None = None) -> Pipeline:
    """The model to train, in fp32 on the CPU, from ``model`` (a [model] section,
    cdiff.train.cdiffset.CDiffSETConfig): a checkpoint's, else ``model.init`` (+ ``model.unet``) made
    into the starting U-Net of the first stage of ``model.stages``."""
    if checkpoint is not None:
        return load_pipeline(checkpoint / MODEL_FILE, dtype=torch.float32)
    stage = model.stages[0]
    if model.init == TINY:
        from cdiff.testing import tiny_pipeline, tiny_stack

        if stage == 1:  # the tiny stand-in for SD 2.1, widened as SD 2.1 is
            unet, vae, context = tiny_stack(model.tiny_seed, in_channels=4, out_channels=4)
            return Pipeline(widen_conv_in(unet), vae, context)
        return tiny_pipeline(model.tiny_seed)
    init = resolve(model.init)  # a name of `cdiff fetch` (sd21-base, sd21ft-qxs-saropt...): its native file
    for path in (init, model.unet):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"model file not found: {path}")
    surgery = partial(STAGE_UNET[stage], source=model.unet or model.init)
    pipeline = load_pipeline(init, unet=model.unet or None, pad_to_77=model.pad_to_77, surgery=surgery,
                             dtype=torch.float32)
    if model.fresh_unet:
        pipeline.unet = fresh_unet(pipeline.unet.config, pipeline.vae.config.latent_channels, model.tiny_seed)
    return pipeline


def fresh_unet(config, latent_channels: int, seed: int):
    """A U-Net of ``config`` with seeded random weights (PyTorch's initialisation), its variance
    channel (if any) zero as the C-DiffSET surgery leaves it, so the C-Diff loss starts as plain L2."""
    from cdiff.unet import UNet

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet(config)
    with torch.no_grad():
        unet.conv_out.weight[latent_channels:].zero_()
        unet.conv_out.bias[latent_channels:].zero_()
    return unet.eval()

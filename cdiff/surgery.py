"""The C-DiffSET surgery: an SD 2.1 U-Net made into the 8-in / 5-out C-DiffSET U-Net."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from cdiff.loss import variance_from_raw
from cdiff.statedict import build_model

log = logging.getLogger("cdiff.surgery")


@torch.no_grad()
def cdiffset_surgery(unet):
    """The C-DiffSET U-Net from an SD 2.1 one, as the official release makes it.

    - conv_in, C to 2C input channels in the order [SAR latent | noisy EO latent]: both halves
      are the original weights x 0.5, so at start the U-Net sees the mean of the two latents;
      the bias is kept.
    - conv_out, C to C + 1 output channels: the first C keep the noise head; the last is the
      raw variance, zero weights and zero bias, so the variance starts at exactly 1
      (cdiff.loss.variance_from_raw(0) = 1) and the C-Diff loss starts as plain L2.

    A C-in/C-out U-Net (SD 2.1) gets both; a 2C-in/C-out one (the release's SAR-conditioned
    starting point) only the variance channel; a 2C-in/(C+1)-out one is returned unchanged.
    The result is of ``unet``'s class (a UNet subclass with changed blocks stays one) and shares
    every other parameter with ``unet`` (no copy). Other shapes raise.
    """
    cfg = unet.config
    c_in, c_out = cfg.in_channels, cfg.out_channels
    if c_in == c_out:
        latent = c_in
    elif c_in == 2 * c_out or c_in == 2 * (c_out - 1):
        latent = c_in // 2
    else:
        latent = None
    if latent is None or (c_in, c_out) not in ((latent, latent), (2 * latent, latent), (2 * latent, latent + 1)):
        raise ValueError(
            f"cdiffset_surgery: a {c_in}-in/{c_out}-out U-Net is neither SD 2.1 (4-in/4-out), the "
            f"SAR-conditioned starting point (8-in/4-out) nor C-DiffSET (8-in/5-out)"
        )
    if (c_in, c_out) == (2 * latent, latent + 1):
        log.info("cdiffset_surgery: %d-in/%d-out is already C-DiffSET; unchanged", c_in, c_out)
        return unet
    state = dict(unet.state_dict())
    if c_in == latent:
        weight = state["conv_in.weight"]  # (width, C, 3, 3)
        state["conv_in.weight"] = torch.cat([0.5 * weight, 0.5 * weight], dim=1)  # (width, 2C, 3, 3): [SAR | EO]
        log.info("cdiffset_surgery: conv_in %d -> %d channels [SAR latent | noisy EO latent], weights x 0.5", c_in, 2 * c_in)
    weight, bias = state["conv_out.weight"], state["conv_out.bias"]  # (C, width, 3, 3), (C,)
    state["conv_out.weight"] = torch.cat([weight, torch.zeros_like(weight[:1])], dim=0)  # (C + 1, width, 3, 3)
    state["conv_out.bias"] = torch.cat([bias, torch.zeros_like(bias[:1])], dim=0)
    start = variance_from_raw(torch.zeros(())).item()
    log.info("cdiffset_surgery: conv_out %d -> %d channels, raw variance zero-initialised (variance %g)", c_out, c_out + 1, start)
    config = replace(cfg, in_channels=2 * latent, out_channels=latent + 1)
    return build_model(type(unet), config, state, "cdiffset_surgery")

"""The C-DiffSET surgery: an SD 2.1 U-Net made into the 8-in / 5-out C-DiffSET U-Net, in the release's
two steps (cdiff.train trains one stage after each):

- ``widen_conv_in``: conv_in C -> 2C input channels [SAR latent | noisy EO latent], both halves the
  original weights x 0.5 (stage 1's start: the SAR-conditioned "SD2.1 FT" U-Net, 8-in/4-out);
- ``add_variance_channel``: conv_out C -> C + 1 outputs, the last a raw variance with zero weights and
  bias, so the variance starts at exactly 1 (stage 2's start from stage 1's U-Net, 8-in/5-out).

``cdiffset_surgery`` applies whichever of the two a U-Net still needs (cdiff's one-step start).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from cdiff.loss import variance_from_raw
from cdiff.statedict import build_model

log = logging.getLogger("cdiff.surgery")


def _latent_channels(unet) -> int | None:
    """C of a C-in/C-out, 2C-in/C-out or 2C-in/(C+1)-out U-Net; None for any other shape."""
    c_in, c_out = unet.config.in_channels, unet.config.out_channels
    for latent in {c_in, c_in // 2}:
        if (c_in, c_out) in ((latent, latent), (2 * latent, latent), (2 * latent, latent + 1)):
            return latent
    return None


def _rebuilt(unet, state: dict, **changes):
    """A U-Net of ``unet``'s class with ``changes`` to its config, holding ``state`` (no copy)."""
    return build_model(type(unet), replace(unet.config, **changes), state, "cdiff.surgery")


@torch.no_grad()
def widen_conv_in(unet):
    """A C-in/C-out U-Net (SD 2.1) -> 2C-in/C-out: conv_in reads [SAR latent | noisy EO latent], both
    halves the original weights x 0.5, so at the start the U-Net sees the mean of the two latents
    (the bias is kept). Every other parameter is shared with ``unet``."""
    c_in, c_out = unet.config.in_channels, unet.config.out_channels
    if c_in != c_out:
        raise ValueError(f"widen_conv_in: expected a C-in/C-out U-Net (SD 2.1: 4-in/4-out), got {c_in}-in/{c_out}-out")
    state = dict(unet.state_dict())
    weight = state["conv_in.weight"]  # (width, C, 3, 3)
    state["conv_in.weight"] = torch.cat([0.5 * weight, 0.5 * weight], dim=1)  # (width, 2C, 3, 3): [SAR | EO]
    log.info("surgery: conv_in %d -> %d channels [SAR latent | noisy EO latent], weights x 0.5", c_in, 2 * c_in)
    return _rebuilt(unet, state, in_channels=2 * c_in)


@torch.no_grad()
def add_variance_channel(unet):
    """A 2C-in/C-out U-Net -> 2C-in/(C+1)-out: the first C outputs keep the noise head; the last is
    the raw variance, zero weights and bias, so the variance is exactly 1
    (cdiff.loss.variance_from_raw(0) = 1) and the C-Diff loss starts as plain L2."""
    c_in, c_out = unet.config.in_channels, unet.config.out_channels
    if c_in != 2 * c_out:
        raise ValueError(f"add_variance_channel: expected a 2C-in/C-out U-Net (8-in/4-out), got {c_in}-in/{c_out}-out")
    state = dict(unet.state_dict())
    weight, bias = state["conv_out.weight"], state["conv_out.bias"]  # (C, width, 3, 3), (C,)
    state["conv_out.weight"] = torch.cat([weight, torch.zeros_like(weight[:1])], dim=0)  # (C + 1, width, 3, 3)
    state["conv_out.bias"] = torch.cat([bias, torch.zeros_like(bias[:1])], dim=0)
    start = variance_from_raw(torch.zeros(())).item()
    log.info("surgery: conv_out %d -> %d channels, raw variance zero-initialised (variance %g)", c_out, c_out + 1, start)
    return _rebuilt(unet, state, out_channels=c_out + 1)


@torch.no_grad()
def drop_zero_variance_channel(unet):
    """A 2C-in/(C+1)-out U-Net whose variance channel is still all zero (cdiff convert's one-step start,
    made from SD 2.1 by both steps above) -> the 2C-in/C-out U-Net it was made from, exactly. A
    variance channel that was trained is refused: its U-Net is a C-DiffSET model, not SD 2.1."""
    c_in, c_out = unet.config.in_channels, unet.config.out_channels
    if c_in != 2 * (c_out - 1):
        raise ValueError(f"drop_zero_variance_channel: expected a 2C-in/(C+1)-out U-Net, got {c_in}-in/{c_out}-out")
    state = dict(unet.state_dict())
    weight, bias = state["conv_out.weight"], state["conv_out.bias"]  # (C + 1, width, 3, 3), (C + 1,)
    if weight[-1].any() or bias[-1].any():
        raise ValueError("its variance channel holds trained weights (a C-DiffSET U-Net): stage 1 starts from "
                         "SD 2.1, not from a trained model")
    state["conv_out.weight"], state["conv_out.bias"] = weight[:-1], bias[:-1]
    log.info("surgery: conv_out %d -> %d channels, the zero variance channel dropped", c_out, c_out - 1)
    return _rebuilt(unet, state, out_channels=c_out - 1)


def cdiffset_surgery(unet):
    """The C-DiffSET U-Net from an SD 2.1 one, as the official release makes it: ``widen_conv_in``
    for a C-in/C-out U-Net (SD 2.1), then ``add_variance_channel`` for a 2C-in/C-out one (the
    release's SAR-conditioned starting point, stage 1's U-Net); a 2C-in/(C+1)-out one is returned
    unchanged. The result is of ``unet``'s class (a UNet subclass with changed blocks stays one) and
    shares every other parameter with ``unet`` (no copy). Other shapes raise.
    """
    c_in, c_out = unet.config.in_channels, unet.config.out_channels
    latent = _latent_channels(unet)
    if latent is None:
        raise ValueError(
            f"cdiffset_surgery: a {c_in}-in/{c_out}-out U-Net is neither SD 2.1 (4-in/4-out), the "
            f"SAR-conditioned starting point (8-in/4-out) nor C-DiffSET (8-in/5-out)"
        )
    if (c_in, c_out) == (2 * latent, latent + 1):
        log.info("cdiffset_surgery: %d-in/%d-out is already C-DiffSET; unchanged", c_in, c_out)
        return unet
    if c_in == latent:
        unet = widen_conv_in(unet)
    return add_variance_channel(unet)

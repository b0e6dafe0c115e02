"""Loading models from any layout: ``load_unet``, ``load_vae`` and ``load_pipeline``."""

from __future__ import annotations

import torch

from cdiff.build import build_model
from cdiff.pipeline import DEFAULT_PROMPT, Pipeline
from cdiff.read import context_for, read_unet, read_vae
from cdiff.surgery import cdiffset_surgery
from cdiff.unet import UNet
from cdiff.vae import VAE


def load_unet(source, dtype: torch.dtype | None = None, device=None):
    """The U-Net of ``source`` (any layout), exactly as stored: no channel surgery.

    ``dtype`` None keeps the stored dtype.
    """
    state, config, _ = read_unet(source)
    return build_model(UNet, config, state, source, dtype, device)


def load_vae(source, dtype: torch.dtype | None = None, device=None):
    """The VAE of ``source`` (native, original single file, diffusers folder or ``vae/``)."""
    state, config, _ = read_vae(source)
    return build_model(VAE, config, state, source, dtype, device)


def load_pipeline(
    source,
    unet=None,
    prompt: str = DEFAULT_PROMPT,
    pad_to_77: bool = False,
    surgery: bool = False,
    dtype: torch.dtype | None = None,
    device=None,
):
    """A cdiff.pipeline.Pipeline from ``source``: its VAE and prompt embedding, and the U-Net
    of ``unet`` (e.g. a release ``model.safetensors``) or of ``source``.

    A native file needs nothing else. From an SD 2.1 source the prompt is encoded (needs
    open_clip). ``surgery=True`` applies ``cdiffset_surgery`` to a 4- or 5-out U-Net first;
    without it a plain SD 2.1 U-Net (4 in) is refused, as it cannot take a SAR latent.
    """
    model = load_unet(unet if unet is not None else source, dtype, device)
    if surgery:
        model = cdiffset_surgery(model)
    vae = load_vae(source, dtype, device)
    if model.config.in_channels != 2 * vae.config.latent_channels:
        raise ValueError(
            f"{unet or source}: its U-Net takes {model.config.in_channels} channels, a plain SD 2.1 U-Net; "
            f"pass surgery=True or run 'cdiff convert' to make the C-DiffSET U-Net"
        )
    # context_for has already checked that a stored embedding was made for this very prompt.
    context = context_for(source, prompt, pad_to_77).to(device=device, dtype=dtype or model.conv_in.weight.dtype)
    return Pipeline(model, vae, context, prompt=prompt)

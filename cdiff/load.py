"""Loading models from any layout: ``load_unet``, ``load_vae``, ``load_pipeline``, and
``load_weights`` into a model one has built (and perhaps changed) oneself."""

from __future__ import annotations

import logging

import torch
from torch import nn

from cdiff.build import build_model, load_partial, stored_dtype
from cdiff.checkpoint import LoadReport, check_state_dict, detect_layout
from cdiff.native import native_prediction
from cdiff.pipeline import DEFAULT_PROMPT, Pipeline
from cdiff.read import context_for, read_unet, read_vae, stored_prompt
from cdiff.surgery import cdiffset_surgery
from cdiff.unet import UNet
from cdiff.vae import VAE

log = logging.getLogger("cdiff.load")


def _load(cls, reader, source, dtype, device, config, strict: bool):
    state, config, _ = reader(source, config)
    if strict:
        return build_model(cls, config, state, source, dtype, device)
    model = cls(config).to(device=device, dtype=dtype or stored_dtype(state))
    report = load_partial(model, state)
    log.log(logging.INFO if report.exact else logging.WARNING, "%s -> %s: %s", source, cls.__name__, report)
    return model.eval()


def load_unet(source, dtype: torch.dtype | None = None, device=None, *, config=None, strict: bool = True) -> UNet:
    """The U-Net of ``source`` (any layout), exactly as stored: no channel surgery.

    ``dtype`` None keeps the stored dtype. ``config`` builds that U-Net instead of the one the
    source describes (needed for a non-preset U-Net in a layout without a config: an
    original single file, a bare weights file). ``strict=False`` loads every tensor whose name
    and shape fit the built U-Net, leaves its other parameters at their initialisation, and
    logs what was missing, unexpected and of another shape (``load_weights`` returns it).
    """
    return _load(UNet, read_unet, source, dtype, device, config, strict)


def load_vae(source, dtype: torch.dtype | None = None, device=None, *, config=None, strict: bool = True) -> VAE:
    """The VAE of ``source`` (native, original single file, diffusers folder or ``vae/``);
    ``config`` and ``strict`` as for ``load_unet``."""
    return _load(VAE, read_vae, source, dtype, device, config, strict)


def load_weights(model: nn.Module, source, strict: bool = True) -> LoadReport:
    """Load the U-Net (or, for a VAE, the VAE) of ``source`` into ``model``, a U-Net or VAE
    (or subclass) one has built, perhaps with blocks changed. Returns the LoadReport.

    ``strict=True`` raises unless every name and shape match; ``strict=False`` takes every
    tensor that fits and leaves the rest of ``model`` as it is. The model keeps its dtype.
    """
    if isinstance(model, VAE):
        state, _, _ = read_vae(source, model.config)
    elif isinstance(model, UNet):
        state, _, _ = read_unet(source, model.config)
    else:
        raise TypeError(f"load_weights: expected a cdiff UNet or VAE (or a subclass), got {type(model).__name__}")
    if strict:
        check_state_dict(model.state_dict(), state, source, type(model).__name__)
    report = load_partial(model, state)
    log.info("%s -> %s: %s", source, type(model).__name__, report)
    return report


def load_pipeline(
    source,
    unet=None,
    prompt: str | None = None,
    pad_to_77: bool = False,
    surgery: bool = False,
    dtype: torch.dtype | None = None,
    device=None,
):
    """A cdiff.pipeline.Pipeline from ``source``: its VAE and prompt embedding, and the U-Net
    of ``unet`` (e.g. a release ``model.safetensors``) or of ``source``.

    A native file needs nothing else. From an SD 2.1 source the prompt is encoded (needs
    open_clip). ``prompt`` None: the prompt (and padding) a model without a text encoder was
    converted with, else ``DEFAULT_PROMPT``; a prompt given for such a model must be its own.
    ``surgery=True`` applies ``cdiffset_surgery`` to a 4- or 5-out U-Net first; without it a
    plain SD 2.1 U-Net (4 in) is refused, as it cannot take a SAR latent.
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
    if prompt is None:
        prompt, pad_to_77 = stored_prompt(source) or (DEFAULT_PROMPT, pad_to_77)
    # context_for has already checked that a stored embedding was made for this very prompt.
    context = context_for(source, prompt, pad_to_77).to(device=device, dtype=dtype or model.conv_in.weight.dtype)
    unet_source = unet if unet is not None else source
    # What the U-Net predicts travels in the native file; the other layouts hold noise predictors.
    prediction = native_prediction(unet_source) if detect_layout(unet_source) == "native" else "epsilon"
    return Pipeline(model, vae, context, prompt=prompt, prediction_type=prediction)

"""cdiff's native file format: one ``.safetensors`` holding a whole C-DiffSET model
(``save_native`` writes it; cdiff.load_pipeline reads it, as every other layout).

Tensors: ``unet.*`` and ``vae.*`` in cdiff's parameter names, and the prompt embedding
``context`` (L, context_dim). Metadata (all strings):

- ``format`` = "cdiff", ``format_version`` = NATIVE_VERSION;
- ``unet_config`` / ``vae_config``: the configs as JSON (cdiff.config.config_to_json), so
  any config, preset or not, comes back exactly;
- ``prompt`` and ``padding`` ("none" or "77"): what the context encodes;
- ``prediction``: what the U-Net's first channels predict, one of
  cdiff.schedulers.PREDICTION_TYPES: "epsilon" (the noise, the paper's and the release's),
  "sample" (the clean EO latent, ``cdiff train --prediction sample``) or "v_prediction"; files
  written before this field existed are "epsilon".
"""

from __future__ import annotations

from pathlib import Path

import torch

from cdiff.config import config_to_json
from cdiff.files import save_safetensors
from cdiff.pipeline import DEFAULT_PROMPT
from cdiff.schedulers import PREDICTION_TYPES
from cdiff.weightfile import CheckpointError, WeightFile

NATIVE_FORMAT = "cdiff"  # metadata "format" of a native file
NATIVE_VERSION = "1"
CONTEXT_KEY = "context"  # the prompt embedding's tensor name


def open_native(path) -> WeightFile:
    """A native file, its format and version checked."""
    f = WeightFile(path)
    if f.metadata.get("format") != NATIVE_FORMAT:
        raise CheckpointError(f"{path}: not a cdiff native file (no format={NATIVE_FORMAT} in its metadata)")
    version = f.metadata.get("format_version")
    if version != NATIVE_VERSION:
        raise CheckpointError(f"{path}: native format version {version!r}; this cdiff reads version {NATIVE_VERSION}")
    return f


def save_native(path, unet, vae, context: torch.Tensor, prompt: str = DEFAULT_PROMPT, padding: str = "none",
                prediction: str = "epsilon") -> Path:
    """Write U-Net, VAE, prompt embedding and configs to one native ``.safetensors`` (atomically)."""
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {prediction!r}")
    if context.ndim != 2:
        raise ValueError(f"context: expected (L, {unet.config.context_dim}), got {tuple(context.shape)}")
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
    tensors[CONTEXT_KEY] = context
    metadata = {
        "format": NATIVE_FORMAT,
        "format_version": NATIVE_VERSION,
        "unet_config": config_to_json(unet.config),
        "vae_config": config_to_json(vae.config),
        "prompt": prompt,
        "padding": padding,
        "prediction": prediction,
    }
    save_safetensors(tensors, path, metadata)
    return Path(path)


def native_prediction(path) -> str:
    """What the U-Net of the native file ``path`` predicts: one of PREDICTION_TYPES."""
    prediction = open_native(path).metadata.get("prediction", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise CheckpointError(f"{path}: unknown prediction {prediction!r} in its metadata; "
                              f"expected one of {PREDICTION_TYPES}")
    return prediction

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
  written before this field existed are "epsilon";
- ``sampler`` and ``steps`` (a distilled student's, ``cdiff distill``; absent otherwise): the
  sampler (one of cdiff.samplers.SAMPLERS) and step count it was distilled to sample with, which
  cdiff.Pipeline.translate and ``cdiff translate`` use unless told otherwise; ``distilled_from``,
  the teacher file's name and sha256, and ``distillation``, the method.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cdiff.config import config_to_json
from cdiff.files import save_safetensors
from cdiff.pipeline import DEFAULT_PROMPT
from cdiff.samplers import SAMPLERS
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
                prediction: str = "epsilon", sampling: tuple[str, int] | None = None,
                extra_metadata: dict[str, str] | None = None) -> Path:
    """Write U-Net, VAE, prompt embedding and configs to one native ``.safetensors`` (atomically).

    ``sampling``: a distilled student's (sampler, steps), recorded for translate to use;
    ``extra_metadata``: more string fields (a student's ``distilled_from`` and ``distillation``)."""
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {prediction!r}")
    if sampling is not None and (sampling[0] not in SAMPLERS or int(sampling[1]) < 1):
        raise ValueError(f"sampling must be (one of {SAMPLERS}, steps >= 1), got {sampling!r}")
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
        **(extra_metadata or {}),
    }
    if sampling is not None:
        metadata.update(sampler=sampling[0], steps=str(int(sampling[1])))
    save_safetensors(tensors, path, metadata)
    return Path(path)


def native_prediction(path) -> str:
    """What the U-Net of the native file ``path`` predicts: one of PREDICTION_TYPES."""
    prediction = open_native(path).metadata.get("prediction", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise CheckpointError(f"{path}: unknown prediction {prediction!r} in its metadata; "
                              f"expected one of {PREDICTION_TYPES}")
    return prediction


def native_sampling(path) -> tuple[str, int] | None:
    """The (sampler, steps) a distilled student's native file records; None for a file without them."""
    metadata = open_native(path).metadata
    if "sampler" not in metadata:
        return None
    sampler, steps = metadata["sampler"], metadata.get("steps", "")
    if sampler not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
        raise CheckpointError(f"{path}: its metadata records sampler {sampler!r} with steps {steps!r}; expected one "
                              f"of {SAMPLERS} and a step count >= 1")
    return sampler, int(steps)

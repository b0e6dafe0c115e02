"""Loading models from any layout: ``load_unet``, ``load_vae``, ``load_pipeline``, and
``load_weights`` into a model one has built (and perhaps changed) oneself.

Sources (cdiff.layouts.detect recognises them): Stability's original single file, a diffusers
model folder (or its ``unet/`` / ``vae/`` folder), the official C-DiffSET release's
``model.safetensors`` (a diffusers-keyed U-Net), and cdiff's native file (cdiff.native).

Reading (``read_component``): keys travel original -> diffusers -> cdiff through the rename
tables of cdiff.layouts; the configs come from the native metadata, or from cdiff.infer_config.
The U-Net and the VAE take one path; only their ``Component`` descriptions differ. The prompt
embedding is the one stored in the source, or encoded with its text encoder (cdiff.prompt).
Building: the tensors go into the models through cdiff.statedict (exactly, or partly with a
LoadReport).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cdiff.config import UNetConfig, VAEConfig
from cdiff.infer_config import infer_unet_config, infer_vae_config
from cdiff.layouts import RenameTable
from cdiff.layouts import diffusers as diffusers_layout
from cdiff.layouts import original as original_layout
from cdiff.layouts.detect import detect_layout, find_weights, strip_wrapper
from cdiff.native import CONTEXT_KEY, native_prediction, native_sampling, open_native
from cdiff.pipeline import DEFAULT_PROMPT, Pipeline
from cdiff.prompt import prompt_embedding
from cdiff.statedict import LoadReport, build_model, check_state_dict, load_partial, stored_dtype
from cdiff.surgery import cdiffset_surgery
from cdiff.unet import UNet
from cdiff.vae import VAE
from cdiff.zoo import resolve
from cdiff.weightfile import CheckpointError, WeightFile

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
    surgery: bool | Callable = False,
    dtype: torch.dtype | None = None,
    device=None,
):
    """A cdiff.pipeline.Pipeline from ``source``: its VAE and prompt embedding, and the U-Net
    of ``unet`` (e.g. a release ``model.safetensors``) or of ``source``.

    ``dtype`` is the U-Net's and the prompt embedding's (None: as stored). The VAE is fp32
    however it is stored: SD's VAE overflows in fp16, and fp16 convolutions on a CPU are many
    times slower than fp32 ones (``Pipeline.to`` can still move it).

    A native file needs nothing else. From an SD 2.1 source the prompt is encoded (needs
    open_clip). ``prompt`` None: the prompt (and padding) a model without a text encoder was
    converted with, else ``DEFAULT_PROMPT``; a prompt given for such a model must be its own.
    ``surgery=True`` applies ``cdiffset_surgery`` to a 4- or 5-out U-Net first, a function
    ``surgery(unet) -> unet`` (cdiff.surgery's steps) that function; without it a plain SD 2.1
    U-Net (4 in) is refused, as it cannot take a SAR latent. ``source`` may be a
    name of ``cdiff fetch`` (e.g. "cdiffset-qxs-saropt"), once fetched with ``--convert``.
    """
    source = resolve(source)
    model = load_unet(unet if unet is not None else source, dtype, device)
    if surgery:
        model = surgery(model) if callable(surgery) else cdiffset_surgery(model)
    vae = load_vae(source, torch.float32, device)  # fp32 whatever the file's dtype: SD's VAE overflows in fp16
    if model.config.in_channels != 2 * vae.config.latent_channels:
        raise ValueError(
            f"{unet or source}: its U-Net takes {model.config.in_channels} channels, a plain SD 2.1 U-Net, not the "
            f"C-DiffSET one; make the C-DiffSET model first: cdiff convert {source} model.safetensors"
            + (f" --unet {unet}" if unet is not None else "") + " (from Python: load_pipeline(..., surgery=True))"
        )
    if prompt is None:
        prompt, pad_to_77 = stored_prompt(source) or (DEFAULT_PROMPT, pad_to_77)
    # context_for has already checked that a stored embedding was made for this very prompt.
    context = context_for(source, prompt, pad_to_77).to(device=device, dtype=dtype or model.conv_in.weight.dtype)
    unet_source = unet if unet is not None else source
    # What the U-Net predicts, and a distilled student's sampling, travel in the native file; the other
    # layouts hold noise predictors sampled as the release does.
    native = detect_layout(unet_source) == "native"
    prediction = native_prediction(unet_source) if native else "epsilon"
    sampling = native_sampling(unet_source) if native else None
    return Pipeline(model, vae, context, prompt=prompt, prediction_type=prediction, sampling=sampling)


# --- reading a layout ----------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """How one model (U-Net or VAE) is stored in each layout."""

    name: str  # "unet" / "vae": the native prefix, the metadata "<name>_config", the diffusers folder
    what: str  # for messages
    original_prefix: str
    original_to_diffusers: Callable[[dict], dict]  # original keys -> diffusers keys (KeyError, ValueError)
    infer_config: Callable  # (diffusers-keyed state, config.json dict or None, where) -> config
    table: RenameTable  # diffusers <-> cdiff
    strips_wrapper: bool  # bare files may carry a DDP/accelerate prefix (release U-Nets do)
    no_source_hint: str = ""


def _original_unet_to_diffusers(state: dict) -> dict:
    return original_layout.unet_table_for(state).rename(state, to="cdiff")


UNET_PART = Component(
    "unet", "U-Net", original_layout.UNET_PREFIX, _original_unet_to_diffusers, infer_unet_config,
    diffusers_layout.UNET, strips_wrapper=True,
)
VAE_PART = Component(
    "vae", "VAE", original_layout.VAE_PREFIX, original_layout.vae_to_diffusers, infer_vae_config,
    diffusers_layout.VAE, strips_wrapper=False,
    no_source_hint="; a release U-Net file needs an SD 2.1 source beside it",
)


def _rename(table: RenameTable, state, where) -> dict:
    try:
        return table.rename(state, to="cdiff")
    except KeyError as err:
        raise CheckpointError(f"{where}: unexpected keys: {err.args[0]}") from None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON: {err}") from None


def read_component(source, part: Component, config=None) -> tuple[dict, object, str]:
    """(cdiff-keyed state dict, config, layout) of ``part`` in ``source``.

    ``config`` given is taken as is (for a model that differs from the stored one); else it
    comes from the native metadata, or cdiff.infer_config.
    """
    path = Path(source)
    layout = detect_layout(path)
    if layout == "native":
        f = open_native(path)
        return f.load(f"{part.name}."), config or f.config(f"{part.name}_config"), layout
    if layout == "original":
        state = WeightFile(path).load(part.original_prefix)
        if not state:
            raise CheckpointError(f"{path}: holds no {part.what} ({part.original_prefix}* keys)")
        try:
            state = part.original_to_diffusers(state)
        except KeyError as err:
            raise CheckpointError(f"{path}: unexpected keys: {err.args[0]}") from None
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None
        config_json = None
    elif layout in ("diffusers", f"diffusers-{part.name}"):
        if path.is_dir():
            folder = path / part.name if layout == "diffusers" else path
            if not folder.is_dir():
                raise CheckpointError(f"{path}: a diffusers model folder without {part.name}/")
            detect_layout(folder)  # a folder without weights fails here, by name
            state = WeightFile(find_weights(folder)).load()
            config_json = _read_json(folder / "config.json")
        else:
            state, config_json = WeightFile(path).load(), None
        if part.strips_wrapper:
            state = {strip_wrapper(k): v for k, v in state.items()}
    else:
        raise CheckpointError(f"{path}: holds no {part.what} (layout {layout!r}{part.no_source_hint})")
    if config is None:
        config = part.infer_config(state, config_json, where=path)
    return _rename(part.table, state, path), config, layout


def read_unet(source, config: UNetConfig | None = None) -> tuple[dict, UNetConfig, str]:
    """(cdiff-keyed state dict, UNetConfig, layout) of the U-Net in ``source``."""
    return read_component(source, UNET_PART, config)


def read_vae(source, config: VAEConfig | None = None) -> tuple[dict, VAEConfig, str]:
    """(cdiff-keyed state dict, VAEConfig, layout) of the VAE in ``source``."""
    return read_component(source, VAE_PART, config)


def read_context(source) -> tuple[torch.Tensor, str, str] | None:
    """A stored prompt embedding (context, prompt, padding) of ``source``, or None."""
    path = Path(source)
    layout = detect_layout(path)
    if layout == "native":
        f = open_native(path)
        return f.load(CONTEXT_KEY)[""], f.metadata.get("prompt", ""), f.metadata.get("padding", "none")
    candidates = {
        "original": (path, original_layout.CONTEXT_KEY),
        "diffusers": (path / diffusers_layout.CONTEXT_FILE, CONTEXT_KEY),
    }
    if layout not in candidates or not candidates[layout][0].is_file():
        return None
    file, key = candidates[layout]
    f = WeightFile(file)
    state = f.load(key)
    if "" not in state:
        return None
    return state[""], f.metadata.get("prompt", ""), f.metadata.get("padding", "none")


def has_text_encoder(source) -> bool:
    path = Path(source)
    layout = detect_layout(path)
    if layout == "original":
        return any(k.startswith(original_layout.TEXT_PREFIX) for k in WeightFile(path).keys())
    return layout == "diffusers" and (path / "text_encoder").is_dir()


def stored_prompt(source) -> tuple[str, bool] | None:
    """(prompt, pad_to_77) that ``source``'s stored embedding was made with, when it has no
    text encoder to encode another; None otherwise."""
    stored = None if has_text_encoder(source) else read_context(source)
    return None if stored is None else (stored[1], stored[2] == "77")


def context_for(source, prompt: str = DEFAULT_PROMPT, pad_to_77: bool = False) -> torch.Tensor:
    """The prompt embedding (L, 1024) for ``source``: encoded with its text encoder if it has
    one, else the one stored in it (which must be for the same prompt and padding)."""
    padding = "77" if pad_to_77 else "none"
    if has_text_encoder(source):
        return prompt_embedding(source, prompt, pad_to_77=pad_to_77)
    stored = read_context(source)
    if stored is None:
        raise CheckpointError(f"{source}: holds neither a text encoder nor a prompt embedding")
    context, stored_prompt, stored_padding = stored
    if (stored_prompt, stored_padding) != (prompt, padding):
        raise CheckpointError(
            f"{source}: holds no text encoder, and its stored prompt embedding is for prompt "
            f"{stored_prompt!r} (padding {stored_padding}), not {prompt!r} (padding {padding})"
        )
    return context

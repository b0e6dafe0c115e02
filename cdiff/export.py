"""Exporting models from cdiff: to a diffusers folder, Stability's original single file, or
the official C-DiffSET release's U-Net file, so a model can be taken into other tools.

Every exporter checks its output path first (cdiff.files.check_output: never the source,
never an existing output unless ``overwrite``), reads its source through cdiff.load (any
layout cdiff reads) and writes atomically. The prompt embedding travels beside the weights:
``cdiff_context.safetensors`` in a diffusers folder, the key ``cdiff.context`` in an
original single file.

The single-file exports are safetensors and must be named ``.safetensors``: a ``.ckpt``
name promises a pickle, which cdiff never writes (a pickle can run code when loaded, and
safetensors is what every current tool reads), and safetensors bytes under a ``.ckpt`` name
would fail in tools that trust the name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cdiff.files import atomic_path, check_output, save_safetensors
from cdiff.layouts import diffusers as diffusers_layout
from cdiff.layouts import original as original_layout
from cdiff.layouts.detect import detect_layout
from cdiff.layouts.diffusers_config import diffusers_unet_config, diffusers_vae_config
from cdiff.load import read_context, read_unet, read_vae
from cdiff.native import CONTEXT_KEY

# SD 2.1 base's noise schedule, written into exported diffusers folders (DDIM, as C-DiffSET samples).
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def _context_metadata(source) -> tuple[torch.Tensor, dict] | None:
    stored = read_context(source)
    if stored is None:
        return None
    context, prompt, padding = stored
    return context, {"prompt": prompt, "padding": padding}


def export_diffusers(source, out, overwrite: bool = False) -> Path:
    """Write ``source`` (any layout; normally a native file) as a diffusers model folder:
    ``unet/``, ``vae/``, ``scheduler/``, ``model_index.json`` and the prompt embedding in
    ``cdiff_context.safetensors``. No text encoder: the prompt is already encoded.
    ``overwrite`` replaces a non-empty folder ``out`` (atomically, once the new one is whole)."""
    check_output(out, "folder", overwrite, sources=(source,))
    unet_state, unet_config, _ = read_unet(source)
    vae_state, vae_config, _ = read_vae(source)
    stored = _context_metadata(source)
    out = Path(out)
    with atomic_path(out, is_dir=True, overwrite=overwrite) as tmp:
        for name, state, table, config in (
            ("unet", unet_state, diffusers_layout.UNET, diffusers_unet_config(unet_config)),
            ("vae", vae_state, diffusers_layout.VAE, diffusers_vae_config(vae_config)),
        ):
            (tmp / name).mkdir()
            (tmp / name / "config.json").write_text(json.dumps(config, indent=2))
            save_safetensors(table.rename(state, to="foreign"), tmp / name / "diffusion_pytorch_model.safetensors")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
        index = {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "DDIMScheduler"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        if stored is not None:
            save_safetensors({CONTEXT_KEY: stored[0]}, tmp / diffusers_layout.CONTEXT_FILE, stored[1])
    return out


def export_original(source, out, overwrite: bool = False) -> Path:
    """Write ``source`` as one ``.safetensors`` file in Stability's original layout
    (``model.diffusion_model.*``, ``first_stage_model.*``); the prompt embedding goes under
    ``cdiff.context``."""
    check_output(out, "file", overwrite, sources=(source,), suffix=".safetensors")
    unet_state, unet_config, _ = read_unet(source)
    vae_state, vae_config, _ = read_vae(source)
    unet_state = diffusers_layout.UNET.rename(unet_state, to="foreign")
    vae_state = diffusers_layout.VAE.rename(vae_state, to="foreign")
    table = original_layout.unet_table(unet_config.level_res_blocks, unet_config.attention_levels)
    tensors = {original_layout.UNET_PREFIX + k: v for k, v in table.rename(unet_state, to="foreign").items()}
    vae_state = original_layout.vae_to_original(vae_state, len(vae_config.block_channels))
    tensors.update({original_layout.VAE_PREFIX + k: v for k, v in vae_state.items()})
    stored = _context_metadata(source)
    metadata = None
    if stored is not None:
        tensors[original_layout.CONTEXT_KEY] = stored[0]
        metadata = stored[1]
    save_safetensors(tensors, out, metadata)
    return Path(out)


def export_release(source, out, overwrite: bool = False) -> Path:
    """Write the U-Net of ``source`` as the official release's ``model.safetensors``
    (diffusers U-Net keys, no prefix)."""
    check_output(out, "file", overwrite, sources=(source,), suffix=".safetensors")
    unet_state, _, _ = read_unet(source)
    save_safetensors(diffusers_layout.UNET.rename(unet_state, to="foreign"), out)
    return Path(out)


EXPORTERS = {"diffusers": export_diffusers, "original": export_original, "release": export_release}


def export(src, out, to: str, echo=print, overwrite: bool = False) -> Path:
    """``cdiff export``: write ``src`` in another layout (``to`` in EXPORTERS)."""
    if to not in EXPORTERS:
        raise ValueError(f"--to: expected one of {sorted(EXPORTERS)}, got {to!r}")
    echo(f"source: {src} ({detect_layout(src)} layout)")
    path = EXPORTERS[to](src, out, overwrite=overwrite)
    echo(f"wrote {path} ({to} layout)")
    return path

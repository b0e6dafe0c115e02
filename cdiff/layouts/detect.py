"""Which layout a checkpoint file or folder is (``detect_layout``), from its names and keys:

- ``"native"``    cdiff's own file: one ``.safetensors`` with ``unet.*``, ``vae.*``,
                  ``context`` and the configs in its metadata (see cdiff.native).
- ``"original"``  Stability's single file: ``model.diffusion_model.*``,
                  ``first_stage_model.*``, ``cond_stage_model.model.*`` (cdiff.layouts.original).
- ``"diffusers"`` a model folder with ``model_index.json`` or ``unet/`` and ``vae/``.
- ``"diffusers-unet"`` / ``"diffusers-vae"`` / ``"diffusers-text"``: one component
                  folder of that layout (``config.json`` + weights), or a bare weights file
                  keyed the diffusers way. The official C-DiffSET release's
                  ``model.safetensors`` is a ``"diffusers-unet"`` file whose keys may carry a
                  ``module.`` or ``unet.`` prefix (``strip_wrapper``).

Every error names the file and says what is wrong with it, in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cdiff.layouts.original import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from cdiff.native import NATIVE_FORMAT
from cdiff.weightfile import WEIGHT_SUFFIXES, CheckpointError, WeightFile

ORIGINAL_PREFIXES = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)  # any of them makes a file "original"
# Prefixes that wrappers (DDP's ``module.``, accelerate's saved ``unet.``) put before
# diffusers U-Net keys in the release's files.
WRAPPER_PREFIXES = ("module.", "unet.")

# Weight file names of a diffusers component folder, in the order diffusers prefers them.
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


def _component_of_keys(keys: list[str]) -> str | None:
    """Which diffusers component a bare diffusers-keyed state dict is, or None."""
    keys = [strip_wrapper(k) for k in keys]
    if any(k.startswith("conv_in.") for k in keys) and any(k.startswith("down_blocks.") for k in keys):
        return "diffusers-unet"
    if any(k.startswith("encoder.down_blocks.") for k in keys) and any(k.startswith("decoder.") for k in keys):
        return "diffusers-vae"
    if any(k.startswith(("text_model.", "embeddings.token_embedding.")) for k in keys):
        return "diffusers-text"
    return None


def strip_wrapper(key: str) -> str:
    """``key`` without a DDP/accelerate wrapper prefix (WRAPPER_PREFIXES), if it has one."""
    for p in WRAPPER_PREFIXES:
        if key.startswith(p):
            return key[len(p) :]
    return key


def find_weights(folder: Path) -> Path:
    """The weights file of a diffusers component folder (``unet/``, ``vae/``, ``text_encoder/``)."""
    for name in DIFFUSERS_WEIGHT_NAMES:
        for candidate in (folder / name, folder / f"{name}.index.json"):
            if candidate.is_file():
                return candidate
    found = sorted(p.name for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if len(found) == 1:
        return folder / found[0]
    if found:
        raise CheckpointError(f"{folder}: several weight files and none with a standard name: {found}")
    raise CheckpointError(
        f"{folder}: no weights found (expected {' or '.join(DIFFUSERS_WEIGHT_NAMES[:3])})"
    )


def detect_layout(source: str | os.PathLike) -> str:
    """The layout of ``source`` (a file or folder); see the module docstring for the names."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "model_index.json").is_file() or ((path / "unet").is_dir() and (path / "vae").is_dir()):
            return "diffusers"
        if (path / "unet").is_dir() or (path / "vae").is_dir():
            return "diffusers"
        config = path / "config.json"
        kind = None
        if config.is_file():
            try:
                cls = json.loads(config.read_text()).get("_class_name", "")
            except json.JSONDecodeError as err:
                raise CheckpointError(f"{config}: not valid JSON: {err}") from None
            kind = {
                "UNet2DConditionModel": "diffusers-unet",
                "AutoencoderKL": "diffusers-vae",
            }.get(cls)
            if kind is None and "architectures" in json.loads(config.read_text()):
                kind = "diffusers-text"
        weights = find_weights(path)  # raises for a folder without weights
        if kind is None:
            kind = _component_of_keys(WeightFile(weights).keys())
        if kind is None:
            raise CheckpointError(f"{path}: unknown layout (not a diffusers model or component folder)")
        return kind
    f = WeightFile(path)
    if f.metadata.get("format") == NATIVE_FORMAT:
        return "native"
    keys = f.keys()
    if any(k.startswith(ORIGINAL_PREFIXES) for k in keys):
        return "original"
    kind = _component_of_keys(keys)
    if kind is None:
        if not keys:
            raise CheckpointError(f"{path}: holds no tensors")
        raise CheckpointError(
            f"{path}: unknown layout: its {len(keys)} keys (first: {keys[:3]}) are neither cdiff's "
            f"native format, the original SD single file (model.diffusion_model.*), nor a "
            f"diffusers U-Net/VAE state dict"
        )
    return kind


"""S2O-NPDE model files: one ``.safetensors`` with the networks and their NPDEConfig.

Tensors: NPDEModel's state dict, ``generator.*`` (SAR -> optical, with the PMD module),
``reverse.*``, ``disc_eo.*`` and ``disc_sar.*`` (the training partners). Metadata (strings):
``format`` = FORMAT, ``format_version`` = VERSION, ``npde_config`` = the NPDEConfig as JSON
(cdiff.config.config_to_json), so a file rebuilds its own networks whatever their sizes and
ablation switches. ``cdiff train`` writes one per checkpoint (``model.safetensors``); ``cdiff
translate`` recognises it by its ``format`` and reads only ``generator.*``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cdiff.config import config_to_json
from cdiff.files import save_safetensors
from cdiff.npde.config import NPDEConfig
from cdiff.npde.model import NPDEGenerator, NPDEModel
from cdiff.statedict import check_state_dict
from cdiff.weightfile import CheckpointError, WeightFile, sniff

FORMAT = "cdiff-s2o-npde"
VERSION = "1"


def save_model(path: str | os.PathLike, model: NPDEModel) -> Path:
    """Write all four networks and ``model.config`` to ``path`` (atomically)."""
    metadata = {"format": FORMAT, "format_version": VERSION, "npde_config": config_to_json(model.config)}
    save_safetensors(model.state_dict(), path, metadata)
    return Path(path)


def is_model_file(path: str | os.PathLike) -> bool:
    """True for an S2O-NPDE model file; False for anything else (a folder, another model), without error."""
    path = Path(path)
    if not path.is_file() or sniff(path) != "safetensors":
        return False
    try:
        return WeightFile(path).metadata.get("format") == FORMAT
    except CheckpointError:
        return False


def _open(path) -> tuple[WeightFile, NPDEConfig]:
    f = WeightFile(path)
    if f.metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an S2O-NPDE model file (no format={FORMAT} in its metadata)")
    if f.metadata.get("format_version") != VERSION:
        raise CheckpointError(f"{path}: S2O-NPDE format version {f.metadata.get('format_version')!r}; "
                              f"this cdiff reads version {VERSION}")
    return f, f.config("npde_config", (NPDEConfig,))


def read_config(path: str | os.PathLike) -> NPDEConfig:
    return _open(path)[1]


def _fill(module: torch.nn.Module, state: dict, path, what: str, device) -> torch.nn.Module:
    check_state_dict(module.state_dict(), state, path, what)
    module.load_state_dict(state)
    return module.to(device)


def load_model(path: str | os.PathLike, device=None, config: NPDEConfig | None = None) -> NPDEModel:
    """The four networks of a model file, fp32, in training mode (to continue training).
    ``config``: build these networks instead of the file's own (e.g. other loss weights); their
    weights must match the file's names and shapes."""
    f, stored = _open(path)
    return _fill(NPDEModel(config or stored), f.load(), path, "S2O-NPDE model", device)


def load_generator(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> NPDEGenerator:
    """The SAR -> optical generator of a model file, in eval mode (for translation)."""
    f, config = _open(path)
    generator = NPDEGenerator(config, config.sar_channels, config.eo_channels, with_pmd=config.pmd)
    return _fill(generator, f.load("generator."), path, "S2O-NPDE generator", device).to(dtype=dtype).eval()

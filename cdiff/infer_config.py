"""Inferring a model's config from a checkpoint: its weights' shapes, and its config.json if any.

What each layout tells:
- a diffusers folder: everything, in ``config.json`` (cdiff.layouts.diffusers_config reads
  it; the weights are checked against it here);
- Stability's original single file and a bare diffusers-keyed weights file (the release's
  ``model.safetensors``): the weights only. Their shapes give the in/out channels, widths, res
  blocks per level, attention levels, transformer depths, context width and feed-forward
  width, but not the head size, the GroupNorm groups or the eps values: those come from the
  preset whose shapes match (SD 2.1, or cdiff's tiny test preset). Any other U-Net in these
  layouts needs its config given (``load_unet(source, config=...)``).
- the native file: its exact config, in the metadata (cdiff.native).

Whether a model is SD 2.x-768 (v-prediction) or 512 (epsilon) is not in the weights: both
have the same shapes. So nothing in a config depends on it; in particular cdiff has no
``upcast_attention`` flag to get wrong (its attention always accumulates in fp32, see
cdiff.attention), and the same weights give the same config from every layout.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from cdiff.config import UNetConfig, VAEConfig
from cdiff.layouts.diffusers_config import unet_config_from_diffusers, vae_config_from_diffusers
from cdiff.weightfile import CheckpointError

NO_CONFIG_HINT = (
    "give its config (load_unet/load_vae(source, config=...)), or read it from a diffusers folder with its config.json"
)


def count_indices(state, prefix: str) -> int:
    """How many consecutive indices ``prefix{n}.`` has, from 0."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in state):
        n += 1
    return n


def _get(state, key: str, where) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{where}: missing key {key}")
    return state[key]


def _unet_shapes(state, where) -> dict:
    """What a diffusers-keyed U-Net state dict's shapes say, in UNetConfig's terms."""
    levels = count_indices(state, "down_blocks.")
    mid = "mid_block.attentions.0."
    proj_in = _get(state, mid + "proj_in.weight", where)
    if proj_in.ndim != 2:
        raise CheckpointError(
            f"{where}: its spatial transformers use 1x1 conv projections (Stable Diffusion 1.x); "
            f"only SD 2.x-style U-Nets (linear projections) are supported"
        )
    attention = tuple(f"down_blocks.{i}.attentions.0.proj_in.weight" in state for i in range(levels))
    # Transformer depth, where the weights show it: attended levels, and the mid block (the last level's).
    depths = {i: count_indices(state, f"down_blocks.{i}.attentions.0.transformer_blocks.") for i in range(levels) if attention[i]}
    depths[levels - 1] = count_indices(state, mid + "transformer_blocks.")
    width = proj_in.shape[0]
    return dict(
        in_channels=_get(state, "conv_in.weight", where).shape[1],
        out_channels=_get(state, "conv_out.weight", where).shape[0],
        level_channels=tuple(_get(state, f"down_blocks.{i}.resnets.0.conv1.weight", where).shape[0] for i in range(levels)),
        level_res_blocks=tuple(count_indices(state, f"down_blocks.{i}.resnets.") for i in range(levels)),
        attention_levels=attention,
        transformer_depths=depths,
        context_dim=_get(state, mid + "transformer_blocks.0.attn2.to_k.weight", where).shape[1],
        ff_mult=_get(state, mid + "transformer_blocks.0.ff.net.0.proj.weight", where).shape[0] // (2 * width),
        time_embed_dim=_get(state, "time_embedding.linear_1.weight", where).shape[0],
    )


def _unet_view(config: UNetConfig) -> dict:
    """``config`` in the terms of ``_unet_shapes``."""
    levels = len(config.channel_mult)
    depths = {i: d for i, d in enumerate(config.level_transformer_depths) if config.attention_levels[i] or i == levels - 1}
    return dict(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        level_channels=config.level_channels,
        level_res_blocks=config.level_res_blocks,
        attention_levels=config.attention_levels,
        transformer_depths=depths,
        context_dim=config.context_dim,
        ff_mult=config.ff_mult,
        time_embed_dim=config.time_embed_dim,
    )


def _check_fits(view: dict, shapes: dict, where) -> None:
    wrong = [f"{k} {view[k]} in config.json, {v} in the weights" for k, v in shapes.items() if view[k] != v]
    if wrong:
        raise CheckpointError(f"{where}: config.json does not fit the weights: " + "; ".join(wrong))


def infer_unet_config(state, diffusers_config: dict | None = None, where="U-Net") -> UNetConfig:
    """The UNetConfig of a diffusers-keyed U-Net state dict: its ``config.json`` (``diffusers_config``)
    checked against the shapes, or else the preset the shapes match, with the file's in/out channels."""
    shapes = _unet_shapes(state, where)
    if diffusers_config:
        try:
            config = unet_config_from_diffusers(diffusers_config, where)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        _check_fits(_unet_view(config), shapes, where)
        return config
    for preset in (UNetConfig.sd21(), UNetConfig.tiny()):
        candidate = replace(preset, in_channels=shapes["in_channels"], out_channels=shapes["out_channels"])
        if _unet_view(candidate) == shapes:
            return candidate
    raise CheckpointError(
        f"{where}: this U-Net is not Stable Diffusion 2.1 (UNetConfig.sd21(); or cdiff's tiny test preset), and "
        f"its head size and GroupNorm groups cannot be read off the weights: {NO_CONFIG_HINT}; found {shapes}"
    )


def infer_vae_config(state, diffusers_config: dict | None = None, where="VAE") -> VAEConfig:
    """The VAEConfig of a diffusers-keyed AutoencoderKL state dict (config.json checked against
    the shapes, or else the preset the shapes match)."""
    levels = count_indices(state, "encoder.down_blocks.")
    shapes = dict(
        image_channels=_get(state, "encoder.conv_in.weight", where).shape[1],
        latent_channels=_get(state, "post_quant_conv.weight", where).shape[0],
        block_channels=tuple(
            _get(state, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", where).shape[0] for i in range(levels)
        ),
        layers_per_block=count_indices(state, "encoder.down_blocks.0.resnets."),
    )
    if diffusers_config:
        try:
            config = vae_config_from_diffusers(diffusers_config, where)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        _check_fits({k: getattr(config, k) for k in shapes}, shapes, where)
        return config
    for preset in (VAEConfig.sd21(), VAEConfig.tiny()):
        if all(getattr(preset, k) == v for k, v in shapes.items()):
            return preset
    raise CheckpointError(
        f"{where}: this VAE is not the SD 2.1 autoencoder (or cdiff's tiny test preset), and its GroupNorm "
        f"groups cannot be read off the weights: {NO_CONFIG_HINT}; found {shapes}"
    )

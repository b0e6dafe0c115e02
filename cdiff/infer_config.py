"""Inferring a model's config from a checkpoint: its weights' shapes, and its config.json if any.

The U-Net and VAE configs come from a diffusers-keyed state dict's shapes, completed by a
diffusers ``config.json`` when the layout has one, or else by the preset the shapes match
(SD 2.1, and cdiff's tiny test preset).
"""

from __future__ import annotations

from dataclasses import asdict, replace

import torch

from cdiff.checkpoint import CheckpointError
from cdiff.config import UNetConfig, VAEConfig


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


def _match_preset(inferred, presets, what: str, where, keep: tuple[str, ...]):
    """The preset equal to ``inferred`` on every field but ``keep`` (taken from ``inferred``)."""
    for preset in presets:
        candidate = replace(preset, **{f: getattr(inferred, f) for f in keep})
        if candidate == inferred:
            return candidate
    raise CheckpointError(
        f"{where}: this {what} is not Stable Diffusion 2.1's (nor cdiff's tiny test preset); found {asdict(inferred)}"
    )


def infer_unet_config(state, diffusers_config: dict | None = None, where="U-Net") -> UNetConfig:
    """The UNetConfig of a diffusers-keyed U-Net state dict (and its config.json, if any).

    in/out channels, widths, depths, attention levels and the context width come from the
    shapes; head size, GroupNorm groups and eps from ``diffusers_config`` when given, else
    from the preset the shapes match. Anything that is neither SD 2.1 (any in/out channels,
    with or without upcast attention) nor the tiny preset is refused.
    """
    conv_in = _get(state, "conv_in.weight", where)
    conv_out = _get(state, "conv_out.weight", where)
    levels = count_indices(state, "down_blocks.")
    widths = [
        _get(state, f"down_blocks.{i}.resnets.0.conv1.weight", where).shape[0] for i in range(levels)
    ]
    width = conv_in.shape[0]
    attention = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in state) for i in range(levels))
    mid = "mid_block.attentions.0."
    proj_in = _get(state, mid + "proj_in.weight", where)
    if proj_in.ndim != 2:
        raise CheckpointError(
            f"{where}: its spatial transformers use 1x1 conv projections (Stable Diffusion 1.x); "
            f"only SD 2.1 (linear projections) is supported"
        )
    if any(w % width for w in widths):
        raise CheckpointError(f"{where}: level widths {widths} are not multiples of {width}")
    fields = dict(
        in_channels=conv_in.shape[1],
        out_channels=conv_out.shape[0],
        model_channels=width,
        channel_mult=tuple(w // width for w in widths),
        num_res_blocks=count_indices(state, "down_blocks.0.resnets."),
        attention_levels=attention,
        transformer_depth=count_indices(state, mid + "transformer_blocks."),
        context_dim=_get(state, mid + "transformer_blocks.0.attn2.to_k.weight", where).shape[1],
    )
    presets = (UNetConfig.sd21(), UNetConfig.tiny())
    if diffusers_config:
        heads = diffusers_config.get("num_attention_heads") or diffusers_config.get("attention_head_dim")
        heads = heads if isinstance(heads, (list, tuple)) else [heads] * levels  # diffusers' "head dim" = head count
        head_dims = {w // h for w, h in zip(widths, heads) if h}
        try:
            inferred = UNetConfig(
                **fields,
                head_dim=head_dims.pop() if len(head_dims) == 1 else -1,
                norm_groups=diffusers_config.get("norm_num_groups", 32),
                norm_eps=diffusers_config.get("norm_eps", 1e-5),
                upcast_attention=bool(diffusers_config.get("upcast_attention", False)),
            )
        except ValueError as err:
            raise CheckpointError(f"{where}: config.json does not fit the weights: {err}") from None
        return _match_preset(inferred, presets, "U-Net", where, keep=("in_channels", "out_channels", "upcast_attention"))
    # Without a config, head size and norms cannot be read off the weights: take the preset's.
    for preset in presets:
        candidate = replace(preset, in_channels=fields["in_channels"], out_channels=fields["out_channels"])
        if all(getattr(candidate, k) == v for k, v in fields.items()):
            return candidate
    raise CheckpointError(
        f"{where}: this U-Net is not Stable Diffusion 2.1 (UNetConfig.sd21(); or cdiff's tiny test preset); found {fields}"
    )


def infer_vae_config(state, diffusers_config: dict | None = None, where="VAE") -> VAEConfig:
    """The VAEConfig of a diffusers-keyed AutoencoderKL state dict (shapes, then config.json or the presets)."""
    levels = count_indices(state, "encoder.down_blocks.")
    fields = dict(
        image_channels=_get(state, "encoder.conv_in.weight", where).shape[1],
        latent_channels=_get(state, "post_quant_conv.weight", where).shape[0],
        block_channels=tuple(
            _get(state, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", where).shape[0] for i in range(levels)
        ),
        layers_per_block=count_indices(state, "encoder.down_blocks.0.resnets."),
    )
    presets = (VAEConfig.sd21(), VAEConfig.tiny())
    if diffusers_config:
        try:
            inferred = VAEConfig(
                **fields,
                norm_groups=diffusers_config.get("norm_num_groups", 32),
                scaling_factor=diffusers_config.get("scaling_factor", 0.18215),
            )
        except ValueError as err:
            raise CheckpointError(f"{where}: config.json does not fit the weights: {err}") from None
        return _match_preset(inferred, presets, "VAE", where, keep=("scaling_factor",))
    for preset in presets:
        if all(getattr(preset, k) == v for k, v in fields.items()):
            return preset
    raise CheckpointError(f"{where}: this VAE is not the SD 2.1 autoencoder (or cdiff's tiny test preset); found {fields}")

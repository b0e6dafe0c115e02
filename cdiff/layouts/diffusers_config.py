"""cdiff's configs <-> diffusers' ``config.json`` (UNet2DConditionModel, AutoencoderKL), both ways.

A diffusers ``config.json`` fully describes its model, so every config in the SD 2.x family
is read, preset or not: any widths (multiples of the first level's), res blocks and
transformer depth per level, head counts per level, attention levels, context width, norms.
What cdiff cannot build is refused by name, with the reason: a key whose value asks for
another architecture (``use_linear_projection: false`` is SD 1.x's 1x1 conv projections,
``class_embed_type`` a class-conditioned U-Net, other block types ...). A key missing from
the file means diffusers' default for it, as diffusers reads it.

diffusers calls the head count per level ``attention_head_dim`` (a historical misnomer it
keeps for compatibility); head size = level width / head count.

``upcast_attention`` is read and has no effect: cdiff's attention always accumulates in fp32
(see cdiff.attention), and the flag cannot be known for the layouts that have no config.json
(SD 2.x 768-v and 512 weights have identical shapes). It is written as false, diffusers'
default, which its default attention (SDPA) ignores.
"""

from __future__ import annotations

import logging

from cdiff.config import UNetConfig, VAEConfig

log = logging.getLogger("cdiff.layouts")

# UNet2DConditionModel keys that cdiff builds at one value only: key -> (diffusers' default, the
# value cdiff builds, what another value would ask for). None and False mean the same to diffusers.
_UNET_FIXED = {
    "use_linear_projection": (False, True, "1x1 conv projections in the spatial transformers (Stable Diffusion 1.x)"),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", "UNetMidBlock2DCrossAttn", "another mid block"),
    "act_fn": ("silu", "silu", "another activation"),
    "center_input_sample": (False, False, "input centring"),
    "flip_sin_to_cos": (True, True, "a sine-first timestep embedding"),
    "freq_shift": (0, 0, "a shifted timestep embedding"),
    "downsample_padding": (1, 1, "another downsample padding"),
    "mid_block_scale_factor": (1, 1, "a scaled mid block"),
    "dropout": (0.0, 0.0, "dropout (cdiff's U-Net has none)"),
    "only_cross_attention": (False, False, "transformers without self-attention"),
    "dual_cross_attention": (False, False, "dual cross-attention"),
    "class_embed_type": (None, None, "a class embedding"),
    "num_class_embeds": (None, None, "a class embedding"),
    "addition_embed_type": (None, None, "an added embedding (SDXL-style)"),
    "addition_time_embed_dim": (None, None, "an added time embedding (SDXL-style)"),
    "projection_class_embeddings_input_dim": (None, None, "a projected class embedding"),
    "class_embeddings_concat": (False, False, "a concatenated class embedding"),
    "encoder_hid_dim": (None, None, "a projection of the context"),
    "encoder_hid_dim_type": (None, None, "a projection of the context"),
    "resnet_time_scale_shift": ("default", "default", "scale-shift time conditioning"),
    "resnet_skip_time_act": (False, False, "res blocks without the time SiLU"),
    "resnet_out_scale_factor": (1.0, 1.0, "scaled res block outputs"),
    "time_embedding_type": ("positional", "positional", "Fourier time features"),
    "time_embedding_act_fn": (None, None, "an extra time activation"),
    "timestep_post_act": (None, None, "an extra time activation"),
    "time_cond_proj_dim": (None, None, "a time condition projection (LCM-style)"),
    "conv_in_kernel": (3, 3, "another conv_in kernel"),
    "conv_out_kernel": (3, 3, "another conv_out kernel"),
    "attention_type": ("default", "default", "gated attention"),
    "cross_attention_norm": (None, None, "a normed context"),
    "mid_block_only_cross_attention": (None, None, "a mid block without self-attention"),
    "reverse_transformer_layers_per_block": (None, None, "different transformer depths on the way up"),
}
# Keys that do not change the architecture.
_UNET_INERT = {"sample_size", "upcast_attention", "addition_embed_type_num_heads"}
_UNET_READ = {
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
    "attention_head_dim", "num_attention_heads", "cross_attention_dim", "transformer_layers_per_block",
    "norm_num_groups", "norm_eps", "time_embedding_dim",
}
_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}


def _uniform(value):
    """A list whose entries agree, as that entry (diffusers accepts either form for many keys)."""
    if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
        return value[0]
    return value


def _off(value) -> bool:
    return value is None or value is False


def _per_level(value, levels: int, name: str, where) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"{where}: {name} has {len(value)} entries for {levels} levels")
        return tuple(value)
    return (value,) * levels


def unet_config_from_diffusers(config: dict, where="config.json") -> UNetConfig:
    """The UNetConfig a diffusers UNet2DConditionModel ``config.json`` describes.

    Raises ValueError naming the key when cdiff cannot build what it asks for.
    """
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"{where}: a {config['_class_name']}, not a UNet2DConditionModel")
    for key, (default, built, meaning) in _UNET_FIXED.items():
        value = _uniform(config.get(key, default))
        if value != built and not (_off(value) and _off(built)):
            raise ValueError(f"{where}: {key}={value!r} asks for {meaning}; cdiff builds SD 2.x-style U-Nets only")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _UNET_FIXED.keys() | _UNET_READ | _UNET_INERT)
    if unknown:
        log.warning("%s: keys unknown to cdiff, ignored: %s", where, unknown)

    widths = tuple(config.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(widths)
    down = tuple(config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    bad = sorted(set(down) - set(_DOWN_TYPES))
    if bad or len(down) != levels:
        raise ValueError(f"{where}: down_block_types {list(down)}: cdiff builds {levels} levels of {sorted(_DOWN_TYPES)}")
    attention = tuple(_DOWN_TYPES[t] for t in down)
    up = tuple(config.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    if up != tuple(_UP_TYPES[a] for a in reversed(attention)):
        raise ValueError(f"{where}: up_block_types {list(up)} do not mirror down_block_types {list(down)}")
    if any(w % widths[0] for w in widths):
        raise ValueError(f"{where}: block_out_channels {list(widths)}: cdiff needs every width a multiple of the first")
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)  # head counts, see above
    heads = _per_level(heads, levels, "attention_head_dim", where)
    for w, h in zip(widths, heads):
        if w % h:
            raise ValueError(f"{where}: {w} channels do not split into {h} heads (attention_head_dim)")
    depth = config.get("transformer_layers_per_block", 1)
    if any(isinstance(d, (list, tuple)) for d in _per_level(depth, levels, "transformer_layers_per_block", where)):
        raise ValueError(f"{where}: transformer_layers_per_block {depth}: cdiff takes one depth per level")
    context_dim = _uniform(config.get("cross_attention_dim", 1280))
    if isinstance(context_dim, (list, tuple)):
        raise ValueError(f"{where}: cross_attention_dim {context_dim}: cdiff takes one context width")
    groups = config.get("norm_num_groups", 32)
    if groups is None:
        raise ValueError(f"{where}: norm_num_groups=None (no GroupNorms) is not an SD 2.x U-Net")
    if config.get("time_embedding_dim") not in (None, 4 * widths[0]):
        raise ValueError(f"{where}: time_embedding_dim {config['time_embedding_dim']}: cdiff's is 4 x {widths[0]}")
    try:
        return UNetConfig(
            in_channels=config.get("in_channels", 4),
            out_channels=config.get("out_channels", 4),
            model_channels=widths[0],
            channel_mult=tuple(w // widths[0] for w in widths),
            num_res_blocks=_per_level(config.get("layers_per_block", 2), levels, "layers_per_block", where),
            attention_levels=attention,
            head_dim=tuple(w // h for w, h in zip(widths, heads)),
            transformer_depth=_per_level(depth, levels, "transformer_layers_per_block", where),
            context_dim=context_dim,
            norm_groups=groups,
            norm_eps=config.get("norm_eps", 1e-5),
        )
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _one_or_list(value):
    return list(value) if isinstance(value, tuple) else value


def diffusers_unet_config(config: UNetConfig) -> dict:
    """The diffusers UNet2DConditionModel config.json of ``config``; ValueError for what diffusers cannot say."""
    fixed = UNetConfig()
    for name in ("transformer_norm_eps", "layer_norm_eps", "ff_mult", "timestep_max_period"):
        value, fixed_value = getattr(config, name), getattr(fixed, name)
        if value != fixed_value:
            raise ValueError(f"UNetConfig.{name}={value}: diffusers' UNet2DConditionModel fixes it at {fixed_value}")
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        # diffusers' "attention_head_dim" is the number of heads per level (a historical name).
        "attention_head_dim": [c // d for c, d in zip(config.level_channels, config.level_head_dims)],
        "block_out_channels": list(config.level_channels),
        "center_input_sample": False,
        "cross_attention_dim": config.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": config.in_channels,
        "layers_per_block": _one_or_list(config.num_res_blocks),
        "mid_block_scale_factor": 1,
        "norm_eps": config.norm_eps,
        "norm_num_groups": config.norm_groups,
        "out_channels": config.out_channels,
        "sample_size": 64,
        "transformer_layers_per_block": _one_or_list(config.transformer_depth),
        "up_block_types": [_UP_TYPES[a] for a in reversed(config.attention_levels)],
        "upcast_attention": False,
        "use_linear_projection": True,
    }


# AutoencoderKL keys that cdiff builds at one value only (as _UNET_FIXED).
_VAE_FIXED = {
    "act_fn": ("silu", "silu", "another activation"),
    "mid_block_add_attention": (True, True, "a mid block without attention"),
    "use_quant_conv": (True, True, "no quant_conv"),
    "use_post_quant_conv": (True, True, "no post_quant_conv"),
    "shift_factor": (None, None, "shifted latents (SD3/Flux-style)"),
    "latents_mean": (None, None, "per-channel latent statistics"),
    "latents_std": (None, None, "per-channel latent statistics"),
}
_VAE_INERT = {"sample_size", "force_upcast"}
_VAE_READ = {
    "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
    "down_block_types", "up_block_types", "norm_num_groups", "scaling_factor",
}


def vae_config_from_diffusers(config: dict, where="config.json") -> VAEConfig:
    """The VAEConfig a diffusers AutoencoderKL ``config.json`` describes (ValueError naming the key otherwise)."""
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"{where}: a {config['_class_name']}, not an AutoencoderKL")
    for key, (default, built, meaning) in _VAE_FIXED.items():
        if config.get(key, default) != built:
            raise ValueError(f"{where}: {key}={config.get(key)!r} asks for {meaning}; cdiff builds the SD autoencoder only")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _VAE_FIXED.keys() | _VAE_READ | _VAE_INERT)
    if unknown:
        log.warning("%s: keys unknown to cdiff, ignored: %s", where, unknown)
    widths = tuple(config.get("block_out_channels", (64,)))
    levels = len(widths)
    if tuple(config.get("down_block_types", ("DownEncoderBlock2D",))) != ("DownEncoderBlock2D",) * levels:
        raise ValueError(f"{where}: down_block_types: cdiff builds {levels} DownEncoderBlock2D")
    if tuple(config.get("up_block_types", ("UpDecoderBlock2D",))) != ("UpDecoderBlock2D",) * levels:
        raise ValueError(f"{where}: up_block_types: cdiff builds {levels} UpDecoderBlock2D")
    channels = config.get("in_channels", 3)
    if config.get("out_channels", 3) != channels:
        raise ValueError(f"{where}: in_channels {channels} and out_channels {config.get('out_channels')}: cdiff needs them equal")
    try:
        return VAEConfig(
            image_channels=channels,
            latent_channels=config.get("latent_channels", 4),
            block_channels=widths,
            layers_per_block=config.get("layers_per_block", 1),
            norm_groups=config.get("norm_num_groups", 32),
            scaling_factor=config.get("scaling_factor", 0.18215),
        )
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def diffusers_vae_config(config: VAEConfig) -> dict:
    """The diffusers AutoencoderKL config.json of ``config`` (its GroupNorm eps is fixed at 1e-6)."""
    if config.norm_eps != 1e-6:
        raise ValueError(f"VAEConfig.norm_eps={config.norm_eps}: diffusers' AutoencoderKL fixes it at 1e-6")
    if config.mid_attention_heads != 1:
        raise ValueError(f"VAEConfig.mid_attention_heads={config.mid_attention_heads}: diffusers' AutoencoderKL fixes it at 1")
    levels = len(config.block_channels)
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": list(config.block_channels),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "in_channels": config.image_channels,
        "latent_channels": config.latent_channels,
        "layers_per_block": config.layers_per_block,
        "norm_num_groups": config.norm_groups,
        "out_channels": config.image_channels,
        "sample_size": 512,
        "scaling_factor": config.scaling_factor,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }

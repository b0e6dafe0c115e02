"""Architecture configs: every architectural number of the stack lives here.

Each config is a frozen dataclass with named presets. ``sd21`` is Stable Diffusion 2.1
exactly (base and 768 share one architecture, as does SD 2.0); ``tiny`` keeps the same
structure at a few MB, for tests and the demo.
The C-DiffSET U-Net is ``replace(UNetConfig.sd21(), in_channels=8, out_channels=5)``
(see ``UNetConfig.cdiffset``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

import torch

# Floating-point formats by the names the command line and the run configs use.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _check_groups(name: str, channels: tuple[int, ...], groups: int) -> None:
    for c in channels:
        if c % groups:
            raise ValueError(f"{name}: {c} channels do not split into {groups} GroupNorm groups")


def _per_level(config, name: str) -> tuple[int, ...]:
    value = getattr(config, name)
    return value if isinstance(value, tuple) else (value,) * len(config.channel_mult)


@dataclass(frozen=True)
class UNetConfig:
    """Every number of an SD 2.x-style U-Net (linear projections in its spatial transformers).

    ``num_res_blocks``, ``head_dim`` and ``transformer_depth`` are one number for every level,
    or a tuple with one per level (a tuple whose entries agree is stored as that one number,
    so equal configs mean equal models). The mid block takes the last level's head size and depth.
    """

    in_channels: int = 4  # 8 for C-DiffSET: [SAR latent | noisy EO latent]
    out_channels: int = 4  # 5 for C-DiffSET: 4 noise + 1 raw variance
    model_channels: int = 320  # channels of the first level; the time MLP is 4x this wide
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # per level; one 2x downsample between levels
    num_res_blocks: int | tuple[int, ...] = 2  # res blocks per level on the way down (the way up has one more)
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # spatial transformer per level
    head_dim: int | tuple[int, ...] = 64  # attention head size; heads = channels // head_dim
    transformer_depth: int | tuple[int, ...] = 1  # transformer blocks per spatial transformer
    context_dim: int = 1024  # width of the text context (OpenCLIP ViT-H/14)
    norm_groups: int = 32
    norm_eps: float = 1e-5  # res blocks and the output norm
    transformer_norm_eps: float = 1e-6  # the spatial transformer's input GroupNorm
    layer_norm_eps: float = 1e-5  # the LayerNorms inside transformer blocks
    ff_mult: int = 4  # GEGLU hidden width = ff_mult x channels
    timestep_max_period: float = 10_000.0  # longest period of the sinusoidal timestep embedding

    def __post_init__(self):
        levels = len(self.channel_mult)
        if levels < 1:
            raise ValueError("UNetConfig: channel_mult needs at least one level")
        if len(self.attention_levels) != levels:
            raise ValueError("UNetConfig: channel_mult and attention_levels need one entry per level")
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError("UNetConfig: in_channels and out_channels must be positive")
        for name in ("num_res_blocks", "head_dim", "transformer_depth"):
            value = getattr(self, name)
            if isinstance(value, list):
                value = tuple(value)
            if isinstance(value, tuple):
                if len(value) != levels:
                    raise ValueError(f"UNetConfig: {name} needs one entry per level ({levels}), got {value}")
                if len(set(value)) == 1:
                    value = value[0]
                object.__setattr__(self, name, value)
            if min(_per_level(self, name)) < 1:
                raise ValueError(f"UNetConfig: {name} must be positive, got {value}")
        # The mid block attends at the last level's width, whatever attention_levels says of it.
        attended = [i for i, a in enumerate(self.attention_levels) if a] + [levels - 1]
        for i in attended:
            c, d = self.level_channels[i], self.level_head_dims[i]
            if c % d:
                raise ValueError(f"UNetConfig: level {i}'s {c} channels do not split into heads of {d}")
        _check_groups("UNetConfig", self.level_channels, self.norm_groups)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def level_res_blocks(self) -> tuple[int, ...]:
        return _per_level(self, "num_res_blocks")

    @property
    def level_head_dims(self) -> tuple[int, ...]:
        return _per_level(self, "head_dim")

    @property
    def level_transformer_depths(self) -> tuple[int, ...]:
        return _per_level(self, "transformer_depth")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def downsample_factor(self) -> int:
        """Latent sides must be divisible by this (one 2x downsample between levels)."""
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def sd21(cls) -> "UNetConfig":
        """SD 2.1 (base and 768), and SD 2.0: one architecture."""
        return cls()

    @classmethod
    def cdiffset(cls) -> "UNetConfig":
        return replace(cls.sd21(), in_channels=8, out_channels=5)

    @classmethod
    def tiny(cls, **overrides) -> "UNetConfig":
        # 4.9M parameters; the context stays 1024 wide so the real prompt embedding fits.
        return replace(cls(model_channels=32, channel_mult=(1, 2, 2, 2), head_dim=16, norm_groups=8), **overrides)


@dataclass(frozen=True)
class VAEConfig:
    image_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (128, 256, 512, 512)  # per level of the encoder
    layers_per_block: int = 2  # res blocks per encoder level (the decoder has one more)
    norm_groups: int = 32
    norm_eps: float = 1e-6
    mid_attention_heads: int = 1  # the mid block's attention is one head as wide as the block
    scaling_factor: float = 0.18215  # unscaled latent * this = the latent the U-Net sees

    def __post_init__(self):
        _check_groups("VAEConfig", self.block_channels, self.norm_groups)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_channels) - 1)

    @classmethod
    def sd21(cls) -> "VAEConfig":
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> "VAEConfig":
        return replace(cls(block_channels=(32, 64, 64, 64), layers_per_block=1, norm_groups=8), **overrides)


def config_to_json(config) -> str:
    return json.dumps({"type": type(config).__name__, **asdict(config)}, sort_keys=True)


# Fields that older native files may hold and that no longer describe anything: cdiff's
# attention always accumulates in fp32, so "upcast_attention" changed nothing (see cdiff.attention).
_RETIRED_FIELDS = {"UNetConfig": ("upcast_attention",)}


def config_from_json(text: str, classes: tuple[type, ...] = (UNetConfig, VAEConfig)):
    """Inverse of ``config_to_json`` for a config of one of ``classes`` (another module's configs,
    such as cdiff.npde's, pass their own); lists come back as the tuples the dataclasses use."""
    data = json.loads(text)
    kind = {cls.__name__: cls for cls in classes}.get(data.pop("type", None))
    if kind is None:
        raise ValueError(f"unknown config type in {text[:80]!r} (expected one of {[c.__name__ for c in classes]})")
    for name in _RETIRED_FIELDS.get(kind.__name__, ()):
        data.pop(name, None)
    names = {f.name for f in fields(kind)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{kind.__name__}: unknown fields {unknown}")
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

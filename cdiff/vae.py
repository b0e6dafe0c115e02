"""The Stable Diffusion 2.1 autoencoder (AutoencoderKL): images <-> 4-channel latents.

    images (B, 3, H, W) in [-1, 1]
      -> Encoder -> quant_conv -> moments (B, 8, H/8, W/8) = [mean | logvar]
      -> DiagonalGaussian posterior; its mean (or a sample) is the UNSCALED latent (B, 4, H/8, W/8)
    unscaled latent -> post_quant_conv -> Decoder -> images (B, 3, H, W), about [-1, 1], not clamped

The U-Net works on SCALED latents (unscaled * ``config.scaling_factor``, 0.18215 for SD 2.1);
``encode_latent`` / ``decode_latent`` do that scaling, ``encode`` / ``decode`` do not.
Parameter names map to diffusers' AutoencoderKL through ``cdiff.layouts.diffusers.VAE``.
"""

from __future__ import annotations

import torch
from torch import nn

from cdiff.attention import attention
from cdiff.config import VAEConfig
from cdiff.layers import Downsample, GroupNorm, ResBlock, Upsample, from_tokens, to_tokens

# The reference clamps the log-variance before exponentiating, so std never under- or overflows.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """The encoder's posterior q(z | x): an axis-aligned Gaussian per latent element.

    moments: (B, 2 * latent_channels, h, w), the first half the mean, the second the log-variance.
    ``mean``, ``logvar`` (clamped to [-30, 20]), ``std`` and ``var`` are (B, latent_channels, h, w),
    all in the unscaled latent space.
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise, noise ~ N(0, 1) drawn from ``generator`` (on its own device) in mean's dtype."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean


class MidAttention(nn.Module):
    """Self-attention over all pixels, with its own GroupNorm and a residual connection.

    x: (B, C, H, W) -> (B, C, H, W). Projections are Linear layers (diffusers' layout;
    the original single-file checkpoints store them as 1x1 convs). ``attention_backend`` is
    this module's own backend (None: the process-wide one), see cdiff.attention.
    """

    def __init__(self, channels: int, heads: int, groups: int, eps: float):
        super().__init__()
        self.heads = heads
        self.attention_backend = None
        self.norm = GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2:]
        # 1. normalise, then pixels become tokens (a view of channels-last memory, no copy)
        h = to_tokens(self.norm(x))  # (B, HW, C)
        # 2. attend every pixel to every pixel
        h = attention(self.to_q(h), self.to_k(h), self.to_v(h), self.heads, backend=self.attention_backend)  # (B, HW, C)
        h = self.to_out(h)
        # 3. tokens back to an image (a channels-last view), plus the residual
        return x + from_tokens(h, height, width)  # (B, C, H, W)


class MidBlock(nn.Module):
    """res block, attention, res block, all at the deepest width. (B, C, h, w) -> same."""

    def __init__(self, channels: int, heads: int, groups: int, eps: float):
        super().__init__()
        self.res = nn.ModuleList([ResBlock(channels, channels, groups, eps) for _ in range(2)])
        self.attn = MidAttention(channels, heads, groups, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res[1](self.attn(self.res[0](x)))


class EncoderLevel(nn.Module):
    """``num_res`` res blocks (the first changes the width), then an optional 2x downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_res: int, downsample: bool, groups: int, eps: float):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_res
        self.res = nn.ModuleList([ResBlock(a, b, groups, eps) for a, b in zip(widths[:-1], widths[1:])])
        # The reference pads only right and bottom before its stride-2 conv.
        self.downsample = Downsample(out_channels, asymmetric=True) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res:
            x = block(x)
        return self.downsample(x)


class DecoderLevel(nn.Module):
    """``num_res`` res blocks (the first changes the width), then an optional 2x upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_res: int, upsample: bool, groups: int, eps: float):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_res
        self.res = nn.ModuleList([ResBlock(a, b, groups, eps) for a, b in zip(widths[:-1], widths[1:])])
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res:
            x = block(x)
        return self.upsample(x)


class Encoder(nn.Module):
    """images (B, image_channels, H, W) -> moments (B, 2 * latent_channels, H/f, W/f), f = downsample_factor."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        c, groups, eps = config.block_channels, config.norm_groups, config.norm_eps
        self.conv_in = nn.Conv2d(config.image_channels, c[0], 3, padding=1)
        last = len(c) - 1
        self.down = nn.ModuleList(
            EncoderLevel(c[max(i - 1, 0)], c[i], config.layers_per_block, i < last, groups, eps) for i in range(len(c))
        )
        self.mid = MidBlock(c[-1], config.mid_attention_heads, groups, eps)
        self.norm_out = GroupNorm(groups, c[-1], eps=eps)
        self.conv_out = nn.Conv2d(c[-1], 2 * config.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 1. stem and the levels, halving the sides between levels
        h = self.conv_in(x)  # (B, c0, H, W)
        for level in self.down:
            h = level(h)  # (B, c_last, H/f, W/f) after the last level
        # 2. the mid block, then norm-SiLU-conv to the moments
        h = self.mid(h)
        return self.conv_out(self.norm_out(h, silu=True))  # (B, 2 * latent_channels, H/f, W/f)


class Decoder(nn.Module):
    """latent (B, latent_channels, h, w) -> images (B, image_channels, h*f, w*f).

    Runs the encoder's widths in reverse, with ``layers_per_block + 1`` res blocks per level.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        c, groups, eps = tuple(reversed(config.block_channels)), config.norm_groups, config.norm_eps
        self.conv_in = nn.Conv2d(config.latent_channels, c[0], 3, padding=1)
        self.mid = MidBlock(c[0], config.mid_attention_heads, groups, eps)
        last = len(c) - 1
        self.up = nn.ModuleList(
            DecoderLevel(c[max(i - 1, 0)], c[i], config.layers_per_block + 1, i < last, groups, eps)
            for i in range(len(c))
        )
        self.norm_out = GroupNorm(groups, c[-1], eps=eps)  # c[-1]: the first encoder level's width
        self.conv_out = nn.Conv2d(c[-1], config.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # 1. stem and the mid block at the deepest width
        h = self.mid(self.conv_in(z))  # (B, c_last, h, w)
        # 2. the levels, doubling the sides between levels
        for level in self.up:
            h = level(h)  # (B, c0, h*f, w*f) after the last level
        # 3. norm-SiLU-conv to pixels
        return self.conv_out(self.norm_out(h, silu=True))  # (B, image_channels, h*f, w*f)


def _check_4d(x: torch.Tensor, name: str, channels: int, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be {what} of shape (B, {channels}, H, W), got {x.ndim} dims {tuple(x.shape)}")
    if x.shape[1] != channels:
        hint = ""
        if x.shape[1] == 1 and channels > 1:  # single-pol SAR: the release feeds it as identical channels
            hint = f"; for a single-channel image repeat the channel: {name}.repeat(1, {channels}, 1, 1)"
        raise ValueError(f"{name} must have {channels} channels ({what}), got shape {tuple(x.shape)}{hint}")


class VAE(nn.Module):
    """The SD 2.1 autoencoder. Every size comes from ``config`` (``VAEConfig.sd21()`` by default)."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config if config is not None else VAEConfig.sd21()
        latent = self.config.latent_channels
        self.encoder = Encoder(self.config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)
        self.decoder = Decoder(self.config)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (B, image_channels, H, W) in [-1, 1], H and W divisible by ``config.downsample_factor``
        -> the posterior over the UNSCALED latent, whose mean is (B, latent_channels, H/f, W/f)."""
        _check_4d(images, "images", self.config.image_channels, "images")
        f = self.config.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"images: height and width must be divisible by {f}, got shape {tuple(images.shape)}")
        moments = self.quant_conv(self.encoder(images))  # (B, 2 * latent_channels, H/f, W/f)
        return DiagonalGaussian(moments)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """UNSCALED latent (B, latent_channels, h, w) -> images (B, image_channels, h*f, w*f).

        The images are about [-1, 1] and are not clamped (the caller decides how to quantise).
        """
        _check_4d(latent, "latent", self.config.latent_channels, "an unscaled latent")
        return self.decoder(self.post_quant_conv(latent))

    def encode_latent(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """images (B, image_channels, H, W) in [-1, 1] -> SCALED latent (B, latent_channels, H/f, W/f).

        The posterior mean (or, with ``sample=True``, a draw from it with ``generator``) times
        ``config.scaling_factor``: the units the U-Net is trained in.
        """
        posterior = self.encode(images)
        latent = posterior.sample(generator) if sample else posterior.mode()
        return latent * self.config.scaling_factor

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """SCALED latent (B, latent_channels, h, w) -> images (B, image_channels, h*f, w*f), about [-1, 1]."""
        return self.decode(latent / self.config.scaling_factor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean: images (B, 3, H, W) -> images (B, 3, H, W)."""
        return self.decode(self.encode(images).mode())

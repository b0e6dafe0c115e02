"""The Stable Diffusion 2.1 U-Net (and the C-DiffSET 8-in / 5-out variant) in plain PyTorch.

    sample (B, in, h, w) --conv_in--> down levels --> mid --> up levels --norm, SiLU, conv_out--> (B, out, h, w)
                                          |  skips (one per layer)  ^
                                          +-------------------------+

Each level has ``num_res_blocks`` res blocks on the way down (``+ 1`` on the way up, one per
skip), each followed by a spatial transformer where ``attention_levels`` says so, and a 2x
down/upsample between levels. Every res block gets the timestep embedding, every transformer
cross-attends to the text ``context`` (B, L, context_dim) of any length L.

Every number comes from ``UNetConfig``. Parameter names map to diffusers'
with ``cdiff.layouts.diffusers.UNET``. ``up.0`` is the deepest level (the order blocks run in).

Written for checkpointing and ``torch.compile``: every down/mid/up block is a module with a
uniform call, ``forward`` holds no data-dependent Python branches and no state.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from cdiff.attention import attention
from cdiff.config import UNetConfig
from cdiff.layers import Downsample, GroupNorm, ResBlock, Upsample


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps, cosines first, frequencies max_period^(-i / (dim/2)).

    t: (B,) timesteps (integer or fractional). Returns (B, dim) in fp32, whatever t's dtype.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, dim)


class Attention(nn.Module):
    """Multi-head attention of ``tokens`` to ``context`` (itself for self-attention).

    tokens: (B, Lq, dim); context: (B, Lk, context_dim). Returns (B, Lq, dim).
    """

    def __init__(self, dim: int, context_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(tokens), self.to_k(context), self.to_v(context)  # (B, L, heads*d)
        return self.to_out(attention(q, k, v, self.heads, upcast=self.upcast))


class FeedForward(nn.Module):
    """GEGLU feed-forward: (value * GELU(gate)) from one projection, then back to ``dim``.

    tokens: (B, L, dim). Returns (B, L, dim).
    """

    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)  # value and gate side by side
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj_in(tokens).chunk(2, dim=-1)  # 2 x (B, L, mult*dim)
        return self.proj_out(value * F.gelu(gate))  # exact (erf) GELU, as the reference


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, GEGLU feed-forward; each residual.

    tokens: (B, L, dim); context: (B, Lc, context_dim). Returns (B, L, dim).
    """

    def __init__(self, dim: int, config: UNetConfig):
        super().__init__()
        heads, eps, upcast = dim // config.head_dim, config.layer_norm_eps, config.upcast_attention
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = Attention(dim, dim, heads, upcast)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, config.context_dim, heads, upcast)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim, config.ff_mult)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(tokens)
        tokens = tokens + self.self_attn(normed, normed)
        tokens = tokens + self.cross_attn(self.norm2(tokens), context)
        return tokens + self.ff(self.norm3(tokens))


class SpatialTransformer(nn.Module):
    """GroupNorm, linear projection to tokens, transformer blocks, projection back; residual.

    sample: (B, C, H, W); context: (B, L, context_dim). Returns (B, C, H, W).
    """

    def __init__(self, channels: int, config: UNetConfig):
        super().__init__()
        self.norm = GroupNorm(config.norm_groups, channels, eps=config.transformer_norm_eps)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(channels, config) for _ in range(config.transformer_depth))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, sample: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = sample.shape
        tokens = self.norm(sample).permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, HW, C)
        tokens = self.proj_in(tokens)
        for block in self.blocks:
            tokens = block(tokens, context)
        tokens = self.proj_out(tokens)
        return sample + tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W)


class DownBlock(nn.Module):
    """One level on the way down: (res block [+ transformer]) x n, then an optional 2x downsample.

    forward(sample (B, C_in, H, W), time_emb (B, T), context (B, L, D)) returns the output
    (B, C_out, H', W') and the skips, one per layer, in the order they were made.
    """

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig, attend: bool, downsample: bool):
        super().__init__()
        groups, eps, time_dim = config.norm_groups, config.norm_eps, config.time_embed_dim
        self.res = nn.ModuleList(
            ResBlock(in_channels if j == 0 else out_channels, out_channels, groups, eps, time_dim)
            for j in range(config.num_res_blocks)
        )
        self.attn = (
            nn.ModuleList(SpatialTransformer(out_channels, config) for _ in range(config.num_res_blocks))
            if attend
            else None
        )
        self.downsample = Downsample(out_channels) if downsample else None  # stride-2, padding 1 all round

    def forward(self, sample, time_emb, context) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips = []
        for j, res in enumerate(self.res):
            sample = res(sample, time_emb)
            if self.attn is not None:  # structural, fixed at construction
                sample = self.attn[j](sample, context)
            skips.append(sample)
        if self.downsample is not None:
            sample = self.downsample(sample)  # (B, C_out, H/2, W/2)
            skips.append(sample)
        return sample, tuple(skips)


class MidBlock(nn.Module):
    """Res block, spatial transformer, res block at the lowest resolution.

    forward(sample (B, C, H, W), time_emb (B, T), context (B, L, D)) returns (B, C, H, W).
    """

    def __init__(self, channels: int, config: UNetConfig):
        super().__init__()
        groups, eps, time_dim = config.norm_groups, config.norm_eps, config.time_embed_dim
        self.res = nn.ModuleList(ResBlock(channels, channels, groups, eps, time_dim) for _ in range(2))
        self.attn = SpatialTransformer(channels, config)

    def forward(self, sample, time_emb, context) -> torch.Tensor:
        sample = self.res[0](sample, time_emb)
        sample = self.attn(sample, context)
        return self.res[1](sample, time_emb)


class UpBlock(nn.Module):
    """One level on the way up: ([skip concat] res block [+ transformer]) x (n + 1), optional 2x upsample.

    forward(sample (B, C, H, W), skips, time_emb (B, T), context (B, L, D)) returns
    (B, C_out, H', W'). ``skips`` are this level's skips in the order the down path made them;
    they are consumed last first, and each res block's input is [sample | skip] on channels.
    """

    def __init__(self, in_channels: int, skip_channels: tuple[int, ...], out_channels: int, config: UNetConfig,
                 attend: bool, upsample: bool):
        super().__init__()
        groups, eps, time_dim = config.norm_groups, config.norm_eps, config.time_embed_dim
        consumed = tuple(reversed(skip_channels))  # res block j eats consumed[j]
        self.res = nn.ModuleList(
            ResBlock((in_channels if j == 0 else out_channels) + skip, out_channels, groups, eps, time_dim)
            for j, skip in enumerate(consumed)
        )
        self.attn = (
            nn.ModuleList(SpatialTransformer(out_channels, config) for _ in consumed) if attend else None
        )
        self.upsample = Upsample(out_channels) if upsample else None  # nearest 2x, then a 3x3 conv

    @property
    def num_skips(self) -> int:
        return len(self.res)

    def forward(self, sample, skips, time_emb, context) -> torch.Tensor:
        for j, res in enumerate(self.res):
            sample = torch.cat([sample, skips[-1 - j]], dim=1)  # (B, C + C_skip, H, W)
            sample = res(sample, time_emb)
            if self.attn is not None:  # structural, fixed at construction
                sample = self.attn[j](sample, context)
        if self.upsample is not None:
            sample = self.upsample(sample)  # (B, C_out, 2H, 2W)
        return sample


class UNet(nn.Module):
    """The conditional U-Net: predicts noise (and, for C-DiffSET, a raw variance) from a latent.

    forward(sample, t, context):
      sample: (B, in_channels, h, w) latent, h and w divisible by ``config.downsample_factor``
              (C-DiffSET: [SAR latent | noisy EO latent], 8 channels);
      t: (B,) timesteps, or one timestep for the whole batch (python number or 0-d tensor);
      context: (B, L, context_dim) text embedding, any L >= 1.
    Returns (B, out_channels, h, w) (C-DiffSET: 4 noise channels, then 1 raw variance channel).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        levels = config.level_channels
        last = len(levels) - 1
        width = config.model_channels
        self.conv_in = nn.Conv2d(config.in_channels, width, 3, padding=1)
        self.time_embed = nn.Sequential(  # indices 0 and 2 are the two linears of the time MLP
            nn.Linear(width, config.time_embed_dim), nn.SiLU(), nn.Linear(config.time_embed_dim, config.time_embed_dim)
        )

        # Down path; skip_channels records the width of every skip, conv_in's first.
        skip_channels = [width]
        down = []
        for level, channels in enumerate(levels):
            down.append(DownBlock(width, channels, config, config.attention_levels[level], downsample=level < last))
            skip_channels += [channels] * (config.num_res_blocks + (level < last))
            width = channels
        self.down = nn.ModuleList(down)
        self.mid = MidBlock(width, config)

        # Up path, deepest level first: each level takes back num_res_blocks + 1 skips.
        up = []
        for level in reversed(range(len(levels))):
            taken = config.num_res_blocks + 1
            skip_channels, level_skips = skip_channels[:-taken], tuple(skip_channels[-taken:])
            up.append(UpBlock(width, level_skips, levels[level], config, config.attention_levels[level],
                              upsample=level > 0))
            width = levels[level]
        self.up = nn.ModuleList(up)

        self.norm_out = GroupNorm(config.norm_groups, width, eps=config.norm_eps)
        self.conv_out = nn.Conv2d(width, config.out_channels, 3, padding=1)

    def check_inputs(self, sample: torch.Tensor, t, context: torch.Tensor) -> None:
        """Raise ValueError naming the argument when a shape is wrong (reads static shapes only)."""
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample: expected (B, {cfg.in_channels}, h, w), got {tuple(sample.shape)}")
        batch, _, height, width = sample.shape
        factor = cfg.downsample_factor
        if height % factor or width % factor:
            raise ValueError(f"sample: latent sides {height}x{width} must be divisible by {factor}")
        context_ok = context.ndim == 3 and context.shape[0] == batch and context.shape[1] >= 1
        if not context_ok or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context: expected (B={batch}, L>=1, {cfg.context_dim}), got {tuple(context.shape)}")
        if isinstance(t, torch.Tensor):
            if not (t.ndim == 0 or (t.ndim == 1 and t.shape[0] == batch)):
                raise ValueError(f"t: expected a scalar or a ({batch},) tensor, got shape {tuple(t.shape)}")
        elif not isinstance(t, numbers.Real):
            raise ValueError(f"t: expected a number or a tensor, got {type(t).__name__}")

    def forward(self, sample: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        self.check_inputs(sample, t, context)
        batch = sample.shape[0]
        dtype = self.conv_in.weight.dtype

        # 1. Timesteps -> (B,) -> sinusoidal (B, model_channels) in fp32 -> MLP (B, time_embed_dim).
        t = torch.as_tensor(t, device=sample.device).reshape(-1).expand(batch)  # (B,)
        time_emb = self.time_embed(timestep_embedding(t, self.config.model_channels, self.config.timestep_max_period).to(dtype))

        # 2. Down path, keeping every layer's output as a skip.
        sample = self.conv_in(sample)  # (B, model_channels, h, w)
        skips = (sample,)
        for block in self.down:
            sample, block_skips = block(sample, time_emb, context)
            skips += block_skips

        # 3. Middle, at h / downsample_factor.
        sample = self.mid(sample, time_emb, context)

        # 4. Up path: each level takes back its skips, last made first.
        for block in self.up:
            skips, block_skips = skips[: -block.num_skips], skips[-block.num_skips :]
            sample = block(sample, block_skips, time_emb, context)

        # 5. Output head.
        return self.conv_out(F.silu(self.norm_out(sample)))  # (B, out_channels, h, w)

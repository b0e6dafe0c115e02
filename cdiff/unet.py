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

Changing a block. The U-Net makes its blocks with ``make_down_block``, ``make_mid_block`` and
``make_up_block``; a subclass overrides one to put its own block in. Blocks talk through an
explicit skip protocol: every block states ``in_channels`` and ``out_channels``; a down block
states ``skip_channels``, the widths of the skips it emits, in order; an up block states the
widths of the skips it consumes, in the order the down path made them (it eats them last
first). ``UNet.check_blocks`` checks the chain at construction and names the block that does
not fit. Down and mid blocks are called ``block(sample, time_emb, context, mask)``, up blocks
``block(sample, skips, time_emb, context, mask)``; a down block returns ``(sample, skips)``.

Step caching. ``forward_outer`` runs the outermost level alone (conv_in, down.0, up.-1, the head)
around a given input of the last up block: DeepCache's cheap step (cdiff.stepcache).

Written for checkpointing and ``torch.compile``: every down/mid/up block is a module with a
uniform call (``gradient_checkpointing(True)`` recomputes each in the backward pass), and
``forward`` holds no data-dependent Python branches and no state.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cdiff.attention import attention
from cdiff.config import UNetConfig
from cdiff.layers import Downsample, GroupNorm, ResBlock, Upsample, from_tokens, to_tokens


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

    tokens: (B, Lq, dim); context: (B, Lk, context_dim); mask: None or broadcastable to
    (B, heads, Lq, Lk), True where a key takes part. Returns (B, Lq, dim).
    ``attention_backend`` is this module's own backend (None: the process-wide one), see
    cdiff.attention.set_attention_backend.
    """

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention_backend = None
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.to_q(tokens), self.to_k(context), self.to_v(context)  # (B, L, heads*d)
        return self.to_out(attention(q, k, v, self.heads, mask, self.attention_backend))


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

    tokens: (B, L, dim); context: (B, Lc, context_dim); mask: None or (B, 1, 1, Lc), True for
    real context tokens. Returns (B, L, dim).
    """

    def __init__(self, dim: int, config: UNetConfig, heads: int):
        super().__init__()
        eps = config.layer_norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = Attention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, config.context_dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim, config.ff_mult)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.norm1(tokens)
        tokens = tokens + self.self_attn(normed, normed)
        tokens = tokens + self.cross_attn(self.norm2(tokens), context, mask)
        return tokens + self.ff(self.norm3(tokens))


class SpatialTransformer(nn.Module):
    """GroupNorm, linear projection to tokens, transformer blocks, projection back; residual.

    Head size and depth are ``level``'s (the last level's by default: the mid block's).
    sample: (B, C, H, W); context: (B, L, context_dim); mask: None or (B, 1, 1, L).
    Returns (B, C, H, W). In channels-last memory the tokens are read without a copy.
    """

    def __init__(self, channels: int, config: UNetConfig, level: int = -1):
        super().__init__()
        heads = channels // config.level_head_dims[level]
        self.norm = GroupNorm(config.norm_groups, channels, eps=config.transformer_norm_eps)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(
            TransformerBlock(channels, config, heads) for _ in range(config.level_transformer_depths[level])
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, sample: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        height, width = sample.shape[2:]
        tokens = self.proj_in(to_tokens(self.norm(sample)))  # (B, HW, C); a view of channels-last memory
        for block in self.blocks:
            tokens = block(tokens, context, mask)
        tokens = self.proj_out(tokens)
        return sample + from_tokens(tokens, height, width)  # (B, C, H, W)


class DownBlock(nn.Module):
    """One level on the way down: (res block [+ transformer]) x n, then an optional 2x downsample.

    forward(sample (B, C_in, H, W), time_emb (B, T), context (B, L, D), mask) returns the output
    (B, C_out, H', W') and the skips, one per layer, in the order they were made.
    """

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig, level: int, downsample: bool):
        super().__init__()
        groups, eps, time_dim = config.norm_groups, config.norm_eps, config.time_embed_dim
        count = config.level_res_blocks[level]
        self.res = nn.ModuleList(
            ResBlock(in_channels if j == 0 else out_channels, out_channels, groups, eps, time_dim) for j in range(count)
        )
        self.attn = (
            nn.ModuleList(SpatialTransformer(out_channels, config, level) for _ in range(count))
            if config.attention_levels[level]
            else None
        )
        self.downsample = Downsample(out_channels) if downsample else None  # stride-2, padding 1 all round
        self.in_channels, self.out_channels = in_channels, out_channels
        self.skip_channels = (out_channels,) * (count + downsample)  # one per res block, one after the downsample

    def forward(self, sample, time_emb, context, mask=None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips = []
        for j, res in enumerate(self.res):
            sample = res(sample, time_emb)
            if self.attn is not None:  # structural, fixed at construction
                sample = self.attn[j](sample, context, mask)
            skips.append(sample)
        if self.downsample is not None:
            sample = self.downsample(sample)  # (B, C_out, H/2, W/2)
            skips.append(sample)
        return sample, tuple(skips)


class MidBlock(nn.Module):
    """Res block, spatial transformer, res block at the lowest resolution.

    forward(sample (B, C, H, W), time_emb (B, T), context (B, L, D), mask) returns (B, C, H, W).
    """

    def __init__(self, channels: int, config: UNetConfig):
        super().__init__()
        groups, eps, time_dim = config.norm_groups, config.norm_eps, config.time_embed_dim
        self.res = nn.ModuleList(ResBlock(channels, channels, groups, eps, time_dim) for _ in range(2))
        self.attn = SpatialTransformer(channels, config)
        self.in_channels = self.out_channels = channels

    def forward(self, sample, time_emb, context, mask=None) -> torch.Tensor:
        sample = self.res[0](sample, time_emb)
        sample = self.attn(sample, context, mask)
        return self.res[1](sample, time_emb)


class UpBlock(nn.Module):
    """One level on the way up: ([skip concat] res block [+ transformer]) x (n + 1), optional 2x upsample.

    forward(sample (B, C, H, W), skips, time_emb (B, T), context (B, L, D), mask) returns
    (B, C_out, H', W'). ``skips`` are this level's skips in the order the down path made them
    (widths ``skip_channels``); they are consumed last first, and each res block's input is
    [sample | skip] on channels.
    """

    def __init__(self, in_channels: int, skip_channels: tuple[int, ...], out_channels: int, config: UNetConfig,
                 level: int, upsample: bool):
        super().__init__()
        groups, eps, time_dim = config.norm_groups, config.norm_eps, config.time_embed_dim
        consumed = tuple(reversed(skip_channels))  # res block j eats consumed[j]
        self.res = nn.ModuleList(
            ResBlock((in_channels if j == 0 else out_channels) + skip, out_channels, groups, eps, time_dim)
            for j, skip in enumerate(consumed)
        )
        self.attn = (
            nn.ModuleList(SpatialTransformer(out_channels, config, level) for _ in consumed)
            if config.attention_levels[level]
            else None
        )
        self.upsample = Upsample(out_channels) if upsample else None  # nearest 2x, then a 3x3 conv
        self.in_channels, self.out_channels = in_channels, out_channels
        self.skip_channels = tuple(skip_channels)

    def forward(self, sample, skips, time_emb, context, mask=None) -> torch.Tensor:
        for j, res in enumerate(self.res):
            sample = torch.cat([sample, skips[-1 - j]], dim=1)  # (B, C + C_skip, H, W)
            sample = res(sample, time_emb)
            if self.attn is not None:  # structural, fixed at construction
                sample = self.attn[j](sample, context, mask)
        if self.upsample is not None:
            sample = self.upsample(sample)  # (B, C_out, 2H, 2W)
        return sample


def _skip_counts(prefix: str, blocks) -> str:
    return ", ".join(f"{prefix}.{i} {len(b.skip_channels)}" for i, b in enumerate(blocks))


class UNet(nn.Module):
    """The conditional U-Net: predicts noise (and, for C-DiffSET, a raw variance) from a latent.

    forward(sample, t, context, context_mask=None):
      sample: (B, in_channels, h, w) latent, h and w divisible by ``config.downsample_factor``
              (C-DiffSET: [SAR latent | noisy EO latent], 8 channels);
      t: (B,) timesteps, or one timestep for the whole batch (python number or 0-d tensor);
      context: (B, L, context_dim) text embedding, any L >= 1;
      context_mask: None, or (B, L) bool, True for the real tokens of a padded context (each
              row needs at least one True); the cross-attention ignores the others.
    Returns (B, out_channels, h, w) (C-DiffSET: 4 noise channels, then 1 raw variance channel).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.checkpointing = False
        levels = config.level_channels
        width = config.model_channels
        self.conv_in = nn.Conv2d(config.in_channels, width, 3, padding=1)
        self.time_embed = nn.Sequential(  # indices 0 and 2 are the two linears of the time MLP
            nn.Linear(width, config.time_embed_dim), nn.SiLU(), nn.Linear(config.time_embed_dim, config.time_embed_dim)
        )

        # Down path; skip_channels records the width of every skip, conv_in's first.
        skip_channels = [width]
        down = []
        for level, channels in enumerate(levels):
            down.append(self.make_down_block(level, width, channels))
            skip_channels += down[-1].skip_channels
            width = channels
        self.down = nn.ModuleList(down)
        self.mid = self.make_mid_block(width)

        # Up path, deepest level first: each level takes back its res blocks + 1 skips.
        up = []
        for level in reversed(range(len(levels))):
            taken = config.level_res_blocks[level] + 1
            if taken > len(skip_channels):
                raise ValueError(
                    f"UNet: up level {level} takes {taken} skips, but only {len(skip_channels)} are left "
                    f"(made: conv_in 1, {_skip_counts('down', self.down)})"
                )
            skip_channels, level_skips = skip_channels[:-taken], tuple(skip_channels[-taken:])
            up.append(self.make_up_block(level, width, level_skips, levels[level]))
            width = levels[level]
        self.up = nn.ModuleList(up)

        self.norm_out = GroupNorm(config.norm_groups, width, eps=config.norm_eps)
        self.conv_out = nn.Conv2d(width, config.out_channels, 3, padding=1)
        self.check_blocks()

    # --- the blocks: override one of these to put a changed block in --------------------------

    def make_down_block(self, level: int, in_channels: int, out_channels: int) -> nn.Module:
        last = len(self.config.channel_mult) - 1
        return DownBlock(in_channels, out_channels, self.config, level, downsample=level < last)

    def make_mid_block(self, channels: int) -> nn.Module:
        return MidBlock(channels, self.config)

    def make_up_block(self, level: int, in_channels: int, skip_channels: tuple[int, ...], out_channels: int) -> nn.Module:
        return UpBlock(in_channels, skip_channels, out_channels, self.config, level, upsample=level > 0)

    def check_blocks(self) -> None:
        """Raise ValueError naming the block whose channels or skips do not fit its neighbours'.

        Run at construction; call it again after replacing a block in place.
        """
        def fail(name, block, text):
            raise ValueError(f"UNet block {name} ({type(block).__name__}): {text}")

        before, width = "conv_in", self.conv_in.out_channels
        skips = [(width, "conv_in")]  # (width, the block that made it), in the order made
        named = [(f"down.{i}", b) for i, b in enumerate(self.down)] + [("mid", self.mid)]
        named += [(f"up.{i}", b) for i, b in enumerate(self.up)]
        for name, block in named:
            if block.in_channels != width:
                fail(name, block, f"takes {block.in_channels} channels, but {before} gives {width}")
            if name.startswith("down."):
                skips += [(c, name) for c in block.skip_channels]
            elif name.startswith("up."):
                wanted = tuple(block.skip_channels)
                given = skips[len(skips) - len(wanted):] if len(wanted) <= len(skips) else skips
                if tuple(c for c, _ in given) != wanted:
                    made = ", ".join(f"{c} from {maker}" for c, maker in given)
                    fail(name, block, f"consumes skips of widths {wanted}, but the down path leaves it ({made})")
                del skips[len(skips) - len(wanted):]
            before, width = name, block.out_channels
        if skips:
            raise ValueError(
                f"UNet: the down path makes {len(skips)} skips more than the up path consumes "
                f"(made: conv_in 1, {_skip_counts('down', self.down)}; consumed: {_skip_counts('up', self.up)})"
            )
        if self.norm_out.num_channels != width:
            raise ValueError(f"UNet: the output head takes {self.norm_out.num_channels} channels, {before} gives {width}")

    def gradient_checkpointing(self, enabled: bool = True) -> "UNet":
        """Recompute every down, mid and up block in the backward pass instead of keeping its
        activations (torch.utils.checkpoint, non-reentrant): less memory, one more forward per
        step. Applies only while gradients are on. Returns the U-Net."""
        self.checkpointing = enabled
        return self

    def _run(self, block: nn.Module, *args):
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def check_inputs(self, sample: torch.Tensor, t, context: torch.Tensor, context_mask=None) -> None:
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
        if context_mask is not None and (context_mask.dtype != torch.bool or context_mask.shape != context.shape[:2]):
            raise ValueError(
                f"context_mask: expected a bool tensor of shape {tuple(context.shape[:2])}, "
                f"got {context_mask.dtype} {tuple(context_mask.shape)}"
            )
        if isinstance(t, torch.Tensor):
            if not (t.ndim == 0 or (t.ndim == 1 and t.shape[0] == batch)):
                raise ValueError(f"t: expected a scalar or a ({batch},) tensor, got shape {tuple(t.shape)}")
        elif not isinstance(t, numbers.Real):
            raise ValueError(f"t: expected a number or a tensor, got {type(t).__name__}")

    def conditioning(self, sample: torch.Tensor, t, context_mask: torch.Tensor | None = None):
        """(time embedding (B, time_embed_dim), attention mask (B, 1, 1, L) or None) of one call."""
        # Timesteps -> (B,) -> sinusoidal (B, model_channels) in fp32 -> MLP (B, time_embed_dim).
        t = torch.as_tensor(t, device=sample.device).reshape(-1).expand(sample.shape[0])  # (B,)
        embedding = timestep_embedding(t, self.config.model_channels, self.config.timestep_max_period)
        time_emb = self.time_embed(embedding.to(self.conv_in.weight.dtype))
        mask = None if context_mask is None else context_mask[:, None, None, :]  # (B, 1, 1, L): over heads, queries
        return time_emb, mask

    def forward(self, sample: torch.Tensor, t, context: torch.Tensor, context_mask: torch.Tensor | None = None):
        self.check_inputs(sample, t, context, context_mask)

        # 1. The timestep embedding and the context mask.
        time_emb, mask = self.conditioning(sample, t, context_mask)

        # 2. Down path, keeping every layer's output as a skip.
        sample = self.conv_in(sample)  # (B, model_channels, h, w)
        skips = (sample,)
        for block in self.down:
            sample, block_skips = self._run(block, sample, time_emb, context, mask)
            skips += block_skips

        # 3. Middle, at h / downsample_factor.
        sample = self._run(self.mid, sample, time_emb, context, mask)

        # 4. Up path: each level takes back its skips, last made first.
        for block in self.up:
            taken = len(block.skip_channels)
            skips, block_skips = skips[:-taken], skips[-taken:]
            sample = self._run(block, sample, block_skips, time_emb, context, mask)

        # 5. Output head.
        return self.conv_out(self.norm_out(sample, silu=True))  # (B, out_channels, h, w)

    def forward_outer(self, sample: torch.Tensor, t, context: torch.Tensor, inner: torch.Tensor,
                      context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The outermost level alone, around a given inside: conv_in, down.0, then up.-1 on ``inner``, the head.

        ``inner`` (B, C, h, w) stands for the rest of the U-Net (down.1.., mid, up.0 .. up.-2): it is
        the input of the last up block, which takes the first skips (conv_in's and down.0's). Given
        the ``inner`` that ``forward(sample, t, context)`` itself makes, the result is ``forward``'s
        bit for bit; cdiff.stepcache (DeepCache) passes the one of a neighbouring sampler step.
        """
        self.check_inputs(sample, t, context, context_mask)
        time_emb, mask = self.conditioning(sample, t, context_mask)
        last = self.up[-1]
        sample = self.conv_in(sample)
        _, first_skips = self._run(self.down[0], sample, time_emb, context, mask)
        skips = (sample, *first_skips)
        if len(last.skip_channels) > len(skips):
            raise ValueError(f"UNet.forward_outer: up.{len(self.up) - 1} takes {len(last.skip_channels)} skips, more "
                             f"than conv_in and down.0 make ({len(skips)})")
        sample = self._run(last, inner, skips[: len(last.skip_channels)], time_emb, context, mask)
        return self.conv_out(self.norm_out(sample, silu=True))  # (B, out_channels, h, w)

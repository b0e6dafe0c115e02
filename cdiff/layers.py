"""Building blocks shared by the VAE and the U-Net.

Memory layout. Every block runs on NCHW tensors of any memory format; with the model and its
input in ``torch.channels_last`` (``model.to(memory_format=torch.channels_last)``), convolutions,
the elementwise ops, padding, nearest upsampling and concatenation keep the activations NHWC in
memory end to end, and ``to_tokens`` / ``from_tokens`` turn them into attention tokens and back as
views, without a copy. PyTorch's own GroupNorm keeps channels-last on the CPU but makes a
contiguous (NCHW) copy on CUDA (aten/src/ATen/native/group_norm.cpp); the fused Triton kernel
(``CDIFF_GROUP_NORM=triton``, kernels/group_norm_silu.py) reads and writes either layout in place.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from cdiff import flags

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, HW, C) tokens, row-major over pixels; a view, never a copy.

    Of channels-last memory, the view is contiguous: each token's C values lie side by side,
    as the projections read them. Of NCHW memory it is strided (a transpose), and the linear
    layers that read it pay for a copy or a transposed read.
    """
    batch, channels, height, width = x.shape
    return x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, HW, C)


def from_tokens(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, HW, C) contiguous tokens -> a (B, C, H, W) view of them, in channels-last memory."""
    batch, _, channels = tokens.shape
    return tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W)


def group_norm_reference(x, groups: int, weight, bias, eps: float, silu: bool = False) -> torch.Tensor:
    """GroupNorm over (B, C, H, W) with fp32 statistics, then SiLU when ``silu``; x's dtype.

    fp32 (fp64) input: exactly ``F.group_norm`` (nn.GroupNorm). fp16/bf16 input: normalised in
    fp32 and rounded once, so the variance neither under- nor overflows on large activations
    (the SD VAE decoder reaches ~1e3); SiLU then runs in x's dtype. The reference of
    kernels/group_norm_silu.py.
    """
    if x.dtype in (torch.float32, torch.float64):
        out = F.group_norm(x, groups, weight, bias, eps)
    else:
        out = F.group_norm(x.float(), groups, weight.float(), bias.float(), eps).to(x.dtype)
    return F.silu(out) if silu else out


def use_group_norm_kernel(x: torch.Tensor) -> bool:
    """Whether GroupNorm runs the fused Triton kernel for ``x`` (CDIFF_GROUP_NORM, see cdiff.flags)."""
    if flags.get("CDIFF_GROUP_NORM") != "triton" or x.ndim != 4 or x.dtype not in KERNEL_DTYPES:
        return False
    if torch.compiler.is_compiling():  # Inductor fuses the reference itself
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


class GroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics are computed in fp32, whatever the input dtype; ``silu=True``
    applies SiLU to the result (fused into the kernel when it runs).

    x: (B, C, H, W) in any memory format -> the same shape, in x's dtype. In fp32 with the
    reference this is exactly ``nn.GroupNorm``.
    """

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        if use_group_norm_kernel(x):
            from cdiff.kernels.group_norm_silu import group_norm_silu

            return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, silu)
        return group_norm_reference(x, self.num_groups, self.weight, self.bias, self.eps, silu)


class ResBlock(nn.Module):
    """norm-SiLU-conv, (+ time embedding), norm-SiLU-conv, plus a skip path.

    x: (B, in_channels, H, W); time_emb: (B, time_dim) or None when time_dim is None.
    Returns (B, out_channels, H, W), in x's memory format.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float, time_dim: int | None = None):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels) if time_dim is not None else None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.norm1(x, silu=True))
        if self.time_proj is not None:
            h = h + self.time_proj(F.silu(time_emb))[:, :, None, None]  # broadcast over H, W
        h = self.conv2(self.norm2(h, silu=True))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv. The VAE pads only right and bottom (``asymmetric``), the U-Net pads 1 all round."""

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

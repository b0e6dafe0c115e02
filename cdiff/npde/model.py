"""S2O-NPDE networks (section 3): the generator with TCD blocks and the PMD module, the
reverse generator and the PatchGAN discriminators of its CycleGAN framework.

Generator, image (B, 3, H, W) in [-1, 1] -> optical image and PMD image (B, 3, H, W):

    backbone:  conv 7x7 -> downsample x n -> u_0
               block 1 -> u_1 -> [+ fusion 1] -> block 2 -> u_2 -> [+ fusion 2] -> block 3 -> u_3
               -> upsample x n -> conv 7x7 + tanh -> optical image
    PMD:       phi(image) -> conv 7x7 -> downsample x n -> p_0
               p_k = fusion_k(concat(p_{k-1}, u_k)), three convs; u_k <- u_k + p_k
               p_last -> upsample x n -> conv 7x7 + tanh -> PMD image (predicts phi(optical))

TCD block j (Eq. 4): u_{j+1} = u_j + (u_j - u_{j-1}) / 2 - (u_{j-1} - u_{j-2}) / 2 + df(u_j),
df = conv-norm-ReLU-conv-norm. The recurrence starts at rest: u_{-1} = u_{-2} = u_0, so
block 1 is a plain residual step u_1 = u_0 + df(u_0) and block 2 sees
u_2 = u_1 + (u_1 - u_0) / 2 + df(u_1). The history holds the states the blocks saw, i.e.
after the fusion feature was added.

What the paper leaves open and cdiff chooses (see NPDEConfig for every number):
- how fused features enter the backbone: added to the backbone state (u_k <- u_k + p_k);
- the PMD module's input is phi(image) alone, the residual of Eq. 7, the same quantity
  its output is trained to predict (Eq. 9); its convs mirror the backbone's;
- the reverse generator (optical -> SAR, used only by the cycle loss) is the same backbone
  without the PMD module: the paper defines the PMD loss for the SAR -> optical direction only;
- convs, norms, padding and initialisation are CycleGAN's ResnetGenerator's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from cdiff.npde.config import NPDEConfig
from cdiff.npde.pde import PMDHead


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels)  # CycleGAN: no affine, no running statistics
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def _conv(cin: int, cout: int, kernel: int, norm: str, relu: bool = True) -> nn.Sequential:
    """Stride-1 conv with mirror padding, then norm and ReLU (CycleGAN's c7s1 / resnet convs)."""
    layers = [nn.ReflectionPad2d(kernel // 2), nn.Conv2d(cin, cout, kernel, bias=norm != "batch"), _norm(norm, cout)]
    return nn.Sequential(*layers, nn.ReLU(True)) if relu else nn.Sequential(*layers)


def _encoder(cin: int, config: NPDEConfig) -> nn.Sequential:
    """conv 7x7 + n stride-2 3x3 convs: (B, cin, H, W) -> (B, feature_channels, H / 2^n, W / 2^n)."""
    c, bias = config.base_channels, config.norm != "batch"
    layers = [_conv(cin, c, config.stem_kernel, config.norm)]
    for _ in range(config.n_downsampling):
        layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=bias), _norm(config.norm, 2 * c), nn.ReLU(True)]
        c *= 2
    return nn.Sequential(*layers)


def _decoder(cout: int, config: NPDEConfig) -> nn.Sequential:
    """n stride-2 transposed 3x3 convs + conv 7x7 + tanh: the inverse shapes of ``_encoder``."""
    c, bias = config.feature_channels, config.norm != "batch"
    layers = []
    for _ in range(config.n_downsampling):
        layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                   _norm(config.norm, c // 2), nn.ReLU(True)]
        c //= 2
    k = config.stem_kernel
    return nn.Sequential(*layers, nn.ReflectionPad2d(k // 2), nn.Conv2d(c, cout, k), nn.Tanh())


class Delta(nn.Sequential):
    """df of a residual block: conv-norm-ReLU-conv-norm, 3x3, width kept."""

    def __init__(self, channels: int, norm: str):
        super().__init__(_conv(channels, channels, 3, norm), _conv(channels, channels, 3, norm, relu=False))


class TCDBlock(nn.Module):
    """Eq. 4: u_{j+1} = u_j + (u_j - u_{j-1}) / 2 - (u_{j-1} - u_{j-2}) / 2 + df(u_j)."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.delta = Delta(channels, norm)

    def forward(self, u: torch.Tensor, u_prev: torch.Tensor, u_prev2: torch.Tensor) -> torch.Tensor:
        return u + (u - u_prev) / 2 - (u_prev - u_prev2) / 2 + self.delta(u)


class ResidualBlock(nn.Module):
    """Table 2's "Base" block, an Euler step u_{j+1} = u_j + df(u_j); the history is unused."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.delta = Delta(channels, norm)

    def forward(self, u: torch.Tensor, u_prev: torch.Tensor, u_prev2: torch.Tensor) -> torch.Tensor:
        return u + self.delta(u)


class FusionBlock(nn.Sequential):
    """Three convs over concat(PMD feature, backbone feature): (B, 2C, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int, convs: int, norm: str):
        super().__init__(_conv(2 * channels, channels, 3, norm), *(_conv(channels, channels, 3, norm) for _ in range(convs - 1)))


class GeneratorOutput(NamedTuple):
    image: torch.Tensor  # (B, out_channels, H, W) in [-1, 1]
    pmd_image: torch.Tensor | None  # (B, out_channels, H, W) in [-1, 1], predicts phi(target); None without PMD


class NPDEGenerator(nn.Module):
    """Image (B, in_channels, H, W) in [-1, 1], H and W multiples of ``config.size_multiple``
    -> GeneratorOutput. ``with_pmd`` adds the PMD module (the forward generator when
    ``config.pmd``; never the reverse one)."""

    def __init__(self, config: NPDEConfig, in_channels: int, out_channels: int, with_pmd: bool):
        super().__init__()
        self.config = config
        c = config.feature_channels
        block = TCDBlock if config.tcd else ResidualBlock
        self.encoder = _encoder(in_channels, config)
        self.blocks = nn.ModuleList(block(c, config.norm) for _ in range(config.n_blocks))
        self.decoder = _decoder(out_channels, config)
        if with_pmd:
            self.pmd_head = PMDHead(config.pmd_eps)
            self.pmd_encoder = _encoder(in_channels, config)
            self.fusions = nn.ModuleList(FusionBlock(c, config.fusion_convs, config.norm) for _ in range(config.n_fusion))
            self.pmd_decoder = _decoder(out_channels, config)
        self.with_pmd = with_pmd
        init_weights(self, config.init_std)

    def forward(self, image: torch.Tensor, side_output: bool = True) -> GeneratorOutput:
        """``side_output=False`` skips the PMD decoder (inference needs only the optical image)."""
        _check_size(image, self.config)
        u = self.encoder(image)  # (B, C, h, w), h = H / 2^n
        p = self.pmd_encoder(self.pmd_head(image)) if self.with_pmd else None  # (B, C, h, w)
        u_prev = u_prev2 = u  # start at rest: u_{-1} = u_{-2} = u_0
        for j, block in enumerate(self.blocks):
            u, u_prev, u_prev2 = block(u, u_prev, u_prev2), u, u_prev
            if self.with_pmd and j < len(self.fusions):
                p = self.fusions[j](torch.cat([p, u], dim=1))  # (B, C, h, w)
                u = u + p  # the fused feature enters the backbone state
        pmd_image = self.pmd_decoder(p) if self.with_pmd and side_output else None
        return GeneratorOutput(self.decoder(u), pmd_image)


class PatchDiscriminator(nn.Sequential):
    """CycleGAN's PatchGAN: (B, C, H, W) -> (B, 1, H / 2^layers - 2, W / 2^layers - 2) real/fake
    scores, one per overlapping patch (70x70 pixels at 3 layers)."""

    def __init__(self, in_channels: int, channels: int, layers: int, norm: str, init_std: float):
        bias = norm != "batch"
        seq = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1  # the last widening conv keeps the resolution
            seq += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=bias), _norm(norm, out), nn.LeakyReLU(0.2, True)]
            width = out
        super().__init__(*seq, nn.Conv2d(width, 1, 4, stride=1, padding=1))
        init_weights(self, init_std)


class NPDEModel(nn.Module):
    """The four networks of S2O-NPDE training: ``generator`` SAR -> optical (with the PMD
    module when ``config.pmd``), ``reverse`` optical -> SAR, ``disc_eo`` and ``disc_sar``."""

    def __init__(self, config: NPDEConfig):
        super().__init__()
        self.config = config
        self.generator = NPDEGenerator(config, config.sar_channels, config.eo_channels, with_pmd=config.pmd)
        self.reverse = NPDEGenerator(config, config.eo_channels, config.sar_channels, with_pmd=False)
        d = (config.disc_channels, config.disc_layers, config.norm, config.init_std)
        self.disc_eo = PatchDiscriminator(config.eo_channels, *d)
        self.disc_sar = PatchDiscriminator(config.sar_channels, *d)

    def generator_parameters(self) -> list[nn.Parameter]:
        return [*self.generator.parameters(), *self.reverse.parameters()]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return [*self.disc_eo.parameters(), *self.disc_sar.parameters()]

    def translate(self, sar: torch.Tensor) -> torch.Tensor:
        """SAR (B, sar_channels, H, W) in [-1, 1] -> optical image (B, eo_channels, H, W) in [-1, 1]."""
        return translate(self.generator, sar)


@torch.no_grad()
def translate(generator: NPDEGenerator, sar: torch.Tensor) -> torch.Tensor:
    """Inference: the generator's optical image, in eval mode (restored afterwards), no gradients."""
    was_training = generator.training
    generator.eval()
    try:
        return generator(sar, side_output=False).image
    finally:
        generator.train(was_training)


def init_weights(module: nn.Module, std: float) -> None:
    """CycleGAN's "normal" init: conv weights ~ N(0, std), BatchNorm scales ~ N(1, std), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def _check_size(image: torch.Tensor, config: NPDEConfig) -> None:
    if image.ndim != 4:
        raise ValueError(f"S2O-NPDE: expected images (B, C, H, W), got shape {tuple(image.shape)}")
    m = config.size_multiple
    if image.shape[-2] % m or image.shape[-1] % m:
        raise ValueError(f"S2O-NPDE: image sides must be multiples of {m}, got {image.shape[-2]}x{image.shape[-1]}")

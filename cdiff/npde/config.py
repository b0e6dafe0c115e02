"""S2O-NPDE config: every width, depth, norm and loss weight in one place.

Each field's comment says where the number comes from:
- "paper": fixed by S2O-NPDE (Zhang et al., IJCAI 2022, sections 3-4);
- "CycleGAN": the paper builds on the CycleGAN framework and leaves the number open, so it
  follows CycleGAN's ResnetGenerator / PatchGAN / training defaults (Zhu et al. 2017);
- "cdiff": neither says; the reason is in the comment.

Presets: ``paper()`` (the model of the paper), ``tiny()`` (same structure, 8 base channels, for
tests), and ``ablation(row)`` for the rows of the paper's Table 2 that this package builds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

NORMS = ("instance", "batch", "none")

# Table 2 rows -> ablation switches. "Base" has plain residual blocks, no PMD module, no
# feature interaction and no PDE loss; the PDE loss comes with the PMD module (section 3.3:
# the module "is achieved by constraining [its] output ... via a PDE-based loss").
TABLE2_ROWS = {
    "base": dict(tcd=False, pmd=False, pde_loss=False),
    "+tcd": dict(tcd=True, pmd=False, pde_loss=False),
    "+pmd": dict(tcd=False, pmd=True, pde_loss=True),
    "+tcd+pmd": dict(tcd=True, pmd=True, pde_loss=True),
}
# Rows of Table 2 that swap in other published blocks; not built here.
TABLE2_NOT_BUILT = ("+tcd+grad", "+rk2+pmd")


@dataclass(frozen=True)
class NPDEConfig:
    # --- images ---
    sar_channels: int = 3  # cdiff's readers repeat single-pol SAR to 3 channels
    eo_channels: int = 3  # RGB

    # --- generator (backbone and PMD module) ---
    base_channels: int = 64  # CycleGAN ngf: width of the first conv; doubles per downsampling
    stem_kernel: int = 7  # CycleGAN c7s1: the first conv and the prediction layer are 7x7
    n_downsampling: int = 2  # CycleGAN: two stride-2 3x3 convs (paper: "a downsampling layer")
    n_blocks: int = 3  # paper: three cascaded TCD residual blocks
    n_fusion: int = 2  # paper: two fusion blocks, placed after backbone blocks 1 .. n_fusion
    fusion_convs: int = 3  # paper: each fusion block is three convolutions
    norm: str = "instance"  # CycleGAN: InstanceNorm without affine or running stats after each conv
    init_std: float = 0.02  # CycleGAN: conv weights ~ N(0, 0.02), biases 0

    # --- PatchGAN discriminators (one per domain) ---
    disc_channels: int = 64  # CycleGAN ndf
    disc_layers: int = 3  # CycleGAN: 3 stride-2 layers, the 70x70 PatchGAN

    # --- ablation switches (Table 2; see TABLE2_ROWS) ---
    tcd: bool = True  # TCD residual blocks (Eq. 4); False: plain residual blocks u + df(u)
    pmd: bool = True  # the parallel PMD neural module, its fusion blocks and side output
    pde_loss: bool = True  # L_PDE (Eq. 9): L_TCD, plus L_PMD when the PMD module is on

    # --- PMD head (Eq. 7) ---
    pmd_eps: float = 1e-4  # cdiff: Eq. 7 divides by 2|grad u|^2, which is 0 on flat ground;
    # eps halves the response where |grad u| ~ 0.007 per pixel (about one 8-bit level in [-1, 1])

    # --- losses (Eq. 8) ---
    gan_weight: float = 1.0  # paper: L_GAN is unweighted in Eq. 8
    pixel_weight: float = 10.0  # paper: lambda_1
    perceptual_weight: float = 10.0  # paper: lambda_2
    cycle_weight: float = 10.0  # paper: lambda_3 (on the sum of both cycles, as CycleGAN)
    pde_weight: float = 10.0  # paper: lambda_4 (on L_TCD + L_PMD)
    gan_loss: str = "lsgan"  # CycleGAN: least squares; the paper does not say
    # cdiff (pix2pixHD's VGG loss): L1 between VGG features at these ReLUs, weighted per layer
    perceptual_layers: tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    perceptual_layer_weights: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
    pool_size: int = 50  # CycleGAN: the discriminators see a history of 50 generated images
    # The optimisation numbers (section 4.1) are the training run's, not the network's: see
    # cdiff.npde.training (PAPER_TRAINING) and, for `cdiff train`, cdiff.train.s2o_npde.

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"NPDEConfig: norm must be one of {NORMS}, got {self.norm!r}")
        if self.gan_loss != "lsgan":
            raise ValueError(f"NPDEConfig: gan_loss {self.gan_loss!r} is not built; only 'lsgan'")
        positive = ("sar_channels", "eo_channels", "base_channels", "n_downsampling", "n_blocks", "fusion_convs",
                    "disc_channels", "disc_layers")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"NPDEConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.stem_kernel < 1 or self.stem_kernel % 2 == 0:
            raise ValueError(f"NPDEConfig: stem_kernel must be odd, got {self.stem_kernel}")
        if not 1 <= self.n_fusion <= self.n_blocks - 1:
            # each fusion block's output is fed into a later backbone block
            raise ValueError(f"NPDEConfig: n_fusion must be in 1 .. n_blocks - 1 = {self.n_blocks - 1}, got {self.n_fusion}")
        if len(self.perceptual_layers) != len(self.perceptual_layer_weights):
            raise ValueError("NPDEConfig: perceptual_layers and perceptual_layer_weights need one entry each")
        if self.pmd_eps <= 0:
            raise ValueError(f"NPDEConfig: pmd_eps must be > 0, got {self.pmd_eps}")
        if self.pool_size < 0:
            raise ValueError(f"NPDEConfig: pool_size must be >= 0, got {self.pool_size}")

    @property
    def feature_channels(self) -> int:
        """Width of the backbone and the PMD module between downsampling and upsampling."""
        return self.base_channels * 2**self.n_downsampling

    @property
    def size_multiple(self) -> int:
        """Image sides must be divisible by this."""
        return 2**self.n_downsampling

    @classmethod
    def paper(cls, **overrides) -> "NPDEConfig":
        return replace(cls(), **overrides)

    @classmethod
    def tiny(cls, **overrides) -> "NPDEConfig":
        return replace(cls(base_channels=8, disc_channels=8), **overrides)

    @classmethod
    def ablation(cls, row: str, base: "NPDEConfig | None" = None) -> "NPDEConfig":
        """The config of one Table 2 row ("base", "+tcd", "+pmd", "+tcd+pmd") on ``base``."""
        key = row.strip().lower().replace(" ", "")
        if key in TABLE2_NOT_BUILT:
            raise ValueError(f"Table 2 row {row!r} uses a block from another paper; not built here")
        if key not in TABLE2_ROWS:
            raise ValueError(f"unknown Table 2 row {row!r}: expected one of {sorted(TABLE2_ROWS)}")
        return replace(base or cls.paper(), **TABLE2_ROWS[key])

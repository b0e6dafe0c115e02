"""S2O-NPDE losses (section 3.4, Eq. 8-9).

Generator (G: SAR x -> optical, F: optical y -> SAR, phi the PMD head):

    L = L_GAN + 10 L_pix + 10 L_per + 10 L_cyc + 10 (L_TCD + L_PMD)

    L_GAN = (D_eo(G(x)) - 1)^2 + (D_sar(F(y)) - 1)^2       least squares (CycleGAN's; the
                                                            paper names no GAN loss)
    L_pix = |G(x) - y|_1                                    the translation direction only
    L_per = sum_l w_l |VGG_l(G(x)) - VGG_l(y)|_1            pix2pixHD's VGG loss (paper: cites only)
    L_cyc = |F(G(x)) - x|_1 + |G(F(y)) - y|_1               CycleGAN's two cycles
    L_TCD = |phi(y) - phi(G(x))|_1                          Eq. 9, the backbone's image
    L_PMD = |phi(y) - G_PMD(x)|_1                           Eq. 9, the PMD module's side output

Every |.|_1 and square is a mean over pixels and the batch. Eq. 8 puts one weight, 10, on
each of L_pix, L_per, L_cyc and L_PDE = L_TCD + L_PMD; L_GAN has weight 1. L_TCD and L_PMD are
in the paper's units of phi: cdiff's PMD head (and the PMD image that predicts its output through
a tanh) works in per-pixel derivatives, a quarter of the paper's phi (cdiff.npde.pde), so both
L1 terms are multiplied by PAPER_PHI_SCALE = 4 and the weight 10 is the paper's.

Discriminators (CycleGAN's, least squares, halved so they learn at half the generator's rate):
    L_D_eo = ((D_eo(y) - 1)^2 + D_eo(G(x))^2) / 2,   L_D_sar = ((D_sar(x) - 1)^2 + D_sar(F(y))^2) / 2

Ablations: without ``pde_loss`` there is no L_TCD / L_PMD; without the PMD module no L_PMD.
Without VGG weights there is no L_per, and a warning says so once, when the loss is built.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from cdiff.npde.config import NPDEConfig
from cdiff.npde.model import NPDEModel
from cdiff.npde.pde import PAPER_PHI_SCALE, PMDHead
from cdiff.npde.vgg import VGGFeatures, load_vgg

log = logging.getLogger(__name__)


def lsgan(scores: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss: mean (scores - 1)^2 for ``real``, else mean scores^2."""
    return (scores - float(real)).square().mean()


class GeneratorLosses(NamedTuple):
    terms: dict[str, torch.Tensor]  # unweighted scalar terms, only the active ones
    total: torch.Tensor  # Eq. 8
    fake_eo: torch.Tensor  # G(x), (B, 3, H, W)
    fake_sar: torch.Tensor  # F(y), (B, 3, H, W)


class NPDELoss(nn.Module):
    """The loss terms of S2O-NPDE for one batch; holds phi and the (frozen) VGG, no trained weights.

    ``vgg``: a VGGFeatures for the perceptual term, or None to train without it (logged as
    a warning). ``NPDELoss.from_vgg_file(config, path)`` reads it from a local file.
    """

    def __init__(self, config: NPDEConfig, vgg: VGGFeatures | None = None):
        super().__init__()
        self.config = config
        self.phi = PMDHead(config.pmd_eps)
        self.vgg = vgg
        if vgg is not None and vgg.layers != config.perceptual_layers:
            raise ValueError(f"NPDELoss: the VGG taps {vgg.layers} are not the config's {config.perceptual_layers}")
        if vgg is None and config.perceptual_weight > 0:
            log.warning("S2O-NPDE: no VGG weights given, so the perceptual loss (weight %g) is off", config.perceptual_weight)
        self.weights = {
            "gan_eo": config.gan_weight, "gan_sar": config.gan_weight, "pixel": config.pixel_weight,
            "perceptual": config.perceptual_weight, "cycle": config.cycle_weight,
            "pde_tcd": config.pde_weight, "pde_pmd": config.pde_weight,
        }

    @classmethod
    def from_vgg_file(cls, config: NPDEConfig, path: str | os.PathLike | None) -> "NPDELoss":
        """With torchvision VGG16/19 weights at ``path`` (see cdiff.npde.vgg), or None: no perceptual loss."""
        return cls(config, load_vgg(path, config.perceptual_layers) if path is not None else None)

    def perceptual(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            targets = self.vgg(real)
        weights = self.config.perceptual_layer_weights
        return sum(w * F.l1_loss(f, t) for w, f, t in zip(weights, self.vgg(fake), targets))

    def generator_terms(self, model: NPDEModel, sar: torch.Tensor, eo: torch.Tensor) -> GeneratorLosses:
        """Forward passes and Eq. 8 for a batch of pairs ``sar``, ``eo`` (B, 3, H, W) in [-1, 1]."""
        fake_eo, pmd_image = model.generator(sar)
        fake_sar = model.reverse(eo).image
        terms = {
            "gan_eo": lsgan(model.disc_eo(fake_eo), True),
            "gan_sar": lsgan(model.disc_sar(fake_sar), True),
            "pixel": F.l1_loss(fake_eo, eo),
            "cycle": F.l1_loss(model.reverse(fake_eo).image, sar)
            + F.l1_loss(model.generator(fake_sar, side_output=False).image, eo),
        }
        if self.vgg is not None:
            terms["perceptual"] = self.perceptual(fake_eo, eo)
        if self.config.pde_loss:
            phi_eo = self.phi(eo)  # the high-frequency target of both PDE terms
            terms["pde_tcd"] = PAPER_PHI_SCALE * F.l1_loss(self.phi(fake_eo), phi_eo)
            if pmd_image is not None:
                terms["pde_pmd"] = PAPER_PHI_SCALE * F.l1_loss(pmd_image, phi_eo)
        total = sum(self.weights[name] * value for name, value in terms.items())
        return GeneratorLosses(terms, total, fake_eo, fake_sar)

    def discriminator_terms(self, model: NPDEModel, sar: torch.Tensor, eo: torch.Tensor, fake_eo: torch.Tensor,
                            fake_sar: torch.Tensor) -> dict[str, torch.Tensor]:
        """The two discriminators' losses; the fakes are detached here."""
        return {
            "disc_eo": (lsgan(model.disc_eo(eo), True) + lsgan(model.disc_eo(fake_eo.detach()), False)) / 2,
            "disc_sar": (lsgan(model.disc_sar(sar), True) + lsgan(model.disc_sar(fake_sar.detach()), False)) / 2,
        }

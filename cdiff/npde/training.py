"""One S2O-NPDE training step, the paper's optimiser and schedule, and CycleGAN's image pools.

``training_step`` does what one iteration of the paper's CycleGAN-style training does: one
generator update (G and F together, Eq. 8) then one discriminator update (both PatchGANs).
It knows nothing of run folders, logging or checkpoints; the caller saves
``model.state_dict()``, both optimisers' and the pools' ``state_dict()``.

Schedule (section 4.1, the PAPER_* constants): Adam(betas 0.5, 0.999), lr 2e-4 for the first
half of 200 epochs, then linearly to zero at the last; batch 1. With torch's LambdaLR stepped
once per epoch: ``LambdaLR(opt, lambda e: lr_factor(e, PAPER_EPOCHS))``. ``cdiff train`` runs
the same schedule counted in steps (cdiff.train.s2o_npde).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from cdiff.npde.losses import NPDELoss
from cdiff.npde.model import NPDEModel


PAPER_LR = 2e-4
PAPER_BETAS = (0.5, 0.999)
PAPER_EPOCHS = 200  # constant lr for the first 100, then linearly to zero
PAPER_BATCH_SIZE = 1


class Optimizers(NamedTuple):
    generator: torch.optim.Adam  # G and F
    discriminator: torch.optim.Adam  # D_eo and D_sar


def make_optimizers(model: NPDEModel, lr: float = PAPER_LR, betas: tuple[float, float] = PAPER_BETAS,
                    eps: float = 1e-8, weight_decay: float = 0.0) -> Optimizers:
    """Adam, by default with the paper's lr and betas. ``weight_decay`` is decoupled (AdamW's);
    the paper uses none, and with 0 the update is plain Adam's."""
    adam = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=True)
    return Optimizers(torch.optim.Adam(model.generator_parameters(), **adam),
                      torch.optim.Adam(model.discriminator_parameters(), **adam))


def lr_factor(epoch: float, epochs: int) -> float:
    """The lr multiplier at ``epoch`` (0-based, fractions allowed) of ``epochs``: 1 for the
    first half, then linear to 0 at ``epochs`` (paper: 200 epochs, decay from the 100th)."""
    half = epochs / 2
    if epoch < half:
        return 1.0
    return max(0.0, (epochs - epoch) / (epochs - half))


class ImagePool:
    """CycleGAN's history of generated images (Shrivastava et al. 2017), one per discriminator.

    While it holds fewer than ``size`` images, each new image is stored and passed through.
    Then, for each image, with probability 1/2 a random stored image is returned and replaced
    by the new one, else the new one is returned. ``size`` 0 passes everything through.
    The draws come from the pool's own seeded generator, saved in ``state_dict``, so that a
    resumed run draws what an uninterrupted one would.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.images: list[torch.Tensor] = []  # each (1, C, H, W), detached
        self.rng = torch.Generator().manual_seed(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) new fakes -> (B, C, H, W) fakes for the discriminator."""
        if self.size == 0:
            return images
        out = []
        for image in images.detach().split(1):
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand((), generator=self.rng).item() > 0.5:
                i = int(torch.randint(self.size, (), generator=self.rng))
                out.append(self.images[i].to(image.device))
                self.images[i] = image.clone()
            else:
                out.append(image)
        return torch.cat(out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        images = torch.cat(self.images).cpu() if self.images else torch.empty(0)
        return {"images": images, "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        images = state["images"]
        self.images = list(images.split(1)) if images.numel() else []
        if len(self.images) > self.size:
            raise ValueError(f"ImagePool: the saved pool holds {len(self.images)} images, more than its size {self.size}")
        self.rng.set_state(state["rng"])


class FakePools(NamedTuple):
    eo: ImagePool  # G(x), for D_eo
    sar: ImagePool  # F(y), for D_sar

    @classmethod
    def create(cls, size: int, seed: int = 0) -> "FakePools":
        return cls(ImagePool(size, seed), ImagePool(size, seed + 1))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v for name, pool in self._asdict().items() for k, v in pool.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, pool in self._asdict().items():
            pool.load_state_dict({k: state[f"{name}.{k}"] for k in ("images", "rng")})


@contextlib.contextmanager
def frozen(parameters: list[torch.nn.Parameter]):
    """Inside, ``parameters`` require no gradient: a forward pass through them records none
    (its backward, after the block, still reaches the inputs). Restored on exit."""
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in parameters:
            p.requires_grad_(True)


def training_step(model: NPDEModel, losses: NPDELoss, optimizers: Optimizers, batch: dict,
                  pools: FakePools | None = None) -> dict[str, float]:
    """One generator update and one discriminator update on ``batch`` {"sar", "eo"}:
    (B, 3, H, W) in [-1, 1]. Returns every active loss term (unweighted), the weighted
    generator total ("generator") and the two discriminator losses, as floats."""
    device = next(model.parameters()).device
    sar, eo = batch["sar"].to(device), batch["eo"].to(device)

    # Generator step; the discriminators only score, so they keep no gradient.
    with frozen(model.discriminator_parameters()):
        g = losses.generator_terms(model, sar, eo)
    optimizers.generator.zero_grad(set_to_none=True)
    g.total.backward()
    optimizers.generator.step()

    # Discriminator step, on fakes drawn through the history pools.
    fake_eo, fake_sar = g.fake_eo.detach(), g.fake_sar.detach()
    if pools is not None:
        fake_eo, fake_sar = pools.eo.query(fake_eo), pools.sar.query(fake_sar)
    d = losses.discriminator_terms(model, sar, eo, fake_eo, fake_sar)
    optimizers.discriminator.zero_grad(set_to_none=True)
    (d["disc_eo"] + d["disc_sar"]).backward()
    optimizers.discriminator.step()

    return {name: float(value.detach()) for name, value in {**g.terms, "generator": g.total, **d}.items()}

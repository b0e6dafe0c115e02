"""S2O-NPDE training (cdiff.npde): the ``[model]`` section of ``kind = "s2o_npde"`` and the task
that cdiff.train.loop runs.

One optimiser step is the paper's CycleGAN-style iteration, the arithmetic of
cdiff.npde.training_step split into the loop's two phases:
1. "generator": G (SAR -> optical, with the PMD module) and F (optical -> SAR) step on Eq. 8,
   the discriminators frozen. The phase leaves its fakes G(x), F(y) in the micro-batch (keys
   "fake_eo", "fake_sar") for the next phase, which runs on the same micro-batches;
2. "discriminator": D_eo and D_sar step on those fakes, drawn through CycleGAN's image pools.

Logged (log.jsonl, unweighted terms): ``gan_eo``, ``gan_sar``, ``pixel``, ``cycle``,
``perceptual`` (with VGG weights), ``pde_tcd`` and ``pde_pmd`` (with the PDE loss; L_PMD with
the PMD module), ``loss_generator`` (Eq. 8, weighted); ``disc_eo``, ``disc_sar``,
``loss_discriminator`` (their sum); ``lr_generator``, ``lr_discriminator``. Validation:
``psnr``, ``ssim``, ``scc`` of the generator's images; grids of SAR | prediction | target |
PMD image (stretched per image; without the PMD module the last column is left out).

The paper's training (section 4.1) is this kind's default for the other sections (see
``S2ONPDEConfig.section_defaults``): Adam(0.5, 0.999) without weight decay, lr 2e-4, constant for
the first half of ``train.steps`` then linearly to 0 (``optim.schedule = "linear_decay"``), batch
1, fp32, no warm-up, no gradient clipping. ``train.steps`` counts optimiser steps: the paper's 200
epochs are 200 x training pairs / batch, 320,000 for its 1,600 SEN1-2 pairs (the default).
Augmentation: CycleGAN's horizontal flips (the paper names none).

Checkpoint folder: ``model.safetensors`` (cdiff.npde.files: all four networks and the
NPDEConfig; ``cdiff translate`` reads it) and ``pools.safetensors`` (the image pools' images and
generator states); the loop adds the optimisers', schedules' and RNG state. The weights start
from CycleGAN's N(0, 0.02) init drawn with a seed derived from ``train.seed``.

Not supported: several processes (torchrun; the paper trains at batch 1 on one GPU) and
``data.latents`` (a latent cache is C-DiffSET's).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from cdiff.files import save_safetensors
from cdiff.npde import (
    PAPER_BATCH_SIZE, PAPER_BETAS, PAPER_EPOCHS, PAPER_LR, FakePools, NPDEConfig, NPDELoss, NPDEModel, load_model,
    make_optimizers, save_model,
)
from cdiff.npde.training import frozen
from cdiff.train.config import DataConfig, OptimConfig, RunConfig, TrainConfig
from cdiff.train.data import DEFAULT_CROPS, image_augment, training_split
from cdiff.train.optim import lr_schedule
from cdiff.train.seeds import derive_seed
from cdiff.train.task import Phase
from cdiff.train.validation import score_pairs
from cdiff.weightfile import read_state_dict

MODEL_FILE, POOLS_FILE = "model.safetensors", "pools.safetensors"
PAPER_PAIRS = 1_600  # the paper's SEN1-2 training pairs (section 4.1, after Guo et al. 2021)


@dataclass(frozen=True)
class S2ONPDEConfig(NPDEConfig):
    """``[model]`` of an S2O-NPDE run: every cdiff.npde.NPDEConfig field (the paper's network and
    loss; ``tcd``, ``pmd``, ``pde_loss`` are the ablation switches of Table 2), and the VGG file."""

    kind: str = "s2o_npde"
    vgg: str = ""  # torchvision VGG16/VGG19 weights for the perceptual loss (cdiff.npde.vgg);
    #               "" trains without that term, with a logged warning

    def __post_init__(self):
        super().__post_init__()
        if self.kind != "s2o_npde":
            raise ValueError(f"config: model.kind of S2ONPDEConfig must be 's2o_npde', got {self.kind!r}")

    def network(self) -> NPDEConfig:
        """The NPDEConfig part (what the model file records)."""
        return NPDEConfig(**{f.name: getattr(self, f.name) for f in fields(NPDEConfig)})

    @staticmethod
    def section_defaults() -> dict:
        """The paper's training, as the defaults of the other sections (module docstring)."""
        return {
            "data": DataConfig(vflip=False, rot90=False),
            "optim": OptimConfig(lr=PAPER_LR, betas=PAPER_BETAS, weight_decay=0.0, warmup_steps=0,
                                 schedule="linear_decay", clip_grad_norm=0.0),
            "train": TrainConfig(steps=PAPER_EPOCHS * PAPER_PAIRS // PAPER_BATCH_SIZE, batch_size=PAPER_BATCH_SIZE,
                                 precision="fp32"),
        }


def initial_model(network: NPDEConfig, seed: int) -> NPDEModel:
    """The four networks with CycleGAN's init, drawn with torch's generator seeded from ``seed`` (its
    state is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "s2o_npde init"))
        return NPDEModel(network)


def fake_pools(network: NPDEConfig, seed: int) -> FakePools:
    return FakePools.create(network.pool_size, derive_seed(seed, "s2o_npde pools"))


class S2ONPDETask:
    """S2O-NPDE in training (a cdiff.train.task.Task)."""

    best_metric = "psnr"
    single_process = True  # the paper trains at batch 1 on one GPU: torchrun is refused before anything is written

    def __init__(self, config: RunConfig, device: torch.device, checkpoint: Path | None = None):
        if config.data.latents:
            raise ValueError("data.latents: a latent cache is for C-DiffSET; S2O-NPDE trains on images "
                             "(set it to \"\")")
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError("S2O-NPDE trains in one process (batch 1, as the paper): run 'cdiff train' "
                             "without torchrun")
        self.config, self.device, self.network = config, device, config.model.network()
        crop, multiple = config.data.crop or DEFAULT_CROPS.get(config.data.kind, 0), self.network.size_multiple
        if crop % multiple:
            raise ValueError(f"data.crop {crop} must be a multiple of {multiple} for S2O-NPDE's "
                             f"{self.network.n_downsampling} downsamplings")
        seed = config.train.seed
        self.pools = fake_pools(self.network, seed)
        if checkpoint is not None:
            self.model = load_model(checkpoint / MODEL_FILE, config=self.network)
            self.pools.load_state_dict(read_state_dict(checkpoint / POOLS_FILE))
        else:
            self.model = initial_model(self.network, seed)
        self.model.to(device).train()
        self.losses = NPDELoss.from_vgg_file(self.network, config.model.vgg or None).to(device)
        model = self.model
        self.modules = {"generator": model.generator, "reverse": model.reverse, "disc_eo": model.disc_eo,
                        "disc_sar": model.disc_sar}
        self.wrapped = dict(self.modules)
        optim = config.optim
        optimizers = make_optimizers(model, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                     weight_decay=optim.weight_decay)
        self.optimizers = optimizers._asdict()
        self.schedulers = {name: lr_schedule(o, optim, config.train.steps) for name, o in self.optimizers.items()}
        self.phases = [
            Phase("generator", "generator", ("generator", "reverse"), self.generator_loss),
            Phase("discriminator", "discriminator", ("disc_eo", "disc_sar"), self.discriminator_loss),
        ]
        # Opened now, so that a missing file is an error at the start. Validation reads pairs held out of
        # the training list (val.holdout), never the test split.
        self.train_pairs, self.val_pairs = training_split(config.data, config.val)

    # --- training ------------------------------------------------------------------------

    def training_samples(self):
        return self.train_pairs, image_augment(self.config.data)

    def _images(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(SAR, EO), each (B, 3, H, W) in [-1, 1], on the device."""
        return batch["sar"].to(self.device, non_blocking=True), batch["eo"].to(self.device, non_blocking=True)

    def generator_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sar, eo = self._images(batch)
        with frozen(self.model.discriminator_parameters()):  # they score; they do not learn here
            g = self.losses.generator_terms(self.model, sar, eo)
        batch["fake_eo"], batch["fake_sar"] = g.fake_eo.detach(), g.fake_sar.detach()
        return g.total, g.terms

    def discriminator_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sar, eo = self._images(batch)
        fake_eo, fake_sar = self.pools.eo.query(batch.pop("fake_eo")), self.pools.sar.query(batch.pop("fake_sar"))
        d = self.losses.discriminator_terms(self.model, sar, eo, fake_eo, fake_sar)
        return d["disc_eo"] + d["disc_sar"], d

    def after_step(self) -> None:
        pass

    # --- checkpoints and validation --------------------------------------------------------

    def save(self, folder: Path) -> None:
        save_model(folder / MODEL_FILE, self.model)
        save_safetensors(self.pools.state_dict(), folder / POOLS_FILE)

    @torch.no_grad()
    def validate(self, step: int):
        """The generator on the first val.images pairs held out of the training list: mean PSNR, SSIM, SCC;
        grid columns."""
        val, generator = self.config.val, self.model.generator
        generator.eval()

        def predict(index, sar):
            out = generator(sar)
            return out.image, out.pmd_image

        result = score_pairs(self.val_pairs, predict, val.batch_size, val.grid_images, self.device)
        generator.train()
        return result

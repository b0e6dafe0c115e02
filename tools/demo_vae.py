"""Stage 1 of the bundled demo model: the ``tiny`` VAE trained on synthetic EO and SAR images.

SD trains its autoencoder with L1 + LPIPS + a patch GAN + a tiny KL term. No pretrained VGG can
be downloaded here, so this recipe keeps L1 and the KL term, on the reparameterised posterior
sample (so the decoder learns to decode slightly noisy latents, as a diffusion model's are):

    loss = mean |decode(z) - x| + kl_weight * mean KL(q(z | x) || N(0, I)),   z ~ q(z | x)

Each step draws ``batch`` random ``crop``-pixel windows of training scenes, each the EO image
(with probability ``eo_fraction``) or the SAR image repeated to 3 channels. The VAE is fully
convolutional apart from the mid block's attention, so crops cost a quarter of the full
scenes and it still runs on the full 128-pixel scenes. The EO share is above one half because
the EO reconstruction is the translation's upper bound; SAR speckle cannot be reconstructed
and would otherwise dominate the L1.

``scaling_factor`` is then set as SD set its 0.18215: one over the standard deviation of the
posterior means over the training scenes (EO and SAR together), so the latents the U-Net sees
have unit standard deviation.

Training scenes are ``make_pair(seed)`` for seed in 0 .. scenes - 1; held-out scenes start at
``cdiff.demo.HELDOUT_SEED`` (1,000,000), far above any training seed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from cdiff.config import VAEConfig
from cdiff.data.synth import make_pair
from cdiff.progress import progress
from cdiff.vae import VAE


@dataclass(frozen=True)
class VAERecipe:
    scenes: int = 1000  # training scenes, seeds 0 .. scenes - 1
    size: int = 128  # scene side in px
    crop: int = 64  # side of the training windows in px (a multiple of 8)
    batch: int = 8  # windows per step
    steps: int = 700  # AdamW steps
    lr: float = 2e-3  # after a linear warm-up, cosine to 0
    warmup: int = 50
    kl_weight: float = 1e-6  # on the mean KL per latent element
    eo_fraction: float = 0.7  # share of EO windows; the rest are SAR
    clip_grad_norm: float = 1.0
    seed: int = 0  # the weights' initialisation and the windows drawn

    def __post_init__(self):
        if self.crop % 8 or not 8 <= self.crop <= self.size:
            raise ValueError(f"VAERecipe: crop must be a multiple of 8 in [8, {self.size}], got {self.crop}")
        if min(self.scenes, self.batch, self.steps) < 1:
            raise ValueError("VAERecipe: scenes, batch and steps must be >= 1")
        if not 0 <= self.eo_fraction <= 1:
            raise ValueError(f"VAERecipe: eo_fraction must be in [0, 1], got {self.eo_fraction}")


def training_scenes(count: int, size: int, first_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(SAR, EO) of scenes ``first_seed`` .. ``first_seed + count - 1``: (N, 3, size, size) each, in [-1, 1].

    The pairs are made as the U-Net's are (cdiff.SyntheticPairs' defaults: speckle, discrepancies,
    misregistrations); SAR is repeated to 3 channels as the VAE takes it.
    """
    sar = torch.empty(count, 1, size, size)
    eo = torch.empty(count, 3, size, size)
    for i in range(count):
        pair = make_pair(first_seed + i, size=size)
        sar[i, 0] = torch.from_numpy(pair.sar)
        eo[i] = torch.from_numpy(np.ascontiguousarray(pair.eo.transpose(2, 0, 1)))
    return sar.expand(-1, 3, -1, -1), eo


def _lr_factor(step: int, recipe: VAERecipe) -> float:
    warm = min(1.0, (step + 1) / recipe.warmup) if recipe.warmup else 1.0
    return warm * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))


def train_vae(recipe: VAERecipe, show_progress: bool = True, log=print) -> VAE:
    """The tiny VAE trained by ``recipe``, in eval mode, its ``scaling_factor`` set from the training scenes."""
    torch.manual_seed(recipe.seed)
    vae = VAE(VAEConfig.tiny()).to(memory_format=torch.channels_last)  # channels-last convs: ~15% faster on CPU
    sar, eo = training_scenes(recipe.scenes, recipe.size)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(recipe.seed)
    start, shown = time.perf_counter(), 0.0
    for step in progress(range(recipe.steps), desc="VAE", enabled=show_progress):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * _lr_factor(step, recipe)
        images = _windows(sar, eo, recipe, generator)  # (batch, 3, crop, crop)
        posterior = vae.encode(images)
        reconstruction = vae.decode(posterior.sample(generator))
        l1 = (reconstruction - images).abs().mean()
        kl = 0.5 * (posterior.mean.square() + posterior.var - 1 - posterior.logvar).mean()
        loss = l1 + recipe.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), recipe.clip_grad_norm)
        optimizer.step()
        if time.perf_counter() - shown > 60 or step == recipe.steps - 1:
            shown = time.perf_counter()
            log(f"VAE step {step + 1}/{recipe.steps}: L1 {l1.item():.4f}, KL {kl.item():.2f}, {shown - start:.0f} s")
    vae = vae.to(memory_format=torch.contiguous_format).eval().requires_grad_(False)
    factor = latent_scaling_factor(vae, torch.cat([eo[:256], sar[:256]]))
    scaled = VAE(replace(vae.config, scaling_factor=factor)).eval().requires_grad_(False)
    scaled.load_state_dict(vae.state_dict())
    return scaled


def _windows(sar: torch.Tensor, eo: torch.Tensor, recipe: VAERecipe, generator: torch.Generator) -> torch.Tensor:
    """``batch`` random windows, each of a random scene's EO (p = eo_fraction) or SAR image."""
    count, size = len(eo), recipe.size
    index = torch.randint(0, count, (recipe.batch,), generator=generator)
    use_eo = torch.rand(recipe.batch, generator=generator) < recipe.eo_fraction
    corner = torch.randint(0, size - recipe.crop + 1, (recipe.batch, 2), generator=generator)
    windows = []
    for i, eo_image, (y, x) in zip(index.tolist(), use_eo.tolist(), corner.tolist()):
        image = eo[i] if eo_image else sar[i]
        windows.append(image[:, y : y + recipe.crop, x : x + recipe.crop])
    return torch.stack(windows).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def latent_scaling_factor(vae: VAE, images: torch.Tensor, batch: int = 32) -> float:
    """1 / std of the posterior means of ``images`` (N, 3, H, W), to 5 significant digits (SD's 0.18215 style)."""
    means = torch.cat([vae.encode(images[i : i + batch]).mean for i in range(0, len(images), batch)])
    return float(f"{1.0 / means.double().std().item():.5g}")

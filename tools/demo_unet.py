"""Stage 2 of the bundled demo model, PROTOTYPE: the tiny C-DiffSET U-Net on cached latents.

This loop is the training step of the official release as `cdiff train` runs it (cdiff/train,
not merged yet): AdamW, linear warm-up then cosine, gradient clipping at 1.0; per sample
t ~ U{0..999}, the EO latent noised, the U-Net fed [SAR latent | noisy EO latent] with the
fixed prompt embedding, and the C-Diff loss on (noise, prediction, raw variance, alpha_bar)
(or plain L2, the paper's Table 3 ablation). Once `cdiff train` lands, tools/train_demo.py
calls it with configs/demo-tiny.toml instead, and this file goes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cdiff.loss import confidence_nll
from cdiff.progress import progress
from cdiff.schedulers import DDPM


@dataclass(frozen=True)
class UNetRecipe:
    steps: int = 3000
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    clip_grad_norm: float = 1.0
    prediction: str = "epsilon"  # or "sample" (the release's x0 option)
    loss: str = "cdiff"  # or "mse"
    seed: int = 2025


def train_unet(unet, sar_latents: torch.Tensor, eo_latents: torch.Tensor, context: torch.Tensor, recipe: UNetRecipe,
               show_progress: bool = True, log=print):
    """Train ``unet`` in place on scaled latents (N, 4, h, w) with the fixed ``context`` (L, 1024)."""
    process = DDPM()
    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    start, shown = time.perf_counter(), 0.0
    for step in progress(range(recipe.steps), desc="U-Net", enabled=show_progress):
        warm = min(1.0, (step + 1) / recipe.warmup) if recipe.warmup else 1.0
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * warm * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        index = torch.randint(0, len(eo_latents), (recipe.batch,), generator=generator)
        clean, condition = eo_latents[index], sar_latents[index]
        t = torch.randint(0, process.num_train_timesteps, (recipe.batch,), generator=generator)
        noise = torch.randn(clean.shape, generator=generator)
        out = unet(torch.cat([condition, process.add_noise(clean, noise, t)], dim=1), t,
                   context.expand(recipe.batch, -1, -1))  # (B, 5, h, w)
        target = noise if recipe.prediction == "epsilon" else clean
        if recipe.loss == "mse":
            loss = F.mse_loss(out[:, :4], target)
        else:
            loss = confidence_nll(target, out[:, :4], out[:, 4:], process.alpha_bar(t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), recipe.clip_grad_norm)
        optimizer.step()
        if time.perf_counter() - shown > 60 or step == recipe.steps - 1:
            shown = time.perf_counter()
            log(f"U-Net step {step + 1}/{recipe.steps}: loss {loss.item():.4f}, {shown - start:.0f} s")
    return unet.eval().requires_grad_(False)

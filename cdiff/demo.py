"""``cdiff demo``: the whole pipeline end to end on a synthetic SAR scene, on the CPU in seconds.

Until a trained demo model ships, the tiny stack gets seeded random weights: the run proves
that encoding, DDIM, decoding and the confidence map work together, not translation quality.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from cdiff.config import UNetConfig, VAEConfig
from cdiff.data.imageio import to_uint8, write_png
from cdiff.data.synth import make_pair
from cdiff.files import check_output
from cdiff.pipeline import Pipeline
from cdiff.unet import UNet
from cdiff.vae import VAE

PROMPT_TOKENS = 6  # the release's unpadded "electro-optical image" prompt is 6 tokens long


def tiny_pipeline(seed: int) -> Pipeline:
    """The tiny C-DiffSET stack (8-in/5-out U-Net, tiny VAE) with seeded random weights."""
    torch.manual_seed(seed)
    unet = UNet(UNetConfig.tiny(in_channels=8, out_channels=5)).eval()
    vae = VAE(VAEConfig.tiny()).eval()
    context = torch.randn(PROMPT_TOKENS, unet.config.context_dim, generator=torch.Generator().manual_seed(seed))
    return Pipeline(unet, vae, context)


def _normalise(confidence: np.ndarray) -> np.ndarray:
    """Min-max to [-1, 1] for display, as the release saves its confidence maps."""
    low, high = float(confidence.min()), float(confidence.max())
    return (confidence - low) / max(high - low, 1e-12) * 2 - 1


def run_demo(out_dir: str, size: int = 128, steps: int = 10, seed: int = 0) -> dict[str, Path]:
    """Translate one synthetic SAR scene of ``size`` px and write PNGs into ``out_dir``.

    Returns the written paths by name: sar, eo, eo_reference, confidence.
    """
    # The VAE divides the side by 8 and the U-Net's latent side must divide by 8 again.
    if size % 64 or size < 64:
        raise ValueError(f"--size must be a positive multiple of 64, got {size}")
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    # The demo writes its four files into --out (an existing folder is fine): check the
    # path before the compute, not after it.
    check_output(out_dir, "folder", overwrite=True)
    start = time.perf_counter()
    pair = make_pair(seed, size=size)
    sar = torch.from_numpy(pair.sar)[None, None].repeat(1, 3, 1, 1)  # (1, 3, H, W): single-pol to 3 channels
    pipeline = tiny_pipeline(seed)
    result = pipeline.translate(sar, steps=steps, generator=torch.Generator().manual_seed(seed), show_progress=True)

    confidence = torch.nn.functional.interpolate(result.confidence, size=(size, size), mode="nearest")
    images = {
        "sar": pair.sar,
        "eo": result.eo[0].permute(1, 2, 0).numpy(),
        "eo_reference": pair.eo,
        "confidence": _normalise(confidence[0, 0].numpy()),
    }
    out = Path(out_dir)
    paths = {}
    for name, image in images.items():
        paths[name] = out / f"{name}.png"
        write_png(paths[name], to_uint8(image))
    print(f"cdiff demo: {size}x{size} scene, {steps} DDIM steps, {time.perf_counter() - start:.1f} s")
    for name, path in paths.items():
        print(f"  {name:13s} {path}")
    return paths

"""Confidence maps as images: the release's grey PNG, and a colour-mapped view of it.

The release's test.py saves the map the U-Net predicts at the confidence step as follows:
confidence = 1 / variance, min-max normalised over the map (with 1e-8 added to the range),
to [-1, 1], bicubic-resized to the image size, back to [0, 1], clamped, and stored as 8 bits
the way torchvision's ToPILImage does it (times 255, truncated). ``release_grey`` does the
same, as one grey channel (the release repeats it into three equal RGB channels).

``colourize`` maps the grey levels through a small built-in colour table (no matplotlib):
dark blue for the least confident pixels of the image, through teal and green, to yellow for
the most confident. The colours are relative to each image, as the grey map is.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

RANGE_EPS = 1e-8  # the release's guard on the min-max range

# (position in [0, 1], R, G, B): linearly interpolated into a 256-entry table.
COLOUR_ANCHORS = (
    (0.00, 25, 20, 85),
    (0.25, 45, 85, 160),
    (0.50, 35, 150, 145),
    (0.75, 130, 200, 80),
    (1.00, 250, 230, 45),
)


def release_grey(confidence: torch.Tensor, height: int, width: int, scale: int = 8) -> np.ndarray:
    """(1, 1, h, w) or (h, w) confidence -> uint8 (height, width) grey, as the release saves it.

    The map covers the (possibly padded) latent; it is resized to ``scale * h x scale * w``
    pixels (the VAE's factor) and cropped to ``height x width``, so padding never stretches it.
    """
    c = confidence.float().reshape(1, 1, *confidence.shape[-2:])
    low, high = c.amin(), c.amax()
    signed = (c - low) / (high - low + RANGE_EPS) * 2 - 1
    full = (scale * c.shape[-2], scale * c.shape[-1])
    if full[0] < height or full[1] < width:
        raise ValueError(f"a {c.shape[-2]}x{c.shape[-1]} confidence map cannot cover a {height}x{width} image")
    resized = F.interpolate(signed, size=full, mode="bicubic")[..., :height, :width]
    unit = (resized * 0.5 + 0.5).clamp(0, 1)
    return (unit * 255).to(torch.uint8)[0, 0].cpu().numpy()  # truncation, as ToPILImage


def colour_table() -> np.ndarray:
    """(256, 3) uint8: the colour of each grey level."""
    positions = np.array([a[0] for a in COLOUR_ANCHORS])
    levels = np.linspace(0, 1, 256)
    channels = [np.interp(levels, positions, [a[k] for a in COLOUR_ANCHORS]) for k in (1, 2, 3)]
    return np.rint(np.stack(channels, axis=1)).astype(np.uint8)


def colourize(grey: np.ndarray) -> np.ndarray:
    """uint8 (H, W) -> uint8 (H, W, 3) through ``colour_table``."""
    if grey.dtype != np.uint8 or grey.ndim != 2:
        raise ValueError(f"colourize: expected a uint8 (H, W) grey map, got {grey.dtype} {grey.shape}")
    return colour_table()[grey]

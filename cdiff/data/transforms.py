"""Paired spatial transforms: every image of a sample gets the same crop, flips and rotation.

A sample is a dict; the transforms act on each value that is a ``(C, H, W)`` tensor (the
SAR and EO images, and masks such as the synthetic data's) and pass others (the name) on.
Randomness comes from an explicit ``torch.Generator`` when one is given (tests, scripted
runs), else from torch's global generator, which a DataLoader seeds per worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _spatial(sample: dict) -> list[str]:
    keys = [k for k, v in sample.items() if isinstance(v, torch.Tensor) and v.ndim == 3]
    if not keys:
        raise ValueError("sample has no (C, H, W) tensor to transform")
    shapes = {tuple(sample[k].shape[-2:]) for k in keys}
    if len(shapes) != 1:
        sizes = ", ".join(f"{k}={tuple(sample[k].shape[-2:])}" for k in keys)
        raise ValueError(f"sample {sample.get('name', '?')!r}: images differ in size ({sizes})")
    return keys


def _check_size(sample: dict, size: int, h: int, w: int) -> None:
    if h < size or w < size:
        raise ValueError(f"sample {sample.get('name', '?')!r} is {h}x{w}, smaller than the crop size {size}")


def _randint(high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(high, (1,), generator=generator))


@dataclass(frozen=True)
class PairAugment:
    """Training augmentation: random square crop (``crop_size``; None keeps the full image),
    then a horizontal flip, a vertical flip (each with probability 1/2) and a rotation by
    k * 90 degrees, k uniform in {0, 1, 2, 3}. Call as ``augment(sample, generator)``.

    Only square images rotate: a quarter turn of an H x W image (H != W) would give W x H,
    and a batch of mixed shapes fails to collate. A non-square image (no crop, or before
    one) keeps its shape; the two flips still give it every orientation that does.
    """

    crop_size: int | None = None
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True

    def __post_init__(self):
        if self.crop_size is not None and self.crop_size < 1:
            raise ValueError(f"crop_size must be positive or None, got {self.crop_size}")

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        keys = _spatial(sample)
        h, w = sample[keys[0]].shape[-2:]
        # Draw every random number first, in a fixed order, so the stream does not depend on
        # which options are on.
        top = left = 0
        if self.crop_size is not None:
            _check_size(sample, self.crop_size, h, w)
            top = _randint(h - self.crop_size + 1, generator)
            left = _randint(w - self.crop_size + 1, generator)
        flip_h = _randint(2, generator) == 1
        flip_v = _randint(2, generator) == 1
        k = _randint(4, generator)
        out = dict(sample)
        for key in keys:
            x = sample[key]
            if self.crop_size is not None:
                x = x[:, top : top + self.crop_size, left : left + self.crop_size]
            if self.hflip and flip_h:
                x = x.flip(-1)
            if self.vflip and flip_v:
                x = x.flip(-2)
            if self.rot90 and k and x.shape[-1] == x.shape[-2]:
                x = torch.rot90(x, k, dims=(-2, -1))
            out[key] = x.contiguous()
        return out


@dataclass(frozen=True)
class CenterCrop:
    """Evaluation crop: the central ``size`` x ``size`` window (top-left rounded down)."""

    size: int

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"CenterCrop size must be positive, got {self.size}")

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        keys = _spatial(sample)
        h, w = sample[keys[0]].shape[-2:]
        _check_size(sample, self.size, h, w)
        top, left = (h - self.size) // 2, (w - self.size) // 2
        out = dict(sample)
        for key in keys:
            out[key] = sample[key][:, top : top + self.size, left : left + self.size].contiguous()
        return out

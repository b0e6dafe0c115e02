"""Training-free step caching: DeepCache (Ma, Fang and Wang, CVPR 2024) for the sampling loop.

Neighbouring sampler steps call the U-Net on nearly the same latent, and its deep features (the
low-resolution inside of the U) change slowly from one step to the next, while the outermost
level, at full latent resolution, carries the detail. So the U-Net runs whole only every
``interval``-th step; the steps between run its outermost level alone (``UNet.forward_outer``:
conv_in, down.0, the last up block and the head), with the input of the last up block taken
from the last whole pass. With interval 1 every step is whole and nothing changes.

The whole pass records that input with a forward pre-hook on the last up block, added for the
one call and removed after it: the U-Net itself holds no state. Which steps run whole:
``whole_steps``; besides every ``interval``-th step, the caller may name steps that must be
whole (the pipeline names its confidence step, so the map is a whole pass's, as without caching).
"""

from __future__ import annotations

import torch


def whole_steps(num_steps: int, interval: int, always: tuple[int, ...] = ()) -> list[bool]:
    """For each of ``num_steps`` steps, whether the U-Net runs whole: step i when i % interval == 0,
    and the steps of ``always``."""
    check_interval(interval)
    return [i % interval == 0 or i in always for i in range(num_steps)]


def check_interval(interval) -> int:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"cache_interval must be an integer >= 1 (1: no caching), got {interval!r}")
    return interval


class DeepCache:
    """Calls of the U-Net over one sampling run, step by step, reusing its deep features.

    ``cache(step, sample, t, context)`` returns the U-Net's output (B, out_channels, h, w), from a
    whole pass when ``whole[step]``, else from ``unet.forward_outer`` around the inside of the last
    whole pass. Steps must come in order, the first one whole. Counts: ``whole_passes``,
    ``outer_passes``.
    """

    def __init__(self, unet, whole: list[bool]):
        if not whole or not whole[0]:
            raise ValueError("DeepCache: the first step must be a whole pass (nothing is cached before it)")
        self.unet, self.whole = unet, whole
        self.inner: torch.Tensor | None = None  # the last whole pass's input of the last up block
        self.whole_passes = self.outer_passes = 0

    def _keep_inner(self, module, args) -> None:
        self.inner = args[0]  # UpBlock.forward(sample, skips, time_emb, context, mask): its sample

    def __call__(self, step: int, sample: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        if self.whole[step]:
            self.whole_passes += 1
            handle = self.unet.up[-1].register_forward_pre_hook(self._keep_inner)
            try:
                return self.unet(sample, t, context)
            finally:
                handle.remove()
        self.outer_passes += 1
        return self.unet.forward_outer(sample, t, context, self.inner)

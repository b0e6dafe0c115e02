"""S2O-NPDE inference at any size: one generator pass, with padding and, for large scenes, tiles.

Unlike C-DiffSET there is no sampler: no steps, no noise, no seed, and no confidence map.
Sides are reflect-padded to multiples of ``config.size_multiple`` (4 with two downsamplings)
and cropped back. Images larger than ``tiling.tile`` go through overlapping tiles whose
outputs are blended with linear ramps (cdiff.tiling). That is an approximation: the
generator's InstanceNorms take statistics over whatever image they see, so a tile is
normalised on its own, as the 256-px training crops were.
"""

from __future__ import annotations

import torch

from cdiff.npde.model import NPDEGenerator
from cdiff.tiling import Grid, Tiling, crop, needs_tiles, pad_to_multiple, tiled_apply


@torch.no_grad()
def translate_image(generator: NPDEGenerator, sar: torch.Tensor, tiling: Tiling | None = None) -> torch.Tensor:
    """SAR (B, sar_channels, H, W) in [-1, 1], any H and W -> optical (B, eo_channels, H, W) in
    [-1, 1], in the generator's dtype and on its device. The generator should be in eval mode
    (its norms then behave as at inference; cdiff.npde.files.load_generator returns it so)."""
    param = next(generator.parameters())
    height, width = sar.shape[-2:]
    multiple = generator.config.size_multiple
    padded = pad_to_multiple(sar.to(param.device, param.dtype), multiple)  # (B, C, H', W')

    def run(x: torch.Tensor) -> torch.Tensor:
        return generator(x, side_output=False).image

    if needs_tiles(height, width, tiling):
        grid = Grid.cover(*padded.shape[-2:], tiling.tile, tiling.overlap, align=multiple)
        eo = tiled_apply(run, padded, grid, batch=tiling.batch)
    else:
        eo = run(padded)
    return crop(eo, height, width)

"""Any image size: padding to the network's multiple, and overlapping tiles for large scenes.

Large images are translated tile by tile, with peak memory bounded by the tile size:
- Denoising (MultiDiffusion, Bar-Tal et al. 2023): at every sampler step the U-Net
  predicts the noise of every overlapping latent tile, and the predictions are averaged
  where tiles overlap, with blending weights, into one prediction for the whole latent;
  the sampler then steps the whole latent at once. MultiDiffusion averages the tiles'
  *updated latents*; a DDIM step x_prev = a_t x_t + b_t eps (+ sigma_t z, with z drawn for the
  whole latent) is affine in eps with coefficients shared by every pixel, so averaging the
  noise predictions, as done here, gives exactly the same x_prev. Because every step re-fuses
  the tiles, neighbouring tiles agree where they meet: no seams. (DPM-Solver++(2M)'s update is
  a fixed linear combination of the current and previous predictions, so the same holds.)
- The VAE encodes and decodes tile by tile with the same blended overlaps. This is an
  approximation: the VAE's GroupNorms take statistics over the whole input and its
  mid-block attention is global, so a tile does not see the rest of the scene. The error
  is measured in tests/test_tiling.py and stated in docs/translation.md.

Blending weights are separable linear ramps across the overlap on each side of a tile that
faces another tile (1 on sides at the scene border); outputs are divided by the summed
weights, so any overlap pattern averages correctly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

PAD_MULTIPLE = 64  # VAE /8 then U-Net /8: image sides must divide by 64


@dataclass(frozen=True)
class Tiling:
    """Tile sizes in image pixels (the latent tile is 1/8 of it)."""

    tile: int = 1024  # side of a tile, a multiple of 64; images no larger than this are not tiled
    overlap: int = 256  # overlap of neighbouring tiles, a multiple of 8, below the tile side
    batch: int = 4  # tiles per network call: peak memory grows with tile**2 * batch
    vae: bool = True  # also encode and decode in tiles (an approximation, see the module docstring)

    def __post_init__(self):
        if self.tile < PAD_MULTIPLE or self.tile % PAD_MULTIPLE:
            raise ValueError(f"tile must be a positive multiple of {PAD_MULTIPLE} pixels, got {self.tile}")
        if self.overlap < 0 or self.overlap % 8 or self.overlap >= self.tile:
            raise ValueError(f"tile overlap must be a multiple of 8 in [0, {self.tile}), got {self.overlap}")
        if self.batch < 1:
            raise ValueError(f"tile batch must be at least 1, got {self.batch}")


# --- padding --------------------------------------------------------------------------------


def pad_to_multiple(images: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Pad (B, C, H, W) at the bottom and right to sides divisible by ``multiple``: reflect
    where the image is large enough, else replicate. Undo with ``crop(x, H, W)``."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(images, (0, pad_w, 0, pad_h), mode=mode)


def crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return images[..., :height, :width]


# --- the grid of tiles ----------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of ``tile`` covering [0, length), neighbours overlapping by at
    least ``overlap``, spread evenly, each a multiple of ``align``. One tile if it fits."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    last = length - tile
    return [round(i * last / (count - 1) / align) * align for i in range(count)]


@dataclass(frozen=True)
class Grid:
    """Tiles of (tile_h, tile_w) at rows ``ys`` and columns ``xs`` over a (height, width) canvas."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    overlap: int

    @classmethod
    def cover(cls, height: int, width: int, tile: int, overlap: int, align: int = 1) -> "Grid":
        tile_h, tile_w = min(tile, height), min(tile, width)
        ys = tuple(tile_starts(height, tile_h, overlap, align))
        xs = tuple(tile_starts(width, tile_w, overlap, align))
        return cls(height, width, tile_h, tile_w, ys, xs, overlap)

    @property
    def boxes(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]

    def scaled(self, factor: float) -> "Grid":
        """The same tiles in a canvas ``factor`` times larger (VAE: 8 or 1/8); exact only."""
        def s(v: int) -> int:
            out = v * factor
            if out != int(out):
                raise ValueError(f"tile offset {v} x {factor} is not a whole pixel")
            return int(out)

        return Grid(s(self.height), s(self.width), s(self.tile_h), s(self.tile_w),
                    tuple(s(y) for y in self.ys), tuple(s(x) for x in self.xs), s(self.overlap))

    def weights(self, y: int, x: int) -> torch.Tensor:
        """(tile_h, tile_w) blending weights of the tile at (y, x): linear ramps from
        1 / (overlap + 1) up to 1 across ``overlap`` pixels on each side that faces another
        tile, so two tiles overlapping by exactly ``overlap`` cross-fade with weights summing to 1."""
        def ramp(length: int, start: int, total: int) -> torch.Tensor:
            w = torch.ones(length, dtype=torch.float32)
            n = min(self.overlap, length)
            if n == 0:
                return w
            up = torch.arange(1, n + 1, dtype=torch.float32) / (self.overlap + 1)
            if start > 0:
                w[:n] = torch.minimum(w[:n], up)
            if start + length < total:
                w[-n:] = torch.minimum(w[-n:], up.flip(0))
            return w

        return ramp(self.tile_h, y, self.height)[:, None] * ramp(self.tile_w, x, self.width)[None, :]


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    grid: Grid,
    out_grid: Grid | None = None,
    batch: int = 4,
) -> torch.Tensor:
    """Apply ``fn`` to every tile of ``x`` (B, C, H, W) and blend the results.

    ``fn`` maps a stack of tiles (n * B, C, tile_h, tile_w) to (n * B, C', tile_h', tile_w');
    ``out_grid`` places its outputs (default: ``grid``, same size). ``batch`` tiles go through
    ``fn`` per call. Returns (B, C', H', W'): the weighted average of the overlapping outputs,
    accumulated in at least fp32.
    """
    out_grid = out_grid or grid
    boxes, out_boxes = grid.boxes, out_grid.boxes
    images = x.shape[0]
    out = weight_sum = None
    for first in range(0, len(boxes), batch):
        chunk = range(first, min(first + batch, len(boxes)))
        tiles = torch.cat([x[..., r : r + grid.tile_h, c : c + grid.tile_w] for r, c in (boxes[i] for i in chunk)])
        result = fn(tiles)  # (n * B, C', tile_h', tile_w')
        if out is None:
            dtype = torch.promote_types(result.dtype, torch.float32)
            out = torch.zeros(images, result.shape[1], out_grid.height, out_grid.width, dtype=dtype, device=result.device)
            weight_sum = torch.zeros(out_grid.height, out_grid.width, dtype=dtype, device=result.device)
        for k, i in enumerate(chunk):
            row, col = out_boxes[i]
            w = out_grid.weights(row, col).to(device=result.device, dtype=dtype)
            rows, cols = slice(row, row + out_grid.tile_h), slice(col, col + out_grid.tile_w)
            out[:, :, rows, cols] += w * result[k * images : (k + 1) * images]
            weight_sum[rows, cols] += w
    return (out / weight_sum).to(result.dtype)


# --- the three tiled stages -----------------------------------------------------------------


def latent_grid(latent_height: int, latent_width: int, tiling: Tiling, scale: int = 8) -> Grid:
    """The U-Net's tiles over a latent canvas (tile and overlap divided by the VAE's ``scale``)."""
    return Grid.cover(latent_height, latent_width, tiling.tile // scale, tiling.overlap // scale)


def needs_tiles(height: int, width: int, tiling: Tiling | None) -> bool:
    return tiling is not None and max(height, width) > tiling.tile


def encode(vae, images: torch.Tensor, tiling: Tiling | None) -> torch.Tensor:
    """``vae.encode_latent`` (B, 3, H, W) -> (B, 4, H/8, W/8), in tiles when the image is larger
    than a tile and ``tiling.vae`` is set."""
    if not (needs_tiles(*images.shape[-2:], tiling) and tiling.vae):
        return vae.encode_latent(images)
    scale = vae.config.downsample_factor
    grid = Grid.cover(*images.shape[-2:], tiling.tile, tiling.overlap, align=scale)
    return tiled_apply(vae.encode_latent, images, grid, grid.scaled(1 / scale), tiling.batch)


def decode(vae, latent: torch.Tensor, tiling: Tiling | None) -> torch.Tensor:
    """``vae.decode_latent`` (B, 4, h, w) -> (B, 3, 8h, 8w), in tiles when the image is larger
    than a tile and ``tiling.vae`` is set."""
    scale = vae.config.downsample_factor
    if not (needs_tiles(latent.shape[-2] * scale, latent.shape[-1] * scale, tiling) and tiling.vae):
        return vae.decode_latent(latent)
    grid = latent_grid(*latent.shape[-2:], tiling, scale)
    return tiled_apply(vae.decode_latent, latent, grid, grid.scaled(scale), tiling.batch)


def denoise(fn: Callable[[torch.Tensor], torch.Tensor], unet_input: torch.Tensor, tiling: Tiling | None,
            scale: int = 8) -> torch.Tensor:
    """One U-Net evaluation ``fn`` on (B, C, h, w), over latent tiles when the image is larger
    than a tile: the blended average of the tiles' predictions (MultiDiffusion)."""
    if not needs_tiles(unet_input.shape[-2] * scale, unet_input.shape[-1] * scale, tiling):
        return fn(unet_input)
    return tiled_apply(fn, unet_input, latent_grid(*unet_input.shape[-2:], tiling, scale), batch=tiling.batch)

"""A seeded procedural generator of SAR-EO scene pairs with known discrepancies.

What it models (all in pixels of about 1 m; numpy, vectorised; a 256x256 pair takes tens
of milliseconds):

- Land cover: rectangular parcels of vegetation, fields (row stripes) and bare soil, forest
  blobs from smooth value noise, urban parcels of paved ground with rectangular buildings of
  random height, roads of 4 px along parcel borders, and water from a noise threshold
  (water overrides everything, so roads stop at the shore).
- EO: a flat colour per class (fields and roofs vary per parcel/building), smooth tone and
  vegetation texture, building shadows cast towards the bottom-right, N(0, 0.01) noise.
- SAR, looking from the left (range grows with x): a backscatter coefficient per class
  (dark water and roads, mid fields/soil, textured vegetation, bright roofs); per building
  a layover strip of its height on the sensor side, a double-bounce line on its sensor-facing
  wall, and a radar shadow behind it; then multiplicative Gamma speckle of ``looks`` looks
  (mean 1), and intensity in dB from -30 to +10 mapped to [-1, 1]. One channel (single-pol).
- Injected problems, with masks: ``discrepancies`` objects present in one image only
  (ships on water, vehicles on roads, else on open ground; flat, no shadow or layover, so
  the mask is their footprint exactly), and ``misregistrations`` square patches of the SAR
  moved by a small integer offset (``shift``: SAR pixel (y, x) shows the scene at
  (y + dy, x + dx)). Objects are placed after the shift, at their true positions.
- ``redraw_eo``: another EO image of a scene's layout, with what the SAR cannot show (roof and
  field colours, tone, texture, noise) drawn afresh: what a perfect translator could produce.

What it does not imitate: real sensor geometry (incidence angle, foreshortening of terrain),
polarimetry, side lobes and point targets, sub-pixel or smooth misregistration, objects seen
in both images, seasons, clouds, and the spectral realism of EO. Each stage draws from its
own seeded stream, so switching injections off changes nothing else: that is what lets the
tests check the masks against a clean twin of the same scene.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cdiff.data.imageio import to_uint8, write_png
from cdiff.files import atomic_path, check_output, write_text
from cdiff.progress import progress

CLASSES = ("water", "vegetation", "fields", "bare_soil", "road", "building")
WATER, VEGETATION, FIELDS, BARE, ROAD, BUILDING = range(len(CLASSES))

# EO colours (RGB in [0, 1]) and SAR backscatter (linear intensity) per class.
_EO_COLOUR = np.array(
    [[0.08, 0.15, 0.22], [0.13, 0.27, 0.10], [0.50, 0.47, 0.28], [0.46, 0.38, 0.30], [0.32, 0.32, 0.33], [0.60, 0.60, 0.60]],
    dtype=np.float32,
)
_FIELD_COLOURS = np.array([[0.50, 0.47, 0.28], [0.36, 0.46, 0.20], [0.62, 0.55, 0.36]], dtype=np.float32)
_ROOF_COLOURS = np.array([[0.70, 0.70, 0.68], [0.55, 0.30, 0.24], [0.30, 0.30, 0.32], [0.80, 0.76, 0.66]], dtype=np.float32)
_VEHICLE_COLOURS = np.array([[0.75, 0.10, 0.10], [0.92, 0.92, 0.92], [0.10, 0.20, 0.60], [0.90, 0.80, 0.10]], dtype=np.float32)
_SHIP_COLOUR = np.array([0.86, 0.86, 0.82], dtype=np.float32)
_SIGMA0 = np.array([0.003, 0.08, 0.04, 0.025, 0.008, 0.12], dtype=np.float32)
_SHADOW_SIGMA0, _LAYOVER_SIGMA0, _DOUBLE_BOUNCE_SIGMA0 = 0.001, 0.25, 2.5
_DB_RANGE = (-30.0, 10.0)  # dB mapped to [-1, 1]
_ROAD_WIDTH = 4


@dataclass(frozen=True)
class SynthPair:
    """One generated pair. Images in [-1, 1]; masks bool (H, W).

    sar: (H, W) float32, single-pol. eo: (H, W, 3) float32 RGB.
    discrepancy = sar_only | eo_only: footprints of objects present in one image only.
    misregistration: the SAR patches moved by ``shift`` ((2, H, W) int16: dy, dx; 0 elsewhere).
    landcover: (H, W) uint8 class index into CLASSES (before objects).
    sigma0: (H, W) float32 SAR backscatter before speckle (after shift and objects).
    """

    sar: np.ndarray
    eo: np.ndarray
    discrepancy: np.ndarray
    sar_only: np.ndarray
    eo_only: np.ndarray
    misregistration: np.ndarray
    shift: np.ndarray
    landcover: np.ndarray
    sigma0: np.ndarray


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise in [0, 1]: random values on a grid of ``cell`` px, bilinearly interpolated."""
    grid = rng.random((int(h / cell) + 2, int(w / cell) + 2)).astype(np.float32)
    y, x = np.arange(h) / cell, np.arange(w) / cell
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0).astype(np.float32)[:, None], (x - x0).astype(np.float32)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx  # (H, W)
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _fractal(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 3) -> np.ndarray:
    total = sum(0.5**k * _value_noise(rng, h, w, max(cell / 2**k, 1.0)) for k in range(octaves))
    return total / sum(0.5**k for k in range(octaves))


def _cuts(rng: np.random.Generator, n: int, lo: int, hi: int) -> np.ndarray:
    """Parcel borders along one axis: cumulative random widths in [lo, hi), starting at 0."""
    widths = rng.integers(lo, hi, size=n // lo + 2)
    edges = np.concatenate([[0], np.cumsum(widths)])
    return edges[edges < n]


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``out[y, x] = mask[y - dy, x - dx]`` (False where that falls outside)."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _scene(rng: np.random.Generator, h: int, w: int):
    """Land cover, per-pixel EO colour, building heights, the field stripe pattern, and the colour
    groups: (H, W) int32, one id per field parcel and per building (the pixels that share a drawn
    colour), -1 where the colour is the class's own."""
    ycuts, xcuts = _cuts(rng, h, 24, 64), _cuts(rng, w, 24, 64)
    iy = np.searchsorted(ycuts, np.arange(h), side="right") - 1  # parcel row of each pixel row
    ix = np.searchsorted(xcuts, np.arange(w), side="right") - 1
    ny, nx = len(ycuts), len(xcuts)
    parcel_class = rng.choice([VEGETATION, FIELDS, BARE], p=[0.3, 0.45, 0.25], size=(ny, nx))
    field_variant = rng.integers(0, len(_FIELD_COLOURS), size=(ny, nx))
    stripes_along_x = rng.random((ny, nx)) < 0.5
    landcover = parcel_class[iy][:, ix].astype(np.uint8)  # (H, W)

    # Row stripes of fields (period 6 px), oriented per parcel.
    yy, xx = np.arange(h)[:, None], np.arange(w)[None, :]
    stripe = np.where(stripes_along_x[iy][:, ix], np.sin(2 * np.pi * xx / 6), np.sin(2 * np.pi * yy / 6))
    stripe = (0.5 + 0.5 * stripe).astype(np.float32)

    # Urban parcels cluster where a coarse noise is high.
    urban_noise = _value_noise(rng, h, w, 96)
    centres = urban_noise[np.minimum((ycuts + 12), h - 1)][:, np.minimum(xcuts + 12, w - 1)]  # (ny, nx)
    urban_parcel = centres > np.quantile(centres, 1 - rng.uniform(0.2, 0.5))
    urban = urban_parcel[iy][:, ix]
    forest = (_fractal(rng, h, w, 40) > 0.62) & ~urban
    landcover[forest] = VEGETATION
    landcover[urban] = BARE

    colour = _EO_COLOUR[landcover]  # (H, W, 3)
    fields = landcover == FIELDS
    colour[fields] = _FIELD_COLOURS[field_variant[iy][:, ix]][fields]

    # Buildings: each urban parcel split into blocks, one building per block, inset by 3 px.
    height = np.zeros((h, w), dtype=np.int16)
    group = np.where(fields, iy[:, None] * nx + ix[None, :], -1).astype(np.int32)
    buildings = 0
    ybounds, xbounds = np.append(ycuts, h), np.append(xcuts, w)
    for py, px in zip(*np.nonzero(urban_parcel)):
        y0, y1, x0, x1 = ybounds[py] + 3, ybounds[py + 1] - 3, xbounds[px] + 3, xbounds[px + 1] - 3
        if y1 - y0 < 6 or x1 - x0 < 6:
            continue
        ys = np.linspace(y0, y1, max(1, (y1 - y0) // int(rng.integers(12, 24))) + 1).astype(int)
        xs = np.linspace(x0, x1, max(1, (x1 - x0) // int(rng.integers(12, 24))) + 1).astype(int)
        for by0, by1 in zip(ys[:-1], ys[1:]):
            for bx0, bx1 in zip(xs[:-1], xs[1:]):
                if rng.random() < 0.15:
                    continue  # an empty lot
                sl = (slice(by0 + 1, by1 - 1), slice(bx0 + 1, bx1 - 1))
                height[sl] = rng.integers(2, 10)
                colour[sl] = _ROOF_COLOURS[rng.integers(len(_ROOF_COLOURS))]
                group[sl] = ny * nx + buildings  # after the parcel ids
                buildings += 1
    landcover[height > 0] = BUILDING

    # Roads along about half of the parcel borders (all borders of urban parcels would be a grid).
    road = np.zeros((h, w), dtype=bool)
    for c in ycuts[1:][rng.random(len(ycuts) - 1) < 0.5]:
        road[max(c - _ROAD_WIDTH // 2, 0) : c + _ROAD_WIDTH // 2] = True
    for c in xcuts[1:][rng.random(len(xcuts) - 1) < 0.5]:
        road[:, max(c - _ROAD_WIDTH // 2, 0) : c + _ROAD_WIDTH // 2] = True
    landcover[road] = ROAD

    water_noise = _fractal(rng, h, w, 64)
    water = water_noise < np.quantile(water_noise, rng.uniform(0.05, 0.3))
    landcover[water] = WATER
    height[landcover != BUILDING] = 0
    # Roads and water over a field keep nothing of it: the EO shows what the SAR shows.
    keep = (landcover != BUILDING) & (landcover != FIELDS)
    colour[keep] = _EO_COLOUR[landcover[keep]]
    group[keep] = -1
    return landcover, colour, height, stripe, group


def _layover_shadow(height: np.ndarray):
    """SAR geometry of buildings seen from the left: layover, double bounce and shadow masks."""
    building = height > 0
    near_edge = building & ~_shift(building, 0, 1)  # sensor-facing wall: no building to the left
    far_edge = building & ~_shift(building, 0, -1)
    layover = np.zeros_like(building)
    shadow = np.zeros_like(building)
    for k in range(1, int(height.max(initial=0)) + 1):
        layover |= _shift(near_edge & (height >= k), 0, -k)  # tall walls appear closer to the sensor
        shadow |= _shift(far_edge & (height >= k), 0, k)
    return layover & ~building, near_edge, shadow & ~building & ~layover


def _eo_shadow(height: np.ndarray) -> np.ndarray:
    building = height > 0
    shadow = np.zeros_like(building)
    for k in range(1, int(height.max(initial=0)) // 2 + 1):
        shadow |= _shift(building & (height >= 2 * k), k, k)
    return shadow & ~building


def _misregister(rng: np.random.Generator, h: int, w: int, count: int, max_shift: int):
    """(mask, shift (2, H, W)) for ``count`` square patches moved by up to ``max_shift`` px."""
    shift = np.zeros((2, h, w), dtype=np.int16)
    mask = np.zeros((h, w), dtype=bool)
    if count == 0 or max_shift == 0:
        return mask, shift
    lo = max(4, min(h, w) // 8)
    hi = max(lo + 1, min(h, w) // 4)
    for _ in range(count):
        side = int(rng.integers(lo, hi))
        y0, x0 = int(rng.integers(0, max(h - side, 0) + 1)), int(rng.integers(0, max(w - side, 0) + 1))
        dy, dx = 0, 0
        while dy == 0 and dx == 0:
            dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
        shift[0, y0 : y0 + side, x0 : x0 + side] = dy
        shift[1, y0 : y0 + side, x0 : x0 + side] = dx
        mask[y0 : y0 + side, x0 : x0 + side] = True
    return mask, shift


def _place_objects(rng: np.random.Generator, landcover: np.ndarray, count: int):
    """Footprints (y0, y1, x0, x1, is_ship, in_sar) of ``count`` non-overlapping objects."""
    h, w = landcover.shape
    occupied = np.zeros((h, w), dtype=bool)
    objects = []
    water, road = landcover == WATER, landcover == ROAD
    ground = ~np.isin(landcover, (WATER, BUILDING))
    for _ in range(count):
        ship = bool(water.any() and (not road.any() or rng.random() < 0.5))
        allowed = water if ship else (road if road.any() else ground)
        length, width = (int(rng.integers(8, 15)), int(rng.integers(3, 5))) if ship else (int(rng.integers(4, 7)), int(rng.integers(2, 4)))
        dh, dw = (length, width) if rng.random() < 0.5 else (width, length)
        candidates = np.flatnonzero(allowed)
        in_sar = bool(rng.random() < 0.5)
        for flat in rng.choice(candidates, size=min(30, candidates.size), replace=False) if candidates.size else []:
            y0, x0 = divmod(int(flat), w)
            y1, x1 = y0 + dh, x0 + dw
            if y1 <= h and x1 <= w and allowed[y0:y1, x0:x1].all() and not occupied[y0:y1, x0:x1].any():
                occupied[y0:y1, x0:x1] = True
                objects.append((y0, y1, x0, x1, ship, in_sar))
                break
    return objects


def _shape_and_streams(seed, size) -> tuple[int, int, list[np.random.Generator]]:
    """(H, W, the pair's 7 random streams): each stage of the generator draws from its own."""
    h, w = (size, size) if isinstance(size, int) else size
    if min(h, w) < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return h, w, [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(7)]


def _eo_image(landcover, colour, height, stripe, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(EO (H, W, 3) in [0, 1] before objects and noise, tone (H, W)): colour x tone (x texture on
    vegetation) x shadow, and the field rows."""
    h, w = landcover.shape
    tone = 0.85 + 0.3 * _fractal(rng, h, w, 48)
    texture = np.where(landcover == VEGETATION, 0.7 + 0.6 * _value_noise(rng, h, w, 3), 1.0)
    eo = colour * (tone * texture * np.where(_eo_shadow(height), 0.55, 1.0))[..., None]
    fields = landcover == FIELDS
    eo[fields] *= (0.85 + 0.15 * stripe[fields])[:, None]
    return eo, tone


def _eo_noise(eo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The sensor's N(0, 0.01) noise, clipped, mapped to [-1, 1]."""
    eo = eo + rng.normal(0.0, 0.01, size=eo.shape).astype(np.float32)
    return np.clip(eo, 0.0, 1.0) * 2.0 - 1.0


def redraw_eo(seed: int, size: int | tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Another EO image of the scene of ``make_pair(seed, size)``, (H, W, 3) float32 in [-1, 1].

    The same land cover, buildings and field rows (all that the SAR shows), with what the SAR
    cannot show drawn afresh from ``rng``: the colour of each roof and field parcel, the tone,
    the vegetation texture and the sensor noise; no injected objects. A draw from the EO's
    distribution given the scene's layout: what a perfect translator could sample at best
    (studies/synthetic/report.py measures that ceiling).
    """
    h, w, streams = _shape_and_streams(seed, size)
    landcover, colour, height, stripe, group = _scene(streams[0], h, w)
    colour = colour.copy()
    for gid in np.unique(group[group >= 0]):
        members = group == gid
        palette = _ROOF_COLOURS if landcover[members][0] == BUILDING else _FIELD_COLOURS
        colour[members] = palette[rng.integers(len(palette))]
    eo, _ = _eo_image(landcover, colour, height, stripe, rng)
    return _eo_noise(eo, rng).astype(np.float32)


def make_pair(
    seed: int,
    size: int | tuple[int, int] = 256,
    looks: float | None = 4.0,
    discrepancies: int = 3,
    misregistrations: int = 2,
    max_shift: int = 3,
) -> SynthPair:
    """Generate the pair of ``seed`` (a non-negative int) at ``size`` (side, or (H, W)).

    ``looks``: number of looks of the Gamma speckle (None: no speckle). ``discrepancies``:
    objects to inject in one image only (fewer if no room is found; the masks say which).
    ``misregistrations``: SAR patches shifted by up to ``max_shift`` px.
    """
    if looks is not None and not looks > 0:
        raise ValueError(f"looks must be positive or None, got {looks}")
    if discrepancies < 0 or misregistrations < 0 or max_shift < 0:
        raise ValueError("discrepancies, misregistrations and max_shift must be >= 0")
    h, w, streams = _shape_and_streams(seed, size)
    g_scene, g_eo, g_sar, g_misreg, g_objects, g_speckle, g_eo_noise = streams

    landcover, colour, height, stripe, _ = _scene(g_scene, h, w)
    eo, tone = _eo_image(landcover, colour, height, stripe, g_eo)
    fields = landcover == FIELDS

    # SAR backscatter: class value x texture, building geometry, then the misregistration.
    sigma0 = _SIGMA0[landcover] * (0.6 + 0.8 * _fractal(g_sar, h, w, 24, 2))
    sigma0 = np.where(fields, sigma0 * (0.5 + stripe), sigma0)
    sigma0 = np.where(landcover == VEGETATION, sigma0 * (0.4 + 1.2 * _value_noise(g_sar, h, w, 3)), sigma0)
    layover, double_bounce, shadow = _layover_shadow(height)
    sigma0[shadow] = _SHADOW_SIGMA0
    sigma0[layover] += _LAYOVER_SIGMA0
    sigma0[double_bounce] = _DOUBLE_BOUNCE_SIGMA0
    misregistration, shift = _misregister(g_misreg, h, w, misregistrations, max_shift)
    if misregistration.any():
        yy, xx = np.indices((h, w))
        sigma0 = sigma0[np.clip(yy + shift[0], 0, h - 1), np.clip(xx + shift[1], 0, w - 1)]

    # Objects in one image only, at their true positions.
    sar_only = np.zeros((h, w), dtype=bool)
    eo_only = np.zeros((h, w), dtype=bool)
    for y0, y1, x0, x1, ship, in_sar in _place_objects(g_objects, landcover, discrepancies):
        if in_sar:
            sigma0[y0:y1, x0:x1] = g_objects.uniform(1.0, 2.0)
            sar_only[y0:y1, x0:x1] = True
        else:
            obj_colour = _SHIP_COLOUR if ship else _VEHICLE_COLOURS[g_objects.integers(len(_VEHICLE_COLOURS))]
            eo[y0:y1, x0:x1] = obj_colour * tone[y0:y1, x0:x1, None]
            eo_only[y0:y1, x0:x1] = True

    eo = _eo_noise(eo, g_eo_noise)
    intensity = sigma0 * g_speckle.gamma(looks, 1.0 / looks, size=(h, w)) if looks is not None else sigma0
    db = 10.0 * np.log10(np.maximum(intensity, 1e-6))
    lo, hi = _DB_RANGE
    sar = np.clip((db - lo) / (hi - lo), 0.0, 1.0) * 2.0 - 1.0
    return SynthPair(
        sar=sar.astype(np.float32),
        eo=eo.astype(np.float32),
        discrepancy=sar_only | eo_only,
        sar_only=sar_only,
        eo_only=eo_only,
        misregistration=misregistration,
        shift=shift,
        landcover=landcover,
        sigma0=sigma0.astype(np.float32),
    )


def pair_name(seed: int) -> str:
    """The name of the pair generated from ``seed``: ``synth_000042``."""
    return f"synth_{seed:06d}"


class SyntheticPairs(Dataset):
    """``count`` generated pairs; pair ``i`` comes from seed ``seed + i``.

    Samples: ``{"sar": (3, H, W), "eo": (3, H, W)`` float32 in [-1, 1] (SAR repeated to 3
    channels), ``"discrepancy", "misregistration": (1, H, W)`` float32 in {0, 1},
    ``"name"}``; ``transform`` (e.g. PairAugment) moves masks with the images.
    """

    def __init__(self, count: int, size: int = 256, seed: int = 0, looks: float | None = 4.0, discrepancies: int = 3,
                 misregistrations: int = 2, max_shift: int = 3, transform=None):
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.count, self.seed, self.transform = count, seed, transform
        self.options = dict(size=size, looks=looks, discrepancies=discrepancies, misregistrations=misregistrations,
                            max_shift=max_shift)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} pairs")
        pair = make_pair(self.seed + index, **self.options)
        sar = torch.from_numpy(pair.sar)[None].expand(3, -1, -1).contiguous()  # (3, H, W)
        sample = {
            "sar": sar,
            "eo": torch.from_numpy(np.ascontiguousarray(pair.eo.transpose(2, 0, 1))),  # (3, H, W)
            "discrepancy": torch.from_numpy(pair.discrepancy[None].astype(np.float32)),
            "misregistration": torch.from_numpy(pair.misregistration[None].astype(np.float32)),
            "name": pair_name(self.seed + index),
        }
        return self.transform(sample) if self.transform is not None else sample


def write_synthetic(out_dir: str | os.PathLike, count: int, size: int | tuple[int, int] = 256, seed: int = 0,
                    looks: float | None = 4.0, discrepancies: int = 3, misregistrations: int = 2, max_shift: int = 3,
                    show_progress: bool = True, overwrite: bool = False) -> Path:
    """Write ``count`` pairs into ``out_dir`` in the generic layout; return ``out_dir``.

    ``sar/NAME.png`` (8-bit grey), ``eo/NAME.png`` (RGB), ``discrepancy/NAME.png`` and
    ``misregistration/NAME.png`` (0 / 255), ``pairs.csv`` (columns sar, eo, discrepancy,
    misregistration) and ``synth.json`` (the parameters). The dataset appears complete or
    not at all: it is written into a temporary folder beside ``out_dir`` and renamed when
    done, so Ctrl-C or an error leaves nothing. An existing ``out_dir`` must be empty unless
    ``overwrite`` (its contents are then replaced, once the new dataset is whole). Sides
    must be multiples of 64, as the pipeline takes them. The same arguments give the same bytes.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    h, w = (size, size) if isinstance(size, int) else size
    if h < 64 or w < 64 or h % 64 or w % 64:
        raise ValueError(f"--size must be a positive multiple of 64 (the pipeline's size rule), got {size}")
    out = check_output(out_dir, "folder", overwrite)
    options = dict(size=size, looks=looks, discrepancies=discrepancies, misregistrations=misregistrations,
                   max_shift=max_shift)
    rows = ["sar,eo,discrepancy,misregistration\n"]
    with atomic_path(out, is_dir=True, overwrite=overwrite) as tmp:
        for i in progress(range(count), desc="synth", enabled=show_progress):
            pair = make_pair(seed + i, **options)
            name = pair_name(seed + i)
            write_png(tmp / "sar" / f"{name}.png", to_uint8(pair.sar))
            write_png(tmp / "eo" / f"{name}.png", to_uint8(pair.eo))
            write_png(tmp / "discrepancy" / f"{name}.png", pair.discrepancy.astype(np.uint8) * 255)
            write_png(tmp / "misregistration" / f"{name}.png", pair.misregistration.astype(np.uint8) * 255)
            rows.append(f"sar/{name}.png,eo/{name}.png,discrepancy/{name}.png,misregistration/{name}.png\n")
        write_text(tmp / "pairs.csv", "".join(rows))
        write_text(tmp / "synth.json", json.dumps(dict(count=count, seed=seed, **options), indent=2) + "\n")
    return out

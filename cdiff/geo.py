"""SAR scenes in, EO scenes out: band mapping, nodata, and GeoTIFF through rasterio.

A SAR file becomes ``(H, W, 3)`` float32 in [-1, 1] with the dataset readers' channel
mapping (cdiff.data.datasets, cdiff.data.imageio):
- 1 band (single-pol): uint8 ``x / 127.5 - 1``, other dtypes a 1st-99th percentile stretch;
  repeated to three channels;
- 2 bands (dual-pol, co- then cross-pol, e.g. Sentinel-1 VV, VH): each band stretched on its
  own, then (co, cross, co): the SpaceNet6 layout (HH, cross, VV) with the one co-pol twice;
- 3 bands: an RGB rendering, scaled as one image;
- 4 bands (SpaceNet6 full-pol HH, HV, VH, VV): ``spacenet6_sar_to_rgb``, (HH, (HV + VH) / 2, VV);
- any other count is refused, naming the file.

Nodata: a pixel whose bands all equal the file's nodata value (or any NaN) is nodata. The
stretch statistics come from valid pixels only; nodata pixels enter the network as -1 and
are written back as nodata.

GeoTIFFs are read (cdiff.data.imageio.read_raster, as the dataset readers read them) and written
with rasterio (``pip install 'cdiffset[geo]'``, imported only inside those functions). The EO GeoTIFF
is 3-band uint8 RGB with the source's CRS, transform and nodata, so it overlays the SAR scene in
a GIS. A nodata value that uint8
cannot hold (e.g. -9999) becomes 0; valid EO pixels that happen to equal the nodata value
are nudged by one level so that they stay valid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdiff.data import imageio
from cdiff.files import atomic_path
from cdiff.imagefiles import TIFF_SUFFIXES


@dataclass
class GeoInfo:
    """Where a scene lies: rasterio's CRS and affine transform, and the nodata value."""

    crs: object
    transform: object
    nodata: float | None


@dataclass
class SarScene:
    sar: np.ndarray  # (H, W, 3) float32 in [-1, 1]; nodata pixels hold -1
    valid: np.ndarray | None  # (H, W) bool, None when every pixel is valid
    geo: GeoInfo | None  # None for files without georeferencing (PNG, JPEG)


def sar_to_rgb(array: np.ndarray, path: str | os.PathLike, valid: np.ndarray | None = None) -> np.ndarray:
    """(H, W, bands) SAR -> (H, W, 3) float32 in [-1, 1] (mapping in the module docstring).

    With ``valid`` (H, W) bool, statistics come from valid pixels and the rest is -1.
    """
    if array.ndim != 3:
        raise ValueError(f"SAR image {path} has shape {array.shape}; expected (H, W, bands)")
    bands = array.shape[2]
    if bands not in (1, 2, 3, 4):
        raise ValueError(
            f"SAR image {path} has {bands} bands; cdiff reads 1 (single-pol), 2 (dual-pol: co, cross), "
            "3 (RGB rendering) or 4 (SpaceNet6 full-pol: HH, HV, VH, VV)"
        )
    pixels = array if valid is None else array[valid][:, None, :]  # (N, 1, bands): valid pixels only
    if pixels.size == 0:
        raise ValueError(f"SAR image {path} has no valid pixel: every pixel is nodata")
    imageio.check_finite(pixels, path)
    imageio.check_not_constant(pixels, path)
    if bands == 4:
        rgb = imageio.spacenet6_sar_to_rgb(pixels, path)
    elif bands == 2:
        unit = imageio.percentile_stretch(pixels, per_band=True) * 2 - 1
        rgb = unit[..., [0, 1, 0]]
    else:
        unit = imageio.to_unit_range(pixels, path)
        rgb = np.repeat(unit, 3, axis=2) if bands == 1 else unit
    if valid is None:
        return rgb.astype(np.float32)
    out = np.full(array.shape[:2] + (3,), -1.0, dtype=np.float32)
    out[valid] = rgb[:, 0, :]
    return out


def nodata_mask(bands: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """(H, W) bool of valid pixels of (H, W, bands), or None when all are valid."""
    invalid = np.zeros(bands.shape[:2], dtype=bool)
    if bands.dtype.kind == "f":
        invalid |= np.isnan(bands).any(axis=2)
    if nodata is not None and not np.isnan(nodata):
        invalid |= (bands == nodata).all(axis=2)
    return None if not invalid.any() else ~invalid


def _rasterio():
    try:
        import rasterio
    except ImportError as err:
        raise ImportError("writing a GeoTIFF needs rasterio: pip install 'cdiffset[geo]'") from err
    return rasterio


def check_geotiff_support(paths, what: str) -> None:
    """Raise ImportError now, before any work, if any of ``paths`` is a TIFF and rasterio, which
    reads and writes them, is missing (not after hours of translating the other files)."""
    tiffs = [Path(p) for p in paths if Path(p).suffix.lower() in TIFF_SUFFIXES]
    if not tiffs:
        return
    try:
        import rasterio  # noqa: F401
    except ImportError:
        count = f"{len(tiffs)} {what}s are TIFFs" if len(tiffs) > 1 else f"1 {what} is a TIFF"
        raise ImportError(f"{count} (first: {tiffs[0]}), and GeoTIFFs need rasterio: "
                          "pip install 'cdiffset[geo]'") from None


def read_geotiff_scene(path: str | os.PathLike) -> SarScene:
    """A SAR GeoTIFF (1, 2, 3 or 4 bands) as a ``SarScene``; unreadable files raise naming it."""
    raster = imageio.read_raster(path)
    geo = GeoInfo(raster.crs, raster.transform, raster.nodata)
    valid = nodata_mask(raster.bands, geo.nodata)
    return SarScene(sar_to_rgb(raster.bands, path, valid), valid, geo)


def read_sar(path: str | os.PathLike) -> SarScene:
    """Any SAR file cdiff reads: TIFFs through rasterio (georeferencing kept), other images
    through Pillow (both cdiff.data.imageio)."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return read_geotiff_scene(path)
    array = imageio.read_image(path)
    return SarScene(sar_to_rgb(array, path), None, None)


def output_nodata(nodata: float | None, has_invalid: bool) -> int | None:
    """The EO file's nodata: the source's where uint8 holds it, else 0 if there is nodata."""
    if nodata is not None and not np.isnan(nodata) and float(nodata).is_integer() and 0 <= nodata <= 255:
        return int(nodata)
    return 0 if has_invalid else None


def mask_nodata(eo: np.ndarray, valid: np.ndarray | None, nodata: int | None) -> np.ndarray:
    """uint8 (H, W, 3) with nodata pixels set to ``nodata`` and valid bands that equal it nudged."""
    if nodata is None:
        return eo
    eo = eo.copy()
    nudge = nodata + 1 if nodata < 255 else nodata - 1
    eo[eo == nodata] = nudge
    if valid is not None:
        eo[~valid] = nodata
    return eo


def write_eo_geotiff(path: str | os.PathLike, eo: np.ndarray, scene: SarScene) -> None:
    """Write uint8 (H, W, 3) EO as an RGB GeoTIFF with ``scene``'s CRS, transform and nodata, atomically."""
    rasterio = _rasterio()
    if eo.dtype != np.uint8 or eo.ndim != 3 or eo.shape[2] != 3:
        raise ValueError(f"write_eo_geotiff({path}): expected uint8 (H, W, 3), got {eo.dtype} {eo.shape}")
    geo = scene.geo or GeoInfo(None, None, None)
    nodata = output_nodata(geo.nodata, scene.valid is not None)
    eo = mask_nodata(eo, scene.valid, nodata)
    profile = dict(driver="GTiff", height=eo.shape[0], width=eo.shape[1], count=3, dtype="uint8",
                   photometric="RGB", compress="deflate", nodata=nodata)
    if geo.crs is not None:
        profile["crs"] = geo.crs
    if geo.transform is not None:
        profile["transform"] = geo.transform
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as target:
            target.write(np.moveaxis(eo, -1, 0))

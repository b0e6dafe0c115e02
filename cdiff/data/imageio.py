"""Reading SAR and EO image files into arrays scaled to [-1, 1], and writing PNGs atomically.

Every reader returns ``(H, W, C)`` arrays and raises ``ValueError`` naming the file for
anything it cannot use (unreadable or truncated files, wrong band counts, NaN/Inf, a
constant SAR image). PNG/JPEG/TIFF go through Pillow; GeoTIFFs (and TIFFs Pillow cannot
decode, such as 4-band float32) go through rasterio (``pip install 'cdiffset[geo]'``, imported only
in :func:`read_raster`), the one GeoTIFF library of cdiff: the dataset readers and ``cdiff
translate`` (cdiff.geo) read them alike.

Scaling to [-1, 1] (``to_unit_range``):
- uint8 images: ``x / 127.5 - 1`` (0 -> -1, 255 -> 1), as the paper's release does.
- anything else (uint16, int32, float: e.g. 11-bit Maxar PS-RGB, float GeoTIFFs): one
  1st-99th percentile stretch over all bands together (so the colour balance is kept),
  clipped, then mapped to [-1, 1]. An image with no spread maps to -1, never divides by 0.
- SpaceNet6 full-pol SAR: ``spacenet6_sar_to_rgb``, per band (see its docstring).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cdiff.files import atomic_path
from cdiff.imagefiles import TIFF_SUFFIXES

# The release's guard on the stretch denominator (in data units).
STRETCH_EPS = 1.0 / 1024

# Pillow modes folded to a plain grey or RGB layout; any other mode is read as it is.
_TO_GREY = {"1": "L", "LA": "L", "La": "L"}
_TO_RGB = {"P": "RGB", "PA": "RGB", "RGBA": "RGB", "RGBa": "RGB", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to an ``(H, W, C)`` array in its own dtype, C = 1 (grey) or 3.

    Pillow reads PNG/JPEG/BMP/TIFF; a TIFF Pillow cannot decode falls through to
    :func:`read_geotiff`. Alpha channels and palettes are dropped/expanded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            mode = img.mode
            if mode in _TO_GREY:
                img = img.convert(_TO_GREY[mode])
            elif mode in _TO_RGB:
                img = img.convert(_TO_RGB[mode])
            array = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if path.suffix.lower() in TIFF_SUFFIXES:
            return read_geotiff(path)
        raise ValueError(f"cannot read image {path}: {err}") from err
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"image {path} has shape {array.shape}; expected a grey or RGB image")
    return array


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(H, W)`` of an image file from its header, without decoding the pixels.

    Catches what a header shows (not an image, an empty or cut header, an unknown format);
    damage further in (truncated pixel data) shows only when :func:`read_image` decodes.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            return height, width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if path.suffix.lower() not in TIFF_SUFFIXES:
            raise ValueError(f"cannot read image {path}: {err}") from err
    rasterio = _import_rasterio(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as source:
                return source.height, source.width
    except Exception as err:  # rasterio/GDAL raise several types for damaged files; all mean "unreadable"
        raise ValueError(f"cannot read GeoTIFF {path}: {type(err).__name__}: {err}") from err


def _import_rasterio(path: Path):
    try:
        import rasterio
    except ImportError as err:
        raise ImportError(f"reading the GeoTIFF {path} needs rasterio: pip install 'cdiffset[geo]'") from err
    return rasterio


@dataclass
class Raster:
    """A (Geo)TIFF's pixels and where they lie."""

    bands: np.ndarray  # (H, W, bands) in the file's own dtype
    crs: object  # rasterio's CRS, or None
    transform: object  # rasterio's affine pixel -> map transform (the identity without georeferencing)
    nodata: float | None


def read_raster(path: str | os.PathLike) -> Raster:
    """Read a (Geo)TIFF with rasterio: every band of its first image, and its georeferencing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    rasterio = _import_rasterio(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # a plain TIFF is fine
            with rasterio.open(path) as source:
                bands = np.moveaxis(source.read(), 0, -1)  # (bands, H, W) -> (H, W, bands)
                return Raster(bands, source.crs, source.transform, source.nodata)
    except Exception as err:  # rasterio/GDAL raise several types for damaged files; all mean "unreadable"
        raise ValueError(f"cannot read GeoTIFF {path}: {type(err).__name__}: {err}") from err


def read_geotiff(path: str | os.PathLike) -> np.ndarray:
    """The pixels of a (Geo)TIFF, ``(H, W, bands)`` in their own dtype (``read_raster``)."""
    return read_raster(path).bands


def check_finite(array: np.ndarray, path: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming ``path`` when ``array`` holds NaN or Inf."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"image {path} contains {bad} NaN/Inf values")


def check_not_constant(array: np.ndarray, path: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming ``path`` when every pixel of every band is the same value."""
    flat = array.reshape(-1)
    if flat.size == 0 or (flat == flat[0]).all():
        value = flat[0] if flat.size else "nothing"
        raise ValueError(f"SAR image {path} is constant ({value} everywhere): it carries no signal")


def percentile_stretch(array: np.ndarray, per_band: bool, p: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """Clip ``(H, W, C)`` to its ``p`` percentiles and map them to [0, 1] (float32).

    ``per_band`` stretches each band on its own (SpaceNet6 SAR, as the release does);
    otherwise one pair of percentiles serves all bands. A band with no spread between the
    percentiles maps to 0: the denominator is at least ``STRETCH_EPS``.
    """
    x = array.astype(np.float32)
    axes = (0, 1) if per_band else None
    lo, hi = np.percentile(x, p, axis=axes)  # (C,) each, or scalars
    lo = np.asarray(lo, dtype=np.float32)
    hi = np.asarray(hi, dtype=np.float32)
    return (np.clip(x, lo, hi) - lo) / np.maximum(hi - lo, STRETCH_EPS)


def to_unit_range(array: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Scale an ``(H, W, C)`` image to float32 in [-1, 1] (rules in the module docstring)."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 127.5 - 1.0
    check_finite(array, path)
    return percentile_stretch(array, per_band=False) * 2.0 - 1.0


def spacenet6_sar_to_rgb(array: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Map a 4-band (HH, HV, VH, VV) SAR intensity image to 3 channels in [-1, 1].

    Each band gets its own 1st-99th percentile stretch to [0, 1] (as the SpaceNet6 release
    data and the C-DiffSET feeder do); the channels are then (HH, (HV + VH) / 2, VV).
    ``array``: (H, W, 4) any real dtype. Returns (H, W, 3) float32.
    """
    if array.ndim != 3 or array.shape[2] != 4:
        raise ValueError(
            f"SpaceNet6 SAR {path} has {array.shape[2] if array.ndim == 3 else 1} bands; "
            "expected 4 (HH, HV, VH, VV)"
        )
    check_finite(array, path)
    check_not_constant(array, path)
    x = percentile_stretch(array, per_band=True)
    rgb = np.stack([x[..., 0], 0.5 * (x[..., 1] + x[..., 2]), x[..., 3]], axis=-1)
    return rgb * 2.0 - 1.0


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8 (-1 -> 0, 1 -> 255), rounding to nearest."""
    return np.clip(np.rint((np.asarray(unit, dtype=np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 ``(H, W)`` / ``(H, W, 1)`` grey or ``(H, W, 3)`` RGB array as a PNG, atomically."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_png({path}): expected uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")

"""SpaceNet6 chips as the field makes them: ``cdiff prepare spacenet6 SRC OUT``.

The published SpaceNet6 numbers (GeoSET's tables) are made on 256-px chips rendered once
from the 900-px tiles of the frozen lists (cdiff.data.frozen), the recipe of GeoSET's
``splits/README.md`` and ``scripts/datasets/build_spacenet6.py``:

- EO: the 3-band uint8 ``PS-RGB`` tile resized to 256 x 256, bicubic.
- SAR: bands HH, HV and VV (1st, 2nd and 4th) of the 4-band ``SAR-Intensity`` tile (HH, HV,
  VH, VV; VH is not used), in dB ``10 * log10(max(x, 1e-3))``, mapped linearly from the fixed
  per-band window ``[lo, hi]`` of ``sar_stretch.json`` to [0, 1], clipped, times 255 and
  truncated to uint8 (float32 arithmetic throughout), then resized to 256 x 256, bilinear.
- Resizing is Pillow's ``Image.resize`` on the uint8 image, which filters with a kernel
  widened by the scale (antialiased), as the field's chips were made.

``SRC`` is the folder holding ``train/AOI_11_Rotterdam/{PS-RGB,SAR-Intensity}/`` (the
extracted training archive); ``OUT`` receives ``{train,test}A/<stem>.png`` (SAR) and
``{train,test}B/<stem>.png`` (EO), ``<stem>`` the EO file name without ``_PS-RGB`` and
``.tif`` (the field's layout, read by ``cdiff.data.datasets.spacenet6_chips``).

Georeferencing: every chip keeps its tile's CRS and transform, scaled for the resize (a
256-px chip of a 900-px tile has pixels 900/256 times larger), in a GDAL sidecar
``<stem>.png.aux.xml`` that GDAL, rasterio and QGIS read with the PNG. Reading the tiles
needs rasterio (``pip install 'cdiffset[geo]'``).

Every listed tile is checked to exist before any work (one error counts the missing ones);
chips are written atomically, a rerun skips chips already written, and a bad tile stops
the run with one error naming it. When a whole list has been built, the chip folders'
pixel digests are compared with the ones GeoSET publishes, so a rebuild can be checked
bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

from cdiff.data.frozen import check_listed_files, frozen_file, read_frozen, shipped_path, spacenet6_chip_stem
from cdiff.files import atomic_path, check_output
from cdiff.progress import Bar

log = logging.getLogger(__name__)

CHIP = 256  # chip side in pixels
MIN_INTENSITY = np.float32(1e-3)  # intensities are clamped to this before log10 (-30 dB)
WINDOW_EPS = np.float32(1e-6)  # guard on the window width
SAR_BANDS = (0, 1, 3)  # HH, HV, VV of the (HH, HV, VH, VV) SAR-Intensity tiles
SPLITS = ("train", "test")

# GeoSET's published pixel digests of the complete chip folders (splits/README.md): SHA-256
# over the folder's PNGs in file-name order, each adding its name, str(shape) of the decoded
# uint8 array and the raw pixels.
CHIP_DIGESTS = {
    "trainA": (2558, "0070c62bd124960a8ebbbfc39bdff10eea43a8be9174b5ef7a7b07da62ecbdf7"),
    "trainB": (2558, "04a25df47eb30a1d118ab3a75ac31d3973a96a35ae3d615be36c9c77aef76733"),
    "testA": (495, "aa68f5bc549cf2185b3e9277c6551226ef2b72c0fea4243bbff03bf8bde6d602"),
    "testB": (495, "92cf94b769e1f154621ab069e8cd994c958a3551a4153e6851cd10b66456dcdc"),
}


def sar_window() -> tuple[np.ndarray, np.ndarray]:
    """The fixed per-band dB window (lo, hi), each (3,) float32 for HH, HV, VV, from sar_stretch.json."""
    window = json.loads(shipped_path(frozen_file("spacenet6/sar_stretch.json")).read_text())
    if window.get("bands") != ["HH", "HV", "VV"]:
        raise ValueError(f"sar_stretch.json describes bands {window.get('bands')}, expected HH, HV, VV")
    return np.asarray(window["lo"], np.float32), np.asarray(window["hi"], np.float32)


def sar_to_uint8(intensity: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(4, H, W) SAR intensities (HH, HV, VH, VV) -> (H, W, 3) uint8 HH, HV, VV through the dB window."""
    x = intensity[list(SAR_BANDS)].astype(np.float32)  # (3, H, W)
    db = np.float32(10.0) * np.log10(np.maximum(x, MIN_INTENSITY))
    unit = (db - lo[:, None, None]) / np.maximum(hi - lo, WINDOW_EPS)[:, None, None]
    return (np.clip(unit, 0, 1) * np.float32(255)).astype(np.uint8).transpose(1, 2, 0)  # (H, W, 3); truncates


def resize(image: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 with Pillow's (antialiased) resampling."""
    return np.asarray(Image.fromarray(image).resize((size, size), resample))


@dataclass(frozen=True)
class Tile:
    eo: Path
    sar: Path
    stem: str
    split: str


def chip_tiles(src: str | os.PathLike, splits=SPLITS, limit: int | None = None) -> list[Tile]:
    """The tiles of the frozen lists, in list order (the first ``limit`` of each list)."""
    src = Path(src)
    tiles = []
    for split in splits:
        for rel in read_frozen("spacenet6", split)[:limit]:
            tiles.append(Tile(src / rel, src / rel.replace("PS-RGB", "SAR-Intensity"), spacenet6_chip_stem(rel), split))
    return tiles


def prepare_spacenet6(src: str | os.PathLike, out: str | os.PathLike, *, splits=SPLITS, size: int = CHIP,
                      limit: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Build the field's SpaceNet6 chips of ``splits`` from the tiles under ``src`` into ``out``.

    ``limit``: only the first ``limit`` tiles of each list (a quick look; no digest check).
    ``overwrite``: rebuild chips that exist (default: skip them). Returns a summary with the
    chip counts and, for complete folders, whether they match GeoSET's pixel digests.
    """
    _import_rasterio()  # before any work: the geo extra may be missing
    src, out = Path(src), Path(out)
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"SpaceNet6 split must be one of {SPLITS}, got {split!r}")
    if not src.is_dir():
        raise FileNotFoundError(f"SpaceNet6 source folder not found: {src} (expected train/AOI_11_Rotterdam/ in it)")
    if size < 1:
        raise ValueError(f"chip size must be positive, got {size}")
    check_output(out, kind="folder", overwrite=True)  # kind and permissions; existing chips are reused
    tiles = chip_tiles(src, splits, limit)
    check_listed_files([p for t in tiles for p in (t.eo, t.sar)],
                       f"the frozen SpaceNet6 lists ({', '.join(splits)}) under {src}")
    lo, hi = sar_window()
    written = skipped = 0
    bar = Bar(len(tiles), desc="SpaceNet6 chips", enabled=progress)
    for i, tile in enumerate(tiles):
        eo_out = out / f"{tile.split}B" / f"{tile.stem}.png"
        sar_out = out / f"{tile.split}A" / f"{tile.stem}.png"
        if not overwrite and eo_out.is_file() and sar_out.is_file():
            skipped += 1
        else:
            build_chip_pair(tile, eo_out, sar_out, lo, hi, size)
            written += 1
        bar.update(i + 1, f"{written} written, {skipped} already there")
    bar.close()
    summary = {"written": written, "skipped": skipped, "digests": {}}
    if limit is None and size == CHIP:
        for folder in (f"{s}{side}" for s in splits for side in "AB"):
            count, expected = CHIP_DIGESTS[folder]
            digest = chip_digest(out / folder)
            summary["digests"][folder] = digest == expected
            if digest != expected:
                log.warning("%s: pixel digest %s differs from GeoSET's %s (%d chips)", out / folder, digest, expected, count)
    return summary


def build_chip_pair(tile: Tile, eo_out: Path, sar_out: Path, lo: np.ndarray, hi: np.ndarray, size: int = CHIP) -> None:
    """Read one EO/SAR tile pair, render both chips and write them with their georeferencing."""
    eo, eo_geo = _read_tile(tile.eo)
    sar, sar_geo = _read_tile(tile.sar)
    if eo.shape[0] != 3 or eo.dtype != np.uint8:
        raise ValueError(f"SpaceNet6 EO tile {tile.eo} has {eo.shape[0]} band(s) of {eo.dtype}; expected 3 uint8 (PS-RGB)")
    if sar.shape[0] != 4:
        raise ValueError(f"SpaceNet6 SAR tile {tile.sar} has {sar.shape[0]} band(s); expected 4 (HH, HV, VH, VV)")
    if eo.shape[1:] != sar.shape[1:]:
        raise ValueError(f"SpaceNet6 tiles {tile.eo} ({eo.shape[1]}x{eo.shape[2]}) and {tile.sar} "
                         f"({sar.shape[1]}x{sar.shape[2]}) differ in size")
    if not np.isfinite(sar).all():
        raise ValueError(f"SpaceNet6 SAR tile {tile.sar} contains NaN/Inf")
    _write_chip(sar_out, resize(sar_to_uint8(sar, lo, hi), size, Image.Resampling.BILINEAR), sar_geo, size)
    _write_chip(eo_out, resize(eo.transpose(1, 2, 0), size, Image.Resampling.BICUBIC), eo_geo, size)


def _import_rasterio():
    try:
        import rasterio
    except ImportError as err:
        raise ImportError("cdiff prepare spacenet6 reads GeoTIFFs with rasterio: pip install 'cdiffset[geo]'") from err
    return rasterio


def _read_tile(path: Path):
    """(bands, H, W) array in its own dtype and (crs, transform, width, height) of a GeoTIFF."""
    rasterio = _import_rasterio()
    try:
        with rasterio.open(path) as src:
            return src.read(), (src.crs, src.transform, src.width, src.height)
    except rasterio.errors.RasterioError as err:
        raise ValueError(f"cannot read SpaceNet6 tile {path}: {err}") from err


def chip_transform(transform, width: int, height: int, size: int = CHIP):
    """The affine transform of a ``size``-px chip of a ``width`` x ``height`` tile: same origin,
    pixels ``width / size`` (``height / size``) times larger."""
    from affine import Affine  # rasterio's transform type

    sx, sy = width / size, height / size
    t = transform
    return Affine(t.a * sx, t.b * sy, t.c, t.d * sx, t.e * sy, t.f)  # transform @ scale(sx, sy), written out


def _write_chip(path: Path, image: np.ndarray, geo, size: int) -> None:
    """The PNG and, first, its GDAL sidecar (so a PNG on disk always has its georeferencing)."""
    crs, transform, width, height = geo
    if crs is not None:
        t = chip_transform(transform, width, height, size)
        geotransform = ", ".join(repr(float(v)) for v in (t.c, t.a, t.b, t.f, t.d, t.e))
        # No axis-mapping attribute: GDAL then reads the SRS in the (x, y) order transforms use.
        sidecar = (f"<PAMDataset>\n  <SRS>{escape(crs.to_wkt())}</SRS>\n"
                   f"  <GeoTransform>{geotransform}</GeoTransform>\n</PAMDataset>\n")
        with atomic_path(path.with_name(path.name + ".aux.xml")) as tmp:
            tmp.write_text(sidecar)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def chip_digest(folder: str | os.PathLike) -> str:
    """GeoSET's pixel digest of a chip folder (see CHIP_DIGESTS)."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.png")):
        with Image.open(path) as img:
            a = np.asarray(img)
        h.update(path.name.encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()

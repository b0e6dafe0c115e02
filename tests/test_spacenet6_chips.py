"""`cdiff prepare spacenet6`: the chips equal a direct computation of the field's recipe, keep
their tiles' georeferencing, and the builder resumes and refuses bad tiles (cdiff.data.spacenet6_chips)."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import numpy as np
import pytest
import torch

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import Affine, from_origin  # noqa: E402

from cdiff.cli import main  # noqa: E402
from cdiff.data import frozen, spacenet6_chips  # noqa: E402
from cdiff.data.spacenet6_chips import prepare_spacenet6  # noqa: E402

CRS = "EPSG:32631"  # UTM 31N, Rotterdam

# --- an independent reference of the resize: Pillow's separable resampling written out --------
# Pillow filters with the kernel stretched by the scale (antialiasing), normalises the weights,
# turns them into fixed point with 22 fraction bits, resamples rows then columns, and rounds to
# uint8 after each pass.

PRECISION_BITS = 22


def triangle(x):
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def cubic(x, a=-0.5):
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    return (((x - 5.0) * x + 8.0) * x - 4.0) * a if x < 2.0 else 0.0


def resample_axis1(img, out_size, kernel, support):
    """(H, W, C) int64 -> (H, out_size, C): one Pillow pass along the columns."""
    scale = img.shape[1] / out_size
    widen = max(scale, 1.0)
    out = np.empty((img.shape[0], out_size, img.shape[2]), np.int64)
    for j in range(out_size):
        center = (j + 0.5) * scale
        lo = max(int(center - support * widen + 0.5), 0)
        hi = min(int(center + support * widen + 0.5), img.shape[1])
        w = np.array([kernel((x + 0.5 - center) / widen) for x in range(lo, hi)])
        w /= w.sum()
        fixed = np.trunc(w * (1 << PRECISION_BITS) + np.where(w < 0, -0.5, 0.5)).astype(np.int64)
        acc = (1 << (PRECISION_BITS - 1)) + np.tensordot(img[:, lo:hi], fixed, axes=([1], [0]))
        out[:, j] = np.clip(acc >> PRECISION_BITS, 0, 255)
    return out


def pillow_resize(img, size, kernel, support):
    x = resample_axis1(img.astype(np.int64), size, kernel, support)
    return resample_axis1(x.transpose(1, 0, 2), size, kernel, support).transpose(1, 0, 2).astype(np.uint8)


def expected_sar_chip(intensity):
    """The recipe: HH, HV, VV in dB, the fixed window, x255 truncated, bilinear to 256."""
    window = json.loads((frozen.SPLITS_DIR / "spacenet6" / "sar_stretch.json").read_text())
    bands = []
    for band, lo, hi in zip((0, 1, 3), np.float32(window["lo"]), np.float32(window["hi"])):
        db = np.float32(10) * np.log10(np.maximum(intensity[band], np.float32(1e-3)))
        bands.append((np.clip((db - lo) / (hi - lo), 0, 1) * np.float32(255)).astype(np.uint8))
    return pillow_resize(np.stack(bands, -1), 256, triangle, 1.0)


def expected_eo_chip(eo):
    return pillow_resize(eo.transpose(1, 2, 0), 256, cubic, 2.0)


# --- synthetic tiles named after the real lists ---------------------------------------------


def tile_names(limit):
    return {split: (frozen.SPLITS_DIR / "spacenet6" / f"{split}.txt").read_text().splitlines()[:limit]
            for split in ("train", "test")}


def write_tiff(path, array, transform):
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype=array.dtype, crs=CRS, transform=transform) as dst:
        dst.write(array)


def make_tiles(src, limit=1, size=900, seed=0):
    """EO uint8 and SAR intensity tiles for the first ``limit`` names of each list; returns
    {stem: (split, eo, sar, transform)}."""
    rng = np.random.default_rng(seed)
    made = {}
    for split, names in tile_names(limit).items():
        for k, rel in enumerate(names):
            transform = from_origin(594_000 + 450.0 * k, 5_750_000 - 450.0 * (split == "test"), 0.5, 0.5)
            eo = rng.integers(0, 256, (3, size, size), dtype=np.uint8)
            # dB rising from -5 to 25 across the tile, +-2 dB of speckle (the window spans about 10 to
            # 17 dB, so both ends clip), no-data zeros and values under 1e-3.
            ramp = np.linspace(-5, 25, size)[None, None, :]
            sar = (10 ** ((ramp + rng.uniform(-2, 2, (4, size, size))) / 10)).astype(np.float32)
            sar[:, :40] = 0
            sar[:, 40:60] = 1e-5
            write_tiff(src / rel, eo, transform)
            write_tiff(src / rel.replace("PS-RGB", "SAR-Intensity"), sar, transform)
            made[PurePosixPath(rel).stem.replace("_PS-RGB", "")] = (split, eo, sar, transform)
    return made


def read_png(path):
    with rasterio.open(path) as chip:
        return chip.read().transpose(1, 2, 0), chip.crs, chip.transform


def test_chips_equal_the_recipe_and_keep_the_georeferencing(tmp_path):
    src, out = tmp_path / "spacenet6", tmp_path / "chips"
    made = make_tiles(src, limit=2)
    summary = prepare_spacenet6(src, out, limit=2, progress=False)
    assert summary == {"written": 4, "skipped": 0, "digests": {}}
    for stem, (split, eo, sar, transform) in made.items():
        sar_chip, sar_crs, sar_transform = read_png(out / f"{split}A" / f"{stem}.png")
        eo_chip, eo_crs, eo_transform = read_png(out / f"{split}B" / f"{stem}.png")
        np.testing.assert_array_equal(sar_chip, expected_sar_chip(sar))
        np.testing.assert_array_equal(eo_chip, expected_eo_chip(eo))
        assert 0 < (sar_chip == 0).mean() < 1 and (sar_chip == 255).any()  # the window clips both ends
        # Same CRS, same origin, pixels 900/256 times larger: the chip covers the tile.
        scale = 900 / 256
        for crs, t in ((sar_crs, sar_transform), (eo_crs, eo_transform)):
            assert crs == rasterio.crs.CRS.from_string(CRS)
            assert t == Affine(0.5 * scale, 0.0, transform.c, 0.0, -0.5 * scale, transform.f)
            far_corner = (t.c + 256 * t.a, t.f + 256 * t.e)
            assert far_corner == pytest.approx((transform.c + 900 * transform.a, transform.f + 900 * transform.e), abs=1e-9)


def test_a_rerun_skips_finished_chips_and_overwrite_rebuilds(tmp_path):
    src, out = tmp_path / "spacenet6", tmp_path / "chips"
    make_tiles(src, limit=1, size=90)
    assert prepare_spacenet6(src, out, limit=1, progress=False)["written"] == 2
    chip = next((out / "trainB").glob("*.png"))
    chip.write_bytes(b"not rebuilt")
    assert prepare_spacenet6(src, out, limit=1, progress=False) == {"written": 0, "skipped": 2, "digests": {}}
    assert chip.read_bytes() == b"not rebuilt"
    assert prepare_spacenet6(src, out, limit=1, overwrite=True, progress=False)["written"] == 2
    assert chip.read_bytes().startswith(b"\x89PNG")
    assert not list(out.rglob(".*tmp"))  # no temporaries left behind


def test_bad_tiles_give_one_clear_error(tmp_path):
    src, out = tmp_path / "spacenet6", tmp_path / "chips"
    names = tile_names(2)
    src.mkdir()
    with pytest.raises(FileNotFoundError, match=r"^8 of the 8 files named by the frozen SpaceNet6 lists .* missing"):
        prepare_spacenet6(src, out, limit=2, progress=False)
    make_tiles(src, limit=1, size=90)
    with pytest.raises(FileNotFoundError, match=r"^4 of the 8 files .* e\.g\. .*tile_8683\.tif"):
        prepare_spacenet6(src, out, limit=2, progress=False)
    assert not out.exists()  # nothing is written before every tile is there
    bad = src / names["train"][0]
    write_tiff(bad, np.zeros((4, 90, 90), np.uint8), from_origin(0, 0, 1, 1))
    with pytest.raises(ValueError, match=f"EO tile {bad} has 4 band"):
        prepare_spacenet6(src, out, limit=1, progress=False)
    with pytest.raises(ValueError, match="split must be one of"):
        prepare_spacenet6(src, out, splits=("val",), progress=False)


def test_chips_reader_and_command(tmp_path, capsys):
    src, out = tmp_path / "spacenet6", tmp_path / "chips"
    make_tiles(src, limit=1, size=90)
    assert main(["prepare", "spacenet6", str(src), str(out), "--limit", "1", "--split", "test"]) == 0
    assert "1 chip pairs written" in capsys.readouterr().out and not (out / "trainA").exists()
    ds = spacenet6_chips(out, "test", frozen=False, transform=None)
    (pair,) = ds.pairs
    sample = ds[0]
    eo_chip = read_png(pair.eo)[0]
    torch.testing.assert_close(sample["eo"], torch.from_numpy(eo_chip.transpose(2, 0, 1) / 127.5 - 1).float())
    assert sample["sar"].shape == (3, 256, 256) and sample["name"] == pair.eo.stem
    assert main(["prepare", "spacenet6", str(tmp_path / "nowhere"), str(out)]) == 2
    assert "SpaceNet6 source folder not found" in capsys.readouterr().err

"""Every kind of bad input gets an error naming the file, or, with on_error="skip", a logged
and counted skip; a dataset left empty is an error."""

import logging
import sys

import numpy as np
import pytest
import tifffile

from cdiff.data import csv_pairs, folder_pairs, qxs_saropt, read_split, spacenet6
from cdiff.data.imageio import read_geotiff
from cdiff.testing import grey, png, quadrant_bands, rgb, sn6_paths


def folders(root, n=3, h=16, w=16):
    for k in range(n):
        png(root / "eo" / f"p{k}.png", rgb(k, 1, 2, h, w))
        png(root / "sar" / f"p{k}.png", grey(50 + k, h, w))
    return root


def test_missing_sar_partner_raises_or_skips(tmp_path, caplog):
    folders(tmp_path)
    (tmp_path / "sar" / "p1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"SAR partner of EO image .*eo/p1.png not found: expected .*sar/p1.png"):
        folder_pairs(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cdiff.data.datasets"):
        ds = folder_pairs(tmp_path, on_error="skip")
    assert len(ds) == 2 and ds.num_skipped == 1
    assert [p.name for p in ds.pairs] == ["p0", "p2"]
    assert any("p1.png" in r.getMessage() for r in caplog.records)


def test_missing_eo_partner_of_a_sar_file(tmp_path):
    folders(tmp_path)
    png(tmp_path / "sar" / "orphan.png", grey(3))
    with pytest.raises(FileNotFoundError, match=r"EO partner of SAR image .*sar/orphan.png"):
        folder_pairs(tmp_path)
    ds = folder_pairs(tmp_path, on_error="skip")
    assert len(ds) == 3 and ds.num_skipped == 1


def test_missing_files_from_a_list(tmp_path):
    root = tmp_path / "qxs"
    png(root / "opt_256_oc_0.2" / "1.png", rgb(1, 2, 3))
    png(root / "sar_256_oc_0.2" / "1.png", grey(9))
    lst = tmp_path / "train_eo_list_080.txt"
    lst.write_text("opt_256_oc_0.2/1.png\nopt_256_oc_0.2/2.png\n")
    # Not the published QXS list, hence force=True; the missing pair is counted in one error.
    with pytest.raises(FileNotFoundError, match=r"2 of the 4 files named by the split list .* missing, e.g. .*opt_256_oc_0.2/2.png"):
        qxs_saropt(root, list_file=lst, force=True)
    assert len(qxs_saropt(root, list_file=lst, on_error="skip", force=True)) == 1
    with pytest.raises(FileNotFoundError, match="split list not found"):
        qxs_saropt(root, list_file=tmp_path / "nope_train.txt")
    (tmp_path / "empty_train.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty_train.txt is empty"):
        read_split(tmp_path / "empty_train.txt")
    with pytest.raises(ValueError, match="pickles"):
        read_split(tmp_path / "train_eo_list_080.pkl")
    with pytest.raises(ValueError, match="cannot tell train from test"):
        qxs_saropt(root, split=None, list_file=lst.rename(tmp_path / "pairs.txt"))


def test_empty_dataset_is_an_error(tmp_path):
    folders(tmp_path, n=2)
    for k in range(2):
        (tmp_path / "sar" / f"p{k}.png").unlink()
    with pytest.raises(ValueError, match="no usable pair .2 skipped"):
        folder_pairs(tmp_path, on_error="skip")
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="no EO images found under .*other"):
        folder_pairs(tmp_path, eo_dir="other")
    with pytest.raises(FileNotFoundError, match=r"dataset root not found: .*missing \(in a run config it is "
                       r"data.root: give the dataset's folder with --set data.root=/path/to/it\)"):
        qxs_saropt(tmp_path / "missing")


@pytest.mark.parametrize(
    "sar_hw, eo_hw, kind",
    [((16, 24), (24, 16), "orientation mismatch"), ((16, 16), (16, 20), "size mismatch")],
)
def test_size_and_orientation_mismatch(tmp_path, sar_hw, eo_hw, kind):
    png(tmp_path / "eo" / "a.png", rgb(1, 2, 3, *eo_hw))
    png(tmp_path / "sar" / "a.png", grey(9, *sar_hw))
    ds = folder_pairs(tmp_path)
    with pytest.raises(ValueError, match=rf"{kind}.*SAR .*sar/a.png is {sar_hw[0]}x{sar_hw[1]} but EO .*eo/a.png"):
        ds[0]


def test_unreadable_and_truncated_images(tmp_path, caplog):
    folders(tmp_path, n=3)
    (tmp_path / "sar" / "p0.png").write_bytes(b"not an image at all")
    data = (tmp_path / "eo" / "p1.png").read_bytes()
    (tmp_path / "eo" / "p1.png").write_bytes(data[: len(data) // 2])
    ds = folder_pairs(tmp_path)
    with pytest.raises(ValueError, match=r"cannot read image .*sar/p0.png"):
        ds[0]
    with pytest.raises(ValueError, match=r"cannot read image .*eo/p1.png"):
        ds[1]
    (tmp_path / "eo" / "p2.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"has no usable pair \(3 skipped\)"):
        folder_pairs(tmp_path, on_error="skip")


def sn6_pair(root, sar_bands, eo=None):
    sar_path, eo_path = sn6_paths(root, "t")
    tifffile.imwrite(sar_path, sar_bands, photometric="minisblack", planarconfig="contig")
    if eo is None:
        tifffile.imwrite(eo_path, rgb(1, 2, 3, 20, 20), photometric="rgb")
    else:
        tifffile.imwrite(eo_path, eo, photometric="minisblack", planarconfig="contig")
    return sar_path, eo_path


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_sar(tmp_path, bad):
    bands = quadrant_bands()[0]
    bands[3, 4, 1] = bad
    sar_path, _ = sn6_pair(tmp_path, bands)
    ds = spacenet6(tmp_path, split=None)
    with pytest.raises(ValueError, match=rf"{sar_path}.* 1 NaN/Inf"):
        ds[0]


def test_constant_sar(tmp_path):
    sar_path, _ = sn6_pair(tmp_path, np.full((20, 20, 4), 0.25, np.float32))
    with pytest.raises(ValueError, match=rf"SAR image {sar_path} is constant"):
        spacenet6(tmp_path, split=None)[0]
    png(tmp_path / "g" / "eo" / "a.png", rgb(1, 2, 3))
    png(tmp_path / "g" / "sar" / "a.png", np.zeros((16, 16)))
    with pytest.raises(ValueError, match=r"sar/a.png is constant"):
        folder_pairs(tmp_path / "g")[0]


def test_one_constant_band_is_fine(tmp_path):
    # A band without spread must not divide by zero: it stretches to 0 (-> -1).
    bands = quadrant_bands()[0]
    bands[..., 0] = 7.0
    sn6_pair(tmp_path, bands)
    s = spacenet6(tmp_path, split=None)[0]
    assert bool((s["sar"][0] == -1).all()) and bool(s["sar"].isfinite().all())


def test_wrong_band_counts(tmp_path):
    sar_path, _ = sn6_pair(tmp_path / "a", quadrant_bands()[0][..., :3])
    with pytest.raises(ValueError, match=rf"{sar_path} has 3 bands; expected 4"):
        spacenet6(tmp_path / "a", split=None)[0]
    _, eo_path = sn6_pair(tmp_path / "b", quadrant_bands()[0], eo=np.zeros((20, 20, 4), np.uint8) + 5)
    with pytest.raises(ValueError, match=rf"EO image {eo_path} has 4 bands; expected 3"):
        spacenet6(tmp_path / "b", split=None)[0]
    png(tmp_path / "c" / "eo" / "a.png", grey(5))
    png(tmp_path / "c" / "sar" / "a.png", grey(6))
    with pytest.raises(ValueError, match=r"EO image .*eo/a.png has 1 bands; expected 3"):
        folder_pairs(tmp_path / "c")[0]


def test_missing_rasterio_names_the_extra(tmp_path, monkeypatch):
    sar_path, _ = sn6_pair(tmp_path, quadrant_bands()[0])
    monkeypatch.setitem(sys.modules, "rasterio", None)  # import rasterio now raises ImportError
    with pytest.raises(ImportError, match=rf"{sar_path} needs rasterio: pip install 'cdiffset\[geo\]'"):
        read_geotiff(sar_path)


def test_damaged_geotiff(tmp_path):
    sar_path, _ = sn6_pair(tmp_path, quadrant_bands()[0])
    data = sar_path.read_bytes()
    sar_path.write_bytes(data[:200])
    with pytest.raises(ValueError, match=rf"cannot read GeoTIFF {sar_path}"):
        spacenet6(tmp_path, split=None)[0]


def test_bad_csv_and_arguments(tmp_path):
    (tmp_path / "p.csv").write_text("a,b\nx,y\n")
    with pytest.raises(ValueError, match=r"p.csv needs columns 'sar' and 'eo'"):
        csv_pairs(tmp_path / "p.csv")
    (tmp_path / "q.csv").write_text("sar,eo\n")
    with pytest.raises(ValueError, match=r"q.csv lists no pairs"):
        csv_pairs(tmp_path / "q.csv")
    with pytest.raises(FileNotFoundError, match="pairs CSV not found"):
        csv_pairs(tmp_path / "none.csv")
    folders(tmp_path / "f")
    with pytest.raises(ValueError, match="on_error"):
        folder_pairs(tmp_path / "f", on_error="ignore")
    with pytest.raises(ValueError, match="split must be one of"):
        folder_pairs(tmp_path / "f", split="val")

"""Readers of the real dataset layouts, on tiny fake datasets written here (PNG via Pillow,
GeoTIFF files written by tifffile, read by rasterio). Expected values come from the scaling rules,
not from the readers."""

import random
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from cdiff.data import (
    CenterCrop,
    PairAugment,
    csv_pairs,
    folder_pairs,
    make_split,
    open_dataset,
    qxs_saropt,
    read_split,
    sar2opt,
    sen12,
    spacenet6,
    write_split,
)
from cdiff.data.datasets import sen12_sar_path
from cdiff.data.split import qxs_group
from cdiff.testing import SN6, grey, png, quadrant_bands, rgb, sn6_paths

def unit(v):
    return v / 127.5 - 1.0


def make_qxs(root: Path, n=10, numbers=None):
    for i, k in enumerate(numbers if numbers is not None else range(n)):
        png(root / "opt_256_oc_0.2" / f"{k}.png", rgb(10, 100 + i, 200))
        png(root / "sar_256_oc_0.2" / f"{k}.png", grey(10 * i + 20))
    return root


def test_qxs_reads_pairs_scaled_and_matched(tmp_path):
    ds = qxs_saropt(make_qxs(tmp_path), split=None)
    assert len(ds) == 10 and ds.transform is None
    names = sorted(ds[i]["name"] for i in range(10))
    assert names == sorted(str(k) for k in range(10))
    for i in range(10):
        s = ds[i]
        k = int(s["name"])
        assert s["sar"].shape == (3, 16, 16) and s["eo"].shape == (3, 16, 16)
        assert s["sar"].dtype == torch.float32 and s["eo"].dtype == torch.float32
        # Single-pol SAR repeated to 3 channels, x / 127.5 - 1; the SAR belongs to this EO.
        expected_sar = torch.from_numpy(unit(grey(10 * k + 20).astype(np.float32)))
        for c in range(3):
            torch.testing.assert_close(s["sar"][c], expected_sar, rtol=0, atol=1e-6)
        # EO channels in RGB order.
        for c, v in enumerate((10, 100 + k, 200)):
            assert torch.all(s["eo"][c] == torch.tensor(unit(np.float32(v))))
        assert s["sar"].min() >= -1 and s["sar"].max() <= 1


def test_own_split_deterministic_release_format(tmp_path):
    # Numbers 100 apart: each pair is a QXS block (scene group) of its own.
    root = make_qxs(tmp_path, numbers=[100 * k for k in range(10)])
    train = qxs_saropt(root, split="train", transform=None, frozen=False)
    test = qxs_saropt(root, split="test", transform=None, frozen=False)
    train_file = root / "cdiff_split_qxs" / "train_eo_list_080.txt"
    test_file = root / "cdiff_split_qxs" / "test_eo_list_080.txt"
    train_lines = train_file.read_text().splitlines()
    test_lines = test_file.read_text().splitlines()
    all_eo = sorted(f"opt_256_oc_0.2/{100 * k}.png" for k in range(10))
    # Format: EO paths relative to the root, sorted, one per line, newline-terminated.
    assert train_file.read_text().endswith("\n")
    assert train_lines == sorted(train_lines) and test_lines == sorted(test_lines)
    assert len(train_lines) == 8 and len(test_lines) == 2
    assert sorted(train_lines + test_lines) == all_eo
    # The spec: numbers from random.Random(2025).random() over the sorted group keys
    # ("block0".."block9"); the groups with the smallest numbers -> test.
    rng = random.Random(2025)
    draws = {f"block{k}": rng.random() for k in sorted(range(10), key=lambda k: f"block{k}")}
    smallest = sorted(draws, key=draws.get)[:2]
    assert test_lines == sorted(f"opt_256_oc_0.2/{100 * int(g[5:])}.png" for g in smallest)
    assert len(train) == 8 and len(test) == 2
    assert {test[i]["name"] for i in range(2)} == {Path(p).stem for p in test_lines}
    # Re-reading uses the written lists (same result); a shuffled input gives the same split.
    assert make_split(list(reversed(all_eo)), group=qxs_group) == (train_lines, test_lines)
    assert make_split(all_eo, seed=7) != (train_lines, test_lines) or make_split(all_eo, seed=8) != (train_lines, test_lines)
    assert qxs_saropt(root, split="test", transform=None, frozen=False).pairs == test.pairs


def test_make_split_integer_counts():
    paths = [f"eo/{i:03d}.png" for i in range(101)]
    train, test = make_split(paths, ratio=80)
    assert len(test) == 101 * 20 // 100 == 20 and len(train) == 81
    assert make_split(paths[:10], ratio=80)[1].__len__() == 2  # not int(10 * 0.19999...) == 1


def test_release_list_file_is_used(tmp_path):
    root = make_qxs(tmp_path / "qxs")
    lst = tmp_path / "lists" / "test_eo_list_080.txt"
    lst.parent.mkdir()
    lst.write_text("opt_256_oc_0.2/3.png\nopt_256_oc_0.2/7.png\n\n")
    ds = qxs_saropt(root, split=None, list_file=lst, force=True)  # not the published list
    assert isinstance(ds.transform, type(None))  # QXS has no crop: the test split gets no transform
    assert [p.sar for p in ds.pairs] == [root / "sar_256_oc_0.2" / "3.png", root / "sar_256_oc_0.2" / "7.png"]
    assert ds[1]["sar"][0, 0, 0] == torch.tensor(unit(np.float32(90)))
    assert not list(root.glob("cdiff_split*"))
    with pytest.raises(ValueError, match="named as a test list"):
        qxs_saropt(root, list_file=lst, split="train")
    train_lst = lst.with_name("train_eo_list_080.txt")
    train_lst.write_text("opt_256_oc_0.2/1.png\n")
    assert qxs_saropt(root, list_file=train_lst, force=True).transform == PairAugment(crop_size=None)  # split from the name


def test_sar2opt_keeps_its_folders(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for k in range(n):
            png(tmp_path / f"{split}B" / f"{split}{k}.png", rgb(k, 50, 60, 20, 24))
            png(tmp_path / f"{split}A" / f"{split}{k}.png", grey(30 + k, 20, 24))
    train = sar2opt(tmp_path, "train", frozen=False)
    test = sar2opt(tmp_path, "test", frozen=False)
    assert len(train) == 3 and len(test) == 2
    assert train.transform == PairAugment(crop_size=512) and test.transform == CenterCrop(512)
    raw = sar2opt(tmp_path, "test", transform=None, frozen=False)
    for i in range(2):
        s = raw[i]
        k = int(s["name"][-1])
        assert s["sar"][0, 0, 0] == torch.tensor(unit(np.float32(30 + k)))
        assert s["eo"][0, 0, 0] == torch.tensor(unit(np.float32(k)))
        assert s["sar"].shape == (3, 20, 24)
    assert [p.sar.parent.name for p in train.pairs] == ["trainA"] * 3
    assert not list(tmp_path.glob("cdiff_split*"))
    lst = tmp_path / "train_eo_list.txt"
    lst.write_text("trainB/train1.png\n")
    from_list = sar2opt(tmp_path, None, list_file=lst, transform=None, force=True)
    assert from_list.pairs[0].sar == tmp_path / "trainA" / "train1.png"
    test_lst = tmp_path / "test_eo_list.txt"
    test_lst.write_text("testB/test1.png\n")
    from_test_list = sar2opt(tmp_path, list_file=test_lst, force=True)
    assert from_test_list.transform == CenterCrop(512) and from_test_list.pairs[0].sar == tmp_path / "testA" / "test1.png"


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_spacenet6_channel_mapping(tmp_path, planar):
    sar_path, eo_path = sn6_paths(tmp_path, "tile_1")
    bands, left, top = quadrant_bands()
    if planar == "contig":
        tifffile.imwrite(sar_path, bands, photometric="minisblack", planarconfig="contig")
    else:
        tifffile.imwrite(sar_path, np.moveaxis(bands, -1, 0), photometric="minisblack", planarconfig="separate")
    tifffile.imwrite(eo_path, rgb(0, 128, 255, 20, 20), photometric="rgb")
    ds = spacenet6(tmp_path, split=None)
    s = ds[0]
    assert s["name"] == "SN6_Train_AOI_11_Rotterdam_PS-RGB_tile_1"
    hh = np.where(left, 1.0, -1.0)
    cross = (np.where(top, 1.0, 0.0) + np.where(left, 1.0, 0.0)) / 2 * 2 - 1  # (HV + VH) / 2 in [0,1] -> [-1,1]
    vv = np.where(top & left, 1.0, -1.0)
    expected = torch.from_numpy(np.stack([hh, cross, vv]).astype(np.float32))
    torch.testing.assert_close(s["sar"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(s["eo"][:, 0, 0], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]), rtol=0, atol=1e-6)


def test_spacenet6_uint16_eo_joint_stretch_and_split(tmp_path):
    for k in range(5):
        sar_path, eo_path = sn6_paths(tmp_path, f"tile_{k}")
        tifffile.imwrite(sar_path, quadrant_bands()[0], photometric="minisblack", planarconfig="contig")
        eo = np.stack([np.zeros((20, 20)), np.full((20, 20), 1000), np.full((20, 20), 2000)], -1).astype(np.uint16)
        tifffile.imwrite(eo_path, eo, photometric="rgb")
    ds = spacenet6(tmp_path, split="train", frozen=False)
    assert len(ds) == 4 and ds.transform == PairAugment(crop_size=512)
    lines = read_split(tmp_path / "cdiff_split_spacenet6" / "train_eo_list_080.txt")
    assert all(line.startswith(f"{SN6}/PS-RGB/SN6_Train_AOI_11_Rotterdam_PS-RGB_tile_") for line in lines)
    assert ds.pairs[0].sar == tmp_path / lines[0].replace("PS-RGB", "SAR-Intensity")
    raw = spacenet6(tmp_path, split="train", transform=None, frozen=False)
    # One stretch over all bands keeps the colour balance: 0 -> -1, 1000 -> 0, 2000 -> 1.
    torch.testing.assert_close(raw[0]["eo"][:, 5, 5], torch.tensor([-1.0, 0.0, 1.0]), rtol=0, atol=1e-6)
    assert spacenet6(tmp_path, split="test", frozen=False).transform == CenterCrop(512)


def test_sen12_path_derivation_and_reader(tmp_path):
    assert (
        sen12_sar_path("ROIs2017_winter/s2_12/ROIs2017_winter_s2_12_p34.png")
        == "ROIs2017_winter/s1_12/ROIs2017_winter_s1_12_p34.png"
    )
    for season in ("ROIs1158_spring", "ROIs2017_winter"):
        for k in range(3):
            png(tmp_path / season / "s2_5" / f"{season}_s2_5_p{k}.png", rgb(k, 2, 3))
            png(tmp_path / season / "s1_5" / f"{season}_s1_5_p{k}.png", grey(40 + k))
    ds = sen12(tmp_path, split=None)
    assert len(ds) == 6
    for i in range(6):
        s = ds[i]
        k = int(s["name"][-1])
        assert s["sar"][0, 0, 0] == torch.tensor(unit(np.float32(40 + k)))
        assert s["eo"][0, 0, 0] == torch.tensor(unit(np.float32(k)))
    # Split by scene: each season's s2_5 folder is one scene of 3 patches, so at 50% one
    # scene goes to each side, whole.
    train, test = sen12(tmp_path, "train", ratio=50), sen12(tmp_path, "test", ratio=50)
    assert len(train) == len(test) == 3
    assert len({p.eo.parent for p in train.pairs}) == len({p.eo.parent for p in test.pairs}) == 1
    with pytest.raises(ValueError, match=r"cannot split 6 pairs in 2 scene groups 80/20: the test set would be empty"):
        sen12(tmp_path, "train", split_dir=tmp_path / "other")
    with pytest.raises(ValueError, match="s2_N"):
        sen12_sar_path("ROIs2017_winter/other/x.png")


def test_generic_folders_csv_and_tiff_via_pillow(tmp_path):
    for k in range(4):
        png(tmp_path / "eo" / f"p{k}.png", rgb(k, 0, 0))
        png(tmp_path / "sar" / f"p{k}.png", grey(60 + k))
    Image.fromarray(rgb(9, 9, 9)).save(tmp_path / "eo" / "t.tif")
    Image.fromarray(grey(70)).save(tmp_path / "sar" / "t.tif")
    ds = open_dataset("folders", tmp_path)
    assert len(ds) == 5 and ds.transform is None
    by_name = {ds[i]["name"]: ds[i] for i in range(5)}
    assert by_name["t"]["sar"][0, 0, 0] == torch.tensor(unit(np.float32(70)))
    assert by_name["p2"]["eo"][0, 0, 0] == torch.tensor(unit(np.float32(2)))

    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "pairs.csv").write_text("sar, eo\n../sar/p1.png,../eo/p3.png\n../sar/p0.png,../eo/p0.png\n")
    cds = csv_pairs(sub / "pairs.csv")
    assert len(cds) == 2
    s = {cds[i]["name"]: cds[i] for i in range(2)}["p3"]  # names come from the EO file
    assert s["sar"][0, 0, 0] == torch.tensor(unit(np.float32(61)))
    with pytest.raises(ValueError, match=r"cannot split 2 pairs .* the test set would be empty"):
        csv_pairs(sub / "pairs.csv", "train", transform=None)  # 2 * 20 // 100 == 0 test pairs
    assert csv_pairs(sub / "pairs.csv", "train", ratio=50, transform=None).__len__() == 1
    assert (sub / "cdiff_split_csv_pairs" / "train_eo_list_050.txt").is_file()


def test_write_split_format(tmp_path):
    tr, te = write_split(tmp_path, ["b.png", "a.png"], ["c.png"], ratio=75)
    assert tr.name == "train_eo_list_075.txt" and te.name == "test_eo_list_075.txt"
    assert tr.read_text() == "a.png\nb.png\n" and te.read_text() == "c.png\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_dataloader_with_workers(tmp_path):
    # The dataset and its default transform must pickle into worker processes.
    for k in range(4):
        png(tmp_path / "eo" / f"p{k}.png", np.repeat(grey(10 * k)[..., None], 3, axis=2))
        png(tmp_path / "sar" / f"p{k}.png", grey(10 * k))
    ds = folder_pairs(tmp_path, "train", ratio=50, crop=8)
    assert ds.transform == PairAugment(crop_size=8)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert [b["sar"].shape for b in batches] == [(2, 3, 8, 8)]
    # EO equal to SAR on disk stays equal after the shared augmentation.
    assert torch.equal(batches[0]["sar"], batches[0]["eo"])

"""cdiff's own split by scene, the record that makes a stale split fail loudly, bad pairs
dropped when a dataset is opened (never replaced by a neighbour), and rotations that keep
every sample's shape. Split tests use empty files: listing and splitting read no pixels."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch

from cdiff.data import PairAugment, csv_pairs, folder_pairs, make_split, qxs_saropt, sen12, spacenet6
from cdiff.data.split import files_hash
from cdiff.testing import grey, png, rgb


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def make_sen12(root: Path, scenes: int = 12, seed: int = 0) -> dict[str, int]:
    """SEN1-2 layout, two seasons, scenes of 1 to 8 patches; returns patches per scene folder."""
    rng = random.Random(seed)
    sizes = {}
    for season in ("ROIs1158_spring", "ROIs2017_winter"):
        for n in range(scenes // 2):
            count = rng.randint(1, 8)
            sizes[f"{season}/s2_{n}"] = count
            for k in range(count):
                touch(root / season / f"s2_{n}" / f"{season}_s2_{n}_p{k}.png")
                touch(root / season / f"s1_{n}" / f"{season}_s1_{n}_p{k}.png")
    return sizes


def sides(train, test, key) -> tuple[set, set]:
    return {key(p) for p in train.pairs}, {key(p) for p in test.pairs}


def assert_ratio_by_pairs(n_test: int, total: int, ratio: int, largest_group: int) -> None:
    target = total * (100 - ratio) // 100
    assert abs(n_test - target) <= largest_group / 2, (n_test, target, largest_group)


# --- split by scene ------------------------------------------------------------------------------


def test_split_by_scene_sen12_keeps_the_patches_of_a_scene_together(tmp_path):
    sizes = make_sen12(tmp_path)
    train = sen12(tmp_path, "train", transform=None)
    test = sen12(tmp_path, "test", transform=None)
    scene = lambda pair: f"{pair.eo.parent.parent.name}/{pair.eo.parent.name}"  # noqa: E731
    train_scenes, test_scenes = sides(train, test, scene)
    assert train_scenes and test_scenes and not train_scenes & test_scenes
    assert train_scenes | test_scenes == set(sizes)
    assert len(train) + len(test) == sum(sizes.values())
    assert_ratio_by_pairs(len(test), sum(sizes.values()), 80, max(sizes.values()))
    # Deterministic for its seed; another seed, another split.
    assert make_split([str(p.eo.relative_to(tmp_path).as_posix()) for p in train.pairs + test.pairs],
                      group=lambda e: str(PurePosixPath(e).parent))[1] == sorted(
        p.eo.relative_to(tmp_path).as_posix() for p in test.pairs)
    other = sen12(tmp_path, "test", seed=1, split_dir=tmp_path / "seed1", transform=None)
    assert {p.eo for p in other.pairs} != {p.eo for p in test.pairs}


def test_split_by_scene_spacenet6_keeps_the_tiles_of_a_strip_together(tmp_path):
    strips = ["20190804111224_20190804111453", "20190804113009_20190804113242", "20190822070610_20190822070846",
              "20190823055340_20190823055613", "20190823162315_20190823162603"]
    tiles = 0
    for s, strip in enumerate(strips):
        for t in range(3 + s):
            tiles += 1
            base = "train/AOI_11_Rotterdam"
            touch(tmp_path / base / "PS-RGB" / f"SN6_Train_AOI_11_Rotterdam_PS-RGB_{strip}_tile_{100 * s + t}.tif")
            touch(tmp_path / base / "SAR-Intensity" / f"SN6_Train_AOI_11_Rotterdam_SAR-Intensity_{strip}_tile_{100 * s + t}.tif")
    train = spacenet6(tmp_path, "train", transform=None, frozen=False)
    test = spacenet6(tmp_path, "test", transform=None, frozen=False)
    strip_of = lambda pair: pair.eo.name.split("_PS-RGB_")[1].split("_tile_")[0]  # noqa: E731
    train_strips, test_strips = sides(train, test, strip_of)
    assert train_strips and test_strips and not train_strips & test_strips
    assert len(train) + len(test) == tiles
    assert_ratio_by_pairs(len(test), tiles, 80, 7)
    record = json.loads((tmp_path / "cdiff_split_spacenet6" / "split_080.json").read_text())
    assert record["groups"] == 5 and record["pairs"] == tiles and record["reader"] == "spacenet6"


def test_split_by_scene_qxs_keeps_blocks_of_consecutive_numbers_together(tmp_path):
    for k in range(1, 1001):  # QXS-SAROPT numbers its patches from 1
        touch(tmp_path / "opt_256_oc_0.2" / f"{k}.png")
        touch(tmp_path / "sar_256_oc_0.2" / f"{k}.png")
    train = qxs_saropt(tmp_path, "train", transform=None, frozen=False)
    test = qxs_saropt(tmp_path, "test", transform=None, frozen=False)
    block = lambda pair: int(pair.eo.stem) // 100  # noqa: E731
    train_blocks, test_blocks = sides(train, test, block)
    assert not train_blocks & test_blocks and train_blocks | test_blocks == set(range(11))
    assert_ratio_by_pairs(len(test), 1000, 80, 100)


def test_split_by_scene_generic_readers_take_a_group_key(tmp_path):
    for scene in range(6):
        for k in range(3):
            name = f"scene{scene}_p{k}.png"
            touch(tmp_path / "eo" / name)
            touch(tmp_path / "sar" / name)
    # folder_pairs: a regex on the EO file name; its first capture group is the key.
    train = folder_pairs(tmp_path, "train", ratio=67, group=r"^(scene\d+)_", transform=None)
    test = folder_pairs(tmp_path, "test", ratio=67, group=r"^(scene\d+)_", transform=None)
    scene = lambda pair: pair.eo.name.split("_")[0]  # noqa: E731
    assert not set.intersection(*sides(train, test, scene)) and len(test) == 6
    # The default is one group per pair, and the rule is part of the record.
    with pytest.raises(ValueError, match=r"stale split .*group_rule .*regex .*now group_rule is 'one group per pair'"):
        folder_pairs(tmp_path, "train", ratio=67, transform=None)
    with pytest.raises(ValueError, match=r"group='\^\(shot\\\\d\+\)' does not match the EO file name eo/scene0_p0.png"):
        folder_pairs(tmp_path, "train", group=r"^(shot\d+)", split_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        folder_pairs(tmp_path, "train", group="(", split_dir=tmp_path / "x")
    # csv_pairs: a group column.
    rows = [f"sar/scene{s}_p{k}.png,eo/scene{s}_p{k}.png,site{s % 3}" for s in range(6) for k in range(3)]
    (tmp_path / "pairs.csv").write_text("sar,eo,group\n" + "\n".join(rows) + "\n")
    train = csv_pairs(tmp_path / "pairs.csv", "train", ratio=67, transform=None)
    test = csv_pairs(tmp_path / "pairs.csv", "test", ratio=67, transform=None)
    site = lambda pair: int(pair.eo.name[5]) % 3  # noqa: E731
    assert not set.intersection(*sides(train, test, site)) and len(test) == 6
    with pytest.raises(ValueError, match="has a 'group' column; group= would be a second rule"):
        csv_pairs(tmp_path / "pairs.csv", "train", group="x")


def test_make_split_keeps_the_train_percentage_by_pairs():
    rng = random.Random(3)
    paths, largest = [], 0
    for g in range(300):
        size = rng.randint(1, 20)
        largest = max(largest, size)
        paths += [f"g{g:03d}/p{k}.png" for k in range(size)]
    group = lambda p: p.split("/")[0]  # noqa: E731
    for ratio in (50, 80, 90):
        train, test = make_split(paths, ratio, group=group)
        assert sorted(train + test) == sorted(paths)
        assert not {group(p) for p in train} & {group(p) for p in test}
        assert_ratio_by_pairs(len(test), len(paths), ratio, largest)
        assert make_split(list(reversed(paths)), ratio, group=group) == (train, test)
    # One group per pair: exactly the pairs with the smallest draws, as before scenes existed.
    flat = sorted(paths)[:101]
    rng = random.Random(2025)
    draws = {p: rng.random() for p in flat}
    assert make_split(flat)[1] == sorted(sorted(flat, key=draws.get)[:20])


# --- the split's record --------------------------------------------------------------------------


def make_pairs(root: Path, names) -> None:
    for name in names:
        touch(root / "eo" / name)
        touch(root / "sar" / name)


def test_stale_split_is_refused(tmp_path):
    make_pairs(tmp_path, [f"p{k:02d}.png" for k in range(10)])
    folder = tmp_path / "cdiff_split_folders"
    assert len(folder_pairs(tmp_path, "train", transform=None)) == 8
    record = json.loads((folder / "split_080.json").read_text())
    assert record == {
        "reader": "folders", "seed": 2025, "ratio": 80, "group_rule": "one group per pair",
        "files_sha256": files_hash([f"eo/p{k:02d}.png" for k in range(10)]),
        "pairs": 10, "groups": 10, "train": 8, "test": 2,
    }
    how = r"To make a new split, delete train_eo_list_080.txt, test_eo_list_080.txt, split_080.json in .*cdiff_split_folders"
    # Files added, then removed.
    make_pairs(tmp_path, ["p10.png"])
    with pytest.raises(ValueError, match=rf"stale split in .*: the files changed: 1 added, 0 removed since \(e.g. eo/p10.png\)\. {how}"):
        folder_pairs(tmp_path, "test")
    for sub in ("eo", "sar"):
        (tmp_path / sub / "p10.png").unlink()
        (tmp_path / sub / "p03.png").unlink()
    with pytest.raises(ValueError, match=r"0 added, 1 removed since \(e.g. eo/p03.png\)"):
        folder_pairs(tmp_path, "test")
    make_pairs(tmp_path, ["p03.png"])
    # Another seed, another reader on the same folder, hand-edited lists.
    with pytest.raises(ValueError, match=r"made with seed 2025, now seed is 7"):
        folder_pairs(tmp_path, "test", seed=7)
    for k in range(10):
        touch(tmp_path / "opt_256_oc_0.2" / f"{k}.png")
    with pytest.raises(ValueError, match=r"made with reader 'folders', now reader is 'qxs'"):
        qxs_saropt(tmp_path, "test", split_dir=folder, frozen=False)
    test_list = folder / "test_eo_list_080.txt"
    test_list.write_text(test_list.read_text() + "eo/p99.png\n")
    with pytest.raises(ValueError, match=r"its lists were edited after it was made"):
        folder_pairs(tmp_path, "test")
    # A split without its record (an older cdiff) cannot be checked.
    (folder / "split_080.json").unlink()
    with pytest.raises(ValueError, match=r"incomplete split in .*: split_080.json missing"):
        folder_pairs(tmp_path, "test")
    # Deleting the three files, as the message says, makes a new split; the release-list
    # escape hatch reads the lists unchecked.
    assert len(folder_pairs(tmp_path, list_file=folder / "train_eo_list_080.txt", transform=None)) == 8
    for name in ("train_eo_list_080.txt", "test_eo_list_080.txt"):
        (folder / name).unlink()
    assert len(folder_pairs(tmp_path, "test", transform=None)) == 2


def test_default_split_folder_is_one_per_reader(tmp_path):
    # One root holding two layouts: QXS-SAROPT's folders and the generic eo/ + sar/.
    for k in range(10):
        touch(tmp_path / "opt_256_oc_0.2" / f"{100 * k}.png")
        touch(tmp_path / "sar_256_oc_0.2" / f"{100 * k}.png")
    make_pairs(tmp_path, [f"p{k}.png" for k in range(5)])
    qxs = qxs_saropt(tmp_path, "test", transform=None, frozen=False)
    folders = folder_pairs(tmp_path, "test", transform=None)
    assert all(p.eo.parent.name == "opt_256_oc_0.2" for p in qxs.pairs) and len(qxs) == 2
    assert all(p.eo.parent.name == "eo" for p in folders.pairs) and len(folders) == 1
    assert sorted(p.name for p in tmp_path.glob("cdiff_split*")) == ["cdiff_split_folders", "cdiff_split_qxs"]


# --- bad pairs are dropped when the dataset is opened ------------------------------------------


def noise(h, w, channels, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)


def test_skip_drops_bad_pairs_at_open_time_and_never_returns_a_neighbour(tmp_path, caplog):
    for k in range(6):
        png(tmp_path / "eo" / f"p{k}.png", noise(64, 64, 3, k))
        png(tmp_path / "sar" / f"p{k}.png", noise(64, 64, 1, 10 + k))
    (tmp_path / "sar" / "p1.png").write_bytes(b"<html>not an image</html>")
    (tmp_path / "eo" / "p3.png").write_bytes(b"")
    png(tmp_path / "sar" / "p4.png", noise(64, 48, 1, 3))  # size mismatch, seen in the header
    data = (tmp_path / "eo" / "p5.png").read_bytes()
    (tmp_path / "eo" / "p5.png").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    with caplog.at_level(logging.WARNING, logger="cdiff.data.datasets"):
        ds = folder_pairs(tmp_path, on_error="skip")
    assert [p.name for p in ds.pairs] == ["p0", "p2", "p5"] and len(ds) == 3
    assert ds.num_skipped == 3
    assert set(ds.skipped) == {str(tmp_path / "eo" / f"p{k}.png") for k in (1, 3, 4)}
    assert "size mismatch" in ds.skipped[str(tmp_path / "eo" / "p4.png")]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("skipped" in m and "p1.png" in m for m in messages) == 1
    assert any("skipped 3 (reasons logged above), kept 3 pairs" in m for m in messages)
    # Every index gives its own pair; the one damaged past its header raises, saying so.
    assert [ds[i]["name"] for i in (0, 1)] == ["p0", "p2"]
    with pytest.raises(ValueError, match=r"pair p5 passed the header check .* cannot be decoded: .*p5.png.*validate\(\)"):
        ds[2]
    assert [p.name for p in ds.validate().pairs] == ["p0", "p2"] and ds.num_skipped == 4
    # A test split opened with skip holds each pair once.
    split = folder_pairs(tmp_path, "test", ratio=50, on_error="skip", transform=None).validate()
    names = [split[i]["name"] for i in range(len(split))]
    assert len(names) == len(set(names)) == 1


# --- rotations keep shapes ---------------------------------------------------------------------


def test_rot90_rotates_only_square_images(tmp_path):
    wide = {"sar": torch.arange(3 * 20 * 24.0).reshape(3, 20, 24), "eo": torch.zeros(3, 20, 24), "name": "w"}
    square = {"sar": torch.arange(3 * 16 * 16.0).reshape(3, 16, 16), "eo": torch.zeros(3, 16, 16), "name": "s"}
    quarter_turns = 0
    for seed in range(32):
        # The reference: the same draws (crop none, then flip h, flip v, k), applied by hand.
        g = torch.Generator().manual_seed(seed)
        flip_h, flip_v, k = (int(torch.randint(n, (1,), generator=g)) for n in (2, 2, 4))
        for sample in (wide, square):
            out = PairAugment()(sample, torch.Generator().manual_seed(seed))
            x = sample["sar"]
            x = x.flip(-1) if flip_h else x
            x = x.flip(-2) if flip_v else x
            if x.shape[-1] == x.shape[-2]:
                x = torch.rot90(x, k, dims=(-2, -1))
            assert torch.equal(out["sar"], x), (seed, sample["name"])
            assert out["eo"].shape == out["sar"].shape
        quarter_turns += k % 2
    assert quarter_turns > 0  # the square image did turn by 90 degrees for some seeds
    # A training set of non-square images without a crop collates into batches.
    for k in range(4):
        png(tmp_path / "eo" / f"p{k}.png", rgb(k, 1, 2, 20, 24))
        png(tmp_path / "sar" / f"p{k}.png", grey(30 + k, 20, 24))
    ds = folder_pairs(tmp_path, "train", ratio=50)
    assert ds.transform == PairAugment(crop_size=None)
    torch.manual_seed(0)
    for batch in torch.utils.data.DataLoader(ds, batch_size=2):
        assert batch["sar"].shape == (2, 3, 20, 24)

"""The field's frozen split lists: the shipped bytes, the readers that use them by default, and
the errors for missing files and foreign lists (cdiff.data.frozen, cdiff.data.datasets)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path, PurePosixPath

import pytest
import torch

from cdiff.data import frozen, qxs_saropt, sar2eo, sar2opt, spacenet6, spacenet6_chips

# Line counts from the issue and SHA-256 values as GeoSET publishes them in splits/README.md
# (its qxs-saropt and sar2opt lists are byte-identical to ReFlowSET's *_eo_list.txt).
PUBLISHED = {
    "qxs-saropt/train_eo_list.txt": (16001, "80489fba906b7e2cb1f21ad05b3306351750b11982824ffa7b3ec952c28dce8d"),
    "qxs-saropt/test_eo_list.txt": (3999, "bee3faadf537dfab8ec1dc94b6655ea4628c50d80335fe6e87c2787d7fc5d474"),
    "sar2opt/train_eo_list.txt": (1450, "c37f4a888adc325712b793dea3338b6094e270b161ec77d2cefc03d4255fa7db"),
    "sar2opt/test_eo_list.txt": (627, "237a9d5f357160a948db4b7d27fe46b65d3417dd521082a9a23c5f0af8df4366"),
    "spacenet6/train.txt": (2558, "8720d40d11fd6dc2288c1cd0467a31252e3f3ed43e81dbded6a39bf92672b797"),
    "spacenet6/test.txt": (495, "e154dacbf982cfa5946225cad26ddcf0cda0e7b447a6f14ad78919beaa48054f"),
    "spacenet6/sar_stretch.json": (22, "00bd1ab1e3fe1ab59f93660e20da12c97a9df0ec4d5a9132266ee6bf6e692ff4"),
    "sar2eo/test_first4000.txt": (4000, "fc9c4747377b2e5081fdf8edf0d59839442b9e052a3deb88da2194deb1d3bdd8"),
}


def lines_of(name: str) -> list[str]:
    return (frozen.SPLITS_DIR / name).read_text().splitlines()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_files_are_the_published_bytes(name):
    data = (frozen.SPLITS_DIR / name).read_bytes()
    lines, sha = PUBLISHED[name]
    assert hashlib.sha256(data).hexdigest() == sha
    assert data.count(b"\n") == lines and data.endswith(b"\n") and b"\r" not in data
    entry = frozen.frozen_file(name)
    assert (entry.lines, entry.sha256, entry.shipped, entry.licence) == (lines, sha, True, "Apache-2.0")
    assert entry.repo in ("KAIST-VICLab/GeoSET", "KAIST-VICLab/ReFlowSET") and len(entry.commit) == 40


def test_every_shipped_file_is_in_the_table_and_the_notice():
    shipped = sorted(str(p.relative_to(frozen.SPLITS_DIR)) for p in frozen.SPLITS_DIR.glob("*/*"))
    assert shipped == sorted(e.file for e in frozen.FILES if e.shipped) == sorted(PUBLISHED)
    notice = (frozen.SPLITS_DIR / "NOTICE").read_text()
    assert all(name in notice for name in PUBLISHED) and "Apache License, Version 2.0" in notice


def test_the_lists_partition_their_datasets():
    qxs_train, qxs_test = lines_of("qxs-saropt/train_eo_list.txt"), lines_of("qxs-saropt/test_eo_list.txt")
    numbers = [int(PurePosixPath(p).stem) for p in qxs_train + qxs_test]
    assert sorted(numbers) == list(range(1, 20001))  # QXS-SAROPT's 20,000 patches, each on one side
    for train, test, prefix in (("sar2opt/train_eo_list.txt", "sar2opt/test_eo_list.txt", ("trainB/", "testB/")),
                                ("spacenet6/train.txt", "spacenet6/test.txt", ("train/AOI_11_Rotterdam/PS-RGB/",) * 2)):
        a, b = lines_of(train), lines_of(test)
        assert not set(a) & set(b) and len(set(a)) == len(a) and len(set(b)) == len(b)
        assert all(x.startswith(prefix[0]) for x in a) and all(x.startswith(prefix[1]) for x in b)
    first4000 = lines_of("sar2eo/test_first4000.txt")
    assert first4000 == sorted(first4000) and all(x.startswith("SAR-EO/EO/validation/Gotcha") for x in first4000)


def tree(root: Path, eo_paths, sar_of) -> None:
    """Empty files named after a list (readers index files without decoding them), made as hard
    links of one empty file: thousands of them in a fraction of a second."""
    names = [rel for eo in eo_paths for rel in (eo, sar_of(eo))]
    for folder in {str(PurePosixPath(rel).parent) for rel in names}:
        (root / folder).mkdir(parents=True, exist_ok=True)
    empty = root / ".empty"
    empty.touch()
    for rel in names:
        os.link(empty, os.path.join(root, rel))


QXS_SAR = lambda e: e.replace("opt_256_oc_0.2/", "sar_256_oc_0.2/")  # noqa: E731
SAR2OPT_SAR = lambda e: e.replace("trainB/", "trainA/").replace("testB/", "testA/")  # noqa: E731
SN6_SAR = lambda e: e.replace("PS-RGB", "SAR-Intensity")  # noqa: E731
SAR2EO_SAR = lambda e: e.replace("/EO/", "/SAR/")  # noqa: E731


@pytest.mark.parametrize("reader, name, split, sar_of", [
    (qxs_saropt, "qxs-saropt/test_eo_list.txt", "test", QXS_SAR),
    (sar2opt, "sar2opt/train_eo_list.txt", "train", SAR2OPT_SAR),
    (sar2opt, "sar2opt/test_eo_list.txt", "test", SAR2OPT_SAR),
    (spacenet6, "spacenet6/test.txt", "test", SN6_SAR),
    (sar2eo, "sar2eo/test_first4000.txt", "test", SAR2EO_SAR),
], ids=["qxs-test", "sar2opt-train", "sar2opt-test", "spacenet6-test", "sar2eo-test"])
def test_reader_returns_the_frozen_list_in_order(tmp_path, reader, name, split, sar_of):
    listed = lines_of(name)
    tree(tmp_path, listed, sar_of)
    # Decoys: files the list does not name are not read.
    tree(tmp_path, [str(PurePosixPath(listed[0]).with_name("decoy.png"))], sar_of)
    ds = reader(tmp_path, split, transform=None)
    assert [p.eo.relative_to(tmp_path).as_posix() for p in ds.pairs] == listed
    assert [p.sar.relative_to(tmp_path).as_posix() for p in ds.pairs] == [sar_of(e) for e in listed]
    assert len({p.name for p in ds.pairs}) == len(listed)


def test_chips_reader_follows_the_frozen_spacenet6_list(tmp_path):
    tiles = lines_of("spacenet6/test.txt")
    chips = [f"testB/{PurePosixPath(t).stem.replace('_PS-RGB', '')}.png" for t in tiles]
    tree(tmp_path, chips, lambda e: e.replace("testB/", "testA/"))
    ds = spacenet6_chips(tmp_path, "test", transform=None)
    assert [p.eo.relative_to(tmp_path).as_posix() for p in ds.pairs] == chips
    assert ds.pairs[0].name == "SN6_Train_AOI_11_Rotterdam_20190804111224_20190804111453_tile_8695"
    assert ds.pairs[0].sar == tmp_path / "testA" / f"{ds.pairs[0].name}.png"


def test_missing_files_are_counted_in_one_error(tmp_path):
    listed = lines_of("qxs-saropt/test_eo_list.txt")
    tree(tmp_path, listed, QXS_SAR)
    gone = [listed[10], listed[20], listed[30]]
    for eo in gone:
        (tmp_path / eo).unlink()
    (tmp_path / QXS_SAR(listed[40])).unlink()
    with pytest.raises(FileNotFoundError) as err:
        qxs_saropt(tmp_path, "test")
    message = str(err.value)
    assert message.startswith("4 of the 7,998 files named by the frozen QXS-SAROPT test list are missing, e.g. ")
    assert all(str(tmp_path / eo) in message for eo in gone) and QXS_SAR(listed[40]) not in message  # the first 3


def test_a_foreign_list_needs_force_and_the_published_one_does_not(tmp_path):
    listed = lines_of("sar2opt/test_eo_list.txt")
    tree(tmp_path, listed, SAR2OPT_SAR)
    mine = tmp_path / "test_eo_list.txt"
    mine.write_text("".join(f"{e}\n" for e in listed[:-1]))  # one pair dropped
    with pytest.raises(ValueError, match=r"is not the published sar2opt test list .*pass force=True"):
        sar2opt(tmp_path, list_file=mine)
    assert len(sar2opt(tmp_path, list_file=mine, force=True)) == 626
    # The published list itself, even with Windows line endings, needs no force.
    mine.write_bytes("".join(f"{e}\r\n" for e in listed).encode())
    assert len(sar2opt(tmp_path, list_file=mine)) == 627


def test_a_damaged_install_is_refused(tmp_path, monkeypatch):
    damaged = tmp_path / "qxs-saropt" / "test_eo_list.txt"
    damaged.parent.mkdir()
    damaged.write_text("opt_256_oc_0.2/1.png\n")
    monkeypatch.setattr(frozen, "SPLITS_DIR", tmp_path)
    with pytest.raises(ValueError, match="damaged or the file was edited"):
        frozen.read_frozen("qxs", "test")


def test_unshipped_sar2eo_lists_are_rebuilt_from_the_folder_and_checked(tmp_path, monkeypatch):
    # The published first 4,000 validation names, in a folder in random creation order: the sorted
    # listing cdiff rebuilds is byte-for-byte the published list (here standing in for test.txt).
    listed = lines_of("sar2eo/test_first4000.txt")
    tree(tmp_path, reversed(listed), SAR2EO_SAR)
    entry = frozen.frozen_list("sar2eo", "test_all")
    stand_in = dataclasses.replace(entry, lines=4000, sha256=PUBLISHED["sar2eo/test_first4000.txt"][1])
    monkeypatch.setattr(frozen, "FILES", tuple(stand_in if e is entry else e for e in frozen.FILES))
    ds = sar2eo(tmp_path, "test_all", transform=None)
    assert [p.eo.relative_to(tmp_path).as_posix() for p in ds.pairs] == listed
    monkeypatch.undo()
    # Against the real published test.txt (21,260 files) this folder is refused, unless forced.
    with pytest.raises(ValueError, match=r"4,000 PNGs in .* are not the published list sar2eo/test.txt \(21,260 files"):
        sar2eo(tmp_path, "test_all")
    assert len(sar2eo(tmp_path, "test_all", force=True, transform=None)) == 4000
    with pytest.raises(FileNotFoundError, match="SAR-EO/EO/train not found"):
        sar2eo(tmp_path, "train")


def test_own_split_stays_for_other_datasets_and_on_request(tmp_path):
    assert not frozen.has_frozen("sen12", "train") and not frozen.has_frozen("folders", "test")
    numbers = [100 * k for k in range(1, 11)]  # ten QXS blocks of 100, so cdiff's split has ten scenes
    tree(tmp_path, [f"opt_256_oc_0.2/{k}.png" for k in numbers], QXS_SAR)
    with pytest.raises(FileNotFoundError, match="of the 32,002 files named by the frozen QXS-SAROPT train list"):
        qxs_saropt(tmp_path, "train")
    own = qxs_saropt(tmp_path, "train", frozen=False, transform=None)
    assert len(own) == 8 and (tmp_path / "cdiff_split_qxs" / "split_080.json").is_file()


def test_sar2eo_reads_grey_pairs_as_three_channels(tmp_path):
    import numpy as np
    from PIL import Image

    for split, k in (("train", 12), ("validation", 3)):
        for side, value in (("EO", 40 + k), ("SAR", 200 - k)):
            path = tmp_path / "SAR-EO" / side / split / f"Gotcha{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            grey = np.full((8, 8), value, np.uint8)
            grey[0, 0] = 0  # not constant (a constant SAR image is refused)
            Image.fromarray(grey).save(path)
    ds = sar2eo(tmp_path, "train", frozen=False, transform=None)
    (sample,) = [ds[0]]
    assert ds.pairs[0].sar == tmp_path / "SAR-EO/SAR/train/Gotcha12.png" and sample["name"] == "Gotcha12"
    assert sample["eo"].shape == sample["sar"].shape == (3, 8, 8)
    torch.testing.assert_close(sample["eo"][:, 1, 1], torch.full((3,), (40 + 12) / 127.5 - 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(sample["sar"][:, 1, 1], torch.full((3,), 188 / 127.5 - 1), rtol=0, atol=1e-6)
    assert [p.eo.name for p in sar2eo(tmp_path, None, transform=None).pairs] == ["Gotcha12.png", "Gotcha3.png"]
    with pytest.raises(ValueError, match="SAR2EO split must be one of"):
        sar2eo(tmp_path, "val")

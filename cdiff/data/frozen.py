"""The field's frozen train/test lists, shipped with cdiff, and the one table that records them.

Since mid-2026 the C-DiffSET authors' follow-up repositories (KAIST-VICLab/GeoSET and
KAIST-VICLab/ReFlowSET) train and score every method on fixed lists of EO file names; their
published tables are made on these lists, so cdiff reads them by default for the four
datasets they cover (cdiff.data.datasets). Every other dataset keeps cdiff's own split by
scene (cdiff.data.split).

Each list holds EO paths relative to the dataset's root, one a line; the SAR path follows
from the EO path by each reader's rule. ``FILES`` below records, for every file, where it
comes from (repository, path, commit), its licence, its line count and the SHA-256 of its
bytes; the shipped copies under ``cdiff/data/splits/`` are byte-exact and their hashes
equal the ones GeoSET publishes in its ``splits/README.md``. The two SAR2EO lists that are
not shipped (68,151 and 21,260 lines: the complete E3Diff train and validation folders,
sorted) are rebuilt from the dataset's folders and accepted only when they hash to the
published value.

Licence: both repositories license their code and these lists under Apache-2.0 (their
NOTICE files; the model weights are licensed separately and are not involved). The lists
name files of the datasets and hold no imagery. ``cdiff/data/splits/NOTICE`` carries the
attribution Apache-2.0 asks for.

Bad input: a user-supplied list for one of these splits whose SHA-256 differs from the
published one is refused unless ``force``; files named by a list that are missing are
counted and the first few named (``check_listed_files``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

log = logging.getLogger(__name__)

SPLITS_DIR = Path(__file__).parent / "splits"

GEOSET = "KAIST-VICLab/GeoSET"
GEOSET_COMMIT = "1e5a07ecd3d98e248ab6eac80b9b6668dfdabf5d"
REFLOWSET = "KAIST-VICLab/ReFlowSET"
REFLOWSET_COMMIT = "32de5d0defa743cb08258478c4b70c315379385f"
APACHE = "Apache-2.0"


@dataclass(frozen=True)
class FrozenFile:
    """One published file: a split list (``dataset``, ``split`` set) or a data file."""

    file: str  # path under cdiff/data/splits/ (also the name used in messages)
    lines: int
    sha256: str  # of the file's bytes
    repo: str
    path: str  # in the repository
    commit: str
    licence: str
    dataset: str | None = None  # reader kind (cdiff.data.datasets.READERS)
    split: str | None = None
    shipped: bool = True
    # An unshipped list is the sorted listing of the *.png files in this folder (relative to
    # the dataset root), written as "<folder>/<name>" lines: how the publisher made it.
    folder: str | None = None

    @property
    def source(self) -> str:
        return f"https://github.com/{self.repo}/blob/{self.commit}/{self.path}"


FILES: tuple[FrozenFile, ...] = (
    FrozenFile("qxs-saropt/train_eo_list.txt", 16001, "80489fba906b7e2cb1f21ad05b3306351750b11982824ffa7b3ec952c28dce8d",
               REFLOWSET, "splits/qxs-saropt/train_eo_list.txt", REFLOWSET_COMMIT, APACHE, "qxs", "train"),
    FrozenFile("qxs-saropt/test_eo_list.txt", 3999, "bee3faadf537dfab8ec1dc94b6655ea4628c50d80335fe6e87c2787d7fc5d474",
               REFLOWSET, "splits/qxs-saropt/test_eo_list.txt", REFLOWSET_COMMIT, APACHE, "qxs", "test"),
    FrozenFile("sar2opt/train_eo_list.txt", 1450, "c37f4a888adc325712b793dea3338b6094e270b161ec77d2cefc03d4255fa7db",
               REFLOWSET, "splits/sar2opt/train_eo_list.txt", REFLOWSET_COMMIT, APACHE, "sar2opt", "train"),
    FrozenFile("sar2opt/test_eo_list.txt", 627, "237a9d5f357160a948db4b7d27fe46b65d3417dd521082a9a23c5f0af8df4366",
               REFLOWSET, "splits/sar2opt/test_eo_list.txt", REFLOWSET_COMMIT, APACHE, "sar2opt", "test"),
    FrozenFile("spacenet6/train.txt", 2558, "8720d40d11fd6dc2288c1cd0467a31252e3f3ed43e81dbded6a39bf92672b797",
               GEOSET, "splits/spacenet6/train.txt", GEOSET_COMMIT, APACHE, "spacenet6", "train"),
    FrozenFile("spacenet6/test.txt", 495, "e154dacbf982cfa5946225cad26ddcf0cda0e7b447a6f14ad78919beaa48054f",
               GEOSET, "splits/spacenet6/test.txt", GEOSET_COMMIT, APACHE, "spacenet6", "test"),
    FrozenFile("spacenet6/sar_stretch.json", 22, "00bd1ab1e3fe1ab59f93660e20da12c97a9df0ec4d5a9132266ee6bf6e692ff4",
               GEOSET, "splits/spacenet6/sar_stretch.json", GEOSET_COMMIT, APACHE),
    # SAR2EO: "test" is the scored subset, the first 4,000 lines of the full validation list.
    FrozenFile("sar2eo/test_first4000.txt", 4000, "fc9c4747377b2e5081fdf8edf0d59839442b9e052a3deb88da2194deb1d3bdd8",
               GEOSET, "splits/sar2eo/test_first4000.txt", GEOSET_COMMIT, APACHE, "sar2eo", "test"),
    FrozenFile("sar2eo/train.txt", 68151, "7f8d01021174caa292c3996c822db34089338404d0eccf964162bf6340df84c1",
               GEOSET, "splits/sar2eo/train.txt", GEOSET_COMMIT, APACHE, "sar2eo", "train",
               shipped=False, folder="SAR-EO/EO/train"),
    FrozenFile("sar2eo/test.txt", 21260, "7bd1583df52f478b90f1f88649ff0d61631f9aba48e9cc769075f87f2fcc5434",
               GEOSET, "splits/sar2eo/test.txt", GEOSET_COMMIT, APACHE, "sar2eo", "test_all",
               shipped=False, folder="SAR-EO/EO/validation"),
)


def frozen_list(dataset: str, split: str) -> FrozenFile:
    """The table's entry for ``dataset`` (reader kind) and ``split``; ValueError if none."""
    for entry in FILES:
        if (entry.dataset, entry.split) == (dataset, split):
            return entry
    known = sorted({f"{e.dataset}/{e.split}" for e in FILES if e.dataset})
    raise ValueError(f"no frozen list for dataset {dataset!r}, split {split!r}; there are: {', '.join(known)}")


def frozen_file(name: str) -> FrozenFile:
    """The table's entry whose ``file`` is ``name`` (e.g. ``"spacenet6/sar_stretch.json"``)."""
    for entry in FILES:
        if entry.file == name:
            return entry
    raise ValueError(f"no frozen file {name!r}; there are: {', '.join(e.file for e in FILES)}")


def has_frozen(dataset: str, split: str | None) -> bool:
    return any((e.dataset, e.split) == (dataset, split) for e in FILES)


def shipped_path(entry: FrozenFile) -> Path:
    """The shipped copy of ``entry``, checked against the table (a damaged install is an error)."""
    if not entry.shipped:
        raise ValueError(f"{entry.file} is not shipped with cdiff; it is rebuilt from the dataset's folder")
    path = SPLITS_DIR / entry.file
    if not path.is_file():
        raise FileNotFoundError(f"frozen split file {path} is missing from the cdiff install; reinstall cdiff")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != entry.sha256:
        raise ValueError(f"frozen split file {path} has SHA-256 {digest}, not the published {entry.sha256}: "
                         f"the cdiff install is damaged or the file was edited; reinstall cdiff")
    return path


def lines_sha256(lines: Sequence[str]) -> str:
    """SHA-256 of ``lines`` written one a line with a final newline (how the lists are stored)."""
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode()).hexdigest()


def read_frozen(dataset: str, split: str, root: str | os.PathLike | None = None, force: bool = False) -> list[str]:
    """The EO paths of the field's ``split`` list for ``dataset``, in the published order.

    A shipped list is read from the package. An unshipped one (SAR2EO's full train and
    validation lists) is the sorted listing of its folder under ``root``, accepted only
    when it hashes to the published value (or with ``force``, with a warning).
    """
    entry = frozen_list(dataset, split)
    if entry.shipped:
        return shipped_path(entry).read_text().splitlines()
    if root is None:
        raise ValueError(f"the {dataset} {split} list is rebuilt from the dataset folder: give its root")
    folder = Path(root) / entry.folder
    if not folder.is_dir():
        raise FileNotFoundError(f"{dataset} {split}: folder {folder} not found (expected {entry.folder}/ under the "
                                f"dataset root {root})")
    lines = sorted(f"{entry.folder}/{p.name}" for p in folder.iterdir() if p.suffix == ".png" and p.is_file())
    if lines_sha256(lines) != entry.sha256:
        message = (f"{dataset} {split}: the {len(lines):,} PNGs in {folder} are not the published list "
                   f"{entry.file} ({entry.lines:,} files, SHA-256 {entry.sha256[:12]}..., {entry.source}): the "
                   f"dataset copy differs from the one the field scored on")
        if not force:
            raise ValueError(f"{message}. Re-extract the dataset, or pass force=True to use these files")
        log.warning("%s; going on with them (force)", message)
    return lines


def check_user_list(list_file: str | os.PathLike, dataset: str, split: str | None, force: bool = False) -> None:
    """Refuse a user's ``list_file`` for a frozen ``split`` unless its bytes are one of the
    dataset's published lists.

    Nothing to check when no frozen list exists for (dataset, split). With ``force`` the
    difference is logged and the user's list is used.
    """
    if split is None or not has_frozen(dataset, split):
        return
    entry = frozen_list(dataset, split)
    path = Path(list_file)
    if not path.is_file():
        return  # the reader says the file is missing, in its own words
    # The lines as cdiff reads them (line endings and blank lines aside) must be a published list.
    digest = lines_sha256([line.strip() for line in path.read_text().splitlines() if line.strip()])
    if digest in {e.sha256 for e in FILES if e.dataset == dataset}:
        return  # a published list of this dataset (e.g. SAR2EO's full test.txt), used as the user asks
    message = (f"split list {path} (SHA-256 {digest[:12]}...) is not the published {dataset} {split} list "
               f"{entry.file} (SHA-256 {entry.sha256[:12]}..., {entry.lines:,} lines, {entry.source}): numbers made "
               f"on it do not compare with the field's tables")
    if not force:
        raise ValueError(f"{message}. Leave list_file out to use the shipped list, or pass force=True")
    log.warning("%s; using it anyway (force)", message)


def check_listed_files(paths: Sequence[Path], what: str, shown: int = 3) -> None:
    """FileNotFoundError counting the ``paths`` that do not exist and naming the first few."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        examples = ", ".join(str(p) for p in missing[:shown])
        raise FileNotFoundError(f"{len(missing):,} of the {len(paths):,} files named by {what} are missing, "
                                f"e.g. {examples}")


def spacenet6_chip_stem(eo_rel: str) -> str:
    """``.../SN6_Train_AOI_11_Rotterdam_PS-RGB_<strip>_tile_<n>.tif`` -> ``SN6_Train_AOI_11_Rotterdam_<strip>_tile_<n>``:
    the name GeoSET gives a SpaceNet6 chip (the EO file name without ``_PS-RGB`` and ``.tif``)."""
    return PurePosixPath(eo_rel).stem.replace("_PS-RGB", "")

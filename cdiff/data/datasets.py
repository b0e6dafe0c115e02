"""Readers of paired SAR-EO datasets on disk: the paper's public benchmarks and a generic layout.

Every reader returns a :class:`PairedImages` dataset whose samples are
``{"sar": (3, H, W) float32 in [-1, 1], "eo": (3, H, W) float32 in [-1, 1], "name": str}``
(``name``: the EO file's stem, unique within the dataset; outputs are written under it).

Layouts (``root`` is the dataset's top folder; split lists hold EO paths relative to it):

- qxs_saropt:   EO ``opt_256_oc_0.2/*``; SAR: folder -> ``sar_256_oc_0.2``; no crop.
- sar2opt:      EO ``trainB/*``, ``testB/*`` (its own split); SAR: ``trainB``/``testB`` ->
                ``trainA``/``testA``; 512 crops.
- spacenet6:    EO ``**/PS-RGB/*.tif`` (3-band GeoTIFF); SAR: every ``PS-RGB`` ->
                ``SAR-Intensity`` (4-band float GeoTIFF, see imageio.spacenet6_sar_to_rgb); 512.
- sen12:        EO ``ROIs*/s2_N/*_s2_N_p<k>.png``; SAR: ``s2`` -> ``s1`` in that folder and
                file-name part only; no crop.
- folder_pairs: EO ``eo/*``, SAR the same names in ``sar/``; no crop unless ``crop=``.
- csv_pairs:    columns ``sar,eo`` of a CSV, relative to its folder; no crop unless ``crop=``.
- sar2eo:       EO ``SAR-EO/EO/{train,validation}/Gotcha<k>.png`` (grey); SAR: ``/EO/`` -> ``/SAR/``;
                no crop. Splits "train", "test" (the scored first 4,000 validation pairs) and
                "test_all" (all 21,260).
- spacenet6_chips: the 256-px chips of ``cdiff prepare spacenet6``: EO ``{train,test}B/<stem>.png``,
                SAR ``{train,test}A/<stem>.png``; no crop.

Frozen lists: for qxs, sar2opt, spacenet6, spacenet6_chips and sar2eo, a ``split`` without a
``list_file`` reads the field's published list shipped with cdiff (cdiff.data.frozen), in its
order; ``frozen=False`` falls back to the behaviour below. A ``list_file`` for one of those
splits must be a published list (same SHA-256) unless ``force=True``. Files a frozen or given
list names that are missing are counted in one error (``on_error="raise"``).

Splits: ``list_file`` takes a release list (``train_eo_list_080.txt``...), read as it is.
Without one, a ``split`` of "train"/"test" reads cdiff's own deterministic 80/20 split by
scene (cdiff.data.split, which also holds each reader's scene rule).

``split=None`` (the default) takes every pair, or with a ``list_file`` the split its name
says (an explicit ``split`` must agree with the name).

``transform="default"``: "train" gets :class:`PairAugment` (random crop at the listed
size, flips, 90-degree rotations of square images), "test" a :class:`CenterCrop` at that
size (nothing for uncropped datasets), ``split=None`` nothing. Pass a callable (or None).

Bad input raises ``ValueError`` (``FileNotFoundError`` for missing files) naming the file.
With ``on_error="skip"``, bad pairs are dropped from the index when the dataset is opened,
logged (logger ``cdiff.data.datasets``), recorded in ``dataset.skipped`` (path -> reason)
and counted by ``dataset.num_skipped``: missing partners, and every file whose header
cannot be read or whose size differs from its partner's. Only headers are read then
(Pillow's ``Image.open`` without decoding; rasterio's header for TIFFs Pillow cannot open):
for 20,000 pairs of 256x256 PNGs (QXS-SAROPT's size) that is 15 s, where decoding them all
takes 12 min (0.4 ms against 18 ms a file, measured on a busy 2-core machine). A file
damaged beyond its header (truncated pixel data) fails only when decoded: reading that pair
then raises, saying so, rather than silently returning another pair (which would put a
pair twice into a test set); ``dataset.validate()`` decodes everything once and drops
those too. A dataset with no pair left is an error.
"""

from __future__ import annotations

import csv
import inspect
import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cdiff.data import imageio
from cdiff.data.frozen import check_listed_files, check_user_list, has_frozen, read_frozen, spacenet6_chip_stem
from cdiff.data.split import (
    QXS_GROUPING,
    SEN12_GROUPING,
    SPACENET6_GROUPING,
    SPLIT_SEED,
    Grouping,
    read_split,
    regex_grouping,
    select_split,
    split_of_list,
)
from cdiff.data.transforms import CenterCrop, PairAugment
from cdiff.imagefiles import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
DEFAULT = "default"


@dataclass(frozen=True)
class PairFiles:
    """One SAR-EO pair on disk."""

    sar: Path
    eo: Path
    name: str


# --- image readers: path -> (H, W, 3) float32 in [-1, 1] ------------------------------------


def read_single_pol_sar(path: Path) -> np.ndarray:
    """Grey (or grey-as-RGB) SAR image; one band is repeated to three."""
    array = imageio.read_image(path)
    imageio.check_finite(array, path)
    imageio.check_not_constant(array, path)
    unit = imageio.to_unit_range(array, path)
    return np.repeat(unit, 3, axis=2) if unit.shape[2] == 1 else unit


def read_rgb_eo(path: Path) -> np.ndarray:
    """RGB EO image (PNG/JPEG/TIFF)."""
    return _rgb(imageio.read_image(path), path)


def read_spacenet6_sar(path: Path) -> np.ndarray:
    """SpaceNet6 4-band SAR-Intensity GeoTIFF -> (HH, (HV+VH)/2, VV) after a per-band stretch."""
    return imageio.spacenet6_sar_to_rgb(imageio.read_geotiff(path), path)


def read_spacenet6_eo(path: Path) -> np.ndarray:
    """SpaceNet6 3-band PS-RGB GeoTIFF (uint8, or uint16/float with a percentile stretch)."""
    return _rgb(imageio.read_geotiff(path), path)


def _rgb(array: np.ndarray, path: Path) -> np.ndarray:
    if array.shape[2] != 3:
        raise ValueError(f"EO image {path} has {array.shape[2]} bands; expected 3 (RGB)")
    return imageio.to_unit_range(array, path)


# --- the dataset -----------------------------------------------------------------------------


class PairedImages(Dataset):
    """Pairs of SAR and EO files read on demand (see the module docstring)."""

    def __init__(
        self,
        pairs: Sequence[PairFiles],
        *,
        read_sar: Callable[[Path], np.ndarray] = read_single_pol_sar,
        read_eo: Callable[[Path], np.ndarray] = read_rgb_eo,
        transform: Callable[[dict], dict] | None = None,
        on_error: str = "raise",
        skipped: dict[str, str] | None = None,
        what: str = "dataset",
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.read_sar, self.read_eo, self.transform, self.on_error = read_sar, read_eo, transform, on_error
        self.what = what
        self.skipped: dict[str, str] = dict(skipped or {})
        for key, reason in self.skipped.items():
            log.warning("skipped %s: %s", key, reason)
        kept = []
        for pair in pairs:
            reason = _missing(pair)
            if reason is None:
                kept.append(pair)
            else:
                self._skip_or_raise(str(pair.eo), FileNotFoundError(reason))
        if on_error == "skip":
            kept = self._drop_unreadable_headers(kept)
        if not kept:
            raise ValueError(f"{what} has no usable pair ({self.num_skipped} skipped)")
        if self.skipped:
            log.warning("%s: skipped %d (reasons logged above), kept %d pairs", what, self.num_skipped, len(kept))
        self.pairs: list[PairFiles] = kept

    @property
    def num_skipped(self) -> int:
        """How many pairs were skipped (missing partners, unreadable files...)."""
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> dict:
        """Read pair ``index`` without the transform; raises on bad input whatever on_error."""
        pair = self.pairs[index]
        sar = self.read_sar(pair.sar)
        eo = self.read_eo(pair.eo)
        mismatch = _size_mismatch(pair, sar.shape[:2], eo.shape[:2])
        if mismatch:
            raise ValueError(mismatch)
        return {"sar": _chw(sar), "eo": _chw(eo), "name": pair.name}

    def __getitem__(self, index: int) -> dict:
        n = len(self.pairs)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} pairs")
        try:
            sample = self.load(index)
        except (ValueError, OSError) as err:
            if self.on_error == "raise":
                raise
            # Never hand back another pair instead: a test set would hold it twice.
            raise ValueError(
                f"{self.what}: pair {self.pairs[index].name} passed the header check when the dataset was "
                f"opened but cannot be decoded: {err}. Call dataset.validate() once to decode every pair "
                f"and drop the bad ones"
            ) from err
        return self.transform(sample) if self.transform is not None else sample

    def validate(self) -> "PairedImages":
        """Decode every pair once; with on_error="skip", drop (log, count) the bad ones."""
        good = []
        for j, pair in enumerate(self.pairs):
            try:
                self.load(j)
            except (ValueError, OSError) as err:
                self._skip_or_raise(str(pair.eo), err)
                continue
            good.append(pair)
        if not good:
            raise ValueError(f"{self.what} has no readable pair ({self.num_skipped} skipped)")
        self.pairs = good
        return self

    def _drop_unreadable_headers(self, pairs: list[PairFiles]) -> list[PairFiles]:
        """The pairs whose two headers read and whose sizes agree; the others skipped."""
        good = []
        for pair in pairs:
            try:
                mismatch = _size_mismatch(pair, imageio.image_size(pair.sar), imageio.image_size(pair.eo))
                if mismatch:
                    raise ValueError(mismatch)
            except ValueError as err:
                self._skip_or_raise(str(pair.eo), err)
                continue
            good.append(pair)
        return good

    def _skip_or_raise(self, key: str, err: Exception) -> None:
        if self.on_error == "raise":
            raise err
        if key not in self.skipped:
            self.skipped[key] = str(err)
            log.warning("skipped %s: %s", key, err)


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))  # (3, H, W)


def _size_mismatch(pair: PairFiles, sar_hw, eo_hw) -> str | None:
    if tuple(sar_hw) == tuple(eo_hw):
        return None
    (hs, ws), (he, we) = sar_hw, eo_hw
    kind = "orientation mismatch (one is rotated/transposed)" if (hs, ws) == (we, he) else "size mismatch"
    return f"{kind}: SAR {pair.sar} is {hs}x{ws} but EO {pair.eo} is {he}x{we} (HxW)"


def _missing(pair: PairFiles) -> str | None:
    if not pair.eo.is_file():
        return f"EO image not found: {pair.eo}"
    if not pair.sar.is_file():
        return f"SAR partner of EO image {pair.eo} not found: expected {pair.sar}"
    return None


# --- building pair lists ---------------------------------------------------------------------


def _images_under(folder: Path, root: Path, pattern: str = "**/*") -> list[str]:
    """Image files matching ``pattern`` under ``folder``, as sorted posix paths relative to ``root``."""
    found = [p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p.relative_to(root).as_posix() for p in found if not p.name.startswith("."))


def _names(eo_rel: Sequence[str]) -> list[str]:
    stems = [PurePosixPath(p).stem for p in eo_rel]
    if len(set(stems)) == len(stems):
        return stems
    # Stems collide (same file name in several folders): fall back to the path, flattened.
    return [str(PurePosixPath(p).with_suffix("")).replace("/", "__") for p in eo_rel]


def _build(
    root: Path,
    eo_rel: Sequence[str],
    sar_from_eo: Callable[[str], str],
    split: str | None,
    crop: int | None,
    transform,
    on_error: str,
    what: str,
    read_sar=read_single_pol_sar,
    read_eo=read_rgb_eo,
    skipped: dict[str, str] | None = None,
) -> PairedImages:
    if transform == DEFAULT:
        transform = default_transform(split, crop)
    pairs = [PairFiles(root / sar_from_eo(e), root / e, n) for e, n in zip(eo_rel, _names(eo_rel))]
    return PairedImages(
        pairs, read_sar=read_sar, read_eo=read_eo, transform=transform, on_error=on_error, skipped=skipped, what=what
    )


def default_transform(split: str | None, crop: int | None):
    """PairAugment(crop) for "train", CenterCrop(crop) (or nothing) for "test", nothing otherwise."""
    if split == "train":
        return PairAugment(crop_size=crop)
    if split == "test" and crop is not None:
        return CenterCrop(crop)
    return None


def _root(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root} (in a run config it is data.root: give the "
                                f"dataset's folder with --set data.root=/path/to/it)")
    return root


def _nonempty(found: list[str], where: Path, layout: str) -> list[str]:
    if not found:
        raise ValueError(f"no EO images found under {where} (expected {layout})")
    return found


def _swap_part(rel: str, table: dict[str, str], path_for_error: str) -> str:
    parts = list(PurePosixPath(rel).parts)
    hits = [i for i, part in enumerate(parts) if part in table]
    if not hits:
        raise ValueError(f"EO path {path_for_error} has none of the folders {sorted(table)}: cannot derive its SAR path")
    for i in hits:
        parts[i] = table[parts[i]]
    return str(PurePosixPath(*parts))


def _frozen_paths(root: Path, dataset: str, split: str | None, list_file, frozen: bool, force: bool) -> list[str] | None:
    """The field's list for ``split`` when it applies (see the module docstring), else None.

    A user's ``list_file`` is checked against the published lists and then read by the caller."""
    if list_file is not None:
        check_user_list(list_file, dataset, split_of_list(split, list_file), force)
        return None
    if frozen and split is not None and has_frozen(dataset, split):
        return read_frozen(dataset, split, root, force)
    return None


def _check_listed(root: Path, eo_rel: Sequence[str], sar_from_eo: Callable[[str], str], what: str, on_error: str) -> None:
    """One error counting every file a list names that is missing (with on_error="raise")."""
    if on_error == "raise":
        check_listed_files([root / p for e in eo_rel for p in (e, sar_from_eo(e))], what)


# --- the readers -----------------------------------------------------------------------------


def qxs_saropt(root, split: str | None = None, *, list_file=None, split_dir=None, ratio: int = 80,
               seed: int = SPLIT_SEED, transform=DEFAULT, on_error: str = "raise", frozen: bool = True,
               force: bool = False) -> PairedImages:
    """QXS-SAROPT: 256x256 grey Gaofen-3 SAR and Google Earth RGB PNGs; no crop.

    "train"/"test" read the field's frozen lists (16,001 / 3,999 pairs) unless ``frozen=False``.
    Split groups of cdiff's own split: blocks of QXS_BLOCK consecutive patch numbers (the names
    are plain numbers with no scene id; see the module docstring)."""
    root = _root(root)
    table = {"opt_256_oc_0.2": "sar_256_oc_0.2"}
    listed = _frozen_paths(root, "qxs", split, list_file, frozen, force)
    if listed is not None:
        _check_listed(root, listed, lambda e: _swap_part(e, table, e), f"the frozen QXS-SAROPT {split} list", on_error)
        return _build(root, listed, lambda e: _swap_part(e, table, e), split, None, transform, on_error,
                      f"QXS-SAROPT {root}")
    eo_dir = root / "opt_256_oc_0.2"

    def discover():
        return _nonempty(_images_under(eo_dir, root), eo_dir, "QXS-SAROPT's opt_256_oc_0.2/ and sar_256_oc_0.2/")

    split, eo_rel = select_split(root, split, list_file, split_dir, ratio, seed, discover, QXS_GROUPING)
    if list_file is not None:
        _check_listed(root, eo_rel, lambda e: _swap_part(e, table, e), f"the split list {list_file}", on_error)
    return _build(root, eo_rel, lambda e: _swap_part(e, table, e), split, None, transform, on_error, f"QXS-SAROPT {root}")


def sar2opt(root, split: str | None = None, *, list_file=None, transform=DEFAULT, on_error: str = "raise",
            frozen: bool = True, force: bool = False) -> PairedImages:
    """SAR2Opt: 600x600 TerraSAR-X SAR (trainA/testA) and RGB (trainB/testB); 512 crops.

    "train"/"test" read the field's frozen lists (1,450 / 627: the official folders) unless
    ``frozen=False``, which lists the folders as they are."""
    root = _root(root)
    table = {"trainB": "trainA", "testB": "testA"}
    listed = _frozen_paths(root, "sar2opt", split, list_file, frozen, force)
    if listed is not None:
        eo_rel = listed
        _check_listed(root, eo_rel, lambda e: _swap_part(e, table, e), f"the frozen SAR2Opt {split} list", on_error)
    elif list_file is not None:
        split = split_of_list(split, list_file)
        eo_rel = read_split(list_file)
        _check_listed(root, eo_rel, lambda e: _swap_part(e, table, e), f"the split list {list_file}", on_error)
    else:
        folders = {"train": ["trainB"], "test": ["testB"], None: ["trainB", "testB"]}
        if split not in folders:
            raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
        eo_rel = [e for f in folders[split] for e in _images_under(root / f, root)]
        _nonempty(eo_rel, root, "SAR2Opt's trainA/, trainB/, testA/, testB/")
    return _build(root, eo_rel, lambda e: _swap_part(e, table, e), split, 512, transform, on_error, f"SAR2Opt {root}")


def spacenet6(root, split: str | None = None, *, list_file=None, split_dir=None, ratio: int = 80,
              seed: int = SPLIT_SEED, transform=DEFAULT, on_error: str = "raise", frozen: bool = True,
              force: bool = False) -> PairedImages:
    """SpaceNet6: 900x900 Capella full-pol SAR-Intensity and Maxar PS-RGB GeoTIFFs; 512 crops.

    "train"/"test" read the field's frozen lists (2,558 / 495 tiles: UTM-easting blocks with a
    450 m guard band) unless ``frozen=False``; the field trains and scores on the 256-px chips
    of these tiles (``spacenet6_chips``). Split groups of cdiff's own split: the SAR strip,
    named by the two collect timestamps in every tile's name."""
    root = _root(root)
    listed = _frozen_paths(root, "spacenet6", split, list_file, frozen, force)
    if listed is not None:
        sar_of = lambda e: e.replace("PS-RGB", "SAR-Intensity")  # noqa: E731
        _check_listed(root, listed, sar_of, f"the frozen SpaceNet6 {split} list", on_error)
        return _build(root, listed, sar_of, split, 512, transform, on_error, f"SpaceNet6 {root}",
                      read_sar=read_spacenet6_sar, read_eo=read_spacenet6_eo)

    def discover():
        found = [e for e in _images_under(root, root, "**/PS-RGB/*") if e.lower().endswith((".tif", ".tiff"))]
        return _nonempty(found, root, "SpaceNet6's .../PS-RGB/*.tif and .../SAR-Intensity/*.tif")

    split, eo_rel = select_split(root, split, list_file, split_dir, ratio, seed, discover, SPACENET6_GROUPING)
    for e in eo_rel:
        if "PS-RGB" not in e:
            raise ValueError(f"SpaceNet6 EO path {e} does not contain 'PS-RGB': cannot derive its SAR path")
    if list_file is not None:
        _check_listed(root, eo_rel, lambda e: e.replace("PS-RGB", "SAR-Intensity"), f"the split list {list_file}",
                      on_error)
    return _build(root, eo_rel, lambda e: e.replace("PS-RGB", "SAR-Intensity"), split, 512, transform, on_error,
                  f"SpaceNet6 {root}", read_sar=read_spacenet6_sar, read_eo=read_spacenet6_eo)


_SEN12_FOLDER = re.compile(r"^s2_(\d+)$")
_SEN12_FILE = re.compile(r"_s2_(\d+_p\d+)(\.\w+)$")


def sen12_sar_path(eo_rel: str) -> str:
    """``ROIs1158_spring/s2_1/ROIs1158_spring_s2_1_p30.png`` -> ``.../s1_1/..._s1_1_p30.png``.

    Only the ``s2_N`` folder and the ``_s2_N_p<k>`` file-name part change: season folders
    such as ``ROIs2017_winter`` also contain the letters "s2".
    """
    path = PurePosixPath(eo_rel)
    folder, file = path.parent.name, path.name
    if not _SEN12_FOLDER.match(folder) or not _SEN12_FILE.search(file):
        raise ValueError(f"SEN1-2 EO path {eo_rel} is not of the form ROIs.../s2_N/..._s2_N_p<k>.png")
    new_folder = _SEN12_FOLDER.sub(r"s1_\1", folder)
    new_file = _SEN12_FILE.sub(r"_s1_\1\2", file)
    return str(path.parent.parent / new_folder / new_file)


def sen12(root, split: str | None = None, *, list_file=None, split_dir=None, ratio: int = 80,
          seed: int = SPLIT_SEED, transform=DEFAULT, on_error: str = "raise") -> PairedImages:
    """SEN1-2: 256x256 Sentinel-1 VV and Sentinel-2 RGB PNG patches; no crop.

    Split groups: the scene, the ``ROIs<season>/s2_N`` folder holding its patches ``p<k>``."""
    root = _root(root)

    def discover():
        found = [e for e in _images_under(root, root, "ROIs*/s2_*/*") if _SEN12_FILE.search(e)]
        return _nonempty(found, root, "SEN1-2's ROIs<season>/s1_N/ and s2_N/ folders")

    split, eo_rel = select_split(root, split, list_file, split_dir, ratio, seed, discover, SEN12_GROUPING)
    return _build(root, eo_rel, sen12_sar_path, split, None, transform, on_error, f"SEN1-2 {root}")


def folder_pairs(root, split: str | None = None, *, sar_dir: str = "sar", eo_dir: str = "eo", list_file=None,
                 split_dir=None, ratio: int = 80, seed: int = SPLIT_SEED, group: str | None = None,
                 crop: int | None = None, transform=DEFAULT, on_error: str = "raise") -> PairedImages:
    """Generic layout: ``root/sar_dir`` and ``root/eo_dir`` hold same-named files.

    Split groups: ``group``, a regex searched in the EO file name (its first capture group,
    else the whole match, is the scene key: ``r"^(scene\\d+)_"`` keeps ``scene3_p1.png`` and
    ``scene3_p2.png`` together); None puts each pair in a group of its own."""
    root = _root(root)
    skipped: dict[str, str] = {}

    def discover():
        eo = _nonempty(_images_under(root / eo_dir, root, "*"), root / eo_dir, f"{eo_dir}/ beside {sar_dir}/")
        eo_names = {PurePosixPath(e).name for e in eo}
        for s in _images_under(root / sar_dir, root, "*"):
            if PurePosixPath(s).name not in eo_names:
                reason = f"EO partner of SAR image {root / s} not found: expected {root / eo_dir / PurePosixPath(s).name}"
                if on_error == "raise":
                    raise FileNotFoundError(reason)
                skipped[str(root / s)] = reason
        return eo

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    grouping = regex_grouping("folders", group)
    split, eo_rel = select_split(root, split, list_file, split_dir, ratio, seed, discover, grouping)
    return _build(root, eo_rel, lambda e: _swap_part(e, {eo_dir: sar_dir}, e), split, crop, transform, on_error,
                  f"folder pairs {root}", skipped=skipped)


def csv_pairs(csv_file, split: str | None = None, *, list_file=None, split_dir=None, ratio: int = 80,
              seed: int = SPLIT_SEED, group: str | None = None, crop: int | None = None, transform=DEFAULT,
              on_error: str = "raise") -> PairedImages:
    """Generic layout: a CSV with columns ``sar,eo`` (paths relative to the CSV's folder).

    Split groups: an optional ``group`` column (pairs with the same value are one scene),
    or ``group=`` a regex on the EO file name as for folder_pairs; else one group per pair.
    The default split folder is ``cdiff_split_csv_<CSV name>`` beside the CSV."""
    csv_file = Path(csv_file)
    if not csv_file.is_file():
        raise FileNotFoundError(f"pairs CSV not found: {csv_file}")
    root = csv_file.parent
    with open(csv_file, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "sar" not in columns or "eo" not in columns:
            raise ValueError(f"pairs CSV {csv_file} needs columns 'sar' and 'eo'; it has {columns}")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    sar_of: dict[str, str] = {}
    group_of: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        if not row["sar"] or not row["eo"]:
            raise ValueError(f"pairs CSV {csv_file}, line {line}: empty 'sar' or 'eo' entry")
        if row["eo"] in sar_of:
            raise ValueError(f"pairs CSV {csv_file}, line {line}: EO image {row['eo']} listed twice")
        if "group" in columns and not row.get("group"):
            raise ValueError(f"pairs CSV {csv_file}, line {line}: empty 'group' entry")
        sar_of[row["eo"]] = row["sar"]
        group_of[row["eo"]] = row.get("group", "")
    if not sar_of:
        raise ValueError(f"pairs CSV {csv_file} lists no pairs")

    def sar_from_eo(e: str) -> str:
        if e not in sar_of:
            raise ValueError(f"EO path {e} (from the split list) is not in the pairs CSV {csv_file}")
        return sar_of[e]

    reader = f"csv_{csv_file.stem}"  # two CSVs in one folder get two split folders
    if "group" in columns:
        if group is not None:
            raise ValueError(f"pairs CSV {csv_file} has a 'group' column; group= would be a second rule, drop one")
        grouping = Grouping(reader, "the CSV's group column", group_of.__getitem__)
    else:
        grouping = regex_grouping(reader, group)
    split, eo_rel = select_split(root, split, list_file, split_dir, ratio, seed, lambda: sorted(sar_of), grouping)
    return _build(root, eo_rel, sar_from_eo, split, crop, transform, on_error, f"pairs CSV {csv_file}")


def read_grey_eo(path: Path) -> np.ndarray:
    """Grey (or RGB) EO image: one band is repeated to three (SAR2EO's monochrome WAMI EO)."""
    unit = imageio.to_unit_range(imageio.read_image(path), path)
    return np.repeat(unit, 3, axis=2) if unit.shape[2] == 1 else unit


SAR2EO_SPLITS = ("train", "test", "test_all")
_SAR2EO_FOLDERS = {"train": "SAR-EO/EO/train", "test": "SAR-EO/EO/validation", "test_all": "SAR-EO/EO/validation"}


def sar2eo_sar_path(eo_rel: str) -> str:
    """``SAR-EO/EO/train/Gotcha12.png`` -> ``SAR-EO/SAR/train/Gotcha12.png``."""
    parts = list(PurePosixPath(eo_rel).parts)
    if "EO" not in parts[:-1]:
        raise ValueError(f"SAR2EO EO path {eo_rel} has no EO/ folder: cannot derive its SAR path")
    parts[parts.index("EO")] = "SAR"
    return str(PurePosixPath(*parts))


def sar2eo(root, split: str | None = None, *, list_file=None, transform=DEFAULT, on_error: str = "raise",
           frozen: bool = True, force: bool = False) -> PairedImages:
    """SAR2EO (the E3Diff release): 256x256 grey airborne UNICORN SAR and WAMI EO PNGs; no crop.

    ``root`` holds ``SAR-EO/{EO,SAR}/{train,validation}/``. Splits: "train" (68,151 pairs),
    "test" (the scored subset: the first 4,000 validation pairs in the published order) and
    "test_all" (all 21,260). With ``frozen`` (the default) "test" is the shipped list and the
    other two are the sorted folder listings, refused unless they hash to the published lists;
    ``frozen=False`` lists the folders as they are ("test" then means all validation pairs).
    """
    root = _root(root)
    if split is not None and split not in SAR2EO_SPLITS:
        raise ValueError(f"SAR2EO split must be one of {SAR2EO_SPLITS} or None, got {split!r}")
    listed = _frozen_paths(root, "sar2eo", split, list_file, frozen, force)
    if listed is not None:
        eo_rel, what = listed, f"the frozen SAR2EO {split} list"
    elif list_file is not None:
        split, eo_rel, what = split_of_list(split, list_file), read_split(list_file), f"the split list {list_file}"
    else:
        folders = [_SAR2EO_FOLDERS[split]] if split is not None else ["SAR-EO/EO/train", "SAR-EO/EO/validation"]
        eo_rel = _nonempty([e for f in folders for e in _images_under(root / f, root, "*")], root,
                           "SAR2EO's SAR-EO/EO/{train,validation}/ and SAR-EO/SAR/{train,validation}/")
        what = f"SAR2EO {root}"
    _check_listed(root, eo_rel, sar2eo_sar_path, what, on_error)
    return _build(root, eo_rel, sar2eo_sar_path, split, None, transform, on_error, f"SAR2EO {root}",
                  read_eo=read_grey_eo)


def spacenet6_chips(root, split: str | None = None, *, list_file=None, transform=DEFAULT, on_error: str = "raise",
                    frozen: bool = True, force: bool = False) -> PairedImages:
    """SpaceNet6 as the field trains and scores it: the 256-px chips of ``cdiff prepare spacenet6``.

    ``root`` holds ``{train,test}A/<stem>.png`` (SAR: HH, HV, VV in a fixed dB window) and
    ``{train,test}B/<stem>.png`` (EO). "train"/"test" follow the frozen SpaceNet6 lists, in
    their order (``frozen=False``: the folders' sorted listings); no crop. A ``list_file``
    holds chip paths such as ``testB/<stem>.png``.
    """
    root = _root(root)
    sar_of = lambda e: _swap_part(e, {"trainB": "trainA", "testB": "testA"}, e)  # noqa: E731
    if list_file is not None:
        split, eo_rel, what = split_of_list(split, list_file), read_split(list_file), f"the split list {list_file}"
    elif frozen and split is not None and has_frozen("spacenet6", split):
        tiles = read_frozen("spacenet6", split)
        eo_rel, what = [f"{split}B/{spacenet6_chip_stem(t)}.png" for t in tiles], f"the frozen SpaceNet6 {split} list"
    else:
        folders = {"train": ["trainB"], "test": ["testB"], None: ["trainB", "testB"]}
        if split not in folders:
            raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
        eo_rel = _nonempty([e for f in folders[split] for e in _images_under(root / f, root, "*.png")], root,
                           "the chips of 'cdiff prepare spacenet6': trainA/, trainB/, testA/, testB/")
        what = f"SpaceNet6 chips {root}"
    _check_listed(root, eo_rel, sar_of, what, on_error)
    return _build(root, eo_rel, sar_of, split, None, transform, on_error, f"SpaceNet6 chips {root}")


READERS = {
    "qxs": qxs_saropt,
    "sar2opt": sar2opt,
    "spacenet6": spacenet6,
    "spacenet6_chips": spacenet6_chips,
    "sar2eo": sar2eo,
    "sen12": sen12,
    "folders": folder_pairs,
    "csv": csv_pairs,
}
DATASET_KINDS = tuple(READERS)  # the names open_dataset takes, as cdiff.train's data.kind does
# The kinds whose readers check a given list_file against the field's published lists, and take
# ``force`` to use another one (cdiff.train's data.force).
FORCE_KINDS = tuple(kind for kind, reader in READERS.items() if "force" in inspect.signature(reader).parameters)


def open_dataset(kind: str, root, **kwargs) -> PairedImages:
    """``READERS[kind](root, **kwargs)``; kind is one of qxs, sar2opt, spacenet6, spacenet6_chips, sar2eo,
    sen12, folders, csv."""
    if kind not in READERS:
        raise ValueError(f"dataset kind must be one of {sorted(READERS)}, got {kind!r}")
    return READERS[kind](root, **kwargs)

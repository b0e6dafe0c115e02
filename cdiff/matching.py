"""Which prediction goes with which ground truth, under the field's protocol, and the crop that
makes them the same size.

As GeoSET's ``scripts/evaluate.py`` (and ReFlowSET's) do:
- files are matched by **stem**: the file name without its folder and suffix, so ``out/12.png``
  goes with ``eo/12.jpg``; pix2pix-family test scripts name their outputs ``<stem>_fake_B.png``,
  and that suffix is dropped from prediction names;
- the test items are the names of a **split list** when one is given (one name per line; a line
  may be a path relative to the dataset, ``opt_256_oc_0.2/12.png``: its stem counts; a
  benchmark's name, ``qxs-saropt``, stands for its test list shipped with cdiff), otherwise
  every image of the target folder;
- a test item without a prediction is **missing**: counted and named in the report, never
  silently left out; the row is then not comparable with a complete one;
- the FID/KID reference is every test item's ground truth, scored or not (GeoSET: "the whole
  test split");
- the ground truth (and the SAR image) is **centre-cropped** to the prediction's size when it
  is larger, ``top = (H - h) // 2``, ``left = (W - w) // 2`` (SAR2Opt's 600-px tiles are
  scored on their centre 512 x 512).

Folders are searched recursively (hidden files skipped); two files of one stem in a folder are
an error, since either could be the one meant.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cdiff.published import BENCHMARKS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
FAKE_B = "_fake_B"  # pytorch-CycleGAN-and-pix2pix's test.py: <stem>_fake_B.png
SPACENET6_EO_TAG = "_PS-RGB"  # GeoSET's SpaceNet6 lists name raw PS-RGB tiles; the chips drop this tag


@dataclass(frozen=True)
class Item:
    """One scored test item: its name (stem), its files; ``sar`` with ``--sar``."""

    name: str
    pred: Path
    target: Path
    sar: Path | None = None


@dataclass(frozen=True)
class Matching:
    """The scored items, the test items without a prediction, the FID/KID reference set, and
    the prediction files that are no test item (e.g. pix2pix's ``_real_A`` images)."""

    items: list[Item]
    missing: list[str]
    reference: list[Path]
    unmatched: list[Path] = field(default_factory=list)


def stem_of(path: str | os.PathLike, prediction: bool = False) -> str:
    """The file name without folder and suffix; for a prediction, without ``_fake_B`` too."""
    stem = Path(path).stem
    if prediction and stem.endswith(FAKE_B):
        stem = stem[: -len(FAKE_B)]
    return stem


def split_list_path(value: str | os.PathLike) -> Path:
    """``--split-list``: a file, else the name of a published benchmark (``qxs-saropt``,
    cdiff.published), which stands for its frozen test list shipped with cdiff
    (cdiff/data/splits/, checked against its published hash)."""
    path = Path(value)
    if path.is_file():
        return path
    if os.fspath(value) in BENCHMARKS:
        from cdiff.data import frozen

        return frozen.shipped_path(frozen.frozen_list(BENCHMARKS[os.fspath(value)].reader, "test"))
    raise FileNotFoundError(f"split list {path}: no such file (a benchmark's name, one of {', '.join(BENCHMARKS)}, "
                            "gives its test list shipped with cdiff)")


def read_split_list(path: str | os.PathLike, dataset: str | None = None) -> list[str]:
    """The test item names of a split list (``split_list_path``): one per line, a stem or a path
    (its stem is taken when it ends in an image suffix); blank lines and ``#`` comments skipped.
    With ``dataset`` "spacenet6" (or the list named "spacenet6"), GeoSET's rule maps a raw tile
    name to its chip (``_PS-RGB`` dropped). An empty list or a name listed twice is an error
    naming the file and line."""
    if dataset is None and os.fspath(path) in BENCHMARKS and not Path(path).is_file():
        dataset = os.fspath(path)
    path = split_list_path(path)
    names: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = Path(line).name
        if Path(name).suffix.lower() in IMAGE_SUFFIXES:
            name = Path(name).stem
        if dataset == "spacenet6":
            name = name.replace(SPACENET6_EO_TAG, "")
        if name in names:
            raise ValueError(f"split list {path}: {name!r} on line {number} is already on line {names[name]}")
        names[name] = number
    if not names:
        raise ValueError(f"split list {path} names no image")
    return list(names)


def images_by_stem(folder: str | os.PathLike, what: str, prediction: bool = False,
                   only: set[str] | None = None) -> dict[str, Path]:
    """The image files under ``folder`` (recursive, hidden ones skipped) by stem (``stem_of``);
    with ``only``, just the files whose relative path without suffix (``scene/12``) it holds.
    A missing or empty folder, or two files of one stem, is an error naming them."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} folder {root}: no such folder")
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.suffix.lower() not in IMAGE_SUFFIXES or any(p.startswith(".") for p in relative.parts):
            continue
        if not path.is_file() or (only is not None and relative.with_suffix("").as_posix() not in only):
            continue
        stem = stem_of(path, prediction)
        if stem in found:
            raise ValueError(f"{what} folder {root}: {found[stem].relative_to(root)} and {relative} are both "
                             f"named {stem!r}; keep one")
        found[stem] = path
    if not found:
        raise ValueError(f"{what} folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def match(pred_dir, target_dir, split_list=None, sar_dir=None, dataset: str | None = None,
          only: list[str] | None = None) -> Matching:
    """Match predictions to test items by stem (module docstring). Every test item needs a
    ground truth (and, with ``sar_dir``, every scored item a SAR image): one missing is an
    error naming it. No prediction of any test item is an error too. ``only``: the
    predictions to consider, by relative path without suffix (the images ``cdiff translate``
    wrote); the other files of ``pred_dir`` are not looked at."""
    targets = images_by_stem(target_dir, "target")
    preds = images_by_stem(pred_dir, "prediction", prediction=True, only=None if only is None else set(only))
    if split_list is not None:
        names = read_split_list(split_list, dataset)
        no_target = [n for n in names if n not in targets]
        if no_target:
            raise ValueError(f"{len(no_target)} items of the split list {split_list} have no image in {target_dir}, "
                             f"e.g. {no_target[0]!r}")
    else:
        names = list(targets)
    listed = set(names)
    scored = [n for n in names if n in preds]
    if not scored:
        raise ValueError(f"no image in {pred_dir} is named after a test item of "
                         f"{split_list or target_dir} (e.g. {names[0]!r}; a {FAKE_B} suffix is accepted)")
    sars = images_by_stem(sar_dir, "SAR") if sar_dir is not None else {}
    if sar_dir is not None:
        no_sar = [n for n in scored if n not in sars]
        if no_sar:
            raise ValueError(f"{len(no_sar)} scored items have no SAR image in {sar_dir}, e.g. {no_sar[0]!r}")
    items = [Item(n, preds[n], targets[n], sars.get(n)) for n in sorted(scored)]
    return Matching(
        items=items,
        missing=sorted(n for n in names if n not in preds),
        reference=[targets[n] for n in sorted(names)],
        unmatched=sorted(p for n, p in preds.items() if n not in listed),
    )


def centre_crop(image: torch.Tensor, height: int, width: int, path: str | os.PathLike) -> torch.Tensor:
    """The centre ``height`` x ``width`` window of ``image`` (..., H, W); an image smaller than
    that is an error naming ``path``."""
    h, w = image.shape[-2:]
    if h < height or w < width:
        raise ValueError(f"{path} is {w}x{h}, smaller than the prediction's {width}x{height}: it cannot be "
                         "centre-cropped to it")
    top, left = (h - height) // 2, (w - width) // 2
    return image[..., top:top + height, left:left + width]

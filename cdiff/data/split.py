"""Train/test split lists in the C-DiffSET release's format.

A split is two text files, ``train_eo_list_080.txt`` and ``test_eo_list_080.txt`` (the
number is the train percentage, three digits): EO image paths relative to the data root,
``/``-separated, one per line, sorted. Only EO paths are stored; each reader derives the
SAR path from the EO path the way the release does.

When no list is given, cdiff makes its own split: the sorted EO paths, each given a key
from ``random.Random(seed).random()`` in that order (the one stream Python promises to keep
stable across versions), and the ``len * (100 - ratio) // 100`` paths with the smallest keys
form the test set. Integer arithmetic, so 10 paths at 80% give exactly 2 test paths.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Sequence

from cdiff.data.imageio import write_text

log = logging.getLogger(__name__)

SPLIT_SEED = 2025
SPLITS = ("train", "test")


def split_list_name(split: str, ratio: int = 80) -> str:
    """``train_eo_list_080.txt`` / ``test_eo_list_080.txt``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_ratio(ratio)
    return f"{split}_eo_list_{ratio:03d}.txt"


def _check_ratio(ratio: int) -> None:
    if not isinstance(ratio, int) or not 0 < ratio < 100:
        raise ValueError(f"ratio (train percentage) must be an integer in 1..99, got {ratio!r}")


def make_split(eo_paths: Sequence[str], ratio: int = 80, seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """Deterministic (train, test) lists of ``eo_paths``, each sorted (see module docstring)."""
    _check_ratio(ratio)
    paths = sorted(set(eo_paths))
    if len(paths) != len(eo_paths):
        raise ValueError("make_split: the EO path list has duplicates")
    rng = random.Random(seed)
    keys = [rng.random() for _ in paths]
    n_test = len(paths) * (100 - ratio) // 100
    order = sorted(range(len(paths)), key=lambda i: keys[i])
    test_ids = set(order[:n_test])
    train = [p for i, p in enumerate(paths) if i not in test_ids]
    test = [p for i, p in enumerate(paths) if i in test_ids]
    return train, test


def write_split(out_dir: str | os.PathLike, train: Sequence[str], test: Sequence[str], ratio: int = 80) -> tuple[Path, Path]:
    """Write the two list files into ``out_dir`` (atomically); return their paths."""
    out_dir = Path(out_dir)
    files = []
    for split, paths in (("train", train), ("test", test)):
        path = out_dir / split_list_name(split, ratio)
        write_text(path, "".join(f"{p}\n" for p in sorted(paths)))
        files.append(path)
    return files[0], files[1]


def read_split(list_file: str | os.PathLike) -> list[str]:
    """The EO paths of a release list file (``.txt``; blank lines ignored)."""
    list_file = Path(list_file)
    if list_file.suffix == ".pkl":
        raise ValueError(f"split list {list_file}: use the .txt list written beside it (pickles are not read)")
    if not list_file.is_file():
        raise FileNotFoundError(f"split list not found: {list_file}")
    paths = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    if not paths:
        raise ValueError(f"split list {list_file} is empty")
    return paths


def split_from_list_name(list_file: str | os.PathLike) -> str:
    """'train' or 'test' from a list file's name, as the release infers it."""
    name = Path(list_file).name
    found = [s for s in SPLITS if s in name]
    if len(found) != 1:
        raise ValueError(f"cannot tell train from test by the name of {list_file}; pass split= explicitly")
    return found[0]


def load_or_make_split(
    split_dir: str | os.PathLike, eo_paths: Sequence[str], split: str, ratio: int = 80, seed: int = SPLIT_SEED
) -> list[str]:
    """The ``split`` list from ``split_dir``; made from ``eo_paths`` and written there if absent."""
    path = Path(split_dir) / split_list_name(split, ratio)
    if not path.is_file():
        train, test = make_split(eo_paths, ratio, seed)
        try:
            write_split(split_dir, train, test, ratio)
        except OSError as err:
            raise OSError(f"cannot write the split lists into {split_dir} ({err}); pass split_dir= a writable folder") from err
        log.info("wrote a %d/%d split (%d train, %d test) into %s", ratio, 100 - ratio, len(train), len(test), split_dir)
    return read_split(path)

"""Train/test split lists in the C-DiffSET release's format, and cdiff's own split by scene.

A split is two text files, ``train_eo_list_080.txt`` and ``test_eo_list_080.txt`` (the
number is the train percentage, three digits): EO image paths relative to the data root,
``/``-separated, one per line, sorted. Only EO paths are stored; each reader derives the
SAR path from the EO path the way the release does.

When no list is given, cdiff makes its own split, by scene: patches cut from one scene
look alike (they overlap, or show the same ground), so they must all land on the same side.
Each reader gives every EO path a group key (its scene; see each reader's docstring), and
whole groups go to train or test:

- the group keys, sorted, each get a number from ``random.Random(seed).random()`` in that
  order (the one stream Python promises to keep stable across versions);
- groups in the order of those numbers (smallest first) form the test set: the shortest
  run of them whose pair count is nearest ``len * (100 - ratio) // 100``. The train share
  is therefore kept by pairs, within half the largest group. With one group per pair this
  is exactly that many test pairs: 10 pairs at 80% give exactly 2 test pairs.

Beside the lists goes ``split_080.json``, the record of how they were made: the reader, the
seed, the ratio, the group rule and a SHA-256 of the file list. A split found on disk is
used only when its record matches what the reader finds now; a stale one (files added or
removed, another reader, seed or group rule) is refused with a message that says how to
make a new one. A release list passed as ``list_file`` is read as it is, unchecked.

Each reader's scene (group) key:

- sen12:        the ``ROIs<season>/s2_N`` folder: all patches ``p<k>`` of one scene.
- spacenet6:    the SAR strip: the two collect timestamps in the tile's name
                (``..._PS-RGB_20190804111224_20190804111453_tile_8679.tif``). Strips overlap
                on the ground, so tiles of one place can still fall on both sides; for a
                geographic split, give a list_file.
- qxs_saropt:   blocks of 100 consecutive numbers (``1234.png`` -> block 12). The names carry
                no scene id; assuming the numbers follow the order the scenes were cut in,
                neighbours share a block. If the numbering were random, blocks cost nothing
                but granularity. A name that is not a number is its own group.
- folder_pairs: ``group=`` a regex searched in the EO file name (its first capture group,
                else the whole match, is the key); default one group per pair.
- csv_pairs:    a ``group`` column if the CSV has one, else ``group=`` as for folder_pairs,
                else one group per pair.
- sar2opt:      its own train/test folders; no cdiff split.

A reader picks its pairs with ``select_split``: a release list file (``list_file``), cdiff's own
split of ``split`` from ``split_dir`` (default ``root/cdiff_split_<reader>``, one folder per
reader: written there first if absent, refused if stale), or every pair.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

from cdiff.files import write_text

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


@dataclass(frozen=True)
class Grouping:
    """How a reader groups its pairs into scenes for cdiff's own split.

    ``reader`` names the default split folder (``cdiff_split_<reader>``), ``rule`` says in
    words what the key is (it is recorded beside the split, so a changed rule makes an old
    split stale), ``key`` maps an EO path (relative to the root) to its group; None puts
    every pair in a group of its own.
    """

    reader: str
    rule: str = "one group per pair"
    key: Callable[[str], str] | None = None


# --- each reader's scene rule --------------------------------------------------------------------


QXS_BLOCK = 100  # consecutive patch numbers per split group (module docstring)


def qxs_group(eo_rel: str) -> str:
    """``opt_256_oc_0.2/1234.png`` -> ``"block12"``: numbers in blocks of QXS_BLOCK."""
    stem = PurePosixPath(eo_rel).stem
    return f"block{int(stem) // QXS_BLOCK}" if stem.isdigit() else eo_rel


# The SAR strip of a SpaceNet6 tile: its collect's start and end time, before the tile number.
_SN6_STRIP = re.compile(r"_(\d{14}_\d{14})_tile_\d+\.\w+$")


def spacenet6_group(eo_rel: str) -> str:
    """``..._PS-RGB_20190804111224_20190804111453_tile_8679.tif`` -> ``"20190804111224_20190804111453"``;
    a name without the strip's timestamps is its own group."""
    found = _SN6_STRIP.search(eo_rel)
    return found.group(1) if found else eo_rel


def sen12_group(eo_rel: str) -> str:
    """``ROIs1158_spring/s2_1/ROIs1158_spring_s2_1_p30.png`` -> ``"ROIs1158_spring/s2_1"``: the scene."""
    return str(PurePosixPath(eo_rel).parent)


QXS_GROUPING = Grouping("qxs", f"blocks of {QXS_BLOCK} consecutive patch numbers", qxs_group)
SPACENET6_GROUPING = Grouping("spacenet6", "the SAR strip (collect timestamps in the tile name)", spacenet6_group)
SEN12_GROUPING = Grouping("sen12", "the ROIs<season>/s2_N scene folder", sen12_group)


def regex_grouping(reader: str, pattern: str | None) -> Grouping:
    """Group by ``pattern`` searched in the EO file name (first capture group, else the match)."""
    if pattern is None:
        return Grouping(reader)
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"group={pattern!r} is not a valid regular expression: {err}") from None

    def key(eo_rel: str) -> str:
        found = regex.search(PurePosixPath(eo_rel).name)
        if found is None:
            raise ValueError(f"group={pattern!r} does not match the EO file name {eo_rel}")
        return found.group(1) if regex.groups else found.group(0)

    return Grouping(reader, f"regex {pattern!r} on the EO file name", key)


# --- making and reading splits ---------------------------------------------------------------------


def make_split(
    eo_paths: Sequence[str], ratio: int = 80, seed: int = SPLIT_SEED, group: Callable[[str], str] | None = None
) -> tuple[list[str], list[str]]:
    """Deterministic (train, test) lists of ``eo_paths``, each sorted, whole groups on one
    side (``group``: EO path -> key; None: one group per path). See the module docstring."""
    _check_ratio(ratio)
    paths = sorted(set(eo_paths))
    if len(paths) != len(eo_paths):
        raise ValueError("make_split: the EO path list has duplicates")
    members: dict[str, list[str]] = {}
    for p in paths:
        members.setdefault(group(p) if group is not None else p, []).append(p)
    rng = random.Random(seed)
    draws = {g: rng.random() for g in sorted(members)}
    order = sorted(members, key=draws.__getitem__)
    n_test = len(paths) * (100 - ratio) // 100
    # The shortest prefix of `order` whose pair count is nearest n_test.
    best_k, best_gap, count = 0, n_test, 0
    for k, g in enumerate(order, start=1):
        if count >= n_test:
            break
        count += len(members[g])
        if abs(count - n_test) < best_gap:
            best_k, best_gap = k, abs(count - n_test)
    test_set = {p for g in order[:best_k] for p in members[g]}
    train = [p for p in paths if p not in test_set]
    test = [p for p in paths if p in test_set]
    if not train or not test:
        raise ValueError(
            f"cannot split {len(paths)} pairs in {len(members)} scene groups {ratio}/{100 - ratio}: the "
            f"{'test' if not test else 'train'} set would be empty. Use every pair (split=None) or give a list_file"
        )
    return train, test


def files_hash(eo_paths: Sequence[str]) -> str:
    """SHA-256 of the sorted EO path list, one path per line."""
    return hashlib.sha256("".join(f"{p}\n" for p in sorted(eo_paths)).encode()).hexdigest()


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


def record_name(ratio: int = 80) -> str:
    """``split_080.json``: the record written beside the lists of that ratio."""
    _check_ratio(ratio)
    return f"split_{ratio:03d}.json"


def load_or_make_split(
    split_dir: str | os.PathLike,
    eo_paths: Sequence[str],
    split: str,
    ratio: int = 80,
    seed: int = SPLIT_SEED,
    grouping: Grouping | None = None,
) -> list[str]:
    """The ``split`` list from ``split_dir``, checked against ``eo_paths`` (what the reader
    finds now); made by scene and written there (with its record) if absent."""
    grouping = grouping or Grouping(reader="")
    split_dir = Path(split_dir)
    lists = [split_dir / split_list_name(s, ratio) for s in SPLITS]
    record_path = split_dir / record_name(ratio)
    expected = {
        "reader": grouping.reader, "seed": seed, "ratio": ratio, "group_rule": grouping.rule,
        "files_sha256": files_hash(eo_paths),
    }
    if not any(p.exists() for p in (*lists, record_path)):
        train, test = make_split(eo_paths, ratio, seed, grouping.key)
        groups = len({grouping.key(p) for p in eo_paths}) if grouping.key else len(eo_paths)
        record = {**expected, "pairs": len(eo_paths), "groups": groups, "train": len(train), "test": len(test)}
        try:
            write_split(split_dir, train, test, ratio)
            write_text(record_path, json.dumps(record, indent=2) + "\n")  # last: its presence means "complete"
        except OSError as err:
            raise OSError(f"cannot write the split lists into {split_dir} ({err}); pass split_dir= a writable folder") from err
        log.info("wrote a %d/%d split by scene (%d groups; %d train, %d test pairs) into %s",
                 ratio, 100 - ratio, groups, len(train), len(test), split_dir)
    else:
        _check_split(split_dir, lists, record_path, expected, eo_paths)
    return read_split(split_dir / split_list_name(split, ratio))


def _check_split(split_dir: Path, lists: list[Path], record_path: Path, expected: dict, eo_paths) -> None:
    """Raise ValueError unless the split in ``split_dir`` was made from ``expected``."""
    how = (
        f"To make a new split, delete {', '.join(p.name for p in (*lists, record_path))} in {split_dir} "
        f"(or pass split_dir= another folder); to use these lists unchecked, pass list_file= one of them"
    )
    missing = [p.name for p in (*lists, record_path) if not p.is_file()]
    if missing:
        raise ValueError(f"incomplete split in {split_dir}: {', '.join(missing)} missing (made by an older cdiff, "
                         f"or interrupted), so it cannot be checked against the files. {how}")
    try:
        record = json.loads(record_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"split record {record_path} is not valid JSON ({err}). {how}") from None
    listed = [p for path in lists for p in read_split(path)]
    reasons = [
        f"it was made with {key} {record.get(key)!r}, now {key} is {value!r}"
        for key, value in expected.items() if key != "files_sha256" and record.get(key) != value
    ]
    if files_hash(listed) != record.get("files_sha256"):
        reasons.append("its lists were edited after it was made")
    if not reasons and record.get("files_sha256") != expected["files_sha256"]:
        found = set(eo_paths)
        added, removed = sorted(found - set(listed)), sorted(set(listed) - found)
        examples = ", ".join((added + removed)[:3])
        reasons.append(f"the files changed: {len(added)} added, {len(removed)} removed since (e.g. {examples})")
    if reasons:
        raise ValueError(f"stale split in {split_dir}: {'; '.join(reasons)}. {how}")


# --- which pairs a reader takes ------------------------------------------------------------------


def split_of_list(split: str | None, list_file) -> str:
    """The split a list file serves: its name says it, and an explicit ``split`` must agree."""
    if split is None:
        return split_from_list_name(list_file)
    name = Path(list_file).name
    other = {"train": "test", "test": "train"}.get(split)
    if other is None:
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    if other in name and split not in name:
        raise ValueError(f"split={split!r} but the list file {list_file} is named as a {other} list")
    return split


def select_split(
    root: Path, split: str | None, list_file, split_dir, ratio: int, seed: int, discover: Callable[[], list[str]],
    grouping: Grouping,
) -> tuple[str | None, list[str]]:
    """(split, EO paths relative to root) from a list file, cdiff's own split by ``grouping`` (in
    ``split_dir``, default ``root/cdiff_split_<reader>``), or everything (``split`` None);
    ``discover()`` lists the EO paths a reader finds."""
    if list_file is not None:
        return split_of_list(split, list_file), read_split(list_file)
    if split is not None:
        split_list_name(split, ratio)  # a bad split or ratio fails before anything is read
    found = discover()
    if split is None:
        return None, found
    split_dir = Path(split_dir) if split_dir is not None else root / f"cdiff_split_{grouping.reader}"
    return split, load_or_make_split(split_dir, found, split, ratio, seed, grouping)

"""The image files of a folder, as ``cdiff translate`` and ``cdiff evaluate`` find them, and what
they do with a file they cannot use.

A folder is searched recursively for IMAGE_SUFFIXES (any case), hidden files and folders
skipped; each image is named by its path relative to the folder, without the suffix, with
``/`` between folders (``scene/0001``), so a prediction and its target match by name whatever
their formats.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp") + TIFF_SUFFIXES  # the files cdiff reads as images


def list_images(folder: str | os.PathLike, what: str, skipped: list[str] | None = None) -> dict[str, Path]:
    """The image files under ``folder`` by name (module docstring), in sorted order. An empty or
    missing folder, or two files of one name, is an error naming ``what`` folder it is.

    A subfolder that cannot be read, or an image whose name is not valid UTF-8 (outputs are named,
    and noise seeded, by the name), is an error naming it; with ``skipped`` (a list: --skip-bad) it
    is left out and "what: reason" appended there instead.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} folder {root}: no such file or folder")
    problems: list[tuple[str, Exception]] = []

    def unreadable(err: OSError) -> None:
        where = Path(err.filename) if err.filename else root
        label = f"{where}{os.sep}" if where != root else str(root)
        problems.append((label, PermissionError(
            f"{what} folder {root}: cannot read the folder {where}: {err.strerror or err}")))

    paths = []
    for top, folders, files in os.walk(root, onerror=unreadable):
        folders[:] = [name for name in folders if not name.startswith(".")]  # hidden folders are skipped
        for name in files:
            path = Path(top) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            paths.append(path)
    found: dict[str, Path] = {}
    for path in sorted(paths):
        key = path.relative_to(root).with_suffix("").as_posix()
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes, kept by Python as lone surrogates
            problems.append((repr(os.fsencode(path)), ValueError(
                f"{what} folder {root}: the file name {os.fsencode(path)!r} is not valid UTF-8; rename it "
                "(cdiff names outputs, and seeds each image's noise, by the name)")))
            continue
        if key in found:
            raise ValueError(f"{what} folder {root}: {found[key].name} and {path.name} have the same name")
        found[key] = path
    for label, err in problems:
        skip_or_raise(err, label, skipped is not None, skipped if skipped is not None else [])
    if not found:
        raise ValueError(f"{what} folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def check_name(path: Path, what: str) -> str:
    """The stem of the single image file ``path`` as its name; a name that is not valid UTF-8 raises."""
    try:
        path.stem.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {os.fsencode(path)!r}: the file name is not valid UTF-8; rename it "
                         "(cdiff names outputs, and seeds each image's noise, by the name)") from None
    return path.stem


def skip_or_raise(err: Exception, what: str, skip_bad: bool, skipped: list[str]) -> None:
    """Raise ``err``; with ``skip_bad``, log it and append "what: err" to ``skipped`` instead."""
    if not skip_bad:
        raise err
    log.warning("skipped %s: %s", what, err)
    skipped.append(f"{what}: {err}")

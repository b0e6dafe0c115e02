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


def list_images(folder: str | os.PathLike, what: str) -> dict[str, Path]:
    """The image files under ``folder`` by name (module docstring), in sorted order. An empty or
    missing folder, or two files of one name, is an error naming ``what`` folder it is."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} folder {root}: no such file or folder")
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.suffix.lower() not in IMAGE_SUFFIXES or any(part.startswith(".") for part in relative.parts):
            continue
        if not path.is_file():
            continue
        key = relative.with_suffix("").as_posix()
        if key in found:
            raise ValueError(f"{what} folder {root}: {found[key].name} and {path.name} have the same name")
        found[key] = path
    if not found:
        raise ValueError(f"{what} folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def skip_or_raise(err: Exception, what: str, skip_bad: bool, skipped: list[str]) -> None:
    """Raise ``err``; with ``skip_bad``, log it and append "what: err" to ``skipped`` instead."""
    if not skip_bad:
        raise err
    log.warning("skipped %s: %s", what, err)
    skipped.append(f"{what}: {err}")

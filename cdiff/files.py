"""Atomic writes: a file or folder appears under its final name only once it is complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(target: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it to ``target`` only on success.

    A crash or an exception leaves ``target`` untouched and removes the temporary, so
    ``convert`` never leaves a half-written output behind.
    """
    target = Path(target)
    if is_dir and target.exists():
        # Never replace a folder: OUT could be a user's folder with other things in it.
        raise FileExistsError(f"{target}: already exists; give a new folder to write into")
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise

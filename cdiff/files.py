"""Writing files that never surprise: outputs checked before the work starts, written
atomically, with the permissions a plain ``open()`` would give.

Every writer in cdiff (convert, export, demo, synth, split lists, weights, the training run
directory) goes through these:

- :func:`check_output` refuses, in one line naming the path, an output that cannot or should
  not be written: the source itself, an existing output without ``overwrite``, a folder where
  a file is wanted (or the reverse), a parent that is a file, a parent that is not writable.
  It is called before any slow work, so a bad path never costs a conversion.
- :func:`atomic_path` writes under a temporary name beside the target and renames it only on
  success: an exception or Ctrl-C leaves the target as it was and no temporary behind
  (``sync=True`` also flushes it to disk first: a checkpoint that must survive a power cut).
- :func:`replace_link` points a symbolic link elsewhere in one step.
- :func:`leftovers` finds the temporaries a killed process left (cdiff's own names only),
  for the next run to remove.
- :func:`out_of_space` tells a full disk from other write errors, whoever raised it.

:func:`write_text` and :func:`save_safetensors` write text and tensors through ``atomic_path``.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:
    import torch

KINDS = ("file", "folder")


def check_output(
    path: str | os.PathLike,
    kind: str = "file",
    overwrite: bool = False,
    sources: Iterable[str | os.PathLike | None] = (),
    suffix: str | None = None,
) -> Path:
    """Raise unless ``path`` can be written as a ``kind`` ("file" or "folder"); return it.

    ``sources``: inputs the output must not be (compared after resolving links, and by
    inode when both exist), nor, for a folder that would be replaced, contain. ``suffix``:
    the file name's required ending (".safetensors"). A folder counts as existing only when
    it is not empty: writing into an empty folder needs no ``overwrite``.
    Errors: ValueError (wrong kind, name or source), FileExistsError (exists, no
    ``overwrite``), PermissionError (not writable); every message names ``path``.
    """
    if kind not in KINDS:
        raise ValueError(f"check_output: kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise ValueError(f"{str(path) or repr('')}: give the output a name (a new {kind})")
    if suffix is not None and path.suffix != suffix:
        raise ValueError(f"{path}: the output must be a {suffix} file (got {path.suffix or 'no suffix'!r})")
    for source in sources:
        if source is None:
            continue
        if _same_path(path, Path(source)):
            raise ValueError(f"{path}: is the source {source}; write the output to another path")
        if kind == "folder" and overwrite and _inside(Path(source), path):
            raise ValueError(f"{path}: holds the source {source}; replacing the folder would delete it")
    if path.exists():
        if kind == "file" and path.is_dir():
            raise ValueError(f"{path}: is a folder; the output is a file, give a file name")
        if kind == "folder" and not path.is_dir():
            raise ValueError(f"{path}: exists and is not a folder; the output is a folder")
        if not overwrite and (kind == "file" or any(path.iterdir())):
            what = "already exists" if kind == "file" else "is a folder that is not empty"
            raise FileExistsError(f"{path}: {what}; pass --overwrite to replace it")
        if kind == "folder" and not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path}: cannot write into this folder: permission denied")
        parent = path.parent
    else:
        parent = path.parent
        while not parent.exists():  # the nearest folder that exists; atomic_path makes the rest
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(f"{path}: cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{path}: cannot write into {parent}: permission denied")
    return path


def _same_path(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)  # also a hard link or another mount of the same file
    return a.resolve() == b.resolve()


def _inside(inner: Path, outer: Path) -> bool:
    return outer.resolve() in inner.resolve().parents


@contextmanager
def atomic_path(target: str | os.PathLike, is_dir: bool = False, overwrite: bool = False,
                sync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it to ``target`` only on success.

    A crash, an exception or Ctrl-C leaves ``target`` untouched and removes the temporary.
    The temporary is made as ``open()`` / ``mkdir()`` would make it (mode 0o666 / 0o777
    less the umask, e.g. 0644 / 0755), so what lands under ``target`` is as readable as any
    file the user writes; so are the files written into a temporary folder. A file replaces an
    existing ``target``; a folder replaces only an empty folder unless ``overwrite`` (callers
    check with :func:`check_output` first). ``sync``: every file is flushed to disk before the
    rename and the rename after it, so that no crash leaves ``target`` named but empty.
    """
    target = Path(target)
    if is_dir and target.exists():
        if not target.is_dir():
            raise ValueError(f"{target}: exists and is not a folder")
        if not overwrite and any(target.iterdir()):
            # Never replace a folder unasked: OUT could be a user's folder with other things in it.
            raise FileExistsError(f"{target}: already exists and is not empty; give a new folder to write into")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(target, is_dir)
    mode = stat.S_IMODE(tmp.stat().st_mode)  # what the umask made of 0o666 / 0o777
    try:
        yield tmp
        # Some writers replace the file they are given by one of their own (safetensors'
        # save_file leaves 0600): give back the mode open() would have given.
        os.chmod(tmp, mode)
        for path in sorted(tmp.rglob("*")) if is_dir else [tmp]:
            if path.is_file() and not path.is_symlink():
                os.chmod(path, mode & 0o666)
                if sync:
                    _fsync(path)
        if sync and is_dir:
            _fsync(tmp)
        if is_dir:
            _replace_folder(tmp, target)
        else:
            os.replace(tmp, target)
        if sync:
            _fsync(target.parent)
    except BaseException:
        _remove(tmp)
        raise


def replace_link(link: str | os.PathLike, target: str) -> None:
    """Point the symbolic link ``link`` at ``target`` (as written, e.g. relative), in one step:
    a reader sees the old link or the new one, never none."""
    link = Path(link)
    while True:
        tmp = _temporary_name(link, "tmp")
        try:
            os.symlink(target, tmp)
            break
        except FileExistsError:
            continue
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[0-9a-f]{8}\.(tmp|old)$")


def leftovers(folder: str | os.PathLike, targets) -> list[Path]:
    """The temporaries that an interrupted :func:`atomic_path` (or :func:`replace_link`) left in
    ``folder`` for a target whose name ``targets`` accepts (a callable, or a collection of names).

    Only names of cdiff's own pattern (``.NAME.<8 hex digits>.tmp`` / ``.old``) are found, and
    only for the targets named: a user's files in the same folder are never among them. Remove
    them only while no other process writes there (e.g. under the run directory's lock).
    """
    folder = Path(folder)
    accepts = targets if callable(targets) else set(targets).__contains__
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match and accepts(match.group("target")):
            found.append(entry)
    return sorted(found)


def remove(path: str | os.PathLike) -> None:
    """Delete a file, link or folder (a leftover temporary); nothing if it is gone already."""
    _remove(Path(path))


def out_of_space(err: BaseException) -> bool:
    """Whether ``err`` is a write that failed for want of space (a full disk or an exceeded
    quota): an OSError, or the error of a library that reports the OS error in its text
    (safetensors: "I/O error: No space left on device (os error 28)")."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    if isinstance(err, OSError):
        return err.errno in codes
    return any(f"(os error {code})" in str(err) for code in codes)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(target: Path, tag: str) -> Path:
    # A dot name beside the target (same file system, so the rename is atomic), short enough
    # for NAME_MAX whatever the target's name.
    return target.parent / f".{target.name[:200]}.{secrets.token_hex(4)}.{tag}"


def _new_temporary(target: Path, is_dir: bool) -> Path:
    while True:
        tmp = _temporary_name(target, "tmp")
        try:
            if is_dir:
                os.mkdir(tmp, 0o777)  # the kernel applies the umask, as for any mkdir
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _replace_folder(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first and deleted after."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = _temporary_name(target, "old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as one ``.safetensors`` file, atomically (contiguous CPU copies; shared
    storage is split). ``metadata``: the header's string map."""
    from safetensors.torch import save_file

    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # safetensors refuses tensors that share storage (e.g. tied views); clone those.
    seen: set[int] = set()
    for k, v in plain.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            plain[k] = v.clone()
        seen.add(ptr)
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata=metadata)

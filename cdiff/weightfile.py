"""What a weights file holds, read safely: format sniffing and lazy reading.

Formats read: ``.safetensors`` (lazily, one prefix at a time, so loading the U-Net of a
5 GB single file does not read its VAE and text encoder), and pickled ``.ckpt`` / ``.bin``
/ ``.pt`` / ``.pth`` files through ``torch.load(..., weights_only=True)`` only. The first
bytes decide (``sniff``), not the name: safetensors bytes are read whatever the extension,
and a file that holds no weights at all (an HTML login page, a git-LFS pointer, JSON, plain
text, an empty file) is reported for what it is. Every error names the file and says what is
wrong with it, in one line.

Which model layout a file or folder is: cdiff.layouts.detect. Whether tensors fit a model:
cdiff.statedict. Writing safetensors atomically: cdiff.files.save_safetensors.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch

from cdiff.config import config_from_json

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not hold what was asked for."""


# --- files ------------------------------------------------------------------------------


class WeightFile:
    """One weights file (or a sharded set), read lazily where the format allows.

    ``keys()`` lists tensor names without reading data; ``load(prefix)`` returns the
    tensors under ``prefix`` with it stripped. ``metadata`` is the safetensors header's
    string map (empty for pickled files).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such file or folder")
        if self.path.is_dir():
            raise CheckpointError(f"{self.path}: is a folder, expected a weights file")
        self._shards: dict[str, Path] = {}  # key -> file, safetensors only
        self._eager: dict[str, torch.Tensor] | None = None  # pickled files load at once
        self.metadata: dict[str, str] = {}
        name = self.path.name
        if name.endswith(".index.json"):
            self._open_index()
            return
        # The bytes decide, not the name: a download that went wrong keeps its name.
        kind = sniff(self.path)
        if kind == "safetensors":
            self._open_safetensors(self.path)  # whatever the extension says
        elif kind in NOT_WEIGHTS:
            raise CheckpointError(f"{self.path}: {_not_weights_message(self.path, kind)}")
        elif name.endswith(PICKLE_SUFFIXES):
            self._eager = _torch_load(self.path)
        elif name.endswith(SAFETENSORS_SUFFIXES):
            if kind in PICKLE_KINDS:
                # A .safetensors name promises no unpickling; keep that promise.
                raise CheckpointError(
                    f"{self.path}: is a PyTorch pickle checkpoint under a .safetensors name; cdiff "
                    f"does not unpickle a file named .safetensors. Rename it to .ckpt if you trust it"
                )
            self._open_safetensors(self.path)  # unknown bytes: the reader says what is wrong
        else:
            found = " (its bytes are a PyTorch checkpoint: name it .ckpt or .pt)" if kind in PICKLE_KINDS else ""
            raise CheckpointError(
                f"{self.path}: unknown weights format (expected one of {', '.join(WEIGHT_SUFFIXES)}){found}"
            )

    def _open_safetensors(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                if not self.metadata:
                    self.metadata = dict(f.metadata() or {})
        except Exception as err:  # safetensors raises its own error type for bad headers
            raise CheckpointError(
                f"{path}: not a readable .safetensors file (truncated or corrupt?): {err}"
            ) from None
        # The header can be intact while the data is cut short: check the size it promises.
        _check_safetensors_size(path)
        for key in keys:
            self._shards[key] = path

    def _open_index(self) -> None:
        try:
            index = json.loads(self.path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{self.path}: not a valid sharded-weights index: {err}") from None
        for shard in sorted(set(weight_map.values())):
            shard_path = self.path.parent / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{self.path}: shard {shard} is missing")
            if shard.endswith(SAFETENSORS_SUFFIXES):
                self._open_safetensors(shard_path)
            else:
                self._eager = {**(self._eager or {}), **_torch_load(shard_path)}

    def config(self, key: str, classes: tuple[type, ...] | None = None):
        """The config stored as JSON in metadata ``key`` (cdiff.config.config_from_json, with
        ``classes`` if given); a missing, cut short or foreign entry is one CheckpointError
        naming the file and the key."""
        text = self.metadata.get(key)
        if text is None:
            raise CheckpointError(f"{self.path}: no {key} in its metadata; the file is damaged or was not written "
                                  "by cdiff")
        try:
            return config_from_json(text, *([classes] if classes else []))
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{self.path}: the {key} in its metadata is not valid JSON ({err.msg} at character "
                                  f"{err.pos} of {len(text)}): the file is damaged or cut short; write it "
                                  "again") from None
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{self.path}: the {key} in its metadata is not a config cdiff can build: "
                                  f"{err}") from None

    def keys(self) -> list[str]:
        return list(self._shards) + list(self._eager or {})

    def load(self, prefix: str = "", strip: bool = True) -> dict[str, torch.Tensor]:
        """Tensors whose key starts with ``prefix`` (stripped unless ``strip=False``)."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        cut = len(prefix) if strip else 0
        for key, value in (self._eager or {}).items():
            if key.startswith(prefix):
                out[key[cut:]] = _aligned(value)
        by_file: dict[Path, list[str]] = {}
        for key, path in self._shards.items():
            if key.startswith(prefix):
                by_file.setdefault(path, []).append(key)
        for path, keys in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in keys:
                        out[key[cut:]] = _aligned(f.get_tensor(key))
            except Exception as err:
                raise CheckpointError(f"{path}: reading its tensors failed (corrupt file?): {err}") from None
        return out


ALIGNMENT = 64  # bytes: what PyTorch's CPU allocator gives every tensor it makes


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied into memory of its own when it does not start on a 64-byte boundary.

    Read tensors sit at their offsets in the file's memory map (a safetensors file aligns them
    to 8 bytes at most). On the CPU some kernels pick their summation order by the address: MKL
    behind a 1x1 convolution gives outputs ~3e-7 apart for the same weights 16-byte aligned or
    not. A resumed run would then drift from the uninterrupted one, whose weights were made in
    freshly allocated (aligned) memory; copied, a loaded model computes as a fresh one does.
    """
    if tensor.device.type == "cpu" and tensor.data_ptr() % ALIGNMENT:
        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def _check_safetensors_size(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated .safetensors file (no header)")
        n = int.from_bytes(head, "little")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = path.stat().st_size
    if size < 8 + n + end:
        raise CheckpointError(
            f"{path}: truncated .safetensors file: {size} bytes, the header promises {8 + n + end}"
        )


# --- what a file really is ------------------------------------------------------------

SNIFF_BYTES = 512
PICKLE_KINDS = ("torch-zip", "pickle")
# Files that are certainly not weights, and what to tell the user about each.
NOT_WEIGHTS = {
    "empty": "is empty (0 bytes): the download or copy did not finish",
    "zip": "is a zip archive, not a PyTorch checkpoint (it holds no data.pkl): unpack it and give "
    "cdiff the weights file inside",
    "git-lfs": "is a git-LFS pointer, not the weights: the real file{size} was never downloaded. "
    "Run `git lfs pull` in its repository, or download the file itself",
    "html": "is an HTML page, not weights: a login, error or download page was saved in place of "
    "the file. Download it again (with an access token if the site needs one)",
    "xml": "is an XML document, not weights: often a storage service's error reply (e.g. AccessDenied) "
    "saved in place of the file. Download it again",
    "json": "is a JSON file, not weights (it starts {start!r})",
    "text": "is a text file, not weights (it starts {start!r})",
}


def sniff(path: str | os.PathLike) -> str:
    """What the first bytes of ``path`` say it is, whatever its name.

    One of "safetensors" (8-byte header length, then ``{``), "torch-zip" (``torch.save``'s
    zip), "pickle" (a legacy ``torch.save`` or any pickle, protocol 2-5), the NOT_WEIGHTS
    kinds ("empty", "zip", "git-lfs", "html", "xml", "json", "text"), or "unknown".
    """
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if not head:
        return "empty"
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100 * 2**20:
        return "safetensors"  # the format caps its header at 100 MB
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip" if _zip_holds_pickle(path) else "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode
        return "pickle"
    text = _as_text(head)
    if text is None:
        return "unknown"
    start = text.lstrip("\ufeff \t\r\n").lower()
    if start.startswith("version https://git-lfs"):
        return "git-lfs"
    if start.startswith("<?xml") and "<html" not in start:
        return "xml"
    if start.startswith("<"):
        return "html"
    if start.startswith(("{", "[")):
        return "json"
    return "text"


def _zip_holds_pickle(path) -> bool:
    """Whether a zip file is a ``torch.save`` archive (it holds ``<name>/data.pkl``)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return True  # a damaged torch archive: torch.load reports it as truncated or corrupt


def _as_text(head: bytes) -> str | None:
    """``head`` decoded as UTF-8 text without control characters, else None."""
    for cut in range(4):  # the read may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return None
    if any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        return None
    return text


def _not_weights_message(path: Path, kind: str) -> str:
    with open(path, "rb") as f:
        text = (_as_text(f.read(SNIFF_BYTES)) or "").strip()
    size = ""
    if kind == "git-lfs":
        sizes = [line.split()[1] for line in text.splitlines() if line.startswith("size ") and len(line.split()) == 2]
        size = f" ({int(sizes[0]):,} bytes)" if sizes and sizes[0].isdigit() else ""
    start = " ".join(text.split())[:60]
    return NOT_WEIGHTS[kind].format(size=size, start=start)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True``; unwraps ``{"state_dict": ...}``."""
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refusing to load: this file needs unpickling arbitrary Python objects, "
            f"which can run code. cdiff reads pickled checkpoints only with "
            f"torch.load(weights_only=True). Convert it to .safetensors with a tool you trust. "
            f"({(str(err).strip().splitlines() or [type(err).__name__])[0]})"
        ) from None
    except Exception as err:  # torch.load raises many types for damaged bytes; all mean "unreadable"
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {err}") from None
    for wrapper in ("state_dict", "module", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path: str | os.PathLike, prefix: str = "") -> dict[str, torch.Tensor]:
    """All tensors of one weights file under ``prefix`` (stripped)."""
    return WeightFile(path).load(prefix)

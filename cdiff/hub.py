"""Downloading files into the cache, and finding them there again. Nothing here runs at import:
every download is one explicit ``fetch`` call (the ``cdiff fetch`` command), and ``locate`` never
touches the network.

Two kinds of remote file:
- ``HubFile``: a file of a Hugging Face repository at a revision (``hf://owner/repo/path@rev``),
  served at ``<endpoint>/<owner/repo>/resolve/<revision>/<path>``. The endpoint is ``HF_ENDPOINT``
  (default https://huggingface.co), so a mirror or a test server can stand in for the hub.
- ``WebFile``: a file at a plain ``https://`` address (torchvision's VGG16, pytorch-fid's Inception).

Where files go (``--cache-dir`` / ``CDIFF_CACHE_DIR`` puts all of it under one folder instead):
- hub files: the Hugging Face cache, in its own layout, so that huggingface_hub, diffusers and
  transformers find them too. The folder follows huggingface_hub's rule (``HF_HUB_CACHE``, else
  ``HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``),
  read here from the environment whether or not huggingface_hub is installed, so installing it
  later does not move the cache:
      models--<owner>--<name>/blobs/<etag>                  the bytes, named by their hash
      models--<owner>--<name>/snapshots/<commit>/<path>     a relative link to the blob
      models--<owner>--<name>/refs/<branch>                 the commit a branch pointed at
  (``<dir>/hub`` under a cache folder);
- web files: torch's hub cache, ``$TORCH_HOME/hub/checkpoints/<file>``, where torchvision, lpips,
  pytorch-fid and ``cdiff evaluate`` look for them (``<dir>/checkpoints``);
- models converted by ``cdiff fetch --convert``: ``$XDG_CACHE_HOME/cdiff/models`` (``<dir>/models``).

Each file is downloaded by cdiff.download: resumed after a cut (HTTP Range), its size checked
against the server's (``X-Linked-Size`` or ``Content-Length``) and its hash against the hub's
(``X-Linked-Etag``, the LFS sha256; or ``ETag``, the git blob sha1 of a small file) and any
sha256 cdiff records, and renamed to its final name (then linked into the snapshot) only once
complete and verified.

huggingface_hub itself (the ``hub`` extra) is optional: with it, the token saved by
``hf auth login`` is used. Its own download function is not used: it neither resumes a cut
download nor checks the sha256 (huggingface_hub 2.x checks the size only).
"""

from __future__ import annotations

import os
import re
import shutil
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cdiff import flags
# The errors of cdiff.download are this module's too (hub.FetchError, ...).
from cdiff.download import (COMMIT, MAX_REDIRECTS, RETRIES, SHA256, AccessError, FetchError, IntegrityError,
                            NotFoundError, OfflineError, download, expected_hashes, http_error, human, request,
                            same_host)
from cdiff.files import atomic_path

DEFAULT_ENDPOINT = "https://huggingface.co"
HASH = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")  # a git blob id or a sha256: the hub's ETags
# torch's convention: a file name carrying the first hex digits of its sha256, "vgg16-397923af.pth".
NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.")


@dataclass(frozen=True)
class HubFile:
    """One file of a Hugging Face repository: ``hf://repo/path@revision``."""

    repo: str  # "owner/name"
    path: str  # inside the repository, "/"-separated
    revision: str = "main"  # a branch, a tag or a 40-hex commit
    sha256: str | None = None  # recorded by cdiff; checked on top of the hub's own hash

    def __post_init__(self):
        # Each part becomes part of a path in the cache: nothing may climb out of it.
        for what, value, parts in (("repository", self.repo, 2), ("path", self.path, None),
                                   ("revision", self.revision, None)):
            pieces = value.split("/")
            if any(p in ("", ".", "..") or "\\" in p for p in pieces) or (parts and len(pieces) != parts):
                raise ValueError(f"hf://{self.repo}/{self.path}@{self.revision}: not a valid {what}: {value!r}")

    def __str__(self) -> str:
        return f"hf://{self.repo}/{self.path}@{self.revision}"


@dataclass(frozen=True)
class WebFile:
    """One file at a plain address, cached under ``name``."""

    url: str
    name: str  # the file name in the cache (torch's: the last part of the address)
    sha256: str | None = None

    def __post_init__(self):
        if self.name in ("", ".", "..") or "/" in self.name or "\\" in self.name:
            raise ValueError(f"{self.url}: not a valid file name for the cache: {self.name!r}")

    def __str__(self) -> str:
        return self.url


Remote = HubFile | WebFile


def parse_address(text: str) -> Remote:
    """``hf://owner/repo/path[@revision]``, a hub ``.../resolve/<rev>/<path>`` address, or any
    ``https://`` (or ``http://``) address -> the file it names."""
    if text.startswith("hf://"):
        body, revision = text[len("hf://"):], "main"
        if "@" in body and "/" not in body.rsplit("@", 1)[1]:
            body, revision = body.rsplit("@", 1)
        parts = body.strip("/").split("/")
        if len(parts) < 3 or not all(parts) or not revision:
            raise ValueError(f"{text}: expected hf://owner/repo/path/to/file[@revision]")
        return HubFile("/".join(parts[:2]), "/".join(parts[2:]), revision)
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("https", "http") or not parsed.netloc:
        raise ValueError(f"{text}: not an address (expected hf://owner/repo/path@revision or https://...)")
    parts = urllib.parse.unquote(parsed.path).strip("/").split("/")
    hub_hosts = {urllib.parse.urlsplit(u).netloc for u in (DEFAULT_ENDPOINT, endpoint())}
    if parsed.netloc in hub_hosts and len(parts) >= 5 and parts[2] == "resolve":
        return HubFile("/".join(parts[:2]), "/".join(parts[4:]), parts[3])
    if not parts[-1]:
        raise ValueError(f"{text}: the address names no file")
    return WebFile(text, parts[-1])


# --- settings, read from the environment when used ------------------------------------------


def endpoint(given: str | None = None) -> str:
    """The hub's address: ``given`` (``--endpoint``), else ``HF_ENDPOINT``, else huggingface.co."""
    return (given or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to 1/true/yes/on, as
    huggingface_hub reads it: then nothing is downloaded and only the cache is used."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def _hf_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(os.path.expandvars(os.path.expanduser(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface"))))


def _root(cache_dir) -> Path | None:
    given = cache_dir or flags.get_path("CDIFF_CACHE_DIR")
    return Path(given).expanduser() if given else None


def hub_cache(cache_dir=None) -> Path:
    """The folder of hub files (Hugging Face cache layout); see the module docstring."""
    root = _root(cache_dir)
    if root is not None:
        return root / "hub"
    legacy = os.environ.get("HUGGINGFACE_HUB_CACHE") or str(_hf_home() / "hub")
    return Path(os.path.expandvars(os.path.expanduser(os.environ.get("HF_HUB_CACHE") or legacy)))


def web_cache(cache_dir=None) -> Path:
    """The folder of web files: torch's ``hub/checkpoints`` (``TORCH_HOME``), or ``<dir>/checkpoints``."""
    root = _root(cache_dir)
    if root is not None:
        return root / "checkpoints"
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def model_cache(cache_dir=None) -> Path:
    """The folder of native model files written by ``cdiff fetch --convert``."""
    root = _root(cache_dir)
    if root is not None:
        return root / "models"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(os.path.expanduser(xdg)) / "cdiff" / "models"


def token() -> str | None:
    """The hub token: ``HF_TOKEN``, else the one ``hf auth login`` saved (through huggingface_hub
    when installed, else its token file ``HF_TOKEN_PATH`` / ``HF_HOME/token``)."""
    value = os.environ.get("HF_TOKEN", "").strip()
    if value:
        return value
    try:
        from huggingface_hub import get_token
    except ImportError:
        path = Path(os.environ.get("HF_TOKEN_PATH") or _hf_home() / "token").expanduser()
        return (path.read_text().strip() or None) if path.is_file() else None
    return get_token()


# --- the cache -------------------------------------------------------------------------------


def repo_folder(repo: str, cache_dir=None) -> Path:
    return hub_cache(cache_dir) / ("models--" + repo.replace("/", "--"))


def locate(remote: Remote, cache_dir=None) -> Path | None:
    """The cached copy of ``remote``, or None; never touches the network. A branch revision is
    looked up through the commit recorded when it was last fetched."""
    if isinstance(remote, WebFile):
        path = web_cache(cache_dir) / remote.name
        return path if path.is_file() else None
    folder = repo_folder(remote.repo, cache_dir)
    commit = remote.revision
    if not COMMIT.match(commit):
        ref = folder / "refs" / remote.revision
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    path = folder / "snapshots" / commit / remote.path
    return path if path.is_file() else None  # is_file follows the link: a dangling one is not cached


def fetch(
    remote: Remote,
    cache_dir=None,
    endpoint_url: str | None = None,
    echo: Callable[[str], None] = print,
    show_progress: bool = True,
    retries: int = RETRIES,
) -> Path:
    """The local path of ``remote``: from the cache, else downloaded (module docstring).

    A pinned (commit) revision that is cached needs no network. A branch revision is checked
    with the server; when the server cannot be reached, the cached copy is used (with a note).
    """
    if isinstance(remote, WebFile):
        return _fetch_web(remote, cache_dir, echo, show_progress, retries)
    return _fetch_hub(remote, cache_dir, endpoint(endpoint_url), echo, show_progress, retries)


def _fetch_web(remote: WebFile, cache_dir, echo, show_progress, retries) -> Path:
    cached = locate(remote, cache_dir)
    if cached is not None:
        return cached
    if offline():
        raise OfflineError(f"{remote}: not cached, and HF_HUB_OFFLINE is set (nothing is downloaded)")
    dest = web_cache(cache_dir) / remote.name
    wanted = expected_hashes(None, remote.sha256, _name_hash(remote.name))
    download(remote.url, dest, size=None, checks=wanted, headers={}, label=remote.name,
              lock=dest.with_name(f".{dest.name}.lock"), echo=echo, show_progress=show_progress, retries=retries)
    return dest


def _fetch_hub(remote: HubFile, cache_dir, base: str, echo, show_progress, retries) -> Path:
    cached = locate(remote, cache_dir)
    if cached is not None and COMMIT.match(remote.revision):
        return cached  # a commit never changes: nothing to ask the server
    if offline():
        if cached is not None:
            return cached
        raise OfflineError(f"{remote}: not cached, and HF_HUB_OFFLINE is set (nothing is downloaded)")
    quote = urllib.parse.quote
    url = f"{base}/{remote.repo}/resolve/{quote(remote.revision, safe='')}/{quote(remote.path)}"
    auth = _auth()
    try:
        meta = _head(url, auth, remote)
    except (NotFoundError, AccessError):
        raise
    except FetchError as err:  # no network, or the hub is down (5xx): a cached copy will do
        if cached is None:
            raise
        echo(f"  note: {err}; using the cached copy of {remote.path}")
        return cached
    commit = meta.commit or (remote.revision if COMMIT.match(remote.revision) else None)
    # Both name files in the cache: only the hub's own forms (hex digests) are accepted.
    if commit is None or not COMMIT.match(commit) or meta.etag is None or not HASH.match(meta.etag):
        missing = "commit (X-Repo-Commit)" if commit is None or not COMMIT.match(commit) else "hash (ETag)"
        raise FetchError(f"{url}: the server sent no valid {missing} header; is {base} a Hugging Face hub "
                         "(HF_ENDPOINT)?")
    if remote.sha256 and SHA256.match(meta.etag) and meta.etag != remote.sha256:
        raise IntegrityError(
            f"{remote}: the hub now serves sha256 {meta.etag}, but cdiff recorded {remote.sha256} for this "
            f"file; not downloaded. The repository has changed: report it to cdiff"
        )
    folder = repo_folder(remote.repo, cache_dir)
    blob = folder / "blobs" / meta.etag
    if not blob.is_file():
        # The token goes only to the hub itself, never to the storage a large file redirects to.
        headers = auth if same_host(meta.url, base) else {}
        lock = hub_cache(cache_dir) / ".locks" / folder.name / f"{meta.etag}.lock"  # huggingface_hub's lock file
        wanted = expected_hashes(meta.etag, remote.sha256, None)
        download(meta.url, blob, size=meta.size, checks=wanted, headers=headers, label=remote.path, lock=lock,
                 echo=echo, show_progress=show_progress, retries=retries)
    snapshot = folder / "snapshots" / commit / remote.path
    _link(blob, snapshot)
    if remote.revision != commit:
        ref = folder / "refs" / remote.revision
        if not ref.is_file() or ref.read_text().strip() != commit:
            with atomic_path(ref) as tmp:
                tmp.write_text(commit)
    return snapshot


# --- HTTP -----------------------------------------------------------------------------------


def _auth() -> dict[str, str]:
    value = token()
    return {"Authorization": f"Bearer {value}"} if value else {}


@dataclass(frozen=True)
class _Meta:
    url: str  # where to GET the bytes
    commit: str | None
    etag: str | None  # sha256 (LFS file) or git blob sha1 (small file)
    size: int | None


def _etag(value: str | None) -> str | None:
    if not value:
        return None
    return value.removeprefix("W/").strip('"').lower() or None


def _head(url: str, headers: dict[str, str], remote: HubFile) -> _Meta:
    """The hub's metadata of one file. A large file answers with a redirect to its storage,
    carrying X-Linked-Etag/-Size; a relative redirect (a renamed repository) is followed."""
    for _ in range(MAX_REDIRECTS):
        response = request("HEAD", url, headers)
        response.close()
        status, h = response.status, response.headers
        if 300 <= status < 400 and "Location" in h:
            location = urllib.parse.urljoin(url, h["Location"])
            if not urllib.parse.urlsplit(h["Location"]).netloc:
                url = location  # relative: the same hub, another path
                continue
            size = h.get("X-Linked-Size")
            return _Meta(location, h.get("X-Repo-Commit"), _etag(h.get("X-Linked-Etag") or h.get("ETag")),
                         int(size) if size else None)
        if status >= 400:
            raise _http_error(status, h, remote, url)
        size = h.get("X-Linked-Size") or h.get("Content-Length")
        return _Meta(url, h.get("X-Repo-Commit"), _etag(h.get("X-Linked-Etag") or h.get("ETag")),
                     int(size) if size else None)
    raise FetchError(f"{url}: more than {MAX_REDIRECTS} redirects")


def _http_error(status: int, headers, remote: HubFile, url: str) -> FetchError:
    """The hub's refusals, each with what to do; other statuses as cdiff.download words them."""
    said = headers.get("X-Error-Message") or headers.get("X-Error-Code") or ""
    said = f" (the server says: {said})" if said else ""
    if status in (401, 403):
        page = f"{endpoint()}/{remote.repo}"
        return AccessError(
            f"{remote}: HTTP {status}{said}. The repository is gated or private: open {page} while logged "
            f"in, accept its licence there, make a read token at {endpoint()}/settings/tokens, and set "
            f"HF_TOKEN=<token> (or run `hf auth login`); then run the command again"
        )
    if status == 404:
        return NotFoundError(f"{remote}: HTTP 404, no such repository, revision or file{said}; check the "
                             "address (`cdiff fetch --list` shows cdiff's names)")
    return http_error(status, headers, remote.path, url)


def _name_hash(name: str) -> str | None:
    found = NAME_HASH.search(name)
    return found.group(1) if found else None


def _link(blob: Path, snapshot: Path) -> None:
    """Point ``snapshot`` at ``blob`` (relative link, as huggingface_hub does), atomically."""
    if snapshot.is_file() and os.path.realpath(snapshot) == os.path.realpath(blob):
        return
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    tmp = snapshot.with_name(f".{snapshot.name}.{os.getpid()}.link")
    if os.path.lexists(tmp):
        tmp.unlink()
    try:
        os.symlink(os.path.relpath(blob, snapshot.parent), tmp)
    except OSError:  # no symlinks (Windows without the right): a copy
        shutil.copyfile(blob, tmp)
    os.replace(tmp, snapshot)


def describe(size: int | None) -> str:
    """Bytes as the command prints them (decimal units: 1 GB = 10^9 bytes)."""
    return "?" if size is None else human(size)

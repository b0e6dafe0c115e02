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

How one file is downloaded (``_download``):
1. the bytes go to ``<final name>.incomplete``; a partial file left by a cut connection, a kill
   or a full disk is resumed with an HTTP Range request, so only the rest is downloaded;
2. its size is checked against the server's (``X-Linked-Size`` or ``Content-Length``) and its
   hash against the hub's (``X-Linked-Etag``, the LFS sha256; or ``ETag``, the git blob sha1 of a
   small file) and against any sha256 cdiff records; a mismatch deletes the file;
3. only then is it renamed to its final name (and, for the hub, linked into the snapshot).
   So a file under its final name is always complete and verified.

huggingface_hub itself (the ``hub`` extra) is optional: with it, the token saved by
``hf auth login`` is used. Its own download function is not used: it neither resumes a cut
download nor checks the sha256 (huggingface_hub 2.x checks the size only).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from cdiff import flags
from cdiff.files import atomic_path
from cdiff.progress import Bar

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT = 60.0  # seconds without a byte before a connection counts as cut
CHUNK = 1 << 20  # bytes read and written at a time
RETRIES = 3  # resumes within one fetch after a cut connection
RETRY_WAIT = 2.0  # seconds before the first resume; doubled each time
MAX_REDIRECTS = 10
COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
HASH = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")  # a git blob id or a sha256: the hub's ETags
# torch's convention: a file name carrying the first hex digits of its sha256, "vgg16-397923af.pth".
NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.")


class FetchError(OSError):
    """A download that could not be done; the message says why and what to do."""


class NotFoundError(FetchError):
    """HTTP 404: no such repository, revision or file."""


class AccessError(FetchError):
    """HTTP 401/403: a gated or private repository."""


class OfflineError(FetchError):
    """No network (or HF_HUB_OFFLINE set), and the file is not cached."""


class IntegrityError(FetchError):
    """The downloaded bytes are not the file the server (or cdiff's table) vouches for."""


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
    checks = _checks(None, remote.sha256, _name_hash(remote.name))
    _download(remote.url, dest, size=None, checks=checks, headers={}, label=remote.name,
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
        headers = auth if _same_host(meta.url, base) else {}
        lock = hub_cache(cache_dir) / ".locks" / folder.name / f"{meta.etag}.lock"  # huggingface_hub's lock file
        _download(meta.url, blob, size=meta.size, checks=_checks(meta.etag, remote.sha256, None), headers=headers,
                  label=remote.path, lock=lock, echo=echo, show_progress=show_progress, retries=retries)
    snapshot = folder / "snapshots" / commit / remote.path
    _link(blob, snapshot)
    if remote.revision != commit:
        ref = folder / "refs" / remote.revision
        if not ref.is_file() or ref.read_text().strip() != commit:
            with atomic_path(ref) as tmp:
                tmp.write_text(commit)
    return snapshot


# --- HTTP -----------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # redirects are followed by hand (see _head)
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _auth() -> dict[str, str]:
    value = token()
    return {"Authorization": f"Bearer {value}"} if value else {}


def _same_host(url: str, base: str) -> bool:
    return urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(base).netloc


def _request(method: str, url: str, headers: dict[str, str]):
    """One request, redirects not followed: the response (an HTTPError for a 3xx/4xx/5xx)."""
    import cdiff

    # identity: the bytes counted are the file's bytes, never a compressed stream of them
    fixed = {"Accept-Encoding": "identity", "User-Agent": f"cdiff/{cdiff.__version__}"}
    request = urllib.request.Request(url, method=method, headers={**fixed, **headers})
    try:
        return _OPENER.open(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as err:
        return err
    except (urllib.error.URLError, OSError) as err:  # refused, no route, DNS, timeout
        reason = getattr(err, "reason", err)
        host = urllib.parse.urlsplit(url).netloc
        raise OfflineError(f"cannot reach {host} ({reason})") from None


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
        response = _request("HEAD", url, headers)
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


def _http_error(status: int, headers, remote: Remote, url: str) -> FetchError:
    said = headers.get("X-Error-Message") or headers.get("X-Error-Code") or ""
    said = f" (the server says: {said})" if said else ""
    if isinstance(remote, HubFile) and status in (401, 403):
        page = f"{endpoint()}/{remote.repo}"
        return AccessError(
            f"{remote}: HTTP {status}{said}. The repository is gated or private: open {page} while logged "
            f"in, accept its licence there, make a read token at {endpoint()}/settings/tokens, and set "
            f"HF_TOKEN=<token> (or run `hf auth login`); then run the command again"
        )
    if status in (401, 403):
        return AccessError(f"{url}: HTTP {status}{said}: access denied")
    if status == 404:
        what = "repository, revision or file" if isinstance(remote, HubFile) else "file"
        return NotFoundError(f"{remote}: HTTP 404, no such {what}{said}; check the address "
                             "(`cdiff fetch --list` shows cdiff's names)")
    return FetchError(f"{url}: HTTP {status}{said}; try again later")


# --- one download ----------------------------------------------------------------------------


def _name_hash(name: str) -> str | None:
    found = NAME_HASH.search(name)
    return found.group(1) if found else None


def _checks(etag: str | None, sha256: str | None, sha256_prefix: str | None) -> dict[str, str]:
    """What the finished file must hash to: {"sha256": hex, "sha256-prefix": hex, "git-sha1": hex}."""
    checks = {}
    if etag and SHA256.match(etag):
        checks["sha256"] = etag
    elif etag and COMMIT.match(etag):
        checks["git-sha1"] = etag  # a small (non-LFS) file: the hub's ETag is its git blob id
    if sha256:
        checks["sha256"] = sha256.lower()
    if sha256_prefix and "sha256" not in checks:
        checks["sha256-prefix"] = sha256_prefix
    return checks


class _Hashes:
    """sha256 and git's blob sha1 ("blob <size>\\0" + bytes) of the bytes seen, fed in order."""

    def __init__(self, size: int | None):
        self.sha256 = hashlib.sha256()
        self.git = hashlib.sha1(f"blob {size}\0".encode()) if size is not None else None

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.git is not None:
            self.git.update(data)

    def mismatch(self, checks: dict[str, str]) -> tuple[str, str, str] | None:
        """(kind, expected, got) of the first failed check, or None."""
        sha256 = self.sha256.hexdigest()
        for kind, expected in checks.items():
            if kind == "git-sha1" and self.git is None:
                continue  # no size was announced; the size check covers it
            got = self.git.hexdigest() if kind == "git-sha1" else sha256
            if not got.startswith(expected) if kind == "sha256-prefix" else got != expected:
                return kind, expected, sha256 if kind == "sha256-prefix" else got
        return None


class _Cut(Exception):
    """The connection ended before the file did."""


@contextmanager
def _locked(path: Path, label: str, echo) -> Iterator[None]:
    """One download of a file at a time (huggingface_hub takes the same fcntl lock on the hub's
    lock file); no lock where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo(f"  waiting for another process downloading {label}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    raise AssertionError


def _download(url: str, dest: Path, *, size: int | None, checks: dict[str, str], headers: dict[str, str], label: str,
              lock: Path, echo, show_progress: bool, retries: int) -> None:
    """Download ``url`` to ``dest`` through ``dest.incomplete`` (module docstring, steps 1-3).
    ``size`` None: the server's Content-Length. ``label`` names the file in messages."""
    partial = dest.with_name(dest.name + ".incomplete")
    with _locked(lock, label, echo):
        if dest.is_file():
            return  # another process finished it while this one waited
        dest.parent.mkdir(parents=True, exist_ok=True)
        have = partial.stat().st_size if partial.is_file() else 0
        if size is not None and have > size:
            partial.unlink()  # longer than the file: not a prefix of it
            have = 0
        _check_space(partial, (size - have) if size is not None else None)
        what = f"{label} ({_human(size)})" if size is not None else label
        resuming = f", resuming at {_human(have)}" if have else ""
        echo(f"  downloading {what}{resuming} from {urllib.parse.urlsplit(url).netloc}")
        began, first = time.perf_counter(), have
        attempt = 0
        while True:
            try:
                size = _get(url, partial, size, headers, label, show_progress)
                break
            except _Cut as cut:
                if attempt >= retries:
                    raise FetchError(
                        f"{label}: the connection was cut ({cut}); {_human(partial.stat().st_size)} are kept in "
                        f"{partial}: run the same command again to download the rest"
                    ) from None
                attempt += 1
                wait = RETRY_WAIT * 2 ** (attempt - 1)
                echo(f"  connection cut ({cut}); resuming in {wait:.0f} s (try {attempt} of {retries})")
                time.sleep(wait)
            except KeyboardInterrupt:
                if partial.is_file():
                    echo(f"\n  interrupted: {_human(partial.stat().st_size)} kept in {partial}; run the same "
                         "command again to download the rest")
                raise
        seconds, done = time.perf_counter() - began, partial.stat().st_size - first
        _verify(partial, size, checks, label)
        os.replace(partial, dest)  # the final name appears only now, complete and verified
        echo(f"  {label}: {_human(done)} in {seconds:.1f} s ({_human(done / max(seconds, 1e-9))}/s), "
             + (f"{' and '.join(checks)} verified" if checks else "size checked (no hash known)"))


def _check_space(partial: Path, needed: int | None) -> None:
    if needed is None:
        return
    free = shutil.disk_usage(partial.parent).free
    if free < needed:
        raise FetchError(errno.ENOSPC, f"{partial.parent}: not enough disk space: {_human(needed)} to download, "
                         f"{_human(free)} free; free some space or choose another --cache-dir")


def _get(url, partial: Path, size, headers, label, show_progress) -> int:
    """Append the missing bytes of ``url`` to ``partial``; the file's full size. Raises _Cut."""
    have = partial.stat().st_size if partial.is_file() else 0
    if size is not None and have == size:
        return size  # complete already (a kill between the last byte and the rename)
    request_headers = dict(headers)
    if have:
        request_headers["Range"] = f"bytes={have}-"
    response = None
    for _ in range(MAX_REDIRECTS):
        try:
            response = _request("GET", url, request_headers)
        except OfflineError as err:
            raise _Cut(str(err)) from None
        if 300 <= response.status < 400 and "Location" in response.headers:
            response.close()
            location = urllib.parse.urljoin(url, response.headers["Location"])
            if not _same_host(location, url):
                request_headers.pop("Authorization", None)
            url = location
            continue
        break
    with response:
        status = response.status
        if status == 416 and have:  # the partial file is not a prefix the server recognises
            partial.unlink()
            raise _Cut("the server refused to resume; starting again")
        if status >= 400:
            raise _http_error(status, response.headers, WebFile(url, label), url)
        if status == 206:
            found = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if not found or int(found.group(1)) != have:
                raise FetchError(f"{url}: the server resumed at the wrong place "
                                 f"(Content-Range {response.headers.get('Content-Range')!r}, expected byte {have})")
            total = found.group(2)
            size = size if size is not None or total == "*" else int(total)
        else:
            have = 0  # 200: the server sends everything, from the start
            length = response.headers.get("Content-Length")
            size = size if size is not None or not length else int(length)
        _check_space(partial, (size - have) if size is not None else None)
        return _stream(response, partial, have, size, label, show_progress)


def _stream(response, partial: Path, have: int, size: int | None, label: str, show_progress: bool) -> int:
    # The bar counts MB (cdiff.progress draws whole numbers); small files get none.
    name = label.rsplit("/", 1)[-1][:40]
    show = show_progress and (size is None or size >= 10**7)
    bar = Bar(-(-size // 10**6) if size else None, f"{name} (MB)", show, start=have // 10**6)
    began, last_draw = time.perf_counter(), 0.0
    done = have

    def draw():
        rate = (done - have) / 1e6 / max(time.perf_counter() - began, 1e-9)
        bar.update(-(-done // 10**6) if done == size else done // 10**6, f"{rate:.1f} MB/s")

    try:
        # Unbuffered: what was received is on disk, so a kill loses nothing a resume could reuse.
        with open(partial, "ab" if have else "wb", buffering=0) as out:
            while True:
                try:
                    data = response.read1(CHUNK)  # whatever has arrived, up to CHUNK
                except (OSError, http.client.HTTPException) as err:  # reset, timeout
                    raise _Cut(f"{type(err).__name__} after {_human(done)}") from None
                if not data:
                    break  # the end, or a cut connection: the size check below tells
                try:
                    view = memoryview(data)
                    while view:
                        view = view[out.write(view):]
                except OSError as err:
                    if err.errno == errno.ENOSPC:
                        raise FetchError(errno.ENOSPC, f"{partial}: the disk is full after {_human(done)}; free "
                                         "some space (or choose another --cache-dir) and run the command again to "
                                         "download the rest") from None
                    raise
                done += len(data)
                if time.perf_counter() - last_draw > 0.2:
                    last_draw = time.perf_counter()
                    draw()
        draw()
    finally:
        bar.close()
    if size is not None and done < size:
        raise _Cut(f"the body ended after {_human(done)} of {_human(size)}")
    return done if size is None else size


def _verify(partial: Path, size: int | None, checks: dict[str, str], label: str) -> None:
    """Size and hashes of the finished partial file; on a mismatch it is deleted."""
    actual = partial.stat().st_size
    if size is not None and actual != size:
        partial.unlink()
        raise IntegrityError(f"{label}: {actual} bytes instead of {size}; the file was removed, run the command again")
    hashes = _Hashes(actual)
    with open(partial, "rb") as f:
        while data := f.read(CHUNK):
            hashes.update(data)
    bad = hashes.mismatch(checks)
    if bad is not None:
        partial.unlink()
        kind, expected, got = bad
        want = f"its name says sha256 {expected}..." if kind == "sha256-prefix" else f"the file's {kind} is {expected}"
        got_kind = "sha256" if kind == "sha256-prefix" else kind
        raise IntegrityError(
            f"{label}: the downloaded bytes have {got_kind} {got}, but {want}; the file was removed. "
            "Run the command again (a proxy or a bad disk may have changed the bytes)"
        )


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
    return "?" if size is None else _human(size)

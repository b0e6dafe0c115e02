"""One download, done so that it can be trusted: resumed after a cut, verified, written atomically.
cdiff.hub decides what to download and where it goes in the cache; this module moves the bytes.

``download(url, dest, ...)``:
1. the bytes go to ``<dest>.incomplete``; a partial file left by a cut connection, a kill or a
   full disk is resumed with an HTTP Range request, so only the rest is downloaded (up to
   ``retries`` times within one call; after that, the next call resumes);
2. the finished file's size is checked against the server's and its hash against every hash
   known for it (``expected_hashes``: a sha256, the git blob sha1 the hub gives small files, or the first
   digits of a sha256 carried in the file's name); a mismatch deletes the file;
3. only then is it renamed to ``dest``. So a file under its final name is always complete and
   verified, whatever happens to the process.

Redirects are followed by hand, so that a token is never sent to another host. The standard
library does the HTTP (urllib), so nothing beyond Python is needed to download.
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
from pathlib import Path
from typing import Iterator

from cdiff.progress import Bar

TIMEOUT = 60.0  # seconds without a byte before a connection counts as cut
CHUNK = 1 << 20  # bytes read and written at a time
RETRIES = 3  # resumes within one download after a cut connection
RETRY_WAIT = 2.0  # seconds before the first resume; doubled each time
MAX_REDIRECTS = 10
COMMIT = re.compile(r"^[0-9a-f]{40}$")  # also the form of a git blob id
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class FetchError(OSError):
    """A download that could not be done; the message says why and what to do."""


class NotFoundError(FetchError):
    """HTTP 404: no such file (or, on the hub, repository or revision)."""


class AccessError(FetchError):
    """HTTP 401/403: a gated or private repository."""


class OfflineError(FetchError):
    """No network (or HF_HUB_OFFLINE set), and the file is not cached."""


class IntegrityError(FetchError):
    """The downloaded bytes are not the file the server (or cdiff's table) vouches for."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # followed by hand: _get here, cdiff.hub's _head
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def same_host(url: str, base: str) -> bool:
    return urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(base).netloc


def request(method: str, url: str, headers: dict[str, str]):
    """One request, redirects not followed: the response (an HTTPError for a 3xx/4xx/5xx)."""
    from cdiff import __version__

    # identity: the bytes counted are the file's bytes, never a compressed stream of them
    fixed = {"Accept-Encoding": "identity", "User-Agent": f"cdiff/{__version__}"}
    prepared = urllib.request.Request(url, method=method, headers={**fixed, **headers})
    try:
        return _OPENER.open(prepared, timeout=TIMEOUT)
    except urllib.error.HTTPError as err:
        return err
    except (urllib.error.URLError, OSError) as err:  # refused, no route, DNS, timeout
        reason = getattr(err, "reason", err)
        host = urllib.parse.urlsplit(url).netloc
        raise OfflineError(f"cannot reach {host} ({reason})") from None


def http_error(status: int, headers, what: str, url: str) -> FetchError:
    """The error of an HTTP status >= 400 for ``what`` (a file's name), in one line."""
    said = headers.get("X-Error-Message") or headers.get("X-Error-Code") or ""
    said = f" (the server says: {said})" if said else ""
    if status in (401, 403):
        return AccessError(f"{url}: HTTP {status}{said}: access denied to {what}")
    if status == 404:
        return NotFoundError(f"{url}: HTTP 404, no such file{said}; check the address")
    return FetchError(f"{url}: HTTP {status}{said}; try again later")


# --- one download ----------------------------------------------------------------------------


def expected_hashes(etag: str | None, sha256: str | None, sha256_prefix: str | None) -> dict[str, str]:
    """What the finished file must hash to: {"sha256": hex, "sha256-prefix": hex, "git-sha1": hex}."""
    wanted = {}
    if etag and SHA256.match(etag):
        wanted["sha256"] = etag
    elif etag and COMMIT.match(etag):
        wanted["git-sha1"] = etag  # a small (non-LFS) file: the hub's ETag is its git blob id
    if sha256:
        wanted["sha256"] = sha256.lower()
    if sha256_prefix and "sha256" not in wanted:
        wanted["sha256-prefix"] = sha256_prefix
    return wanted


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


def human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    raise AssertionError


def download(url: str, dest: Path, *, size: int | None, checks: dict[str, str], headers: dict[str, str], label: str,
              lock: Path, echo, show_progress: bool, retries: int) -> None:
    """Download ``url`` to ``dest`` through ``dest.incomplete`` (module docstring, steps 1-3);
    ``checks`` as made by ``expected_hashes()``, ``headers`` sent to ``url``'s host only, ``lock`` the file
    locked while downloading.
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
        what = f"{label} ({human(size)})" if size is not None else label
        resuming = f", resuming at {human(have)}" if have else ""
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
                        f"{label}: the connection was cut ({cut}); {human(partial.stat().st_size)} are kept in "
                        f"{partial}: run the same command again to download the rest"
                    ) from None
                attempt += 1
                wait = RETRY_WAIT * 2 ** (attempt - 1)
                echo(f"  connection cut ({cut}); resuming in {wait:.0f} s (try {attempt} of {retries})")
                time.sleep(wait)
            except KeyboardInterrupt:
                if partial.is_file():
                    echo(f"\n  interrupted: {human(partial.stat().st_size)} kept in {partial}; run the same "
                         "command again to download the rest")
                raise
        seconds, done = time.perf_counter() - began, partial.stat().st_size - first
        _verify(partial, size, checks, label)
        os.replace(partial, dest)  # the final name appears only now, complete and verified
        echo(f"  {label}: {human(done)} in {seconds:.1f} s ({human(done / max(seconds, 1e-9))}/s), "
             + (f"{' and '.join(checks)} verified" if checks else "size checked (no hash known)"))


def _check_space(partial: Path, needed: int | None) -> None:
    if needed is None:
        return
    free = shutil.disk_usage(partial.parent).free
    if free < needed:
        raise FetchError(errno.ENOSPC, f"{partial.parent}: not enough disk space: {human(needed)} to download, "
                         f"{human(free)} free; free some space or choose another --cache-dir")


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
            response = request("GET", url, request_headers)
        except OfflineError as err:
            raise _Cut(str(err)) from None
        if 300 <= response.status < 400 and "Location" in response.headers:
            response.close()
            location = urllib.parse.urljoin(url, response.headers["Location"])
            if not same_host(location, url):
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
            raise http_error(status, response.headers, label, url)
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
                    raise _Cut(f"{type(err).__name__} after {human(done)}") from None
                if not data:
                    break  # the end, or a cut connection: the size check below tells
                try:
                    view = memoryview(data)
                    while view:
                        view = view[out.write(view):]
                except OSError as err:
                    if err.errno == errno.ENOSPC:
                        raise FetchError(errno.ENOSPC, f"{partial}: the disk is full after {human(done)}; free "
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
        raise _Cut(f"the body ended after {human(done)} of {human(size)}")
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

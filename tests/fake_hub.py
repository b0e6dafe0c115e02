"""A Hugging Face hub on 127.0.0.1 for the tests of ``cdiff fetch``: no test reaches the internet.

It answers as the hub does (huggingface_hub's file_download.py reads the same headers):
- ``HEAD|GET /<owner>/<name>/resolve/<revision>/<path>``: a small file answers 200 with its git blob
  sha1 as ``ETag``; a large (LFS) file answers 302 to its storage (``/cdn/<sha256>``, an absolute
  address) with ``X-Linked-Etag`` (its sha256) and ``X-Linked-Size``; both carry ``X-Repo-Commit``.
  A gated repository answers 401 (``X-Error-Code: GatedRepo``) without the right token, an unknown
  repository 401 (``RepoNotFound``, as the hub answers anonymous callers), a missing file 404.
- ``GET /cdn/<sha256>`` and ``GET /web/<name>``: the bytes, with HTTP Range support (206).

Faults, by served path, for one GET each: ``cut_after`` bytes (the connection is closed early),
``stall_after`` bytes (then wait for ``release``), or ``corrupt`` (one byte flipped, every time).
``sent`` counts the body bytes sent per path; ``requests`` logs (method, path, Range header).
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Fault:
    cut_after: int | None = None
    stall_after: int | None = None
    corrupt: bool = False


@dataclass
class Repo:
    commit: str
    branch: str | None
    files: dict[str, bytes]
    token: str | None  # gated: only this token gets the files


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes, served at /cdn/<sha256>
        self.web: dict[str, bytes] = {}
        self.faults: dict[str, Fault] = {}
        self.sent: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.stalled, self.release = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    # --- content ---------------------------------------------------------------------------

    def add_repo(self, repo: str, files: dict[str, bytes], revision: str = "main", token: str | None = None) -> str:
        """Serve ``files`` at ``revision`` (a branch, or a 40-hex commit); the commit."""
        is_commit = bool(re.fullmatch(r"[0-9a-f]{40}", revision))
        commit = revision if is_commit else hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
        self.repos[repo] = Repo(commit, None if is_commit else revision, dict(files), token)
        for path, data in files.items():
            if path.endswith(LFS_SUFFIXES):
                self.blobs[hashlib.sha256(data).hexdigest()] = data
        return commit

    @staticmethod
    def read_folder(folder: Path, prefix: str = "") -> dict[str, bytes]:
        """Every file under ``folder`` as {prefix + relative path: bytes}."""
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in files}

    def cdn_path(self, data: bytes) -> str:
        return f"/cdn/{hashlib.sha256(data).hexdigest()}"

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of the GET requests of ``path``."""
        return [rng for method, p, rng in self.requests if method == "GET" and p == path]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

        def _answer(self, body: bool):
            with hub._lock:
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
            if self.path.startswith("/cdn/"):
                return self._bytes(hub.blobs.get(self.path[len("/cdn/"):]), body, {})
            if self.path.startswith("/web/"):
                return self._bytes(hub.web.get(self.path[len("/web/"):]), body, {})
            found = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
            if not found:
                return self._error(404, "EntryNotFound", "no such route")
            name, revision, path = found.groups()
            repo = hub.repos.get(name)
            if repo is None:
                return self._error(401, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
            if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
                return self._error(401, "GatedRepo", f"Access to model {name} is restricted.")
            if revision not in (repo.commit, repo.branch):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            data = repo.files.get(path)
            if data is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}")
            if path.endswith(LFS_SUFFIXES):  # large files: a redirect to the storage, as the hub does
                sha = hashlib.sha256(data).hexdigest()
                self.send_response(302)
                self.send_header("Location", f"{hub.url}/cdn/{sha}")
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", f'"{git_sha1(data)}"')  # the pointer's id, not the file's
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._bytes(data, body, {"ETag": f'"{git_sha1(data)}"', "X-Repo-Commit": repo.commit})

        def _error(self, status: int, code: str, message: str):
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _bytes(self, data: bytes | None, body: bool, headers: dict[str, str]):
            if data is None:
                return self._error(404, "EntryNotFound", "no such file")
            start, status = 0, 200
            found = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if found:
                start, status = int(found.group(1)), 206
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            chunk = data[start:]
            fault = hub.faults.get(self.path, Fault())
            if fault.corrupt:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            limit = fault.cut_after if fault.cut_after is not None else fault.stall_after
            if limit is not None:
                hub.faults[self.path] = Fault(corrupt=fault.corrupt)  # once
                chunk = chunk[:limit]
            self._send(chunk)
            if fault.stall_after is not None:
                hub.stalled.set()
                hub.release.wait(60)
            if limit is not None:
                self.close_connection = True  # the rest is never sent: the client sees a cut connection

        def _send(self, chunk: bytes):
            try:
                self.wfile.write(chunk)
                self.wfile.flush()
            except OSError:
                return
            with hub._lock:
                hub.sent[self.path] = hub.sent.get(self.path, 0) + len(chunk)

    return Handler

"""A fake Hugging Face Hub on loopback that answers the routes huggingface-hub 2.x calls, from real files.

    GET  /api/models/OWNER/REPO[/revision/REV]?blobs=True   HfApi.model_info: commit sha, files, sizes, LFS sha256
    HEAD /OWNER/REPO/resolve/REV/PATH    get_hf_file_metadata: X-Repo-Commit, ETag; LFS files answer 302 to the
                                         "CDN" with X-Linked-Size and X-Linked-Etag, as the Hub does
    GET  /OWNER/REPO/resolve/REV/PATH    the same redirect (LFS) or the bytes (small git files), with Range
    GET  /cdn/SHA256                     the bytes, with Range; served on http://localhost:PORT while the Hub is
                                         http://127.0.0.1:PORT, so it is another origin and must get no token

Faults for tests: gated repos, private repos (a token is required), corrupted files (the bytes served differ
from the checksum announced), and a stall after N bytes (to interrupt a download). Every body byte served is
counted per file, and every request is recorded (method, path, range, whether it carried a token).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

# Files up to this size get their real sha256; bigger ones are sparse shapes only ever read by range, so a
# stand-in checksum spares hashing tens of GB of zeros (downloading one would fail verification, rightly).
HASH_LIMIT_BYTES = 1 << 30
_CHUNK = 1 << 20
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(?P<start>\d+)-(?P<end>\d*)$")


@dataclass(frozen=True)
class HubFile:
    path: str
    source: Path
    size: int
    sha256: str
    git_sha1: str  # what the Hub's ETag is for a file kept in git rather than LFS
    lfs: bool


@dataclass
class Repo:
    repo_id: str
    commit: str
    files: dict[str, HubFile]
    gated: bool = False  # only ``token`` gets in; others get GatedRepo
    token: str | None = None  # private: without it the repo does not exist


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    authorized: bool
    host: str


@dataclass
class FakeHub:
    """The server's state; tests add repos, set faults and read the counters."""

    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)  # body bytes per "repo/path"
    corrupt: set[str] = field(default_factory=set)  # "repo/path" served with one byte flipped
    stall_after: dict[str, int] = field(default_factory=dict)  # "repo/path": stall once this offset is sent
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_repo(
        self, repo_id: str, files: Mapping[str, Path], *, gated: bool = False, token: str | None = None,
        lfs: bool = True,
    ) -> Repo:  # fmt: skip
        """Serve ``files`` (repo path -> local file) as ``repo_id``; the commit is derived from the contents."""
        entries = {path: _describe(path, Path(source), lfs) for path, source in files.items()}
        digest = hashlib.sha1(repo_id.encode())
        for entry in entries.values():
            digest.update(entry.path.encode() + entry.sha256.encode())
        repo = Repo(repo_id, digest.hexdigest(), entries, gated, token)
        self.repos[repo_id] = repo
        return repo

    def served_bytes(self, key: str | None = None) -> int:
        with self.lock:
            return self.served.get(key, 0) if key else sum(self.served.values())

    def reset_counters(self) -> None:
        with self.lock:
            self.served.clear()
            self.requests.clear()

    def _count(self, key: str, n_bytes: int) -> None:
        with self.lock:
            self.served[key] = self.served.get(key, 0) + n_bytes


def _describe(path: str, source: Path, lfs: bool) -> HubFile:
    size = source.stat().st_size
    if size > HASH_LIMIT_BYTES:
        stand_in = hashlib.sha256(f"sparse:{path}:{size}".encode()).hexdigest()
        return HubFile(path, source, size, stand_in, stand_in[:40], lfs)
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(f"blob {size}\0".encode())
    with source.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
    return HubFile(path, source, size, sha256.hexdigest(), sha1.hexdigest(), lfs)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet: pytest shows failures, not traffic
        pass

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    # Routing --------------------------------------------------------------------------------------------------

    def _dispatch(self, body: bool) -> None:
        hub = self.server.hub
        path = unquote(urlsplit(self.path).path)
        authorization = self.headers.get("Authorization")
        with hub.lock:
            hub.requests.append(
                Request(self.command, path, self.headers.get("Range"), authorization is not None,
                        self.headers.get("Host", ""))
            )  # fmt: skip
        if match := _INFO.match(path):
            self._model_info(match["repo"], match["rev"] or "main", authorization)
        elif match := _RESOLVE.match(path):
            self._resolve(match["repo"], match["rev"], match["path"], authorization, body)
        elif match := _CDN.match(path):
            self._cdn(match["sha"], body)
        else:
            self._error(404, "EntryNotFound", f"no route {path}")

    def _repo(self, repo_id: str, revision: str, authorization: str | None) -> Repo | None:
        repo = self.server.hub.repos.get(repo_id)
        bearer = f"Bearer {repo.token}" if repo is not None and repo.token else None
        if repo is None or (repo.token and not repo.gated and authorization != bearer):
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if repo.gated and authorization != bearer:
            self._error(401 if authorization is None else 403, "GatedRepo", f"Access to model {repo_id} is restricted")
            return None
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def _model_info(self, repo_id: str, revision: str, authorization: str | None) -> None:
        repo = self._repo(repo_id, revision, authorization)
        if repo is None:
            return
        siblings = []
        for entry in repo.files.values():
            sibling: dict[str, object] = {"rfilename": entry.path, "size": entry.size, "blobId": entry.git_sha1}
            if entry.lfs:
                sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": 134}
            siblings.append(sibling)
        info = {
            "id": repo_id, "sha": repo.commit, "private": repo.token is not None and not repo.gated,
            "gated": "auto" if repo.gated else False, "siblings": siblings,
        }  # fmt: skip
        self._json(info)

    def _resolve(self, repo_id: str, revision: str, path: str, authorization: str | None, body: bool) -> None:
        repo = self._repo(repo_id, revision, authorization)
        if repo is None:
            return
        entry = repo.files.get(path)
        if entry is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", commit=repo.commit)
            return
        if entry.lfs:
            # The Hub answers LFS files with a redirect to a signed CDN URL on another host.
            cdn = f"http://localhost:{self.server.hub.port}/cdn/{entry.sha256}?name={quote(path)}"
            self.send_response(302)
            self.send_header("Location", cdn)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("X-Linked-Size", str(entry.size))
            self.send_header("X-Linked-Etag", f'"{entry.sha256}"')
            self.send_header("ETag", f'"{entry.git_sha1}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._file(entry, f"{repo_id}/{path}", body, {"X-Repo-Commit": repo.commit, "ETag": f'"{entry.git_sha1}"'})

    def _cdn(self, sha256: str, body: bool) -> None:
        for repo in self.server.hub.repos.values():
            for entry in repo.files.values():
                if entry.sha256 == sha256:
                    self._file(entry, f"{repo.repo_id}/{entry.path}", body, {"ETag": f'"{sha256}"'})
                    return
        self._error(404, "EntryNotFound", "no such object")

    # Responses ------------------------------------------------------------------------------------------------

    def _file(self, entry: HubFile, key: str, body: bool, headers: dict[str, str]) -> None:
        hub = self.server.hub
        start, end = 0, entry.size - 1
        match = _RANGE.match(self.headers.get("Range", ""))
        if match:
            start = int(match["start"])
            end = min(int(match["end"]), entry.size - 1) if match["end"] else entry.size - 1
            if start >= entry.size:
                self._error(416, "RangeNotSatisfiable", f"range starts at {start} of {entry.size}")
                return
        self.send_response(206 if match else 200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
        self.end_headers()
        if not body:
            return
        stall_at = hub.stall_after.pop(key, None)
        with entry.source.open("rb") as handle:
            handle.seek(start)
            position = start
            while position <= end:
                n_bytes = min(_CHUNK, end + 1 - position)
                if stall_at is not None and position < stall_at:
                    n_bytes = min(n_bytes, stall_at - position)
                elif stall_at is not None:
                    # Hold the connection open, mid-body, until the test has interrupted the client.
                    self.wfile.flush()
                    hub.stalled.set()
                    hub.release.wait(timeout=60)
                    self.close_connection = True
                    return
                chunk = bytearray(handle.read(n_bytes))
                if key in hub.corrupt and position <= entry.size // 2 < position + len(chunk):
                    chunk[entry.size // 2 - position] ^= 0xFF
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                    return
                hub._count(key, len(chunk))
                position += len(chunk)

    def _json(self, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub


@contextlib.contextmanager
def fake_hub() -> Iterator[FakeHub]:
    """A running fake Hub; point huggingface-hub at it with ``HF_ENDPOINT=hub.url``."""
    server = _Server(("127.0.0.1", 0), _Handler)
    hub = FakeHub(port=server.server_address[1])
    server.hub = hub
    thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def hub_env(hub: FakeHub, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI run against ``hub``: its endpoint, an empty HF_HOME (no stored login), no token."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env

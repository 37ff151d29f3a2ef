"""Download one file from the Hugging Face Hub: resumable, verified, and never half written under its name.

Bytes go to ``NAME.<etag>.partial`` beside the target; a later run resumes from that file's length with a range
request (huggingface-hub's ``http_get``: progress bar, retries, Range). The partial file is hashed and compared
with the Hub's checksum (sha256 for LFS files, the git blob sha1 otherwise), deleted on a mismatch, and only a
verified file is renamed to its final name. (huggingface-hub's own ``hf_hub_download`` keeps a process-unique
temporary file and deletes it on failure, so it cannot resume after Ctrl-C; hence this module.)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tuner import FileLocation, Hub, HubError, HubReference, hub_errors

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GIT_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class PlannedFile:
    """One file to download: where it comes from and where it goes."""

    repo_id: str
    repo_path: str
    location: FileLocation
    dest: Path

    @property
    def partial(self) -> Path:
        # The checksum in the name: bytes of another revision are never resumed into this one.
        return self.dest.with_name(f"{self.dest.name}.{self.location.etag[:12]}.partial")

    @property
    def partial_bytes(self) -> int:
        try:
            return self.partial.stat().st_size
        except FileNotFoundError:
            return 0


def check_disk_space(files: list[PlannedFile]) -> None:
    """Refuse up front when the folder cannot hold what is left to download."""
    if not files:
        return
    needed = sum(max(f.location.size - f.partial_bytes, 0) for f in files if not f.dest.exists())
    free = shutil.disk_usage(files[0].dest.parent).free
    if needed > free:
        gib = 1024**3
        raise HubError(
            f"{files[0].dest.parent}/ has {free / gib:.2f} GiB free but the download needs {needed / gib:.2f} GiB "
            "more; free some space or choose another --dir"
        )


def fetch(hub: Hub, file: PlannedFile) -> Path:
    """Download ``file`` to its partial file (resuming), verify it, and return the partial file's path."""
    from huggingface_hub.file_download import http_get

    partial, size = file.partial, file.location.size
    resume = file.partial_bytes
    if resume > size:  # not a prefix of this file: start again
        partial.unlink()
        resume = 0
    if resume:
        print(f"resuming {file.dest.name} at {resume:,} of {size:,} bytes", file=sys.stderr)
    headers = hub.request_headers(file.location.send_token)
    ref = HubReference(file.repo_id, file.location.commit, filename=file.repo_path)
    # Append: the bytes already there are the prefix the range request continues.
    with hub_errors(ref, hub.endpoint), partial.open("ab") as handle:
        http_get(
            file.location.location, handle, resume_size=resume, headers=headers, expected_size=size,
            displayed_filename=file.dest.name,
        )  # fmt: skip
    verify(partial, file.location, file.repo_path)
    return partial


def verify(path: Path, location: FileLocation, name: str) -> None:
    """Compare a downloaded ``path`` with the Hub's checksum; one that differs is deleted, never kept."""
    size = path.stat().st_size
    if size != location.size:
        path.unlink()
        raise HubError(f"{name}: received {size:,} bytes but the Hub lists {location.size:,}; deleted, run again")
    digest = checksum(path, location, name)
    if digest != location.etag.lower():
        path.unlink()
        raise HubError(
            f"{name}: checksum mismatch (got {digest[:16]}…, the Hub says {location.etag[:16]}…); the corrupt "
            "download was deleted; run the same command again"
        )


def matches(path: Path, location: FileLocation, name: str) -> bool:
    """Whether an existing file is exactly the Hub's (size, then checksum); it is never modified."""
    return path.stat().st_size == location.size and checksum(path, location, name) == location.etag.lower()


def checksum(path: Path, location: FileLocation, name: str) -> str:
    """The file's digest in the Hub's kind: sha256 for LFS files, the git blob sha1 for files kept in git."""
    etag = location.etag.lower()
    size = path.stat().st_size
    if _SHA256.match(etag):
        digest = hashlib.sha256()
    elif _GIT_SHA1.match(etag):
        digest = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    else:
        raise HubError(f"{name}: the Hub's checksum {etag!r} is neither a sha256 nor a git id; cannot verify it")
    if size > 1024**3:
        print(f"verifying {name} ({size / 1024**3:.1f} GiB) ...", file=sys.stderr)
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def install(partials: list[tuple[Path, Path]]) -> None:
    """Rename verified partial files to their final names, together at the end (a split model appears whole)."""
    for partial, dest in partials:
        os.replace(partial, dest)

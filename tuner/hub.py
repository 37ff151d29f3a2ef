"""GGUF headers straight from the Hugging Face Hub: plan a model before downloading it.

A GGUF's header (metadata, then the tensor table) is a few MB at the start of a file of many GB. The lazy
header reader (tuner.gguf) asks for bytes as it parses; ``RangeReader`` answers with HTTP range requests that
grow only as far as the header needs. huggingface-hub does everything else that touches the Hub: the endpoint
(HF_ENDPOINT), the token (HF_TOKEN or `hf auth login`), offline mode (HF_HUB_OFFLINE), the repo listing, the
HEAD that resolves a file to its commit, size, checksum and download location, retries and error classes.
It is imported only here, and only when a hub reference is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tuner.errors import GGUFError, HubError
from tuner.gguf import Header, read_header, read_split_model
from tuner.hubref import HubReference, RemoteFile, RemoteModel, group_models, parse_reference, select_model
from tuner.model import ModelInfo

if TYPE_CHECKING:
    from huggingface_hub import HfApi

log = logging.getLogger("tuner.hub")

MiB = 1024 * 1024
# The first request: most of a small model's header (SmolLM2's, with a 49k vocabulary, is 1.7 MiB; Gemma 3's
# 262k vocabulary makes 6.2 MiB, a 128k Llama 3 vocabulary with its merges ~8 MiB). Later requests double what is
# held, so a header costs about log2(header / 1 MiB) + 1 requests and less than twice its size; the cap per
# request bounds the overshoot on very large headers.
FIRST_FETCH_BYTES = 1 * MiB
MAX_FETCH_BYTES = 8 * MiB
# Headers of a repo's quantisations are read side by side: the wait is network latency, not CPU.
LISTING_WORKERS = 4


@dataclass
class FetchStats:
    """What reading headers cost: bytes received against the size of the files they head."""

    bytes_fetched: int = 0
    requests: int = 0
    file_bytes: int = 0
    files: int = 0

    def add(self, other: FetchStats) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def describe(self) -> str:
        share = self.bytes_fetched / self.file_bytes * 100 if self.file_bytes else 0.0
        return (
            f"{_size(self.bytes_fetched)} fetched in {self.requests} range requests from {self.files} "
            f"file{'s' if self.files != 1 else ''} of {_size(self.file_bytes)} ({share:.3g}% of the download)"
        )


@dataclass(frozen=True)
class RepoListing:
    """A repo's GGUF models at one commit (every later read is pinned to that commit)."""

    repo_id: str
    commit: str
    models: tuple[RemoteModel, ...]


@dataclass(frozen=True)
class FileLocation:
    """Where a file's bytes are and what they must hash to, from the Hub's HEAD on its resolve URL."""

    url: str  # the resolve URL, pinned to the commit
    location: str  # where the bytes are served (the resolve URL, or the CDN it redirects to)
    size: int
    etag: str  # sha256 for LFS files, the git blob sha1 for small files
    commit: str
    send_token: bool  # False when ``location`` is off the Hub (a signed CDN URL must not receive the token)


class RangeReader:
    """A remote file's leading bytes, fetched by range requests on demand (a ``tuner.gguf.Grow``)."""

    def __init__(self, location: FileLocation, headers: dict[str, str], name: str) -> None:
        self.location = location
        self.headers = headers
        self.name = name
        self.buffer = bytearray()
        self.stats = FetchStats(file_bytes=location.size, files=1)

    def __call__(self, n_bytes: int) -> bytes:
        have = len(self.buffer)
        if n_bytes > have and have < self.location.size:
            # Method: double what is held (at least the first fetch, at most MAX_FETCH_BYTES more), but always
            # reach n_bytes; stop at the end of the file, where the header reader reports truncation.
            target = max(n_bytes, FIRST_FETCH_BYTES, min(2 * have, have + MAX_FETCH_BYTES))
            self._fetch(have, min(target, self.location.size))
        return bytes(self.buffer)

    def _fetch(self, start: int, end: int) -> None:
        from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff

        headers = {**self.headers, "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        want = end - start
        received = bytearray()
        with http_stream_backoff("GET", self.location.location, headers=headers) as response:
            hf_raise_for_status(response)
            if response.status_code != 206:
                # A server that ignores Range sends the whole file: take what is needed and hang up.
                log.warning("%s: the server ignored the range request (HTTP %d)", self.name, response.status_code)
                if start:
                    raise HubError(f"{self.name}: the server does not serve byte ranges; download the file instead")
            for chunk in response.iter_bytes():
                received += chunk
                if len(received) >= want:
                    break
        self.stats.requests += 1
        self.stats.bytes_fetched += len(received)
        self.buffer += received[:want]
        log.debug("%s: bytes %d-%d (%d received)", self.name, start, end - 1, len(received))


class Hub:
    """The Hub as the tuner uses it: list a repo's GGUFs, resolve files, read headers by range."""

    def __init__(self, endpoint: str | None = None, token: str | bool | None = None) -> None:
        from huggingface_hub import HfApi, constants

        # None: huggingface-hub finds the token (HF_TOKEN, then the one `hf auth login` stored).
        self.token = token
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.api: HfApi = HfApi(endpoint=self.endpoint, token=token)

    def parse(self, text: str) -> HubReference | None:
        """``text`` as a hub reference (accepting URLs on this endpoint), or None for a local path."""
        return parse_reference(text, self.endpoint)

    def listing(self, ref: HubReference) -> RepoListing:
        """Every GGUF model in the repo, with sizes and checksums, at the commit ``ref.revision`` points to."""
        with hub_errors(ref, self.endpoint):
            info = self.api.model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
        if info.sha is None:
            raise HubError(f"{ref}: the Hub did not say which commit {ref.revision} is")
        files = [
            RemoteFile(
                s.rfilename,
                s.lfs.size if s.lfs is not None else (s.size or 0),
                s.lfs.sha256 if s.lfs is not None else None,
            )
            for s in info.siblings or ()
        ]
        return RepoListing(ref.repo_id, info.sha, tuple(group_models(files)))

    def resolve(self, ref: HubReference) -> tuple[RepoListing, RemoteModel]:
        """The listing and the one model ``ref`` names (by file or quantisation tag)."""
        listing = self.listing(ref)
        return listing, select_model(listing.models, ref)

    def locate(self, repo_id: str, path: str, commit: str) -> FileLocation:
        """HEAD the file's resolve URL: its size, checksum and where its bytes are served."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(repo_id, path, revision=commit, endpoint=self.endpoint)
        with hub_errors(HubReference(repo_id, commit, filename=path), self.endpoint):
            meta = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint)
        if meta.size is None or meta.etag is None:
            raise HubError(f"{repo_id}/{path}: the Hub sent no size or checksum for the file")
        send_token = urlsplit(meta.location).netloc == urlsplit(url).netloc
        return FileLocation(url, meta.location, meta.size, meta.etag, meta.commit_hash or commit, send_token)

    def request_headers(self, send_token: bool) -> dict[str, str]:
        from huggingface_hub.utils import build_hf_headers

        return build_hf_headers(token=self.token if send_token else False, library_name="llamasplit")

    def read_model(self, listing: RepoListing, model: RemoteModel) -> tuple[ModelInfo, FetchStats]:
        """Read the model's header(s) by range requests and return it exactly as tuner.gguf reads a local file."""
        stats = FetchStats()

        def read_part(name: str, file_index: int) -> Header:
            path = model.files[file_index].path
            location = self.locate(listing.repo_id, path, listing.commit)
            reader = RangeReader(location, self.request_headers(location.send_token), name)
            try:
                with hub_errors(HubReference(listing.repo_id, listing.commit, filename=path), self.endpoint):
                    return read_header(reader, name, file_index)
            finally:
                stats.add(reader.stats)

        names = [f"hf://{listing.repo_id}/{f.path}" for f in model.files]
        return read_split_model(names, read_part), stats

    def read_models(self, listing: RepoListing, models: Sequence[RemoteModel]) -> list[HeaderRead]:
        """Read several models' headers side by side; one that is not a model the tuner plans carries its error."""

        def one(model: RemoteModel) -> HeaderRead:
            try:
                info, stats = self.read_model(listing, model)
            except GGUFError as exc:  # one odd file (an unknown architecture, say) must not hide the others
                return HeaderRead(model, None, str(exc), FetchStats())
            return HeaderRead(model, info, None, stats)

        if len(models) <= 1:
            return [one(model) for model in models]
        with ThreadPoolExecutor(max_workers=min(LISTING_WORKERS, len(models)), thread_name_prefix="hub") as pool:
            return list(pool.map(one, models))


@dataclass(frozen=True)
class HeaderRead:
    """One model of a listing: its header as the tuner reads it, or why it could not be read."""

    model: RemoteModel
    info: ModelInfo | None
    error: str | None
    stats: FetchStats


@contextlib.contextmanager
def hub_errors(ref: HubReference, endpoint: str) -> Iterator[None]:
    """Turn huggingface-hub's exceptions into one-line HubErrors that say what to do (and hold no token)."""
    import httpx2
    from huggingface_hub import errors

    try:
        yield
    except errors.OfflineModeIsEnabled as exc:
        raise HubError(
            f"{ref}: HF_HUB_OFFLINE is set, so the Hub cannot be asked; unset it, or plan a downloaded file"
        ) from exc
    except errors.GatedRepoError as exc:
        raise HubError(
            f"{ref}: {ref.repo_id} is gated; accept its terms at {endpoint}/{ref.repo_id} with your account, then "
            "log in with `hf auth login` or set HF_TOKEN to a token of that account"
        ) from exc
    except errors.RepositoryNotFoundError as exc:
        raise HubError(
            f"{ref}: not a local file, and the Hub shows no repo {ref.repo_id} to this client "
            "(if it is private, log in with `hf auth login` or set HF_TOKEN)"
        ) from exc
    except errors.RevisionNotFoundError as exc:
        raise HubError(f"{ref}: {ref.repo_id} has no revision {ref.revision!r}") from exc
    except errors.RemoteEntryNotFoundError as exc:
        raise HubError(f"{ref}: {ref.repo_id} has no file {ref.filename}") from exc
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise HubError(f"{ref}: the Hub answered HTTP {status} ({_first_line(exc)})") from exc
    except (errors.FileMetadataError, httpx2.HTTPError) as exc:
        # httpx2 is huggingface-hub's transport; its HTTPError covers refused connections, timeouts, cut responses.
        raise HubError(f"{ref}: cannot reach the Hub at {endpoint} ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return next((line for line in text.splitlines() if line.strip()), type(exc).__name__)


def _size(n_bytes: int) -> str:
    if n_bytes >= 1024 * MiB:
        return f"{n_bytes / (1024 * MiB):.2f} GiB"
    if n_bytes >= MiB:
        return f"{n_bytes / MiB:.2f} MiB"
    return f"{n_bytes / 1024:.1f} KiB"

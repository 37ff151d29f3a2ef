"""Hugging Face Hub references as `tune-split` and `llamasplit pull` accept them, and the GGUF models in a repo.

    owner/repo:Q4_K_M                     a quantisation in a repo (how llama.cpp's -hf and Ollama write it)
    owner/repo/path/model-Q4_K_M.gguf     one file (for a split GGUF, any of its parts)
    https://huggingface.co/owner/repo/resolve/main/model.gguf   a resolve (or blob) URL
    owner/repo                            the whole repo: its GGUF files grouped by quantisation

An optional ``@revision`` follows the repo (``owner/repo@v1.0:Q8_0``). Pure string handling; tuner.hub does
the network part.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from tuner.errors import HubError
from tuner.gguf import SPLIT_NAME

DEFAULT_REVISION = "main"
# Hub ids: letters, digits, '-', '_', '.'; neither part starts with a separator (huggingface_hub's validator).
_ID = r"[A-Za-z0-9][\w.\-]*"
_REPO_REF = re.compile(rf"^(?:hf://)?(?P<repo>{_ID}/{_ID})(?:@(?P<rev>[^:/@]+))?(?::(?P<tag>[\w.\-]+))?$")
_FILE_REF = re.compile(rf"^(?:hf://)?(?P<repo>{_ID}/{_ID})(?:@(?P<rev>[^:/@]+))?/(?P<file>.+\.gguf)$", re.I)
_URL_PATH = re.compile(rf"^/(?P<repo>{_ID}/{_ID})/(?:resolve|blob)/(?P<rev>[^/]+)/(?P<file>.+)$")
# Hosts that are the Hub whatever HF_ENDPOINT says; the configured endpoint is accepted besides them.
HUB_HOSTS = ("huggingface.co", "hf.co")
# A quantisation tag in a file name: Q4_K_M, IQ3_XXS, Q8_0, F16, BF16, unsloth's UD-Q4_K_XL, MXFP4_MOE, TQ1_0,
# standing between separators (-, ., _ , /) or at the ends of the name.
_QUANT = re.compile(
    r"(?:^|(?<=[-._/]))(?P<tag>(?:UD-)?(?:I?Q\d+(?:_[A-Z0-9]+)*|TQ\d_\d|MXFP4(?:_MOE)?|BF16|F16|FP16|F32))(?=[-._/]|$)",
    re.I,
)
_SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}\.gguf$")
# Files in GGUF repos that are not language models: vision projectors (llama.cpp's -hf skips them too).
_NOT_A_MODEL = re.compile(r"(?:^|/)mmproj[^/]*$", re.I)


@dataclass(frozen=True)
class HubReference:
    """A parsed reference: a repo at a revision, and at most one of a file path or a quantisation tag."""

    repo_id: str
    revision: str = DEFAULT_REVISION
    filename: str | None = None
    tag: str | None = None

    @property
    def is_repo(self) -> bool:
        """Names the whole repo (no file, no tag)."""
        return self.filename is None and self.tag is None

    def __str__(self) -> str:
        at = "" if self.revision == DEFAULT_REVISION else f"@{self.revision}"
        if self.filename:
            return f"{self.repo_id}{at}/{self.filename}"
        return f"{self.repo_id}{at}" + (f":{self.tag}" if self.tag else "")


def parse_reference(text: str, endpoint: str | None = None) -> HubReference | None:
    """The hub reference ``text`` spells, or None when it is a local path.

    An existing local file always wins; so does anything spelled like a path (absolute, ./, ~, or a bare
    ``dir/name.gguf`` with two parts). A URL must be a resolve/blob URL on the Hub or on ``endpoint``.
    """
    if text.startswith(("http://", "https://")):
        return _parse_url(text, endpoint)
    if os.path.exists(text) or text.startswith(("/", ".", "~")) or "\\" in text:
        return None
    match = _FILE_REF.match(text)
    if match:
        return HubReference(match["repo"], match["rev"] or DEFAULT_REVISION, filename=match["file"])
    match = _REPO_REF.match(text)
    if match and not match["repo"].lower().endswith(".gguf"):
        return HubReference(match["repo"], match["rev"] or DEFAULT_REVISION, tag=match["tag"])
    return None


def _parse_url(text: str, endpoint: str | None) -> HubReference:
    parts = urlsplit(text)
    hosts = {*HUB_HOSTS, *(f"www.{h}" for h in HUB_HOSTS)}
    endpoint_path = ""
    if endpoint:
        configured = urlsplit(endpoint)
        hosts.add(configured.netloc)
        endpoint_path = configured.path.rstrip("/") if parts.netloc == configured.netloc else ""
    if parts.netloc not in hosts:
        raise HubError(f"{text}: not a Hugging Face Hub URL (expected https://huggingface.co/OWNER/REPO/resolve/...)")
    match = _URL_PATH.match(unquote(parts.path).removeprefix(endpoint_path))
    if match is None:
        raise HubError(
            f"{text}: not a file URL; use https://huggingface.co/OWNER/REPO/resolve/REVISION/FILE.gguf "
            "or write OWNER/REPO:QUANT"
        )
    return HubReference(match["repo"], match["rev"], filename=match["file"])


def quant_tag(filename: str) -> str | None:
    """The quantisation a file name states (``Q4_K_M`` for ``Llama-3.3-70B-Q4_K_M-00001-of-00002.gguf``)."""
    name = _SPLIT_SUFFIX.sub("", filename).removesuffix(".gguf")
    found = _QUANT.findall(name)
    # The last tag wins: "Q4_K_M/Llama-Q4_K_M" and "model-f16-Q8_0" (a Q8_0 made from an f16) name the file's own.
    return found[-1].upper() if found else None


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo as the listing describes it; ``sha256`` is the LFS checksum (None for small git files)."""

    path: str
    size: int
    sha256: str | None = None


@dataclass(frozen=True)
class RemoteModel:
    """One model in a repo: a GGUF, or every part of a split GGUF in order."""

    files: tuple[RemoteFile, ...]
    tag: str | None
    expected_parts: int = 1  # what the split name promises; more than len(files) when parts are missing

    @property
    def path(self) -> str:
        """The first file: the one llama.cpp loads, and the one a user names."""
        return self.files[0].path

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def complete(self) -> bool:
        return len(self.files) == self.expected_parts

    @property
    def label(self) -> str:
        return self.tag or self.path.rsplit("/", 1)[-1].removesuffix(".gguf")


def group_models(files: Iterable[RemoteFile]) -> list[RemoteModel]:
    """The repo's GGUF models, smallest first: plain files, and split parts gathered under their first part."""
    singles: list[RemoteModel] = []
    splits: dict[tuple[str, int], dict[int, RemoteFile]] = {}
    for remote in files:
        if not remote.path.lower().endswith(".gguf") or _NOT_A_MODEL.search(remote.path):
            continue
        directory, _, name = remote.path.rpartition("/")
        match = SPLIT_NAME.match(name)
        if match is None:
            singles.append(RemoteModel((remote,), quant_tag(remote.path)))
            continue
        key = (f"{directory}/{match['prefix']}" if directory else match["prefix"], int(match["count"]))
        splits.setdefault(key, {})[int(match["no"])] = remote
    for (_, count), parts in splits.items():
        ordered = tuple(parts[no] for no in sorted(parts))
        singles.append(RemoteModel(ordered, quant_tag(ordered[0].path), expected_parts=count))
    return sorted(singles, key=lambda m: (m.size, m.path))


def select_model(models: Sequence[RemoteModel], ref: HubReference) -> RemoteModel:
    """The model ``ref`` names: by file (any part of a split), or by quantisation tag (case-insensitive)."""
    if ref.filename is not None:
        for model in models:
            if any(f.path == ref.filename for f in model.files):
                return _complete(model, ref)
        raise HubError(f"{ref}: {ref.repo_id} has no GGUF file {ref.filename}{_available(models)}")
    if ref.tag is None:
        raise HubError(f"{ref}: name a file or a quantisation, e.g. {ref.repo_id}:Q4_K_M")
    wanted = ref.tag.upper()
    matches = [m for m in models if m.tag == wanted]
    if not matches:
        raise HubError(f"{ref}: {ref.repo_id} has no {wanted} GGUF{_available(models)}")
    if len(matches) > 1:
        names = ", ".join(m.path for m in matches)
        raise HubError(f"{ref}: {len(matches)} files carry {wanted} ({names}); name one as {ref.repo_id}/FILE.gguf")
    return _complete(matches[0], ref)


def _complete(model: RemoteModel, ref: HubReference) -> RemoteModel:
    if not model.complete:
        raise HubError(
            f"{ref}: the repo holds {len(model.files)} of the {model.expected_parts} parts of {model.path}; "
            "the split model is incomplete"
        )
    return model


def _available(models: Sequence[RemoteModel]) -> str:
    if not models:
        return " (it holds no GGUF files)"
    return "; it has " + ", ".join(m.label for m in models)


def looks_remote(text: str) -> bool:
    """Whether ``text`` is meant for the Hub (a URL, or a reference that is not a local path)."""
    return text.startswith(("http://", "https://")) or parse_reference(text) is not None

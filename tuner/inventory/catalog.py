"""The shipped GPU catalog (tuner/data/gpus.json): VRAM and memory bandwidth of common NVIDIA and AMD cards.

Simulated inventories look cards up by name (`lookup_gpu`, strict: unknown or ambiguous names raise with
suggestions); the driver probes use `find_gpu` to name cards and fill in bandwidth the driver cannot report.
Names match case-insensitively and without vendor words: "4090", "rtx4090", "NVIDIA GeForce RTX 4090".
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tuner.devices import AllocatorBackend
from tuner.errors import InventoryError

MIB = 1024**2
GB = 10**9

# Words that vendors and users add or drop freely; they never tell two cards apart.
_VENDOR_WORDS = frozenset({"nvidia", "geforce", "tesla", "quadro", "amd", "ati", "radeon", "instinct"})
# Series prefixes users often omit ("4090" for "RTX 4090", "7900 XTX" for "RX 7900 XTX", "A6000").
_SERIES_PREFIX = re.compile(r"^(?:rtx|gtx|rx)(?=[a-z]?\d)")
# Shorter names ("L4", "A10") occur inside unrelated names too often to be found by containment.
_MIN_CONTAINED_KEY = 4
# A driver total within this fraction of a catalog size is the same card (ECC and firmware carve-outs
# take a few percent); sister cards differ by 20% or more (7900 XTX 24 GiB vs XT 20 GiB).
_VRAM_TOLERANCE = 0.10


class GpuSpec(BaseModel):
    """One catalog entry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    vendor: Literal["nvidia", "amd"]
    vram_mib: int = Field(gt=0)
    vram_source: Literal["driver", "nominal"]
    bandwidth_gb_s: float = Field(gt=0)
    aliases: tuple[str, ...] = ()
    pci_device_ids: tuple[int, ...] = ()

    @field_validator("pci_device_ids", mode="before")
    @classmethod
    def _parse_hex_ids(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return tuple(int(item, 16) if isinstance(item, str) else item for item in value)
        return value

    @property
    def vram_bytes(self) -> int:
        return self.vram_mib * MIB

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.bandwidth_gb_s * GB

    @property
    def backend(self) -> AllocatorBackend:
        return "cuda" if self.vendor == "nvidia" else "rocm"

    @property
    def short_name(self) -> str:
        return self.aliases[0] if self.aliases else self.name


class _CatalogFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    gpus: list[GpuSpec]


def canonical_name(name: str) -> str:
    """The matching key of a GPU name: lower case, vendor words and series prefix dropped, only [a-z0-9]."""
    words = re.findall(r"[a-z0-9]+", name.lower())
    joined = "".join(word for word in words if word not in _VENDOR_WORDS)
    return _SERIES_PREFIX.sub("", joined)


@functools.cache
def load_catalog() -> tuple[GpuSpec, ...]:
    """All catalog entries, in file order."""
    text = resources.files("tuner").joinpath("data/gpus.json").read_text(encoding="utf-8")
    try:
        return tuple(_CatalogFile.model_validate(json.loads(text)).gpus)
    except (ValueError, ValidationError) as exc:
        raise InventoryError(f"the shipped GPU catalog tuner/data/gpus.json is invalid: {exc}") from exc


@functools.cache
def _keys() -> dict[str, GpuSpec]:
    keys: dict[str, GpuSpec] = {}
    for spec in load_catalog():
        for spelling in (spec.name, *spec.aliases):
            keys.setdefault(canonical_name(spelling), spec)
    return keys


def _prefix_matches(key: str) -> list[GpuSpec]:
    # A name may stop where a qualifier starts ("H100" of "H100 PCIe"), never inside a number or word:
    # "409" must not mean "4090".
    found: list[GpuSpec] = []
    for candidate, spec in _keys().items():
        if (
            len(candidate) > len(key)
            and candidate.startswith(key)
            and candidate[len(key)].isdigit() != key[-1].isdigit()
            and spec not in found
        ):
            found.append(spec)
    return found


def lookup_gpu(name: str) -> GpuSpec:
    """The catalog entry called `name`; InventoryError naming close matches when unknown or ambiguous."""
    key = canonical_name(name)
    if not key:
        raise InventoryError(f"GPU name {name!r} is empty; give a card such as 'RTX 4090' or a size such as 24GiB")
    exact = _keys().get(key)
    if exact is not None:
        return exact
    prefixed = _prefix_matches(key)
    if len(prefixed) == 1:
        return prefixed[0]
    if prefixed:
        choices = ", ".join(spec.short_name for spec in prefixed)
        raise InventoryError(f"GPU name {name!r} is ambiguous: it could be {choices}; write one of them in full")
    close = difflib.get_close_matches(key, list(_keys()), n=4, cutoff=0.6)
    suggestions = list(dict.fromkeys(_keys()[match].short_name for match in close))
    hint = f"did you mean {', '.join(suggestions)}? " if suggestions else ""
    raise InventoryError(
        f"unknown GPU {name!r}: not in the catalog of {len(load_catalog())} cards; {hint}"
        "give the memory size instead (e.g. 24GiB) or describe the card in a JSON inventory file"
    )


def _vram_fits(spec: GpuSpec, total_bytes: int | None) -> bool:
    return total_bytes is None or abs(spec.vram_bytes - total_bytes) <= _VRAM_TOLERANCE * spec.vram_bytes


def find_gpu(
    name: str | None = None, pci_device_id: int | None = None, total_bytes: int | None = None
) -> GpuSpec | None:
    """The one catalog card a driver's description fits, or None when none or several fit.

    Tries, in order: the name as a catalog name; the PCI device id; a catalog name inside the driver's
    name ("AMD INSTINCT MI250 (MCM) OAM AC MBA"). Each candidate must have about `total_bytes` of VRAM,
    which tells sister cards with one device id apart (RX 7900 XTX / XT / GRE are all 0x744c).
    """
    key = canonical_name(name) if name else ""
    exact = _keys().get(key) if key else None
    if exact is not None and _vram_fits(exact, total_bytes):
        return exact
    if pci_device_id is not None:
        by_id = [s for s in load_catalog() if pci_device_id in s.pci_device_ids and _vram_fits(s, total_bytes)]
        if len(by_id) == 1:
            return by_id[0]
    if key:
        # The longest contained name wins: "7900xtx" over "7900xt" in "navi31rx7900xt7900xtx7900m".
        contained = sorted(
            (
                (len(candidate), spec)
                for candidate, spec in _keys().items()
                if len(candidate) >= _MIN_CONTAINED_KEY and candidate in key
            ),
            key=lambda item: item[0],
            reverse=True,
        )
        fitting = [spec for _, spec in contained if _vram_fits(spec, total_bytes)]
        if fitting:
            return fitting[0]
    return None

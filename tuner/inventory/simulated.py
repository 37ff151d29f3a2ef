"""Simulated inventories: plan for GPUs you do not have, from a `--gpus` spec or a JSON file.

Spec: comma-separated items `[COUNT x] CARD [:FREE]`, CARD a catalog name ("RTX 4090", "4090", "MI300X")
or a size ("24GiB", "16GB", "24564MiB"), FREE a size. Examples: "RTX 4090,RTX 4080", "24GiB,16GiB",
"2x RTX 4090", "RTX 4090:20GiB,RTX 3090". GiB/MiB/TiB are powers of 1024, GB/MB/TB powers of 1000.
A spec naming an existing file, or ending in .json, is a JSON list of objects:
    {"name": "RTX 4090", "total": "24GiB", "free": 21474836480, "bandwidth": 1008, "backend": "cuda"}
name is required (a catalog name or any label); total and free are bytes or size strings; bandwidth is
in GB/s; backend is cuda, rocm or cpu. A catalog name fills in what is left out; other names need total.
Free memory is the total unless given: the planner adds the CUDA/HIP context overhead itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuner.devices import AllocatorBackend, Device
from tuner.errors import InventoryError
from tuner.inventory.catalog import GB, GpuSpec, lookup_gpu

_UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}  # fmt: skip
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)$", re.IGNORECASE)
# Two digits at most, so that "7900 XTX" is a card and not 7900 times "TX".
_COUNT = re.compile(r"^(\d{1,2})\s*[x×]\s*(\S.*)$", re.IGNORECASE)


class _JsonGpu(BaseModel):
    """One GPU of a JSON inventory file (schema in the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    total: int | str | None = None
    free: int | str | None = None
    bandwidth: float | None = Field(default=None, gt=0)
    backend: AllocatorBackend | None = None


def is_size(text: str) -> bool:
    return _SIZE.match(text.strip()) is not None


def parse_size(text: str) -> int:
    """Bytes in '24GiB', '16 GB', '24564MiB', '1.5TiB'; InventoryError for anything else."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise InventoryError(f"{text!r} is not a memory size; write a number and a unit, e.g. 24GiB, 16GB or 24564MiB")
    return round(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _gib(size_bytes: int) -> str:
    return f"{size_bytes / 2**30:.2f} GiB"


def _device(name: str, backend: AllocatorBackend, total: int, free: int | None, bandwidth: float | None) -> Device:
    if free is not None and free > total:
        raise InventoryError(
            f"GPU {name!r}: free memory {_gib(free)} exceeds its total {_gib(total)}; give a free size up to the total"
        )
    return Device(
        name=name,
        kind="simulated",
        backend=backend,
        total_bytes=total,
        free_bytes=total if free is None else free,
        bandwidth_bytes_per_s=bandwidth,
    )


def _parse_item(item: str) -> list[Device]:
    count = 1
    match = _COUNT.match(item)
    if match is not None:
        count, item = int(match.group(1)), match.group(2).strip()
        if count == 0:
            raise InventoryError(f"'0x {item}' describes no GPU; give a count of 1 or more")
    card, colon, free_text = item.partition(":")
    card = card.strip()
    free = None
    if colon:
        if not is_size(free_text):
            raise InventoryError(
                f"in {item!r}, what follows ':' must be the free memory as a size, e.g. 'RTX 4090:20GiB'"
            )
        free = parse_size(free_text)
    if is_size(card):
        device = _device(f"{card} GPU", "cuda", parse_size(card), free, None)
    else:
        spec = lookup_gpu(card)
        device = _device(spec.name, spec.backend, spec.vram_bytes, free, spec.bandwidth_bytes_per_s)
    return [device] * count


def _from_json_file(path: Path) -> list[Device]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InventoryError(f"cannot read the GPU inventory {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise InventoryError(f"GPU inventory {path} is not valid JSON: {exc}") from exc
    if not isinstance(entries, list) or not entries:
        raise InventoryError(f"GPU inventory {path} must be a non-empty JSON list of GPU objects")
    devices = []
    for position, raw in enumerate(entries):
        try:
            entry = _JsonGpu.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "entry"
            raise InventoryError(f"GPU inventory {path}, entry {position}: {where}: {first['msg']}") from exc
        devices.append(_json_device(entry))
    return devices


def _size_field(value: int | str) -> int:
    if isinstance(value, int):
        if value < 0:
            raise InventoryError(f"memory size {value} is negative; give bytes or a size such as 24GiB")
        return value
    return parse_size(value)


def _json_device(entry: _JsonGpu) -> Device:
    spec: GpuSpec | None
    if entry.total is None:
        spec = lookup_gpu(entry.name)  # raises with suggestions: a label outside the catalog needs a total
        total = spec.vram_bytes
    else:
        try:
            spec = lookup_gpu(entry.name)
        except InventoryError:
            spec = None  # a card of the user's own description
        total = _size_field(entry.total)
    if entry.bandwidth is not None:
        bandwidth: float | None = entry.bandwidth * GB
    else:
        bandwidth = spec.bandwidth_bytes_per_s if spec else None
    backend = entry.backend or (spec.backend if spec else "cuda")
    free = _size_field(entry.free) if entry.free is not None else None
    return _device(entry.name, backend, total, free, bandwidth)


def simulated_devices(spec: str) -> list[Device]:
    """The inventory a `--gpus` value describes (a spec string or a JSON file path)."""
    text = spec.strip()
    if not text:
        raise InventoryError(
            "--gpus is empty; give cards such as 'RTX 4090,RTX 4080', sizes such as 24GiB,16GiB, or a JSON file"
        )
    path = Path(text).expanduser()
    if path.is_file() or text.lower().endswith(".json"):
        return _from_json_file(path)
    devices: list[Device] = []
    for item in text.split(","):
        if not item.strip():
            raise InventoryError(f"--gpus {spec!r} has an empty item; separate cards with single commas")
        devices.extend(_parse_item(item.strip()))
    return devices

"""NVIDIA GPUs through NVML (package nvidia-ml-py, imported only when called), numbered as CUDA numbers them.

CUDA with CUDA_DEVICE_ORDER=PCI_BUS_ID numbers GPUs by PCI bus id; CUDA_VISIBLE_DEVICES then picks and
reorders them. A machine without the NVML library or the driver simply has no NVIDIA devices.
`select_visible` is shared with the ROCm probe, since HIP reads its *_VISIBLE_DEVICES the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from types import ModuleType

from tuner.devices import Device
from tuner.errors import InventoryError
from tuner.inventory.catalog import find_gpu

log = logging.getLogger(__name__)

# NVML start-up failures that mean "no NVIDIA GPU here" rather than "a GPU we cannot read".
_ABSENT_ERROR_NAMES = ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded")
_PCI_BUS_ID = re.compile(r"^([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+)\.([0-7])$")
_ORDINAL = re.compile(r"^\+?(\d+)")
PCI_BUS_ORDER = "PCI_BUS_ID"


def use_pci_bus_order() -> None:
    """Make CUDA number GPUs in PCI bus order, as the inventory does; call before CUDA initialises."""
    os.environ.setdefault("CUDA_DEVICE_ORDER", PCI_BUS_ORDER)


def query_nvidia_devices(env: Mapping[str, str] | None = None) -> list[Device]:
    """The NVIDIA GPUs llama.cpp's CUDA backend will see, in its order; [] without driver or library.

    `env` defaults to os.environ; CUDA_VISIBLE_DEVICES in it is applied.
    """
    env = os.environ if env is None else env
    order = env.get("CUDA_DEVICE_ORDER", "")
    if order not in ("", PCI_BUS_ORDER):
        # CUDA's default (FASTEST_FIRST) can number mismatched cards differently from the PCI order NVML
        # reports; a plan's tensor_split would then address the wrong cards.
        raise InventoryError(
            f"CUDA_DEVICE_ORDER={order} numbers GPUs differently from NVML; unset it or set "
            f"CUDA_DEVICE_ORDER={PCI_BUS_ORDER} (llamasplit sets that for the processes it starts)"
        )
    try:
        import pynvml
    except ImportError as exc:
        log.debug("pynvml is not importable (%s): no NVIDIA devices", exc)
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        absent = tuple(getattr(pynvml, name) for name in _ABSENT_ERROR_NAMES if hasattr(pynvml, name))
        level = logging.DEBUG if isinstance(exc, absent) else logging.WARNING
        log.log(level, "NVML did not start (%s): no NVIDIA devices", exc)
        return []
    try:
        gpus = [_read_gpu(pynvml, index) for index in range(pynvml.nvmlDeviceGetCount())]
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    gpus.sort(key=lambda gpu: pci_sort_key(gpu.pci_bus_id))
    return select_visible(gpus, env.get("CUDA_VISIBLE_DEVICES"))


def nvml_used_bytes() -> dict[str, int] | None:
    """NVML "used" bytes of every NVIDIA GPU keyed by UUID and by PCI bus id; None without NVML.

    Read before and after a load, the difference is what the load really took on each card (the CUDA
    context and cuBLAS workspace included, which llama.cpp's own report leaves out).
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.debug("NVML unavailable: %s", exc)
        return None
    try:
        used: dict[str, int] = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            used_bytes = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            used[_text(pynvml.nvmlDeviceGetUUID(handle))] = used_bytes
            raw_bus_id = getattr(pynvml.nvmlDeviceGetPciInfo(handle), "busId", None)
            if raw_bus_id:
                used[normalise_pci_bus_id(_text(raw_bus_id))] = used_bytes
        return used
    except pynvml.NVMLError as exc:
        log.warning("NVML could not read GPU memory: %s", exc)
        return None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def nvml_key(device: Device) -> str | None:
    """The key of ``device`` in nvml_used_bytes(), None for anything but an NVIDIA GPU."""
    if device.kind != "cuda":
        return None
    return device.uuid or device.pci_bus_id


def _text(value: str | bytes) -> str:
    # nvidia-ml-py decodes most strings, but struct fields such as PciInfo.busId stay bytes.
    return value.decode() if isinstance(value, bytes) else value


def _read_gpu(pynvml: ModuleType, index: int) -> Device:
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = _text(pynvml.nvmlDeviceGetName(handle))
        uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
        pci_bus_id = normalise_pci_bus_id(_text(pynvml.nvmlDeviceGetPciInfo(handle).busId))
        total_bytes, free_bytes = _memory(pynvml, handle)
    except pynvml.NVMLError as exc:
        raise InventoryError(
            f"NVML failed to describe NVIDIA GPU {index}: {exc}; check that `nvidia-smi` lists it, "
            "or hide it with CUDA_VISIBLE_DEVICES and plan with --gpus"
        ) from exc
    bandwidth = _bandwidth(pynvml, handle)
    if bandwidth is None:
        spec = find_gpu(name, total_bytes=total_bytes)
        bandwidth = spec.bandwidth_bytes_per_s if spec else None
    return Device(
        name=name,
        kind="cuda",
        backend="cuda",
        total_bytes=total_bytes,
        free_bytes=free_bytes,
        bandwidth_bytes_per_s=bandwidth,
        uuid=uuid,
        pci_bus_id=pci_bus_id,
    )


def _memory(pynvml: ModuleType, handle: object) -> tuple[int, int]:
    """(total, free) bytes; total excludes the driver's reserved memory where NVML says how much it is."""
    version = getattr(pynvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=version)
        except pynvml.NVMLError as exc:
            log.debug("nvmlDeviceGetMemoryInfo_v2 unavailable (%s); using v1", exc)
        else:
            # CUDA's own total (cudaMemGetInfo) leaves the reserved part out: it can never be allocated.
            return int(info.total) - int(info.reserved), int(info.free)
    info = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return int(info.total), int(info.free)


def _bandwidth(pynvml: ModuleType, handle: object) -> float | None:
    """Peak bytes/s: bus width in bytes x max memory clock x 2 transfers per clock; None if NVML can't say."""
    try:
        bus_width_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        max_mem_clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
    except (pynvml.NVMLError, AttributeError) as exc:  # AttributeError: nvidia-ml-py older than 11.515
        log.debug("NVML cannot report the memory bus width or clock (%r); bandwidth from the catalog", exc)
        return None
    if bus_width_bits <= 0 or max_mem_clock_mhz <= 0:
        return None
    return bus_width_bits / 8 * max_mem_clock_mhz * 1e6 * 2


def normalise_pci_bus_id(bus_id: str) -> str:
    """'00000000:01:00.0' (NVML) or '0000:01:00.0' -> '0000:01:00.0', the form llama.cpp logs."""
    match = _PCI_BUS_ID.match(bus_id.strip())
    if match is None:
        return bus_id.strip().lower()
    domain, bus, device, function = (int(part, 16) for part in match.groups())
    return f"{domain:04x}:{bus:02x}:{device:02x}.{function}"


def pci_sort_key(bus_id: str | None) -> tuple[int, ...]:
    """Numeric (domain, bus, device, function); unparsable ids sort last."""
    match = _PCI_BUS_ID.match(bus_id or "")
    if match is None:
        return (1 << 32,)
    return tuple(int(part, 16) for part in match.groups())


def select_visible(devices: Sequence[Device], visible: str | None) -> list[Device]:
    """The devices a CUDA (or HIP) process sees under *_VISIBLE_DEVICES=`visible`; None means unset.

    The runtime's rules, as PyTorch's `torch.cuda._parse_visible_devices` reproduces them: entries are
    ordinals or, when the list starts with 'GPU-', unique UUID prefixes; the first invalid entry (not a
    number, out of range, negative, unknown or ambiguous UUID) ends the list; a repeated device hides all.
    """
    if visible is None:
        return list(devices)
    entries = [entry.strip() for entry in visible.split(",")]
    by_uuid = entries[0].startswith(("GPU-", "MIG-"))
    chosen: list[int] = []
    for entry in entries:
        index = _uuid_index(entry, devices) if by_uuid else _ordinal_index(entry, len(devices))
        if index is None:
            break
        if index in chosen:
            return []
        chosen.append(index)
    return [devices[index] for index in chosen]


def _ordinal_index(entry: str, count: int) -> int | None:
    # strtoul-like, as CUDA parses it: "1gpu" is 1, "-1" and "" end the list.
    match = _ORDINAL.match(entry)
    if match is None:
        return None
    index = int(match.group(1))
    return index if index < count else None


def _uuid_index(entry: str, devices: Sequence[Device]) -> int | None:
    if entry.startswith("MIG-"):
        log.warning("MIG device %s in *_VISIBLE_DEVICES is not supported; the device list ends there", entry)
        return None
    if not entry.startswith("GPU-"):
        return None
    prefix = entry.lower()
    matches = [i for i, device in enumerate(devices) if (device.uuid or "").lower().startswith(prefix)]
    return matches[0] if len(matches) == 1 else None

"""AMD GPUs for llama.cpp's ROCm/HIP backend: from amdsmi, else `rocm-smi --json`, else the amdgpu sysfs files.

Cards are ordered by PCI bus id (HIP enumerates KFD nodes, which follow it on common boards), then
ROCR_VISIBLE_DEVICES and HIP_VISIBLE_DEVICES (or CUDA_VISIBLE_DEVICES, which HIP also honours) select
them. Names and bandwidth come from the catalog, matched by PCI device id and VRAM size where the
driver's name is vague ("Navi 31 [Radeon RX 7900 XT/7900 XTX/7900M]").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tuner.devices import Device
from tuner.errors import InventoryError
from tuner.inventory.catalog import find_gpu
from tuner.inventory.nvidia import normalise_pci_bus_id, pci_sort_key, select_visible

log = logging.getLogger(__name__)

AMD_PCI_VENDOR_ID = 0x1002
# rocm-smi answers in well under a second; a hung driver must not hang the tuner.
ROCM_SMI_TIMEOUT_S = 15.0
ROCM_SMI_ARGS = ("--showproductname", "--showbus", "--showuniqueid", "--showmeminfo", "vram", "--json")


@dataclass(frozen=True)
class _RawGpu:
    """What one source says about a card, before the catalog names it."""

    name: str | None
    pci_device_id: int | None
    total_bytes: int
    used_bytes: int
    pci_bus_id: str | None
    uuid: str | None


def query_amd_devices(
    env: Mapping[str, str] | None = None,
    rocm_smi: str | None = "rocm-smi",
    sysfs_root: Path | str = "/sys",
) -> list[Device]:
    """The AMD GPUs llama.cpp's HIP backend will see, in its order; [] when there are none.

    `rocm_smi` is the executable to run (None skips it); `sysfs_root` is where /sys is mounted.
    """
    env = os.environ if env is None else env
    raw = _from_amdsmi()
    if raw is None and rocm_smi is not None:
        raw = _from_rocm_smi(rocm_smi)
    if raw is None:
        raw = _from_sysfs(Path(sysfs_root))
    gpus = sorted((_to_device(gpu) for gpu in raw), key=lambda gpu: pci_sort_key(gpu.pci_bus_id))
    # ROCr filters first; HIP numbers what is left.
    gpus = select_visible(gpus, env.get("ROCR_VISIBLE_DEVICES"))
    hip_visible = env.get("HIP_VISIBLE_DEVICES", env.get("CUDA_VISIBLE_DEVICES"))
    return select_visible(gpus, hip_visible)


def _to_device(gpu: _RawGpu) -> Device:
    spec = find_gpu(gpu.name, gpu.pci_device_id, gpu.total_bytes)
    if spec is not None:
        name = spec.name
    elif gpu.name:
        name = gpu.name
    else:
        name = f"AMD GPU {gpu.pci_device_id:#06x}" if gpu.pci_device_id is not None else "AMD GPU"
    return Device(
        name=name,
        kind="rocm",
        backend="rocm",
        total_bytes=gpu.total_bytes,
        free_bytes=max(gpu.total_bytes - gpu.used_bytes, 0),
        bandwidth_bytes_per_s=spec.bandwidth_bytes_per_s if spec else None,
        uuid=gpu.uuid,
        pci_bus_id=normalise_pci_bus_id(gpu.pci_bus_id) if gpu.pci_bus_id else None,
    )


def _hex_id(value: object) -> int | None:
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip(), 16)
    except ValueError:  # "N/A"
        return None


def _uuid_from_unique_id(unique_id: object) -> str | None:
    # ROCr names a GPU "GPU-" + its 64-bit unique id in hex; ROCR_VISIBLE_DEVICES accepts that form.
    value = _hex_id(unique_id)
    return f"GPU-{value:016x}" if value else None


def _from_amdsmi() -> list[_RawGpu] | None:
    try:
        import amdsmi
    except (ImportError, OSError) as exc:  # OSError: the package is there but libamd_smi.so is not
        log.debug("amdsmi is not usable (%s); trying rocm-smi", exc)
        return None
    try:
        amdsmi.amdsmi_init()
    except amdsmi.AmdSmiException as exc:
        log.debug("amdsmi did not start (%s); trying rocm-smi", exc)
        return None
    try:
        return [_amdsmi_gpu(amdsmi, handle) for handle in amdsmi.amdsmi_get_processor_handles()]
    except amdsmi.AmdSmiException as exc:
        raise InventoryError(
            f"amdsmi failed to describe an AMD GPU: {exc}; check that `amd-smi list` shows it, "
            "or hide it with HIP_VISIBLE_DEVICES and plan with --gpus"
        ) from exc
    finally:
        with contextlib.suppress(amdsmi.AmdSmiException):
            amdsmi.amdsmi_shut_down()


def _amdsmi_gpu(amdsmi: ModuleType, handle: object) -> _RawGpu:
    asic = amdsmi.amdsmi_get_gpu_asic_info(handle)
    vram = amdsmi.AmdSmiMemoryType.VRAM
    market_name = asic.get("market_name")
    return _RawGpu(
        name=market_name if market_name and market_name != "N/A" else None,
        pci_device_id=_hex_id(asic.get("device_id")),
        total_bytes=int(amdsmi.amdsmi_get_gpu_memory_total(handle, vram)),
        used_bytes=int(amdsmi.amdsmi_get_gpu_memory_usage(handle, vram)),
        pci_bus_id=amdsmi.amdsmi_get_gpu_device_bdf(handle),
        uuid=_uuid_from_unique_id(asic.get("asic_serial")),
    )


def _field(card: Mapping[str, object], *names: str) -> str | None:
    # rocm-smi renamed its keys between releases ("Card series" -> "Card Series"); match case-insensitively.
    lowered = {key.lower(): value for key, value in card.items()}
    for name in names:
        value = lowered.get(name.lower())
        if value not in (None, "", "N/A"):
            return str(value)
    return None


def _from_rocm_smi(executable: str) -> list[_RawGpu] | None:
    path = shutil.which(executable)
    if path is None:
        log.debug("%s not found; reading sysfs", executable)
        return None
    try:
        result = subprocess.run(
            [path, *ROCM_SMI_ARGS], capture_output=True, text=True, timeout=ROCM_SMI_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        log.warning("%s did not answer within %.0f s; reading sysfs", executable, ROCM_SMI_TIMEOUT_S)
        return None
    except OSError as exc:
        log.debug("%s could not run (%s); reading sysfs", executable, exc)
        return None
    if result.returncode != 0:
        log.debug("%s exited with %d (%s); reading sysfs", executable, result.returncode, result.stderr.strip())
        return None
    # Some releases print warnings before the JSON object.
    start = result.stdout.find("{")
    try:
        answer = json.loads(result.stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError as exc:
        log.warning("%s printed no valid JSON (%s); reading sysfs", executable, exc)
        return None
    if not isinstance(answer, dict):
        return None
    gpus = []
    for key, card in answer.items():
        if not re.fullmatch(r"card:?\d+", key) or not isinstance(card, dict):
            continue  # "system" holds the driver version
        total = _field(card, "VRAM Total Memory (B)")
        if total is None:
            log.warning("%s reports no VRAM total for %s; skipping it", executable, key)
            continue
        gpus.append(
            _RawGpu(
                name=_field(card, "Card Series", "Device Name"),
                pci_device_id=_hex_id(_field(card, "Card Model", "Device ID")),
                total_bytes=int(total),
                used_bytes=int(_field(card, "VRAM Total Used Memory (B)") or 0),
                pci_bus_id=_field(card, "PCI Bus"),
                uuid=_uuid_from_unique_id(_field(card, "Unique ID")),
            )
        )
    return gpus


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _from_sysfs(root: Path) -> list[_RawGpu]:
    gpus = []
    drm = root / "class" / "drm"
    cards = sorted(drm.glob("card*"), key=lambda card: int(card.name[4:]) if card.name[4:].isdigit() else -1)
    for card in cards:
        if not re.fullmatch(r"card\d+", card.name):
            continue  # connectors such as card0-DP-1
        device = card / "device"
        total = _read(device / "mem_info_vram_total")
        if _hex_id(_read(device / "vendor")) != AMD_PCI_VENDOR_ID or total is None:
            continue
        uevent = _read(device / "uevent") or ""
        slot = re.search(r"^PCI_SLOT_NAME=(\S+)$", uevent, re.MULTILINE)
        gpus.append(
            _RawGpu(
                name=_read(device / "product_name") or None,
                pci_device_id=_hex_id(_read(device / "device")),
                total_bytes=int(total),
                used_bytes=int(_read(device / "mem_info_vram_used") or 0),
                pci_bus_id=slot.group(1) if slot else None,
                uuid=_uuid_from_unique_id(_read(device / "unique_id")),
            )
        )
    return gpus

"""Device inventory: the devices a plan may use, in llama.cpp's order.

Real devices come from llama.cpp RPC servers, NVML (NVIDIA) and amdsmi / rocm-smi / sysfs (AMD); a
`--gpus` spec describes a simulated inventory instead. Driver libraries are imported only when probed.
"""

from __future__ import annotations

from collections.abc import Sequence

from tuner.devices import Device
from tuner.errors import InventoryError
from tuner.inventory.amd import query_amd_devices
from tuner.inventory.catalog import GpuSpec, lookup_gpu
from tuner.inventory.nvidia import query_nvidia_devices
from tuner.inventory.simulated import parse_size, simulated_devices

__all__ = [
    "GpuSpec",
    "discover_devices",
    "lookup_gpu",
    "parse_size",
    "query_amd_devices",
    "query_nvidia_devices",
    "simulated_devices",
]


def discover_devices(rpc: Sequence[str] = (), gpus: str | None = None) -> list[Device]:
    """The devices to plan for: the simulated `gpus` inventory, or RPC devices, then NVIDIA, then AMD GPUs.

    `rpc` holds host:port endpoints of llama.cpp RPC servers; llama.cpp puts their devices first.
    """
    if gpus is not None:
        if rpc:
            # A plan cannot mix imagined cards with real remote ones; refuse rather than drop either.
            raise InventoryError(
                f"--gpus describes a simulated inventory and cannot be combined with --rpc {','.join(rpc)}; "
                "drop one of them"
            )
        return simulated_devices(gpus)
    devices: list[Device] = []
    if rpc:
        from tuner.llamacpp.rpc import query_rpc_devices

        devices.extend(query_rpc_devices(rpc))
    devices.extend(query_nvidia_devices())
    devices.extend(query_amd_devices())
    return devices

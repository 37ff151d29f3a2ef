"""The device record every inventory source produces and the planner consumes.

A device is anything llama.cpp can place layers on: a CUDA or ROCm GPU, a remote llama.cpp RPC device, or a
simulated card described by the user. The list order is llama.cpp's device order (RPC devices first, then
GPUs in CUDA/HIP enumeration order), because tensor_split and layer ranges follow that order.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DeviceKind = Literal["cuda", "rocm", "rpc", "simulated"]
# How the device allocates: decides the compute-buffer model and the fixed per-device overhead.
# An RPC device backed by a CPU allocates like the CPU backend; one backed by a GPU like that GPU.
AllocatorBackend = Literal["cuda", "rocm", "cpu"]


class Device(BaseModel):
    """One device as seen at planning time."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: DeviceKind
    backend: AllocatorBackend
    total_bytes: int = Field(ge=0)
    free_bytes: int = Field(ge=0)
    # Peak memory bandwidth (bus width x max memory clock x 2 for DDR); drives the speed objective.
    bandwidth_bytes_per_s: float | None = None
    uuid: str | None = None
    pci_bus_id: str | None = None
    endpoint: str | None = None  # host:port of an RPC device
    # Memory the device loses that llama.cpp does not report (CUDA/HIP context, cuBLAS workspace).
    # None means "use the backend's measured default" (tuner.memory.overhead).
    overhead_bytes: int | None = None

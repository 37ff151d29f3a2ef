"""Which engine process a model loads in, and with which devices: processes grouped by the RPC workers they use.

A llama.cpp RPC server serves one client connection at a time, and ggml-rpc aborts the whole process when a
worker it talks to dies. So:

- a model loads with only the RPC workers its plan gives a share (``select_devices``): a model kept on this
  machine's GPUs or in host RAM never connects to a worker, and a dead worker cannot take it down;
- models that use a worker share one engine process (the worker's one connection), and so do all models
  whose workers overlap: ``EngineGroup.endpoints`` is every worker its process has connected to, for as long
  as the process lives (a second process would wait forever for that connection);
- a model that uses no worker gets an engine process of its own, as on a server without ``--rpc``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from server.engine.client import WorkerProcess
from tuner import Device, DevicePlan, LoadSettings, Plan


@dataclass(frozen=True)
class DeviceSelection:
    """The devices a model is opened with, as ``tuner.llamacpp.device_list(endpoints)`` lists them."""

    endpoints: tuple[str, ...]  # the RPC workers the plan uses, in inventory order
    indices: tuple[int, ...]  # inventory indices in llama.cpp's order: the endpoints' devices, then local ones
    n_inventory: int  # devices in the inventory the plan was made on

    @property
    def narrowed(self) -> bool:
        return len(self.indices) != self.n_inventory

    def load_settings(self, settings: LoadSettings) -> LoadSettings:
        """``settings`` (made for the whole inventory) for this device list: per-device values re-indexed."""
        if not self.narrowed:
            return settings
        position = {index: pos for pos, index in enumerate(self.indices)}
        split = settings.tensor_split
        if split is not None:
            kept = tuple(share for index, share in enumerate(split) if index in position)
            split = kept if kept else None  # no device left: llama.cpp's default (host RAM only here)
        # main_gpu only matters where it holds something, and a device that holds something is kept.
        main_gpu = position.get(settings.main_gpu, 0)
        return settings.model_copy(update={"tensor_split": split, "main_gpu": main_gpu})


def holds_something(device: DevicePlan) -> bool:
    """The plan gives the device layers, weights or KV cache (a compute buffer alone is llama.cpp's habit of
    reserving one per listed device, which dropping the device from the list also drops)."""
    return device.n_layers > 0 or device.weights_bytes > 0 or device.kv_bytes > 0


def select_devices(plan: Plan, devices: Sequence[Device]) -> DeviceSelection:
    """The RPC workers ``plan`` (made on ``devices``) uses, and the devices the model is opened with.

    This machine's devices always stay (device_list() passes them after the endpoints' devices; without
    endpoints llama.cpp's default list is exactly them); an RPC worker stays only when one of its devices holds
    part of the model.
    """
    used_indices = {dp.index for dp in plan.devices if holds_something(dp)}
    used = {devices[i].endpoint for i in used_indices if i < len(devices) and devices[i].endpoint is not None}
    endpoints = tuple(dict.fromkeys(d.endpoint for d in devices if d.endpoint is not None and d.endpoint in used))
    remote = [i for i, d in enumerate(devices) if d.endpoint is not None and d.endpoint in used]
    local = [i for i, d in enumerate(devices) if d.endpoint is None]
    # device_list() orders by endpoint as given; the inventory lists each endpoint's devices together, in the
    # order of --rpc, so the inventory order is already llama.cpp's.
    return DeviceSelection(endpoints, tuple(remote + local), len(devices))


@dataclass(eq=False)
class EngineGroup:
    """One engine process and every RPC worker it has connected to (it may hold each connection until it ends)."""

    label: str  # for the log: the model it was started for, or its RPC workers
    worker: WorkerProcess
    endpoints: set[str] = field(default_factory=set)

    @property
    def alive(self) -> bool:
        return self.worker.alive

    def describe(self) -> str:
        workers = f"RPC workers {', '.join(sorted(self.endpoints))}" if self.endpoints else "no RPC worker"
        return f"engine process {self.label} (pid {self.worker.pid}, {workers})"


def overlapping(groups: Iterable[EngineGroup], endpoints: Iterable[str]) -> list[EngineGroup]:
    """The live groups that already use one of ``endpoints``: a model using them must load in their process,
    and if there are several, they must first become one."""
    wanted = set(endpoints)
    return [group for group in groups if group.alive and group.endpoints & wanted]

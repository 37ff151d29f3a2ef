"""What each device holds after a load, measured outside llama.cpp's own report.

In split mode "tensor" llama.cpp's memory breakdown shows only the aggregate ``Meta()`` device, so the bytes per
device need another source. Two are read per device, before the load and after the context exists:

- ggml's device memory (``ggml_backend_dev_memory``: cudaMemGetInfo and the like; an RPC server answers with
  its own device's): used = free before - free after. It counts everything on the device, the CUDA context
  included. A CPU device (and so a CPU-backed RPC server) reports free == total whatever it holds: no figure.
- the process of an RPC server on this machine (a loopback endpoint whose listening socket is visible in /proc):
  the growth of its data segment (VmData). Every buffer the server allocates is in it (mapped at allocation,
  whether or not its pages were touched yet), plus the server's own bookkeeping, so it is an upper bound: 26 and
  32 KiB above the buffers its allocation log shows for SmolLM2 on two devices (tests/server/test_server_tensor.py).

Neither is split by the prediction: a device without a source gets no figure. Linux only for the second.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

_BUFFER_ENDPOINT = re.compile(r"\[(?P<endpoint>[^\]]+)\]$")  # RPC0[127.0.0.1:50052] -> 127.0.0.1:50052
_TCP_LISTEN = "0A"  # include/net/tcp_states.h: TCP_LISTEN


class DeviceSample(BaseModel):
    """One device at one moment: ggml's free/total and, for a local RPC server, its process's data segment."""

    free_bytes: int | None = None
    total_bytes: int | None = None
    server_pid: int | None = None
    server_data_bytes: int | None = None


class DeviceUsage(BaseModel):
    """One device before and after a load, keyed in reports by its buffer name (RPC0[host:port], CUDA0)."""

    before: DeviceSample
    after: DeviceSample

    def used(self) -> tuple[int, str] | None:
        """(bytes the load took on this device, where the figure comes from), or None without a source."""
        before, after = self.before, self.after
        if (
            before.free_bytes is not None
            and after.free_bytes is not None
            and before.total_bytes is not None
            and (before.free_bytes != before.total_bytes or after.free_bytes != after.total_bytes)
        ):
            return before.free_bytes - after.free_bytes, "ggml_backend_dev_memory: free before minus free after"
        if (
            before.server_data_bytes is not None
            and after.server_data_bytes is not None
            and before.server_pid == after.server_pid
        ):
            return (
                after.server_data_bytes - before.server_data_bytes,
                f"RPC server process {after.server_pid} on this machine: growth of its data segment (VmData) "
                "over the load; holds every buffer it allocated plus its own bookkeeping",
            )
        return None


def endpoint_of_buffer(buffer_name: str) -> str | None:
    """The endpoint in an RPC buffer type's name (``RPC0[127.0.0.1:50052]``), else None."""
    found = _BUFFER_ENDPOINT.search(buffer_name)
    return found["endpoint"] if found and buffer_name.startswith("RPC") else None


def is_loopback(endpoint: str) -> bool:
    host = endpoint.rpartition(":")[0].strip("[]").lower()
    return host == "localhost" or host.startswith("127.") or host == "::1"


def listening_inodes(port: int, proc: Path = Path("/proc")) -> set[str]:
    """Socket inodes listening on ``port`` (IPv4 and IPv6) according to /proc/net/tcp{,6}."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == _TCP_LISTEN and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(fields[9])
    return inodes


def listening_pid(endpoint: str, proc: Path = Path("/proc")) -> int | None:
    """The process listening on a loopback endpoint, where /proc lets this user see its sockets; else None."""
    if not is_loopback(endpoint):
        return None
    port_text = endpoint.rpartition(":")[2]
    if not port_text.isdigit():
        return None
    targets = {f"socket:[{inode}]" for inode in listening_inodes(int(port_text), proc)}
    if not targets:
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in targets:
                    return int(entry.name)
        except OSError:  # another user's process, or one that just ended
            continue
    return None


def process_data_bytes(pid: int, proc: Path = Path("/proc")) -> int | None:
    """VmData of a process in bytes (heap and private anonymous mappings), None when unreadable."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def sample_devices(devices: Sequence[int]) -> dict[str, DeviceSample]:
    """Every ggml device (ggml_backend_dev_t pointers) now, keyed by its buffer type's name."""
    import ctypes

    from tuner.llamacpp import libs

    base = libs.ggml_base()
    samples: dict[str, DeviceSample] = {}
    for dev in devices:
        name = base.ggml_backend_buft_name(base.ggml_backend_dev_buffer_type(dev)).decode()
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        sample = DeviceSample(free_bytes=free.value, total_bytes=total.value)
        endpoint = endpoint_of_buffer(name)
        pid = listening_pid(endpoint) if endpoint else None
        if pid is not None:
            sample.server_pid = pid
            sample.server_data_bytes = process_data_bytes(pid)
        samples[name] = sample
    return samples


def local_gpu_devices() -> list[int]:
    """llama.cpp's default devices when none are given: the GPUs its backends found."""
    from tuner.llamacpp import libs

    ggml, base = libs.ggml(), libs.ggml_base()
    gpu_types = (libs.GGML_BACKEND_DEVICE_TYPE_GPU, libs.GGML_BACKEND_DEVICE_TYPE_IGPU)
    local = [ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count())]
    return [dev for dev in local if base.ggml_backend_dev_type(dev) in gpu_types]


def usage_between(before: dict[str, DeviceSample], after: dict[str, DeviceSample]) -> dict[str, DeviceUsage]:
    return {name: DeviceUsage(before=before[name], after=sample) for name, sample in after.items() if name in before}

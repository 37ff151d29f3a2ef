"""llama.cpp RPC devices: inventory remote devices, register them with llama.cpp, serve this CPU as one.

An RPC server (``rpc-server`` or ``start_rpc_server`` here) serves ONE client at a time; a second client's
connection is accepted by the kernel but its handshake waits until the first disconnects. ggml's own client
aborts the whole process (GGML_ABORT) when an endpoint does not answer, and blocks forever when it is busy,
so every endpoint is first checked here with a plain socket handshake under a timeout.

Run ``python -m tuner.llamacpp.rpc --port 50052`` to serve this machine's CPU (blocks).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tuner.devices import AllocatorBackend, Device
from tuner.errors import InventoryError

# ggml-rpc.h of the vendored llama.cpp; a server with another major version is refused by the client.
RPC_PROTO_MAJOR_VERSION = 7
_RPC_CMD_HELLO = 14
_RPC_CMD_DEVICE_COUNT = 15
_RPC_CONN_CAPS_SIZE = 24  # ggml-rpc/transport.h
DEFAULT_TIMEOUT_S = 5.0


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split "host:port" the way ggml-rpc does (first colon), validating the port."""
    host, sep, port_text = endpoint.partition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InventoryError(f"RPC endpoint {endpoint!r} is not host:port (e.g. 192.168.1.20:50052)")
    return host, int(port_text)


def _recv_exact(sock: socket.socket, n_bytes: int) -> bytes:
    data = b""
    while len(data) < n_bytes:
        chunk = sock.recv(n_bytes - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the server")
        data += chunk
    return data


def _send_cmd(sock: socket.socket, cmd: int, payload: bytes) -> bytes:
    # request: | cmd (1 byte) | size (8 bytes LE) | payload |; response: | size (8 bytes LE) | data |
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    if size > 1 << 20:
        raise ConnectionError(f"implausible response size {size}")
    return _recv_exact(sock, size)


def probe_rpc_endpoint(endpoint: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """Connect, do the RPC HELLO handshake and ask for the device count, all within ``timeout_s``.

    Returns the number of devices the server offers. Raises InventoryError with the reason otherwise:
    nothing listening, not a llama.cpp RPC server, another protocol version, or busy with another client.
    """
    host, port = parse_endpoint(endpoint)
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise InventoryError(
            f"RPC endpoint {endpoint} is unreachable ({exc.strerror or exc}); "
            "start `llamasplit rpc-worker --host ADDRESS --port PORT` (or llama.cpp's rpc-server) there, "
            "or fix the address"
        ) from exc
    with sock:
        sock.settimeout(timeout_s)
        try:
            hello = _send_cmd(sock, _RPC_CMD_HELLO, bytes(_RPC_CONN_CAPS_SIZE))
            count = _send_cmd(sock, _RPC_CMD_DEVICE_COUNT, b"")
        except TimeoutError as exc:
            raise InventoryError(
                f"RPC endpoint {endpoint} accepted the connection but did not answer the handshake within "
                f"{timeout_s:g} s: an RPC server serves one client at a time, so another client (a running "
                "llamasplit server?) holds it, or it is not a llama.cpp RPC server"
            ) from exc
        except (OSError, ConnectionError) as exc:
            raise InventoryError(
                f"RPC endpoint {endpoint} is not a llama.cpp RPC server or dropped the handshake ({exc})"
            ) from exc
    if len(hello) < 3 or len(count) != 4:
        raise InventoryError(f"RPC endpoint {endpoint} answered the handshake with {len(hello)} bytes")
    major, minor, patch = hello[0], hello[1], hello[2]
    if major != RPC_PROTO_MAJOR_VERSION:
        raise InventoryError(
            f"RPC endpoint {endpoint} speaks RPC protocol {major}.{minor}.{patch}; this llama.cpp needs "
            f"{RPC_PROTO_MAJOR_VERSION}.x: run an rpc-server built from the same llama.cpp version"
        )
    (n_devices,) = struct.unpack("<I", count)
    if n_devices == 0:
        raise InventoryError(f"RPC endpoint {endpoint} serves no devices")
    return n_devices


_registries: dict[str, int] = {}


def _rpc_registry(endpoint: str, timeout_s: float) -> int:
    """The ggml registry of one endpoint, after the socket check (add_server caches it per endpoint).

    The check runs once per process: a second connection to a server this process already uses (a model
    loaded over it holds the first) would wait for the first to close, since a server serves one client.
    """
    from tuner.llamacpp import libs

    reg = _registries.get(endpoint)
    if reg is not None:
        return reg
    probe_rpc_endpoint(endpoint, timeout_s)
    reg = libs.ggml_rpc().ggml_backend_rpc_add_server(endpoint.encode())
    if not reg:
        raise InventoryError(f"llama.cpp could not register RPC endpoint {endpoint}")
    _registries[endpoint] = reg
    return reg


def _registry_devices(reg: int) -> list[int]:
    from tuner.llamacpp import libs

    base = libs.ggml_base()
    return [base.ggml_backend_reg_dev_get(reg, i) for i in range(base.ggml_backend_reg_dev_count(reg))]


def rpc_device_pointers(endpoints: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[int]:
    """ggml_backend_dev_t of every device of every endpoint, in order, for llama_model_params.devices."""
    return [dev for endpoint in endpoints for dev in _registry_devices(_rpc_registry(endpoint, timeout_s))]


def device_list(endpoints: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[int]:
    """The devices a model is loaded onto, in llama.cpp's default order: the endpoints' devices, then the GPUs.

    Empty without endpoints (llama.cpp's default list then applies). RPC devices are passed explicitly
    rather than registered globally, so that nothing else in the process starts placing layers on them.
    """
    if not endpoints:
        return []
    from tuner.llamacpp import libs

    ggml, base = libs.ggml(), libs.ggml_base()
    gpu_types = (libs.GGML_BACKEND_DEVICE_TYPE_GPU, libs.GGML_BACKEND_DEVICE_TYPE_IGPU)
    local = [ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count())]
    return rpc_device_pointers(endpoints, timeout_s) + [d for d in local if base.ggml_backend_dev_type(d) in gpu_types]


_registered: set[int] = set()


def register_rpc_endpoints(endpoints: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[int]:
    """Add the endpoints' devices to llama.cpp's global device list (what llama-server's ``--rpc`` does).

    After this a plain ``llama_cpp.Llama(...)`` offloads to them, RPC devices first in llama.cpp's default
    device order. Idempotent within a process. Returns the device pointers in order.
    """
    from tuner.llamacpp import libs

    ggml = libs.ggml()
    devices: list[int] = []
    for endpoint in endpoints:
        reg = _rpc_registry(endpoint, timeout_s)
        reg_devices = _registry_devices(reg)
        known = {ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count())}
        # Registering twice would list the devices twice (and split layers over phantom copies).
        if reg not in _registered and not known.intersection(reg_devices):
            ggml.ggml_backend_register(reg)
        _registered.add(reg)
        devices.extend(reg_devices)
    return devices


def infer_backend(free_bytes: int, total_bytes: int) -> AllocatorBackend:
    """Guess what an RPC device is: the protocol does not say, its description is just the endpoint.

    ggml's CPU device reports all physical RAM as free (free == total, ggml-cpu.cpp); a GPU never does,
    because its driver context is already resident. CUDA and ROCm look alike from here: say which.
    """
    return "cpu" if free_bytes == total_bytes else "cuda"


def query_rpc_devices(
    endpoints: Sequence[str],
    *,
    backend: AllocatorBackend | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[Device]:
    """One Device per device served by each endpoint, in llama.cpp's order.

    ``Device.name`` is the name llama.cpp gives the device's buffers in its log (``RPC0[host:port]``, the
    index counting within that server), so it matches the keys of a BufferReport. ``backend`` says what
    the remote devices are; None infers it (see infer_backend). An RPC server backed by a CPU reports
    all of that machine's physical RAM as free; there is no way to cap it (rpc-server dropped its
    --mem flag), so a caller that wants a smaller budget replaces ``free_bytes``.
    """
    from tuner.llamacpp import libs

    devices: list[Device] = []
    for endpoint in endpoints:
        reg = _rpc_registry(endpoint, timeout_s)
        for index, dev in enumerate(_registry_devices(reg)):
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            libs.ggml_base().ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            devices.append(
                Device(
                    name=f"RPC{index}[{endpoint}]",
                    kind="rpc",
                    backend=backend or infer_backend(free.value, total.value),
                    total_bytes=total.value,
                    free_bytes=free.value,
                    endpoint=endpoint,
                )
            )
    return devices


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent dies, so that a killed test run leaves no servers behind."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


@dataclass(frozen=True)
class LocalDevice:
    """One ggml device of this process, as an RPC server would serve it (``pointer``: ggml_backend_dev_t)."""

    name: str
    description: str
    kind: Literal["cpu", "gpu", "igpu", "accel"]
    free_bytes: int
    total_bytes: int
    pointer: int


_DEVICE_KINDS: dict[int, Literal["cpu", "gpu", "igpu", "accel"]] = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


def local_devices() -> list[LocalDevice]:
    """Every ggml device of this process (CUDA0, ROCm0, Vulkan0, CPU, ...), in ggml's order."""
    from tuner.llamacpp import libs

    ggml, base = libs.ggml(), libs.ggml_base()
    found = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(
            LocalDevice(
                name=(base.ggml_backend_dev_name(dev) or b"?").decode(errors="replace"),
                description=(base.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                kind=_DEVICE_KINDS.get(base.ggml_backend_dev_type(dev), "accel"),
                free_bytes=free.value,
                total_bytes=total.value,
                pointer=dev,
            )
        )
    return found


def default_served_devices(devices: Sequence[LocalDevice]) -> list[LocalDevice]:
    """What rpc-server serves by default: every GPU (discrete or integrated), else the CPU."""
    gpus = [d for d in devices if d.kind in ("gpu", "igpu")]
    return gpus or [d for d in devices if d.kind == "cpu"][:1]


def serve_rpc_devices(
    host: str, port: int, devices: Sequence[LocalDevice], n_threads: int = 1, cache_dir: str | None = None
) -> None:
    """Serve ``devices`` as one llama.cpp RPC server on host:port. Blocks while it serves.

    ``cache_dir``: llama.cpp's tensor cache (weights over 10 MiB are kept there by content hash, so that a
    client reloading the model after a restart sends only the hash). ``n_threads`` is for a CPU device.
    """
    from tuner.llamacpp import libs

    if not devices:
        raise InventoryError("no device to serve")
    pointers = (ctypes.c_void_p * len(devices))(*(d.pointer for d in devices))
    endpoint = f"{host}:{port}".encode()
    cache = cache_dir.encode() if cache_dir else None
    # Returns only when it cannot bind or accept (the port is taken): that is the caller's signal.
    libs.ggml_rpc().ggml_backend_rpc_start_server(endpoint, cache, n_threads, len(devices), pointers)
    raise InventoryError(f"the RPC server on {host}:{port} stopped (port taken, or accept failed)")


def start_rpc_server(host: str, port: int, n_threads: int = 1, cache_dir: str | None = None) -> None:
    """Serve this machine's CPU device as an RPC device on host:port. Blocks until the process is killed.

    Meant for a child process. The served device reports all physical RAM as free (ggml-cpu.cpp sets
    free = total); llama.cpp offers no memory limit for it.
    """
    cpu = [d for d in local_devices() if d.kind == "cpu"]
    if not cpu:
        raise InventoryError("llama.cpp has no CPU device to serve")
    serve_rpc_devices(host, port, cpu[:1], n_threads, cache_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve this machine's CPU as a llama.cpp RPC device.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50052)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--die-with-parent", action="store_true", help="exit when the parent process dies")
    args: Any = parser.parse_args(argv)
    if args.die_with_parent:
        _die_with_parent()
    try:
        start_rpc_server(args.host, args.port, args.threads)
    except InventoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

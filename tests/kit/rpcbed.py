"""The multi-device test bed: N llama.cpp RPC servers on loopback, each serving this machine's CPU.

``with rpc_servers(2) as endpoints:`` gives ["127.0.0.1:PORT", ...] once every server answers the RPC
handshake, and kills every server on the way out (also when the test fails). The servers also die with
the test process (PR_SET_PDEATHSIG), so a killed pytest leaves none behind. Every server reports all
physical RAM as free: tests that need a smaller device tell the tuner its free memory themselves.

``with logged_rpc_servers(2) as servers:`` starts them with ``GGML_RPC_DEBUG=1``: each server then logs every
buffer it allocates and frees, and ``server.allocations()`` reads them back. That log is the per-device truth
in split mode "tensor", where llama.cpp's own report shows only the aggregate Meta() device.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tuner.errors import InventoryError
from tuner.llamacpp.rpc import probe_rpc_endpoint

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
# A port can be taken between choosing it and the server binding it; then the server exits and we retry.
MAX_START_ATTEMPTS = 5


class RpcBedError(RuntimeError):
    """The test bed could not start its RPC servers; the message has the servers' output."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# ggml-rpc.cpp's debug lines (GGML_RPC_DEBUG): "[alloc_buffer] device: 0, size: 123 -> remote_ptr: 5f..., ..."
_ALLOC_LINE = re.compile(r"\[alloc_buffer\] device: (\d+), size: (\d+) -> remote_ptr: ([0-9a-f]+)")
_FREE_LINE = re.compile(r"\[free_buffer\] remote_ptr: ([0-9a-f]+)")
_CLEAR_LINE = re.compile(r"\[buffer_clear\] remote_ptr: ([0-9a-f]+)")


@dataclass(frozen=True)
class Allocation:
    """One buffer an RPC server allocated; ``freed`` when the client freed it again, ``cleared`` when the client
    zeroed it (llama.cpp clears KV-cache buffers, never weights or compute buffers)."""

    size_bytes: int
    remote_ptr: str
    freed: bool
    cleared: bool


@dataclass(frozen=True)
class DeviceAllocation:
    """What one RPC device held once the client had allocated everything: weights, KV cache, compute."""

    weights_bytes: int
    kv_bytes: int
    compute_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes


def classify(allocations: list[Allocation]) -> DeviceAllocation:
    """Split one client's allocations into phases. The buffers alive after the last allocation (the client's
    teardown only frees) are what it held; the cleared ones are KV caches, those allocated before the first KV
    cache are weights, the rest compute buffers (the reserve's, and scratch allocated while decoding)."""
    first_kv = next((i for i, a in enumerate(allocations) if a.cleared), len(allocations))
    weights = kv = compute = 0
    for index, allocation in enumerate(allocations):
        if allocation.freed:
            continue
        if allocation.cleared:
            kv += allocation.size_bytes
        elif index < first_kv:
            weights += allocation.size_bytes
        else:
            compute += allocation.size_bytes
    return DeviceAllocation(weights, kv, compute)


class _Server:
    def __init__(self, port: int, log_dir: Path, n_threads: int, debug: bool = False) -> None:
        self.port = port
        self.endpoint = f"{HOST}:{port}"
        self.log_path = log_dir / f"rpc-{port}.log"
        env = dict(os.environ)
        if debug:
            env["GGML_RPC_DEBUG"] = "1"
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tuner.llamacpp.rpc",
                    "--host",
                    HOST,
                    "--port",
                    str(port),
                    "--threads",
                    str(n_threads),
                    "--die-with-parent",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""

    def log_size(self) -> int:
        """Bytes logged so far: a marker to split the allocations into phases (model, KV, compute)."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def allocations(self, since: int = 0, until_teardown: bool = True) -> list[Allocation]:
        """Every buffer the server allocated after log offset ``since``, in order (GGML_RPC_DEBUG only).

        ``until_teardown``: frees after the last allocation (the client closing the model) do not count.
        """
        with open(self.log_path, "rb") as log:
            log.seek(since)
            lines = log.read().decode(errors="replace").splitlines()
        found: list[tuple[int, str]] = []
        freed: dict[int, int] = {}  # index in found -> line number of its free
        cleared: set[int] = set()
        live: dict[str, int] = {}  # remote_ptr -> index in found, for the buffer currently at that address
        last_alloc_line = -1
        for number, line in enumerate(lines):
            alloc = _ALLOC_LINE.search(line)
            if alloc:
                live[alloc.group(3)] = len(found)
                found.append((int(alloc.group(2)), alloc.group(3)))
                last_alloc_line = number
                continue
            clear = _CLEAR_LINE.search(line)
            if clear and clear.group(1) in live:
                cleared.add(live[clear.group(1)])
                continue
            free = _FREE_LINE.search(line)
            if free and free.group(1) in live:
                freed[live.pop(free.group(1))] = number
        return [
            Allocation(size, ptr, i in freed and (not until_teardown or freed[i] < last_alloc_line), i in cleared)
            for i, (size, ptr) in enumerate(found)
        ]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _wait_ready(server: _Server, deadline: float) -> bool:
    """True once the server answers the handshake; False if it exited (port taken). Raises on timeout."""
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return False
        try:
            probe_rpc_endpoint(server.endpoint, timeout_s=2.0)
            return True
        except InventoryError:
            time.sleep(0.05)
    raise RpcBedError(f"RPC server {server.endpoint} did not answer within {START_TIMEOUT_S:g} s:\n{server.output()}")


def _start_one(log_dir: Path, n_threads: int, debug: bool = False) -> _Server:
    outputs: list[str] = []
    for _ in range(MAX_START_ATTEMPTS):
        server = _Server(_free_port(), log_dir, n_threads, debug)
        try:
            if _wait_ready(server, time.monotonic() + START_TIMEOUT_S):
                return server
        except BaseException:
            server.stop()
            raise
        server.stop()
        outputs.append(f"{server.endpoint} (exit {server.proc.returncode}): {server.output()}")
    raise RpcBedError("could not start an RPC server:\n" + "\n".join(outputs))


@contextlib.contextmanager
def rpc_servers(n: int, n_threads: int = 1) -> Iterator[list[str]]:
    """Start n RPC servers (CPU device, n_threads each) on free loopback ports; yield their endpoints."""
    if n < 1:
        raise ValueError(f"rpc_servers needs n >= 1, got {n}")
    servers: list[_Server] = []
    with tempfile.TemporaryDirectory(prefix="llamasplit-rpcbed-") as log_dir:
        try:
            # Started one after another: each takes ~0.3 s to import llama_cpp, and a server that loses
            # its port is retried on a new one without disturbing the others.
            for _ in range(n):
                servers.append(_start_one(Path(log_dir), n_threads))
            yield [server.endpoint for server in servers]
        finally:
            for server in servers:
                server.stop()


@contextlib.contextmanager
def logged_rpc_servers(n: int, n_threads: int = 1) -> Iterator[list[_Server]]:
    """Like ``rpc_servers``, with GGML_RPC_DEBUG=1: yields the servers (``.endpoint``, ``.allocations()``)."""
    if n < 1:
        raise ValueError(f"logged_rpc_servers needs n >= 1, got {n}")
    servers: list[_Server] = []
    with tempfile.TemporaryDirectory(prefix="llamasplit-rpcbed-") as log_dir:
        try:
            for _ in range(n):
                servers.append(_start_one(Path(log_dir), n_threads, debug=True))
            yield servers
        finally:
            for server in servers:
                server.stop()

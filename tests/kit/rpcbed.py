"""The multi-device test bed: N llama.cpp RPC servers on loopback, each serving this machine's CPU.

``with rpc_servers(2) as endpoints:`` gives ["127.0.0.1:PORT", ...] once every server answers the RPC
handshake, and kills every server on the way out (also when the test fails). The servers also die with
the test process (PR_SET_PDEATHSIG), so a killed pytest leaves none behind. Every server reports all
physical RAM as free: tests that need a smaller device tell the tuner its free memory themselves.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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


class _Server:
    def __init__(self, port: int, log_dir: Path, n_threads: int) -> None:
        self.port = port
        self.endpoint = f"{HOST}:{port}"
        self.log_path = log_dir / f"rpc-{port}.log"
        env = dict(os.environ)
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


def _start_one(log_dir: Path, n_threads: int) -> _Server:
    outputs: list[str] = []
    for _ in range(MAX_START_ATTEMPTS):
        server = _Server(_free_port(), log_dir, n_threads)
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

"""`llamasplit rpc-worker` processes on loopback for tests: start, kill, restart on the same port.

Unlike tests/kit/rpcbed.py (the tuner's own minimal CPU server) these run the real subcommand, so the tests
see what a user on a second machine runs. Each worker dies with the test process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tuner.errors import InventoryError
from tuner.llamacpp.rpc import probe_rpc_endpoint

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec; survives the exec
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMASPLIT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


class RpcWorker:
    """One `llamasplit rpc-worker` on a loopback port; its output goes to ``log_path`` (appended across restarts)."""

    def __init__(self, log_dir: Path, *args: str, port: int | None = None, debug: bool = False) -> None:
        self.port = port or free_port()
        self.endpoint = f"{HOST}:{self.port}"
        self.args = args
        self.debug = debug
        self.log_path = log_dir / f"rpc-worker-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> RpcWorker:
        env = child_env(**({"GGML_RPC_DEBUG": "1"} if self.debug else {}))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "rpc-worker", "--port", str(self.port), *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rpc-worker {self.endpoint} exited {self.proc.returncode}:\n{self.output()}")
            try:
                probe_rpc_endpoint(self.endpoint, timeout_s=2.0)
                return self
            except InventoryError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"rpc-worker {self.endpoint} did not answer within {timeout_s:g} s:\n{self.output()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

"""Helpers for the server tests: a live uvicorn server in a thread, settings without the shell's
LLAMASPLIT_* variables, Prometheus text parsing and polling."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from server.config import Settings, load_settings

START_TIMEOUT_S = 120.0
# The session server (conftest.py): two keys, 2048 tokens of context, one slot, a queue of one.
API_KEYS = ("test-key-one", "test-key-two")
ALIAS = "smollm2"
CTX = 2048
MAX_BODY_BYTES = 64 * 1024


@contextlib.contextmanager
def clean_environment() -> Iterator[None]:
    """Hide LLAMASPLIT_* variables of the developer's shell from settings built inside."""
    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("LLAMASPLIT_")]}
    try:
        yield
    finally:
        os.environ.update(saved)


def make_settings(**cli: Any) -> Settings:
    with clean_environment():
        return load_settings(cli)


class LiveServer:
    """A uvicorn server in a daemon thread, bound to a free loopback port before it starts."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1") -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, wait_ready: bool = True) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        if wait_ready:
            self.wait_ready(deadline)
        return self

    def wait_ready(self, deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.url}/health did not turn 200 within {START_TIMEOUT_S:g} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@contextlib.contextmanager
def served(settings: Settings) -> Iterator[LiveServer]:
    """The server's app for ``settings`` on a live server, ready, and stopped however the block ends."""
    from server.app import create_app

    live = LiveServer(create_app(settings)).start()
    try:
        yield live
    finally:
        live.stop()


ROOT = Path(__file__).resolve().parents[2]


def cli_environment() -> dict[str, str]:
    """The environment for a `llamasplit serve` child: this checkout importable, no LLAMASPLIT_* of the shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMASPLIT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@contextlib.contextmanager
def serve_cli(args: Sequence[str], log: Path, timeout_s: float = START_TIMEOUT_S) -> Iterator[str]:
    """Run `python -m server.cli serve --port P ARGS` in its own process until /health is 200; yields its URL.

    The process is stopped with SIGINT (a clean shutdown) when the block ends; its stderr goes to ``log``.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *args],
            stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=cli_environment(),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                time.sleep(0.1)
            assert proc.poll() is None, log.read_text()
            yield url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def plan_and_chat_over_two_rpc_devices(
    model: Path, log: Path, *flags: str
) -> tuple[list[str], dict[str, Any], httpx.Response]:
    """Serve ``model`` as "smol" over two local RPC devices with ``flags``: the endpoints, the model's /v1/plan
    entry and the reply to a short chat."""
    from tests.kit.rpcbed import rpc_servers

    with (
        rpc_servers(2) as endpoints,
        serve_cli(["--model", f"smol={model}", "--rpc", ",".join(endpoints), "--ctx", "2048", *flags], log) as url,
    ):
        entry = httpx.get(url + "/v1/plan").json()["data"][0]
        reply = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=120,
        )
    return endpoints, entry, reply


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None when absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        match = re.match(r"^(\w+)(?:\{(.*)\})?\s+(\S+)$", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return None


def model_metric(http: httpx.Client, name: str, model: str, **labels: str) -> float:
    """One sample of ``model`` from the server's /metrics; it must be there."""
    value = metric_value(http.get("/metrics").text, name, model=model, **labels)
    assert value is not None, name
    return value


def assert_engine_clean(http: httpx.Client, model: str) -> None:
    """The engine's own accounting once requests are done: no sequence busy, no KV cell held or leaked."""
    wait_for(lambda: model_metric(http, "llamasplit_sequences_busy", model) == 0, 10)
    assert model_metric(http, "llamasplit_kv_cells_used", model) == 0
    assert model_metric(http, "llamasplit_kv_cells_untracked", model) == 0
    assert model_metric(http, "llamasplit_requests_running", model) == 0


def running_requests(http: httpx.Client) -> float:
    value = metric_value(http.get("/metrics").text, "llamasplit_requests_running", model=ALIAS)
    assert value is not None
    return value


def wait_for(predicate: Any, timeout_s: float, interval_s: float = 0.02) -> float:
    """Poll until predicate() is true; return the seconds it took, or fail after timeout_s."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
    return time.monotonic() - started

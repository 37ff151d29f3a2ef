"""`llamasplit serve --rpc` over real `llamasplit rpc-worker` processes on loopback, and what happens when one fails.

- Two workers: the tuner plans across them, each holds what was predicted, a chat is answered.
- A worker slowed down (stopped and continued in turns, a tc-free throttle) shows in llamasplit_step_seconds.
- A worker killed with SIGKILL mid-stream: ggml-rpc aborts the engine process, the stream ends with an error
  within seconds, /health names the worker the model waits for, the server stays up, and once the worker is back
  the model reloads by itself.
- A worker absent at start-up: the server names it and exits 2; with --rpc-optional it plans without it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.kit.rpcworker import ROOT, RpcWorker, child_env, free_port
from tests.server.support import wait_for

pytestmark = pytest.mark.llama
MiB = 1024 * 1024
ALIAS = "smol"
NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end-of-text tokens: keep a stream going


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(model: Path, rpc: list[str], log: Path, *extra: str) -> Served:
    port = free_port()
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--model", f"{ALIAS}={model}", "--rpc", ",".join(rpc),
             "--port", str(port), "--ctx", "2048", "--parallel", "2", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=child_env(),
        )  # fmt: skip
    return Served(proc, f"http://127.0.0.1:{port}", log)


def wait_healthy(served: Served, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert served.proc.poll() is None, served.output()
        try:
            if httpx.get(served.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not healthy within {timeout_s} s:\n{served.output()}")


def stop_server(served: Served) -> None:
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGINT)
        try:
            served.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait()


def chat(url: str, max_tokens: int = 8, **extra: Any) -> httpx.Response:
    body = {"model": ALIAS, "messages": [{"role": "user", "content": "Tell a long story."}], "temperature": 0,
            "max_tokens": max_tokens, "logit_bias": NO_EOS, **extra}  # fmt: skip
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def bed(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, list[RpcWorker]]]:
    tmp = tmp_path_factory.mktemp("rpc-workers")
    workers = [RpcWorker(tmp, "--cache-dir", str(tmp / f"cache{i}"), "--threads", "1").start() for i in range(2)]
    # Both workers report all of this machine's RAM as free, so left alone the tuner puts every layer on the first;
    # an even split makes both hold layers (the tuner still plans everything else and checks that it fits).
    served = start_server(smollm2, [w.endpoint for w in workers], tmp / "serve.log", "--tensor-split", "1,1")
    try:
        wait_healthy(served)
        yield served, workers
    finally:
        stop_server(served)
        for worker in workers:
            worker.stop()


def test_the_tuners_plan_over_two_workers_holds_what_it_predicted_and_answers(
    bed: tuple[Served, list[RpcWorker]],
) -> None:
    served, workers = bed
    entry = httpx.get(served.url + "/v1/plan").json()["data"][0]
    reply = chat(served.url)

    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 8
    rows = entry["memory"]["devices"]
    assert [row["buffer_name"] for row in rows] == [f"RPC0[{w.endpoint}]" for w in workers]
    # Both workers hold layers, each what the tuner predicted (within its acceptance bound).
    assert entry["plan"]["n_gpu_layers"] == 31 and all(row["actual_bytes"] > 20 * MiB for row in rows)
    for row in rows:
        assert abs(row["actual_bytes"] - row["predicted_bytes"]) <= max(0.03 * row["actual_bytes"], 16 * MiB)


def step_seconds(url: str) -> tuple[float, float]:
    """(sum, count) of llamasplit_step_seconds for the model."""
    text = httpx.get(url + "/metrics").text
    found = {
        kind: float(value)
        for kind, value in re.findall(rf'^llamasplit_step_seconds_(sum|count)\{{model="{ALIAS}"\}} (\S+)$', text, re.M)
    }
    return found.get("sum", 0.0), found.get("count", 0.0)  # absent before the first step


def mean_step_s(url: str, max_tokens: int) -> float:
    sum_before, count_before = step_seconds(url)
    assert chat(url, max_tokens=max_tokens).status_code == 200
    sum_after, count_after = step_seconds(url)
    assert count_after - count_before >= max_tokens - 1
    return (sum_after - sum_before) / (count_after - count_before)


def test_a_slow_worker_shows_in_the_per_step_time(bed: tuple[Served, list[RpcWorker]]) -> None:
    served, workers = bed
    baseline_s = mean_step_s(served.url, 24)

    # Throttle the second worker without tc: stopped 80 ms out of every 100 ms, as a busy or slow card would be.
    stop = threading.Event()

    def throttle() -> None:
        while not stop.is_set():
            os.kill(workers[1].pid, signal.SIGSTOP)
            time.sleep(0.08)
            os.kill(workers[1].pid, signal.SIGCONT)
            time.sleep(0.02)

    thread = threading.Thread(target=throttle)
    thread.start()
    try:
        slow_s = mean_step_s(served.url, 24)
    finally:
        stop.set()
        thread.join()
        os.kill(workers[1].pid, signal.SIGCONT)
    print(f"mean step {baseline_s * 1000:.1f} ms, with the worker throttled {slow_s * 1000:.1f} ms")
    assert slow_s > 2 * baseline_s, (baseline_s, slow_s)
    assert mean_step_s(served.url, 8) < slow_s  # and it is gone with the throttle


def test_a_worker_killed_mid_stream_ends_the_stream_in_seconds_and_the_model_comes_back_by_itself(
    bed: tuple[Served, list[RpcWorker]],
) -> None:
    served, workers = bed
    events: list[dict[str, Any]] = []
    first_tokens = threading.Event()
    body = {"model": ALIAS, "messages": [{"role": "user", "content": "Tell a long story."}], "temperature": 0,
            "max_tokens": 400, "logit_bias": NO_EOS, "stream": True}  # fmt: skip

    def stream() -> None:
        with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line.removeprefix("data: ")))
                    if len(events) >= 5:
                        first_tokens.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert first_tokens.wait(60)
    killed_at = time.monotonic()
    workers[1].kill(signal.SIGKILL)
    thread.join(30)
    ended_in_s = time.monotonic() - killed_at

    # The stream ended within seconds with an error event that says what happened.
    assert not thread.is_alive() and ended_in_s < 10, ended_in_s
    error = events[-1]["error"]
    assert error["code"] == "engine_died" and "SIGABRT" in error["message"]
    # The server is up, says the model failed, and which worker it waits for.
    assert served.proc.poll() is None

    def names_the_worker() -> bool:
        return workers[1].endpoint in httpx.get(served.url + "/health").json().get("errors", {}).get(ALIAS, "")

    wait_for(names_the_worker, 15)
    health = httpx.get(served.url + "/health")
    assert health.status_code == 503
    reason = health.json()["errors"][ALIAS]
    assert "engine process died" in reason and f"waiting for RPC worker {workers[1].endpoint}" in reason
    refused = chat(served.url)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_failed"
    assert "Remote RPC server crashed" in served.output()  # ggml-rpc's own words, in the server's log

    # The worker comes back on its port: the model reloads by itself, and the log says so.
    workers[1].start()
    back_in_s = wait_for(lambda: httpx.get(served.url + "/health").status_code == 200, 90, interval_s=0.2)
    wait_for(lambda: f"{ALIAS}: reloaded automatically" in served.output(), 5)  # logged once load_model returns
    log = served.output()
    assert f"RPC worker {workers[1].endpoint} answers again" in log
    assert f"{ALIAS}: reloading automatically, every RPC worker answers again" in log
    reply = chat(served.url)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
    print(f"stream ended {ended_in_s:.2f} s after the kill; healthy {back_in_s:.1f} s after the worker was back")


def test_a_worker_absent_at_start_up_is_named_and_the_server_refuses_to_start(smollm2: Path, tmp_path: Path) -> None:
    worker = RpcWorker(tmp_path, "--no-cache", "--threads", "1").start()
    absent = f"127.0.0.1:{free_port()}"
    try:
        served = start_server(smollm2, [worker.endpoint, absent], tmp_path / "refused.log")
        started = time.monotonic()
        served.proc.wait(timeout=60)
        refused_in_s = time.monotonic() - started
        assert served.proc.returncode == 2
        assert f"llamasplit: RPC endpoint {absent} is unreachable" in served.output()
        assert refused_in_s < 30

        optional = start_server(smollm2, [worker.endpoint, absent], tmp_path / "optional.log", "--rpc-optional")
        try:
            wait_healthy(optional)
            entry = httpx.get(optional.url + "/v1/plan").json()["data"][0]
            reply = chat(optional.url)
        finally:
            stop_server(optional)
    finally:
        worker.stop()
    assert reply.status_code == 200, reply.text
    assert [row["buffer_name"] for row in entry["memory"]["devices"]] == [f"RPC0[{worker.endpoint}]"]
    log = optional.output()
    assert f"--rpc-optional: planning without it: RPC endpoint {absent} is unreachable" in log

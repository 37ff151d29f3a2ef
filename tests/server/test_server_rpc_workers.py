"""`llamasplit serve --rpc` over real `llamasplit rpc-worker` processes on loopback, and what happens when one fails.

- Two workers: the tuner plans across them, each holds what was predicted, a chat is answered. A second model
  kept in host RAM is opened without the workers, in an engine process of its own.
- A worker slowed down (stopped and continued in turns, a tc-free throttle) shows in llamasplit_step_seconds.
- A worker killed with SIGKILL mid-stream: ggml-rpc aborts the engine process that uses it, the stream ends with
  an error within seconds, /health names the worker the model waits for, the server stays up, the model in host
  RAM finishes its stream and keeps answering, a model that shared the dead process but not the dead worker
  comes back at once, and once the worker is back the model on it reloads by itself.
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
import openai
import pytest

from tests.kit.rpcworker import ROOT, RpcWorker, child_env, free_port
from tests.server.support import wait_for

pytestmark = pytest.mark.llama
MiB = 1024 * 1024
ALIAS = "smol"
LOCAL = "local"  # the same GGUF again, kept in host RAM (n_gpu_layers 0): it uses no worker
FIRST = "first"  # and again, whole on the first worker: it shares smol's engine process (the worker's connection)
NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end-of-text tokens: keep a stream going


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(model: Path | None, rpc: list[str], log: Path, *extra: str) -> Served:
    """``model`` None: the models come from a --config in ``extra``."""
    port = free_port()
    models = ["--model", f"{ALIAS}={model}"] if model is not None else []
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", *models, "--rpc", ",".join(rpc),
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


def chat(url: str, max_tokens: int = 8, model: str = ALIAS, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell a long story."}], "temperature": 0,
            "max_tokens": max_tokens, "logit_bias": NO_EOS, **extra}  # fmt: skip
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def bed(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, list[RpcWorker]]]:
    tmp = tmp_path_factory.mktemp("rpc-workers")
    workers = [RpcWorker(tmp, "--cache-dir", str(tmp / f"cache{i}"), "--threads", "1").start() for i in range(2)]
    # Both workers report all of this machine's RAM as free, so left alone the tuner puts every layer on the first;
    # an even split makes both hold layers (the tuner still plans everything else and checks that it fits).
    # One thread per engine: llama.cpp's threads spin at their barriers, and on a shared two-core machine two
    # engines with two threads each crawl.
    config = tmp / "models.toml"
    config.write_text(
        f"preload_all = true\nthreads = 1\n"
        f'[[models]]\nalias = "{ALIAS}"\npath = "{smollm2}"\ntensor_split = [1, 1]\n'
        f'[[models]]\nalias = "{LOCAL}"\npath = "{smollm2}"\nn_gpu_layers = 0\n'
        f'[[models]]\nalias = "{FIRST}"\npath = "{smollm2}"\ntensor_split = [1, 0]\n'
    )
    served = start_server(None, [w.endpoint for w in workers], tmp / "serve.log", "--config", str(config))
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


def test_a_model_kept_in_host_ram_is_opened_without_the_workers_in_an_engine_process_of_its_own(
    bed: tuple[Served, list[RpcWorker]],
) -> None:
    served, workers = bed
    entry = next(e for e in httpx.get(served.url + "/v1/plan").json()["data"] if e["model"] == LOCAL)
    reply = chat(served.url, model=LOCAL)

    assert reply.status_code == 200, reply.text
    assert entry["plan"]["n_gpu_layers"] == 0
    # Opened without the workers: no buffer on either, everything in host RAM.
    assert [row["buffer_name"] for row in entry["memory"]["devices"]] == [None, None]
    assert entry["memory"]["host"]["actual_bytes"] > 50 * MiB
    log = served.output()
    endpoints = ", ".join(sorted(w.endpoint for w in workers))
    assert re.search(rf"{ALIAS} loads in a new engine process rpc-\d+ \(pid \d+, RPC workers {endpoints}\)", log)
    assert re.search(rf"{LOCAL} loads in a new engine process {LOCAL} \(pid \d+, no RPC worker\)", log)


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


def stream_chat(url: str, model: str, max_tokens: int, events: list[dict[str, Any]], started: threading.Event) -> None:
    """Stream a chat into ``events`` (each SSE data object); ``started`` is set after the fifth."""
    body = {"model": model, "messages": [{"role": "user", "content": "Tell a long story."}], "temperature": 0,
            "max_tokens": max_tokens, "logit_bias": NO_EOS, "stream": True}  # fmt: skip
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
                if len(events) >= 5:
                    started.set()


def test_a_worker_killed_mid_stream_fails_only_the_model_on_it_which_comes_back_by_itself(
    bed: tuple[Served, list[RpcWorker]],
) -> None:
    served, workers = bed
    events: list[dict[str, Any]] = []
    local_events: list[dict[str, Any]] = []
    first_tokens, local_first_tokens = threading.Event(), threading.Event()
    thread = threading.Thread(target=stream_chat, args=(served.url, ALIAS, 400, events, first_tokens))
    local_thread = threading.Thread(target=stream_chat, args=(served.url, LOCAL, 200, local_events, local_first_tokens))
    thread.start()
    local_thread.start()
    assert first_tokens.wait(60) and local_first_tokens.wait(60)
    killed_at = time.monotonic()
    workers[1].kill(signal.SIGKILL)
    local_events_at_kill = len(local_events)
    thread.join(30)
    ended_in_s = time.monotonic() - killed_at

    # The stream ended within seconds with an error event that says what happened.
    assert not thread.is_alive() and ended_in_s < 10, ended_in_s
    error = events[-1]["error"]
    assert error["code"] == "engine_died" and "SIGABRT" in error["message"]
    # The model in host RAM, in its own engine process, went on streaming to its end.
    local_thread.join(300)
    assert not local_thread.is_alive()
    assert len(local_events) > local_events_at_kill and "error" not in local_events[-1]
    assert local_events[-1]["choices"][0]["finish_reason"] == "length"
    # The server is up, says the model failed, and which worker it waits for.
    assert served.proc.poll() is None

    def names_the_worker() -> bool:
        return workers[1].endpoint in httpx.get(served.url + "/health").json().get("errors", {}).get(ALIAS, "")

    wait_for(names_the_worker, 15)
    health = httpx.get(served.url + "/health")
    assert health.status_code == 503
    reason = health.json()["errors"][ALIAS]
    assert "engine process died" in reason and f"waiting for RPC worker {workers[1].endpoint}" in reason
    assert workers[0].endpoint not in reason  # the live worker is not waited for
    assert health.json()["models"][LOCAL] == "ready" and LOCAL not in health.json()["errors"]
    # The model on the first worker alone died with the shared process, and comes back while the other is down.
    wait_for(lambda: httpx.get(served.url + "/health").json()["models"][FIRST] == "ready", 90, interval_s=0.2)
    assert f"{FIRST}: reloading automatically, its RPC workers answer again ({workers[0].endpoint})" in (
        served.output()
    )
    assert chat(served.url, model=FIRST).status_code == 200
    refused = chat(served.url)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_failed"
    assert "Remote RPC server crashed" in served.output()  # ggml-rpc's own words, in the server's log

    # While the worker is down the other model answers, through the official client.
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model=LOCAL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert answer.choices[0].message.content and answer.usage is not None and answer.usage.completion_tokens >= 1

    # The worker comes back on its port: the model reloads by itself, and the log says which and over what.
    workers[1].start()
    back_in_s = wait_for(lambda: httpx.get(served.url + "/health").status_code == 200, 90, interval_s=0.2)
    wait_for(lambda: f"{ALIAS}: reloaded automatically" in served.output(), 5)  # logged once load_model returns
    log = served.output()
    endpoints = ", ".join(w.endpoint for w in workers)
    assert f"RPC worker {workers[1].endpoint} answers again" in log
    assert f"{ALIAS}: reloading automatically, its RPC workers answer again ({endpoints})" in log
    # It reloaded into the process the first model came back in: they share the first worker.
    assert len(re.findall(rf"{ALIAS} loads in a new engine process", log)) == 1
    assert f"{LOCAL}: its engine process died" not in log and f"{LOCAL}: reloading" not in log
    assert len(re.findall(rf"{LOCAL} loads in a new engine process", log)) == 1  # never restarted
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

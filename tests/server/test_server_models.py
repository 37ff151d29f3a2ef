"""Several models on one workstation: loaded on demand, placed and evicted by exact memory.

Two local RPC devices are capped at 300 MiB each with --device-limit: SmolLM2 at a 512-token context needs
207 MiB on one device (predicted and measured), so two models fit, one per device, and a third has to evict.
Three aliases of the same GGUF compete ("a", "b", "c"); the server runs in this process (LiveServer) so that
the test can look at its registry, and only its engine process connects to the RPC servers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import create_app
from tests.kit.rpcbed import rpc_servers
from tests.server.support import LiveServer, make_settings, metric_value, wait_for

pytestmark = pytest.mark.llama

MiB = 1024 * 1024
NO_EOS = {"0": -100, "2": -100}


@pytest.fixture(scope="module")
def endpoints() -> Iterator[list[str]]:
    with rpc_servers(2) as found:
        yield found


def start(smollm2: Path, endpoints: list[str], **extra: Any) -> LiveServer:
    settings = make_settings(
        models=[{"path": str(smollm2), "alias": name} for name in ("a", "b", "c")],
        rpc=",".join(endpoints),
        ctx=512,
        parallel=1,
        reserve_mib=0,
        device_limit="0=300MiB,1=300MiB",
        max_queue=8,
        **extra,
    )
    return LiveServer(create_app(settings)).start()


@pytest.fixture
def server(smollm2: Path, endpoints: list[str]) -> Iterator[LiveServer]:
    live = start(smollm2, endpoints)
    yield live
    live.stop()


def chat(http: httpx.Client, model: str, max_tokens: int = 4) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens,
            "temperature": 0, "logit_bias": NO_EOS}  # fmt: skip
    return http.post("/v1/chat/completions", json=body)


def states(http: httpx.Client) -> dict[str, str]:
    return {card["id"]: card["status"] for card in http.get("/v1/models").json()["data"]}


def cards(http: httpx.Client) -> dict[str, dict[str, Any]]:
    return {card["id"]: card for card in http.get("/v1/models").json()["data"]}


def test_models_load_on_demand_each_on_its_own_device_and_the_third_evicts_the_least_recently_used(
    server: LiveServer,
) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        # Several models and no --preload: nothing is loaded, and the server is healthy.
        assert states(http) == {"a": "unloaded", "b": "unloaded", "c": "unloaded"}
        assert http.get("/health").status_code == 200

        assert chat(http, "a").status_code == 200
        assert chat(http, "b").status_code == 200
        loaded = cards(http)
        assert loaded["a"]["status"] == loaded["b"]["status"] == "ready"
        # Each went whole on a device of its own: the fastest placement that evicts nothing.
        where = {name: [d["name"] for d in loaded[name]["devices"]] for name in ("a", "b")}
        assert len(where["a"]) == len(where["b"]) == 1 and where["a"] != where["b"]
        assert "whole on" in loaded["a"]["placement"]

        time.sleep(0.05)
        assert chat(http, "a").status_code == 200  # a is now used more recently than b
        assert chat(http, "c").status_code == 200  # no room: b, the least recently used idle model, goes
        after = cards(http)
        assert (after["a"]["status"], after["b"]["status"], after["c"]["status"]) == ("ready", "unloaded", "ready")
        assert after["b"]["evictions"] == 1 and after["a"]["evictions"] == 0
        assert [d["name"] for d in after["c"]["devices"]] == where["b"]  # exactly the room b left

        # Predicted against measured, per device, after each load.
        for entry in http.get("/v1/plan").json()["data"]:
            if entry["status"] != "ready":
                continue
            for row in entry["memory"]["devices"]:
                actual, predicted = row["actual_bytes"], row["predicted_bytes"]
                if actual is not None:
                    assert abs(actual - predicted) <= max(0.03 * actual, 16 * MiB), row["name"]
        text = http.get("/metrics").text
        assert metric_value(text, "llamasplit_model_evictions_total", model="b") == 1
        assert metric_value(text, "llamasplit_model_loads_total", model="a") == 1
        assert metric_value(text, "llamasplit_model_state", model="b", state="unloaded") == 1


def test_a_model_with_a_stream_in_flight_is_never_evicted(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=180) as http:
        assert chat(http, "a").status_code == 200
        assert chat(http, "b").status_code == 200
        streaming: dict[str, Any] = {}
        started = threading.Event()

        def long_stream() -> None:
            body = {"model": "a", "messages": [{"role": "user", "content": "Tell a long story."}], "stream": True,
                    "max_tokens": 150, "temperature": 0, "logit_bias": NO_EOS}  # fmt: skip
            lines = []
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                    if len(lines) > 3:
                        started.set()
            streaming["lines"] = lines

        thread = threading.Thread(target=long_stream)
        thread.start()
        assert started.wait(60)
        # a is older (used first) but busy: b, idle, is the one that goes.
        assert chat(http, "c").status_code == 200
        thread.join(180)
        assert streaming["lines"][-1] == "data: [DONE]"
        assert states(http) == {"a": "ready", "b": "unloaded", "c": "ready"}


def test_concurrent_first_requests_cause_one_load(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as http, ThreadPoolExecutor(max_workers=4) as pool:
        replies = list(pool.map(lambda _: chat(http, "b"), range(4)))
        assert [r.status_code for r in replies] == [200] * 4
        assert cards(http)["b"]["loads"] == 1


def test_pinned_models_stay_and_a_model_that_cannot_get_room_is_a_503_with_the_numbers(
    smollm2: Path, endpoints: list[str]
) -> None:
    # 100 MiB of host RAM: a and b take 37 MiB each there (token_embd and the CPU's compute buffer), so c
    # cannot spill its layers into RAM either.
    live = start(smollm2, endpoints, pin=("a", "b"), preload=("a", "b"), host_limit="100MiB")
    try:
        with httpx.Client(base_url=live.url, timeout=120) as http:
            assert states(http) == {"a": "ready", "b": "ready", "c": "unloaded"}  # preloaded at start-up
            refused = chat(http, "c")
            assert refused.status_code == 503 and refused.headers["Retry-After"]
            error = refused.json()["error"]
            assert error["code"] == "no_room"
            assert "a (pinned)" in error["message"] and "MiB" in error["message"]
            assert states(http) == {"a": "ready", "b": "ready", "c": "unloaded"}
            assert chat(http, "a").status_code == 200  # and the others keep serving
    finally:
        live.stop()


def test_an_idle_model_is_unloaded_after_its_keep_alive(smollm2: Path, endpoints: list[str]) -> None:
    live = start(smollm2, endpoints, keep_alive_s=1.5)
    try:
        with httpx.Client(base_url=live.url, timeout=120) as http:
            assert chat(http, "a").status_code == 200
            assert states(http)["a"] == "ready"
            waited = wait_for(lambda: states(http)["a"] == "unloaded", 15)
            assert waited >= 1.0
            assert chat(http, "a").status_code == 200  # and it comes back on demand
            assert cards(http)["a"]["loads"] == 2
    finally:
        live.stop()

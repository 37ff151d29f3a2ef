"""llama.cpp cannot take the server down: the engine runs in its own process. When that process dies (here:
SIGKILL mid-stream, as an abort inside llama.cpp or a dead RPC server would end it) the requests in flight end
with a clear error within seconds, /health reports the model failed and why, other routes keep answering,
and POST /models/load brings the model back."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.support import LiveServer, make_settings, served, wait_for

pytestmark = pytest.mark.llama

ALIAS = "smol"
KEY = "crash-test-key"
NO_EOS = {"0": -100, "2": -100}


@pytest.fixture(scope="module")
def server(smollm2: Path) -> Iterator[LiveServer]:
    settings = make_settings(models=[{"path": str(smollm2), "alias": ALIAS}], ctx=2048, parallel=2, api_keys=[KEY])
    with served(settings) as live:
        yield live


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def body(**extra: Any) -> dict[str, Any]:
    return {"model": ALIAS, "messages": [{"role": "user", "content": "Tell a long story."}], "temperature": 0,
            "max_tokens": 400, "logit_bias": NO_EOS, **extra}  # fmt: skip


def test_a_killed_engine_ends_its_requests_with_an_error_and_the_model_loads_again(
    server: LiveServer, http: httpx.Client
) -> None:
    worker = server.app.state.llamasplit.registry.worker_of(ALIAS)
    assert worker is not None and worker.alive
    streamed: list[dict[str, Any]] = []
    first_tokens = threading.Event()
    plain: dict[str, httpx.Response] = {}

    def stream() -> None:
        with http.stream("POST", "/v1/chat/completions", json=body(stream=True)) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    streamed.append(json.loads(line.removeprefix("data: ")))
                    if len(streamed) >= 5:
                        first_tokens.set()

    def non_streaming() -> None:
        plain["reply"] = http.post("/v1/chat/completions", json=body())

    threads = [threading.Thread(target=stream), threading.Thread(target=non_streaming)]
    for thread in threads:
        thread.start()
    assert first_tokens.wait(60)
    killed_at = time.monotonic()
    worker.kill(signal.SIGKILL)
    for thread in threads:
        thread.join(30)
    ended_in_s = time.monotonic() - killed_at

    # Both requests ended within seconds, each with an error that says what happened.
    assert ended_in_s < 10
    error = streamed[-1]["error"]
    assert error["code"] == "engine_died" and "SIGKILL" in error["message"]
    assert plain["reply"].status_code == 503 and plain["reply"].json()["error"]["code"] == "engine_died"
    assert plain["reply"].headers["Retry-After"]
    # The server is up and says what is wrong.
    health = http.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "error"
    assert "SIGKILL" in health.json()["errors"][ALIAS]
    refused = http.post("/v1/chat/completions", json=body(max_tokens=4))
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_failed"
    card = http.get(f"/v1/models/{ALIAS}").json()
    assert card["status"] == "failed" and "SIGKILL" in card["error"]

    # Loading it again needs the API key, like the rest of the API.
    assert httpx.post(server.url + "/models/load", json={"model": ALIAS}).status_code == 401
    assert http.post("/models/load", json={"model": "nope"}).status_code == 404
    reloaded = http.post("/models/load", json={"model": ALIAS})
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["status"] == "ready"
    new_worker = server.app.state.llamasplit.registry.worker_of(ALIAS)
    assert new_worker is not worker and new_worker.alive
    assert http.get("/health").status_code == 200
    reply = http.post("/v1/chat/completions", json=body(max_tokens=8))
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8


def test_unload_frees_the_model_and_a_request_or_load_brings_it_back(http: httpx.Client) -> None:
    loads = http.get(f"/v1/models/{ALIAS}").json()["loads"]
    unloaded = http.post("/models/unload", json={"model": ALIAS})
    assert unloaded.status_code == 200 and unloaded.json()["status"] == "unloaded"
    assert http.get(f"/v1/models/{ALIAS}").json()["devices"] == []
    # An unloaded model loads on demand: the request waits for it.
    assert http.post("/v1/chat/completions", json=body(max_tokens=4)).status_code == 200
    assert http.get(f"/v1/models/{ALIAS}").json()["loads"] == loads + 1
    assert http.post("/models/unload", json={"model": ALIAS}).json()["status"] == "unloaded"
    assert http.post("/models/load", json={"model": ALIAS}).json()["status"] == "ready"
    wait_for(lambda: http.get("/health").status_code == 200, 10)
    assert http.post("/v1/chat/completions", json=body(max_tokens=4)).status_code == 200

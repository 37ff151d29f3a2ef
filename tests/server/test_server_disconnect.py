"""A client that goes away stops its generation at once: the slot is free again within a second, and no
more tokens are generated for it (streaming, non-streaming, and during a long prompt's prefill)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.server.support import ALIAS, API_KEYS, LiveServer, metric_value, running_requests, wait_for

pytestmark = pytest.mark.llama

LONG = {"model": ALIAS, "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "max_tokens": 500, "temperature": 0}  # fmt: skip


def generated(http: httpx.Client) -> float:
    return metric_value(http.get("/metrics").text, "llamasplit_generated_tokens_total", model=ALIAS) or 0.0


def cancelled(http: httpx.Client) -> float:
    return metric_value(http.get("/metrics").text, "llamasplit_requests_cancelled_total", model=ALIAS) or 0.0


def raw_request(server: LiveServer, body: dict[str, object]) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection((server.host, server.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {API_KEYS[0]}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def assert_stops_within_a_second(http: httpx.Client, closed_at: float) -> None:
    wait_for(lambda: running_requests(http) == 0, timeout_s=1.0)
    assert time.monotonic() - closed_at < 1.0
    before = generated(http)
    time.sleep(0.3)
    assert generated(http) == before  # nothing is generated for the departed client any more


def test_streaming_client_that_disconnects_frees_the_slot_within_a_second(http: httpx.Client) -> None:
    cancelled_before = cancelled(http)
    with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as response:
        lines = response.iter_lines()
        content = 0
        for line in lines:  # read a few tokens, then hang up mid-answer
            if line.startswith("data: ") and '"content"' in line:
                content += 1
                if content == 3:
                    break
        assert running_requests(http) == 1
    assert_stops_within_a_second(http, time.monotonic())
    assert cancelled(http) == cancelled_before + 1
    # The freed slot serves the next request at once.
    assert http.post("/v1/chat/completions", json={**LONG, "max_tokens": 1}).status_code == 200


def test_non_streaming_client_that_disconnects_frees_the_slot_within_a_second(
    http: httpx.Client, live_server: LiveServer
) -> None:
    sock = raw_request(live_server, LONG)
    before = generated(http)
    wait_for(lambda: generated(http) > before + 3, timeout_s=30)  # it is generating
    sock.close()
    assert_stops_within_a_second(http, time.monotonic())


def test_disconnect_during_a_long_prefill_aborts_it(http: httpx.Client, live_server: LiveServer) -> None:
    # ~1750 prompt tokens take seconds to prefill on two cores; the abort callback stops llama_decode.
    body = {**LONG, "messages": [{"role": "user", "content": "lorem ipsum dolor " * 250}], "max_tokens": 10}
    before = generated(http)
    sock = raw_request(live_server, body)
    wait_for(lambda: running_requests(http) == 1, timeout_s=10)
    time.sleep(0.2)
    sock.close()
    assert_stops_within_a_second(http, time.monotonic())
    assert generated(http) == before  # it never got past the prompt

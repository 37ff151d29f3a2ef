"""Every client error comes back OpenAI-shaped with the right status, names the parameter, and leaves the
server running: 400 (bad parameters, bad bodies, too-long prompts), 401, 404, 405, 413, 429."""

from __future__ import annotations

import json
import re
import socket
import threading
from typing import Any

import httpx
import pytest

from tests.server.support import ALIAS, API_KEYS, CTX, MAX_BODY_BYTES, LiveServer

pytestmark = pytest.mark.llama

MESSAGES = [{"role": "user", "content": "Hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": ALIAS, "messages": MESSAGES, "max_tokens": 2, **fields}


def assert_openai_error(
    response: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return str(error["message"])


# (id, body, param named in the 400)
CHAT_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("temperature-above-2", chat(temperature=2.01), "temperature"),
    ("temperature-negative", chat(temperature=-0.5), "temperature"),
    ("temperature-string", chat(temperature="0.5"), "temperature"),
    ("top-p-above-1", chat(top_p=1.5), "top_p"),
    ("top-k-negative", chat(top_k=-1), "top_k"),
    ("min-p-above-1", chat(min_p=1.1), "min_p"),
    ("max-tokens-zero", chat(max_tokens=0), "max_tokens"),
    ("max-tokens-float", chat(max_tokens=2.5), "max_tokens"),
    ("max-completion-tokens-zero", chat(max_completion_tokens=0), "max_completion_tokens"),
    ("max-tokens-disagree", chat(max_tokens=3, max_completion_tokens=4), "max_tokens"),
    ("presence-penalty", chat(presence_penalty=2.5), "presence_penalty"),
    ("frequency-penalty", chat(frequency_penalty=-2.5), "frequency_penalty"),
    ("n-two", chat(n=2), "n"),
    ("n-zero", chat(n=0), "n"),
    ("logprobs-not-bool", chat(logprobs=3), "logprobs"),
    ("top-logprobs-21", chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("top-logprobs-without-logprobs", chat(top_logprobs=2), "top_logprobs"),
    ("logit-bias-key-not-int", chat(logit_bias={"hello": 1}), "logit_bias"),
    ("logit-bias-value-101", chat(logit_bias={"42": 101}), "logit_bias.42"),
    ("logit-bias-unknown-token", chat(logit_bias={"49152": 1}), "logit_bias"),
    ("stop-five", chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("stop-number", chat(stop=7), "stop"),
    ("stop-empty", chat(stop=[""]), "stop"),
    ("seed-string", chat(seed="7"), "seed"),
    ("seed-too-big", chat(seed=2**64), "seed"),
    ("messages-empty", chat(messages=[]), "messages"),
    ("messages-not-list", chat(messages="Hi"), "messages"),
    ("role-unknown", chat(messages=[{"role": "wizard", "content": "Hi"}]), "messages[0].role"),
    ("role-missing", chat(messages=[{"content": "Hi"}]), "messages[0].role"),
    ("content-number", chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    ("content-image", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content"),
    ("tool-without-id", chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].tool_call_id"),
    ("assistant-empty", chat(messages=[{"role": "assistant"}]), "messages[0]"),
    ("assistant-function-call", chat(messages=[{"role": "assistant", "content": "x", "function_call": {"name": "f"}}]),
     "messages[0].function_call"),
    ("message-unknown-field", chat(messages=[{"role": "user", "content": "x", "mood": "happy"}]), "messages[0].mood"),
    ("response-format-type", chat(response_format={"type": "xml"}), "response_format.type"),
    ("schema-name", chat(response_format={"type": "json_schema", "json_schema": {"name": "has space"}}),
     "response_format.json_schema.name"),
    ("schema-not-object", chat(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": 3}}),
     "response_format.json_schema.schema"),
    ("stream-options-without-stream", chat(stream_options={"include_usage": True}), "stream_options"),
    ("stream-not-bool", chat(stream="yes"), "stream"),
    ("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ("unknown-parameter", chat(temprature=1), "temprature"),
    ("model-missing", {"messages": MESSAGES}, "model"),
    ("model-not-string", chat(model=5), "model"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param"), [c[1:] for c in CHAT_CASES], ids=[c[0] for c in CHAT_CASES])
def test_invalid_chat_parameter_is_a_400_naming_it(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    message = assert_openai_error(http.post("/v1/chat/completions", json=body), 400, param=param)
    assert param.split(".")[0].split("[")[0] in message


COMPLETION_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("prompt-missing", {"model": ALIAS}, "prompt"),
    ("prompt-empty-list", {"model": ALIAS, "prompt": []}, "prompt"),
    ("prompt-two", {"model": ALIAS, "prompt": ["a", "b"]}, "prompt"),
    ("prompt-negative-id", {"model": ALIAS, "prompt": [-1]}, "prompt"),
    ("prompt-id-past-vocab", {"model": ALIAS, "prompt": [10, 49152]}, "prompt"),
    ("prompt-empty-string", {"model": ALIAS, "prompt": ""}, "prompt"),
    ("logprobs-6", {"model": ALIAS, "prompt": "a", "logprobs": 6}, "logprobs"),
    ("echo-with-logprobs", {"model": ALIAS, "prompt": "a", "echo": True, "logprobs": 1}, "echo"),
    ("suffix", {"model": ALIAS, "prompt": "a", "suffix": "b"}, "suffix"),
    ("best-of-2", {"model": ALIAS, "prompt": "a", "best_of": 2}, "best_of"),
    ("max-tokens-negative", {"model": ALIAS, "prompt": "a", "max_tokens": -1}, "max_tokens"),
]


@pytest.mark.parametrize(("body", "param"), [c[1:] for c in COMPLETION_CASES], ids=[c[0] for c in COMPLETION_CASES])
def test_invalid_completion_parameter_is_a_400_naming_it(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    assert_openai_error(http.post("/v1/completions", json=body), 400, param=param)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"model": "\xff\xfe"}', "not valid UTF-8"),
        (b"[1, 2]", "must be a JSON object, not a JSON array"),
        (b'"hello"', "not a JSON string"),
        (b"null", "not a JSON null"),
        (b"", "empty"),
        (b'{"model": "smollm2", "messages": [], "temperature": NaN}', "NaN is not valid JSON"),
        (b'{"model": "smollm2", "max_tokens": ' + b"9" * 5000 + b"}", "not acceptable JSON"),
        (b"[" * 20_000 + b"]" * 20_000, "JSON"),
        (b'{"model": "smollm2", "messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    ],
    ids=["syntax", "utf8", "array", "string", "null", "empty", "nan", "huge-int", "deep-nesting", "lone-surrogate"],
)
def test_body_that_is_not_a_json_object_is_a_400(http: httpx.Client, content: bytes, fragment: str) -> None:
    if len(content) > MAX_BODY_BYTES:
        pytest.fail("test body larger than the server's limit")
    response = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert fragment in assert_openai_error(response, 400)


def test_prompt_longer_than_the_context_is_a_400_with_both_counts(http: httpx.Client) -> None:
    body = chat(messages=[{"role": "user", "content": "lorem ipsum " * 1500}])
    message = assert_openai_error(
        http.post("/v1/chat/completions", json=body), 400, param="messages", code="context_length_exceeded"
    )
    n_prompt = int(re.search(r"the prompt is ([\d,]+) tokens", message).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert n_prompt > CTX
    assert f"{CTX:,} tokens" in message


def test_prompt_plus_max_tokens_over_the_context_is_a_400_naming_max_tokens(http: httpx.Client) -> None:
    message = assert_openai_error(
        http.post("/v1/completions", json={"model": ALIAS, "prompt": "Hello there", "max_tokens": CTX}),
        400,
        param="max_tokens",
        code="context_length_exceeded",
    )
    assert f"{CTX:,}" in message and "at most" in message


def test_unknown_model_is_a_404(http: httpx.Client) -> None:
    message = assert_openai_error(
        http.post("/v1/chat/completions", json=chat(model="gpt-9")), 404, param="model", code="model_not_found"
    )
    assert "gpt-9" in message and ALIAS in message
    assert_openai_error(http.get("/v1/models/gpt-9"), 404, code="model_not_found")


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {API_KEYS[0]}"}, {"Authorization": "Bearer"}],
    ids=["missing", "wrong", "basic-scheme", "empty"],
)
def test_bad_or_missing_api_key_is_a_401(live_server: LiveServer, headers: dict[str, str]) -> None:
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/metrics")):
        response = httpx.request(method, live_server.url + path, headers=headers, json=chat())
        assert_openai_error(response, 401, code="invalid_api_key")
        assert API_KEYS[0] not in response.text


def test_every_configured_key_is_accepted_and_health_needs_none(live_server: LiveServer) -> None:
    for key in API_KEYS:
        assert httpx.get(live_server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.get(live_server.url + "/health").status_code == 200


def test_oversized_body_is_a_413(http: httpx.Client) -> None:
    big = chat(messages=[{"role": "user", "content": "x" * MAX_BODY_BYTES}])
    assert_openai_error(http.post("/v1/chat/completions", json=big), 413, code="request_too_large")

    # Without Content-Length (chunked), the limit holds while reading.
    def chunks() -> Any:
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 8192):
            yield payload[i : i + 8192]

    assert_openai_error(http.post("/v1/chat/completions", content=chunks()), 413, code="request_too_large")


def test_unknown_route_and_wrong_method_are_openai_shaped(http: httpx.Client) -> None:
    assert_openai_error(http.get("/v1/nothing-here"), 404, code="not_found")
    assert_openai_error(http.get("/v1/chat/completions"), 405, code="method_not_allowed")


def test_full_queue_is_a_429_with_retry_after(http: httpx.Client, live_server: LiveServer) -> None:
    """One slot and a queue of one: with one request running and one waiting, a third is refused."""
    from tests.server.support import metric_value, wait_for

    def gauge(name: str) -> float:
        return metric_value(http.get("/metrics").text, name, model=ALIAS) or 0.0

    long_body = chat(messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=400, stream=True)
    results: dict[str, Any] = {}
    with http.stream("POST", "/v1/chat/completions", json=long_body) as running:
        lines = running.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # generation has begun

        def waiting_request() -> None:
            results["waiting"] = httpx.post(
                live_server.url + "/v1/chat/completions",
                json=chat(max_tokens=2),
                headers={"Authorization": f"Bearer {API_KEYS[0]}"},
                timeout=120,
            )

        waiter = threading.Thread(target=waiting_request)
        waiter.start()
        wait_for(lambda: gauge("llamasplit_queue_depth") == 1, timeout_s=10)
        refused = http.post("/v1/chat/completions", json=chat())
        assert_openai_error(refused, 429, code="queue_full")
        assert int(refused.headers["Retry-After"]) >= 1
    waiter.join(timeout=60)
    assert results["waiting"].status_code == 200  # the waiting request ran once the stream was dropped


def test_server_still_serves_after_all_the_bad_input(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    assert http.post("/v1/chat/completions", json=chat(max_tokens=1)).status_code == 200


def test_half_sent_body_does_not_hurt_the_server(live_server: LiveServer, http: httpx.Client) -> None:
    with socket.create_connection((live_server.host, live_server.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEYS[0]}\r\nContent-Length: 500\r\n\r\n".encode()
            + b'{"model": "smollm2", "mess'
        )
    assert http.post("/v1/chat/completions", json=chat(max_tokens=1)).status_code == 200

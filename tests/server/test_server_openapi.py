"""The OpenAPI document (/openapi.json) against the real server.

schemathesis sends a server of its own (SmolLM2 and MiniLM on loopback: what it loads or unloads touches no
other test) requests the document allows and requests it forbids, and checks that no answer is a 5xx and that every
answer's status, media type, body and headers are ones the document declares. It runs as its CLI in a child
process (its pytest plugin's fixture loader does not work with pytest 9); tests/server/openapi_hooks.py keeps
generation cheap. A failure prints schemathesis' report, with a curl command that reproduces each finding.

The document's own promises are checked directly too: every error is the OpenAI error body, bodies are
required, Retry-After is declared where it is sent, /metrics is text, and streamed chunks match their schema
(which schemathesis cannot see inside an event's data).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from tests.kit.minilm import minilm_path
from tests.server.support import (
    ALIAS,
    API_KEYS,
    CTX,
    MAX_BODY_BYTES,
    LiveServer,
    cli_environment,
    make_settings,
    running_requests,
    served,
    wait_for,
)

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
)
GENERATING_PATHS = ("/v1/chat/completions", "/v1/completions")
EMBEDDER = "minilm"  # the embedding model's alias, which tests/server/openapi_hooks.py names too
# About 1,100 requests, a dozen of which generate (two tokens each): 25 s on two idle cores, a minute on busy ones.
EXAMPLES_PER_ROUTE = 12
EXAMPLES_PER_GENERATING_ROUTE = 20
RUN_TIMEOUT_S = 300
ERROR_BODY = "#/components/schemas/ErrorResponse"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def openapi_server(smollm2: Path) -> Iterator[LiveServer]:
    # The chat model as the session server has it (one slot, a queue of one) and an embedding model, so that
    # every route has a model that answers it.
    settings = make_settings(
        models=[
            {"path": str(smollm2), "alias": ALIAS, "ctx": CTX, "parallel": 1},
            {"path": str(minilm_path()), "alias": EMBEDDER},
        ],
        preload=[ALIAS, EMBEDDER],
        api_keys=API_KEYS,
        max_queue=1,
        max_body_bytes=MAX_BODY_BYTES,
    )
    with served(settings) as server:
        yield server


@pytest.fixture(scope="module")
def document(openapi_server: LiveServer) -> dict[str, Any]:
    document: dict[str, Any] = httpx.get(f"{openapi_server.url}/openapi.json", timeout=30).json()
    return document


def operations(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield f"{method.upper()} {path}", operation


def test_every_error_response_is_the_openai_error_body(document: dict[str, Any]) -> None:
    for name, operation in operations(document):
        for status, response in operation["responses"].items():
            if int(status) < 400 or name == "GET /health":  # /health's 503 is its own report
                continue
            assert response["content"] == {"application/json": {"schema": {"$ref": ERROR_BODY}}}, (name, status)
            if status in ("429", "503"):
                assert response["headers"]["Retry-After"]["required"] is True, (name, status)
        assert "422" not in operation["responses"], f"{name}: FastAPI's 422, which this server never sends"


def test_routes_that_read_a_body_require_one(document: dict[str, Any]) -> None:
    posts = [(name, operation) for name, operation in operations(document) if name.startswith("POST ")]
    assert posts
    for name, operation in posts:
        assert "requestBody" in operation, f"{name}: declare its body with server.openapi.json_body"
        body = operation["requestBody"]
        assert body["required"] is True, name
        assert body["content"]["application/json"]["schema"]["$ref"].startswith("#/components/schemas/"), name
        assert {"400", "413"} <= set(operation["responses"]), f"{name}: a body can be malformed or too large"


def test_document_declares_the_key_streams_and_prometheus_text(document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "One of the server's API keys (--api-key), when it has any",
    }  # fmt: skip
    paths = document["paths"]
    assert paths["/v1/models"]["get"]["security"] == [{"apiKey": []}]
    assert "security" not in paths["/health"]["get"]
    for path in GENERATING_PATHS:
        assert set(paths[path]["post"]["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain; version=0.0.4; charset=utf-8"]


@pytest.mark.parametrize(
    ("path", "chunk_model", "request_body"),
    [
        ("/v1/chat/completions", "ChatCompletionChunk", {"messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/completions", "Completion", {"prompt": "Once upon a time"}),
    ],
    ids=["chat", "completion"],
)
def test_streamed_chunks_match_their_schema_in_the_document(
    openapi_server: LiveServer, document: dict[str, Any], path: str, chunk_model: str, request_body: dict[str, Any]
) -> None:
    # The event schema names the chunk model in contentSchema, an annotation nothing validates; this does.
    declared = document["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    data_schemas = declared["properties"]["data"]["anyOf"][1]["contentSchema"]["anyOf"]
    assert {"$ref": f"#/components/schemas/{chunk_model}"} in data_schemas
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{chunk_model}", "components": document["components"]}
    )
    body = {"model": ALIAS, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}, **request_body}
    headers = {"Authorization": f"Bearer {API_KEYS[0]}"}
    with httpx.stream("POST", openapi_server.url + path, json=body, headers=headers, timeout=120) as response:
        assert response.status_code == 200
        data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert len(data) >= 3  # at least a token chunk and the usage chunk before [DONE]
    for event in data[:-1]:
        validator.validate(json.loads(event))


def test_a_full_queue_answers_as_the_document_declares(openapi_server: LiveServer, document: dict[str, Any]) -> None:
    # One slot and a queue of one: two streams take both, the third request is refused with a 429.
    declared = document["paths"]["/v1/chat/completions"]["post"]["responses"]["429"]
    body = {"model": ALIAS, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 512}
    headers = {"Authorization": f"Bearer {API_KEYS[0]}"}
    with (
        httpx.Client(base_url=openapi_server.url, headers=headers, timeout=120) as http,
        contextlib.ExitStack() as held,
    ):
        for _ in range(2):
            stream = held.enter_context(http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}))
            assert stream.status_code == 200
        refused = http.post("/v1/chat/completions", json=body)
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/json"
    retry_after = declared["headers"]["Retry-After"]
    jsonschema.validate(int(refused.headers["Retry-After"]), retry_after["schema"])
    jsonschema.Draft202012Validator({"$ref": ERROR_BODY, "components": document["components"]}).validate(refused.json())
    assert refused.json()["error"]["code"] == "queue_full"
    with httpx.Client(base_url=openapi_server.url, headers=headers, timeout=30) as http:
        wait_for(lambda: running_requests(http) == 0, timeout_s=60)  # the closed streams free the slot


def schemathesis_config() -> str:
    # The hooks do not reach the coverage phase, whose valid requests to a generating route all name a model
    # "0" (a 404 that the other routes' coverage already gives): only its invalid ones are worth sending.
    operations = "".join(
        f'''
[[operations]]
include-path = "{path}"
generation.max-examples = {EXAMPLES_PER_GENERATING_ROUTE}
phases.coverage.generation.mode = "negative"
'''
        for path in GENERATING_PATHS
    )
    return f"""\
hooks = "tests.server.openapi_hooks"
workers = 1
request-timeout = 60
headers = {{ Authorization = "Bearer {API_KEYS[0]}" }}
# Hypothesis times its own data generation: on two cores shared with other work that says nothing of the server.
suppress-health-check = ["too_slow"]

[generation]
mode = "all"            # requests the document allows, and requests it forbids (which must be 4xx)
max-examples = {EXAMPLES_PER_ROUTE}
deterministic = true    # the same requests on every run: a failure here reproduces
database = "none"

[phases.stateful]
enabled = false

[cache]
enabled = false         # schemathesis would keep its crash cache in the working directory
{operations}"""


def test_every_answer_is_one_the_document_declares(openapi_server: LiveServer, tmp_path: Path) -> None:
    pytest.importorskip("schemathesis", reason="schemathesis (test extra) needs Python 3.11+")
    config = tmp_path / "schemathesis.toml"
    config.write_text(schemathesis_config())
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
        f"{openapi_server.url}/openapi.json", "--checks", ",".join(CHECKS), "--no-color",
    ]  # fmt: skip
    # cli_environment puts this checkout on PYTHONPATH, where the CLI finds tests.server.openapi_hooks.
    result = subprocess.run(
        command, cwd=tmp_path, env=cli_environment(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert result.returncode == 0, result.stdout + result.stderr

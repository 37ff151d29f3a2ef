"""The one function that turns errors into OpenAI bodies, and its streaming twin mid-stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from server import errors
from server.engine import EngineDeadError, EngineError, EngineRequestError, GenerationRequest, TokenEvent
from server.serving import Prepared, chat_sse, completion_sse
from tuner import LoadSettings

ALL_ERRORS = [
    (errors.InvalidRequestError("bad", param="temperature"), 400, "invalid_request_error", None),
    (errors.ContextLengthError("long", param="messages"), 400, "invalid_request_error", "context_length_exceeded"),
    (errors.AuthenticationError("no key"), 401, "invalid_request_error", "invalid_api_key"),
    (errors.NotFoundError("no route"), 404, "invalid_request_error", "not_found"),
    (errors.ModelNotFoundError("no model", param="model"), 404, "invalid_request_error", "model_not_found"),
    (errors.MethodNotAllowedError("no"), 405, "invalid_request_error", "method_not_allowed"),
    (errors.PayloadTooLargeError("big"), 413, "invalid_request_error", "request_too_large"),
    (errors.QueueFullError("busy", retry_after_s=2), 429, "rate_limit_error", "queue_full"),
    (errors.QueueFullError("busy", retry_after_s=2, status_code=503), 503, "rate_limit_error", "queue_full"),
    (errors.ModelNotReadyError("loading"), 503, "server_error", "model_loading"),
    (errors.EngineFailedError("decode failed"), 500, "server_error", None),
    (errors.EngineGoneError("the engine process ended (killed by SIGKILL)"), 503, "server_error", "engine_died"),
]

# What the engine raises (plain Python, no HTTP) and what the client is told.
ENGINE_ERRORS = [
    (EngineRequestError("logit_bias key 99999 is not a token id", param="logit_bias"), 400, "invalid_request_error"),
    (EngineDeadError("the engine process is gone"), 503, "server_error"),
    (EngineError("llama_decode returned -3"), 500, "server_error"),
]


@pytest.mark.parametrize(
    ("exc", "status", "kind", "code"), ALL_ERRORS, ids=[type(e[0]).__name__ + str(e[1]) for e in ALL_ERRORS]
)
def test_every_error_class_has_its_status_type_and_code(
    exc: errors.ServerError, status: int, kind: str, code: str | None
) -> None:
    response = errors.error_response(exc)
    assert response.status_code == status
    body = json.loads(bytes(response.body))
    assert body == {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": code}}
    if status in (429, 503):
        assert response.headers["Retry-After"]


@pytest.mark.parametrize(("exc", "status", "kind"), ENGINE_ERRORS, ids=[type(e[0]).__name__ for e in ENGINE_ERRORS])
def test_engine_errors_keep_their_words_and_get_their_status(exc: EngineError, status: int, kind: str) -> None:
    response = errors.error_response(exc)
    assert response.status_code == status
    body = json.loads(bytes(response.body))["error"]
    assert (body["message"], body["type"]) == (exc.message, kind)
    assert body["param"] == getattr(exc, "param", None)


def test_unexpected_exceptions_become_a_generic_500_without_their_text() -> None:
    response = errors.error_response(RuntimeError("/secret/path 0xdeadbeef"))
    assert response.status_code == 500
    assert b"secret" not in bytes(response.body) and b"deadbeef" not in bytes(response.body)


def _prepared() -> Prepared:
    return Prepared(
        model=SimpleNamespace(alias="m", path=Path("m.gguf"), load_settings=LoadSettings()),  # type: ignore[arg-type]
        engine=SimpleNamespace(),  # type: ignore[arg-type]
        generation=GenerationRequest((1,), 4),
        received_s=0.0,
    )


async def _failing_stream() -> AsyncIterator[Any]:
    yield TokenEvent(token_id=5, text="Hel", logprob=None, time_s=0.0)
    raise EngineError("llama_decode returned -3")


@pytest.mark.parametrize("sse", [chat_sse, completion_sse], ids=["chat", "completion"])
def test_failure_after_the_stream_started_is_an_error_event(sse: Any) -> None:
    async def collect() -> list[str]:
        return [event async for event in sse(_prepared(), _failing_stream())]

    events = asyncio.run(collect())
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    last = json.loads(events[-1].removeprefix("data: "))
    assert last == {
        "error": {"message": "llama_decode returned -3", "type": "server_error", "param": None, "code": None}
    }
    assert any('"Hel"' in e for e in events[:-1])
    assert "data: [DONE]\n\n" not in events

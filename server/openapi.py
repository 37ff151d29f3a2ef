"""The parts of the OpenAPI document (/openapi.json) that FastAPI cannot infer from the routes.

Routes read their JSON bodies themselves (routes.read_json_object enforces the size limit while reading and
words each 400), so FastAPI sees no body parameter: ``json_body`` declares the required body and its model.
Every error leaves through errors.error_response in one shape, errors.ErrorResponse; ``error_responses`` declares
a route's error statuses with it, and Retry-After where the server sends one. ``install`` gives the app an
openapi() that adds the body models to the components and drops FastAPI's 422, which this server never sends
(its validation errors are 400s).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.errors import ErrorResponse

COMPONENTS = "#/components/schemas/"

# Models named by json_body and event_stream: pydantic schemas that FastAPI never sees (ErrorResponse is named
# by every event stream's data, whether or not a route's error responses bring it in).
_BODY_MODELS: dict[str, type[BaseModel]] = {"ErrorResponse": ErrorResponse}

# Why each status happens; a route may pass its own words for the same status.
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "The request is malformed or a parameter is out of range (`param` names it); `context_length_exceeded` "
    "when the prompt and max_tokens do not fit the model's context",
    401: "The API key is missing or wrong (`invalid_api_key`); only when the server has keys",
    404: "The request names a model this server does not serve (`model_not_found`)",
    413: "The request body is larger than max_body_bytes (`request_too_large`)",
    429: "The model's queue is full (`queue_full`); retry after Retry-After seconds",
    500: "The engine failed while serving the request (llama.cpp returned an error); never the client's fault",
    503: "The model is loading (`model_loading`), failed (`model_failed`), has no room on the devices (`no_room`) "
    "or its engine process died (`engine_died`); retry after Retry-After seconds",
}
# Statuses whose every answer carries Retry-After (errors.QueueFullError, ModelNotReadyError, EngineGoneError).
RETRY_AFTER_STATUSES = frozenset({429, 503})
RETRY_AFTER_HEADER: dict[str, Any] = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}

# The error statuses by what a route does; a route lists the sum of what applies to it.
AUTHENTICATED = (401,)
READS_BODY = (400, 413)  # routes.read_json_object and parse_request
NAMES_MODEL = (404,)
RUNS_MODEL = (500, 503)  # a model that is not ready (registry.acquire), an engine that fails or dies
GENERATES = (429, *RUNS_MODEL)  # and a full queue (admission)
LOADS = (500, 503)  # llama.cpp failed to load the model; no room for it while other models are busy


def error_responses(*statuses: int, descriptions: Mapping[int, str] | None = None) -> dict[int | str, Any]:
    """FastAPI ``responses=`` for ``statuses``, each with the OpenAI error body and, where sent, Retry-After."""
    words = {**ERROR_DESCRIPTIONS, **(descriptions or {})}
    responses: dict[int | str, Any] = {}
    for status in sorted(set(statuses)):
        # JSON whatever the route's own media type (/metrics answers text, its 401 JSON).
        entry: dict[str, Any] = {
            "description": words[status],
            "content": {"application/json": {"schema": {"$ref": f"{COMPONENTS}ErrorResponse"}}},
        }
        if status in RETRY_AFTER_STATUSES:
            entry["headers"] = RETRY_AFTER_HEADER
        responses[status] = entry
    return responses


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """FastAPI ``openapi_extra=`` declaring a required JSON body validated by ``model`` (install adds the
    model to the components)."""
    _BODY_MODELS[model.__name__] = model
    content = {"application/json": {"schema": {"$ref": f"{COMPONENTS}{model.__name__}"}}}
    return {"requestBody": {"required": True, "content": content}}


def event_stream(chunk: type[BaseModel], description: str) -> dict[str, Any]:
    """The text/event-stream content of a streaming answer: each event's data is a JSON ``chunk``, the error
    body if the stream fails after it started, or [DONE] at the end.

    Before OpenAPI 3.2 (FastAPI writes 3.1) an event stream's ``schema`` describes one event, as schemathesis
    reads it; ``contentSchema`` says what the data holds (JSON Schema annotations, not assertions).
    """
    _BODY_MODELS[chunk.__name__] = chunk
    data_json = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [{"$ref": f"{COMPONENTS}{chunk.__name__}"}, {"$ref": f"{COMPONENTS}ErrorResponse"}]},
    }
    return {
        "text/event-stream": {
            "schema": {
                "description": description,
                "type": "object",
                "required": ["data"],
                "properties": {"data": {"anyOf": [{"const": "[DONE]"}, data_json]}, "event": {"const": "message"}},
            },
        }
    }


def generation_responses(result: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, Any]:
    """``responses=`` of a generating route: ``result`` as JSON, or ``chunk``s as an event stream when the
    request asks for ``"stream": true``, and every error that generating can meet."""
    streamed = f"One event: {chunk.__name__} JSON, ErrorResponse JSON if the stream fails, or [DONE] at the end"
    answer = f"The answer: {result.__name__} as JSON, or with stream: true an event stream"
    return {
        200: {"model": result, "description": answer, "content": event_stream(chunk, streamed)},
        **error_responses(*READS_BODY, *NAMES_MODEL, *GENERATES),
    }


def install(app: FastAPI) -> None:
    """Replace ``app.openapi`` with one that completes FastAPI's document (see the module docstring)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, openapi_version=app.openapi_version,
                description=app.description, routes=app.routes,
            )  # fmt: skip
            _add_models(document.setdefault("components", {}).setdefault("schemas", {}))
            _drop_validation_error(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the document


def _add_models(schemas: dict[str, Any]) -> None:
    """Add the body and event models, and the models they use, to the components.

    A response model that they share (Usage, ChoiceLogprobs) is already there, drawn by FastAPI, which words
    annotations differently (it leaves out null defaults): the two must agree on everything but annotations,
    or two different models share a name and one must be renamed.
    """
    _, top = models_json_schema(
        [(model, "validation") for model in _BODY_MODELS.values()], ref_template=COMPONENTS + "{model}"
    )
    for name, schema in top.get("$defs", {}).items():
        existing = schemas.setdefault(name, schema)
        if _shape(existing) != _shape(schema):
            raise RuntimeError(f"two different schemas are named {name!r} in the OpenAPI document; rename one model")


ANNOTATIONS = frozenset({"title", "description", "default", "examples"})


def _shape(schema: Any) -> Any:
    """``schema`` without the keywords that do not change what it accepts."""
    if isinstance(schema, dict):
        return {key: _shape(value) for key, value in schema.items() if key not in ANNOTATIONS}
    if isinstance(schema, list):
        return [_shape(item) for item in schema]
    return schema


def _drop_validation_error(document: dict[str, Any]) -> None:
    # FastAPI adds a 422 to every route with parameters; app.py's handler answers those errors with a 400.
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    # Only FastAPI's 422 used these two; nothing refers to them once it is gone.
    schemas = document.get("components", {}).get("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)

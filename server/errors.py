"""Errors the server raises on purpose, and the one function that turns any error into the OpenAI body.

Hierarchy (HTTP status, OpenAI ``type`` / ``code``)::

    ServerError                     500 server_error; base class, also what an unexpected bug becomes
    ├── InvalidRequestError         400 invalid_request_error; a parameter is missing, malformed or out of range
    │   └── ContextLengthError      400 code context_length_exceeded; the prompt (plus max_tokens) exceeds n_ctx
    ├── AuthenticationError         401 code invalid_api_key; the API key is missing or wrong
    ├── NotFoundError               404 code not_found; an unknown path
    │   └── ModelNotFoundError      404 code model_not_found; the request names a model that is not served
    ├── MethodNotAllowedError       405 code method_not_allowed
    ├── PayloadTooLargeError        413 code request_too_large; the body exceeds max_body_bytes
    ├── QueueFullError              429 (or 503) code queue_full, with Retry-After; the model's queue is full
    ├── ModelNotReadyError          503 code model_loading, with Retry-After; the model is still loading
    ├── EngineFailedError           500 server_error; the engine failed while generating (not the client's fault)
    │   └── EngineGoneError         503 code engine_died; the engine process died; the model must be reloaded
    └── ConfigError                 start-up only: the configuration is invalid or no model can be found;
                                    the CLI prints it on one line and exits 2

``error_response`` builds the JSON response for any exception and ``sse_error`` is its streaming twin, used
once a stream has started and the status line can no longer change; ``ErrorResponse`` is that body as a model
(the OpenAPI document declares it for every error status).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from starlette.responses import JSONResponse

from server.engine.errors import EngineDeadError, EngineError, EngineRequestError

ErrorType = Literal["invalid_request_error", "rate_limit_error", "server_error"]  # OpenAI's error types


class ServerError(Exception):
    """Base class of every error the server raises on purpose."""

    status_code = 500
    error_type: ErrorType = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = dict(headers or {})


class InvalidRequestError(ServerError):
    """A parameter is missing, malformed or out of range; ``param`` names it."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """The prompt, or the prompt plus the requested completion, does not fit the model's context."""

    default_code = "context_length_exceeded"


class AuthenticationError(ServerError):
    """The request carries no API key, or one that is not configured."""

    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class NotFoundError(ServerError):
    """The path does not exist."""

    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    """The request names a model that this server does not serve."""

    default_code = "model_not_found"


class MethodNotAllowedError(ServerError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLargeError(ServerError):
    """The request body is larger than the configured limit."""

    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class QueueFullError(ServerError):
    """Every slot of the model is busy and its waiting queue is full; retry after ``retry_after_s``."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int, status_code: int = 429) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})
        self.status_code = status_code
        self.retry_after_s = retry_after_s


class ModelNotReadyError(ServerError):
    """The model is still loading (or failed to load); the client should retry later."""

    status_code = 503
    error_type = "server_error"
    default_code = "model_loading"

    def __init__(self, message: str, *, retry_after_s: int = 5, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


class EngineFailedError(ServerError):
    """The inference engine failed (llama.cpp returned an error); never caused by client input."""


class EngineGoneError(EngineFailedError):
    """The engine process died under the request (a crash in llama.cpp, a dead RPC server)."""

    status_code = 503
    default_code = "engine_died"

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class ConfigError(ServerError):
    """The settings are invalid (bad value, missing model, non-loopback bind without a key); start-up only."""

    exit_code = 2


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, the limit and the fix")
    type: ErrorType
    param: str | None = Field(description="The request parameter at fault, as a path: messages[0].content")
    code: str | None = Field(description="A stable machine-readable reason: model_not_found, queue_full, ...")


class ErrorResponse(BaseModel):
    """The OpenAI error body: every 4xx and 5xx answer, and the last event of a stream that fails."""

    error: ErrorDetail


def error_body(exc: BaseException) -> dict[str, Any]:
    """The OpenAI error object for ``exc``; anything that is not a ServerError becomes a generic 500."""
    err = _as_server_error(exc)
    detail = ErrorDetail(message=err.message, type=err.error_type, param=err.param, code=err.code)
    return ErrorResponse(error=detail).model_dump()


def error_response(exc: BaseException) -> JSONResponse:
    """A JSONResponse with the OpenAI body, the right status and headers (Retry-After) for ``exc``."""
    err = _as_server_error(exc)
    return JSONResponse(error_body(err), status_code=err.status_code, headers=err.headers)


def sse_error(exc: BaseException) -> str:
    """The streaming twin of ``error_response``: one SSE event carrying the OpenAI error body."""
    return f"data: {json.dumps(error_body(exc), ensure_ascii=False)}\n\n"


def _as_server_error(exc: BaseException) -> ServerError:
    if isinstance(exc, ServerError):
        return exc
    if isinstance(exc, EngineError):
        # The engine's own words: they name the model's limits or llama.cpp's failure, never client data.
        if isinstance(exc, EngineRequestError):
            return InvalidRequestError(exc.message, param=exc.param)
        if isinstance(exc, EngineDeadError):
            return EngineGoneError(exc.message)
        return EngineFailedError(exc.message)
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    # Never echo the text of an unexpected exception: it may hold paths or memory addresses.
    return ServerError("internal server error; the server log has the details")


def from_validation_error(
    exc: ValidationError, data: Any = None, hints: Mapping[str, str] | None = None
) -> InvalidRequestError:
    """Turn pydantic's first error into a 400 whose ``param`` is the path of the bad field.

    ``data`` is the validated input: walking it along the error's location drops the entries pydantic adds
    for union branches and discriminator tags, so the path reads like the request ("messages[0].content").
    ``hints`` maps a field name to the message used when every branch of a union failed.
    """
    errors = exc.errors(include_url=False)
    first = errors[0]
    kind = first["type"]
    param = param_path(tuple(first["loc"]), data, missing=kind == "missing")
    field = param.rsplit(".", 1)[-1].split("[", 1)[0]
    same_field = [e for e in errors if param_path(tuple(e["loc"]), data).startswith(param)]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        discriminator = str((first.get("ctx") or {}).get("discriminator", "type")).strip("'")
        param = f"{param}.{discriminator}" if param else discriminator
        message = f"{param}: {first['msg']}"
    elif hints and field in hints and len(same_field) > 1:
        message = f"{param}: {hints[field]}"
    elif kind == "extra_forbidden":
        message = f"unrecognized request argument supplied: {param}"
    elif kind == "missing":
        message = f"missing required parameter: {param}"
    else:
        message = f"{param}: {_clean_msg(first['msg'])}" if param else _clean_msg(first["msg"])
    return InvalidRequestError(message, param=param or None)


def param_path(loc: tuple[str | int, ...], data: Any = None, missing: bool = False) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'.

    With ``data``, location entries that are not keys or indexes of the input (pydantic's union branch names
    and discriminator tags) are dropped, except the last one of a ``missing`` error: the absent field.
    """
    out = ""
    node = data
    for i, part in enumerate(loc):
        if data is not None:
            in_dict = isinstance(node, dict) and isinstance(part, str) and part in node
            in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
            if in_dict or in_list:
                node = node[part]
            elif not (missing and i == len(loc) - 1):
                continue  # a union branch or discriminator tag, not part of the request
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _clean_msg(msg: str) -> str:
    # pydantic prefixes messages of our own ValueErrors with "Value error, ".
    return msg.removeprefix("Value error, ")

"""HTTP endpoints: the OpenAI API (/v1/...), /v1/plan, /health and /metrics. Knows nothing of llama.cpp.

Request bodies are read here rather than by FastAPI: the size limit (413) is enforced while reading, and a
body that is not UTF-8, not JSON or not an object is a 400 that says which. Disconnects cancel generation:
streams through the response's own disconnect watch, non-streaming requests through ``until_disconnect``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from server import embeddings, serving
from server.allocation import MemoryReport
from server.auth import ApiKeyChecker
from server.config import Settings
from server.engine import EngineError, GenerationEvent
from server.errors import (
    InvalidRequestError,
    ModelNotReadyError,
    PayloadTooLargeError,
    ServerError,
    from_validation_error,
)
from server.metrics import CONTENT_TYPE, Metrics
from server.openapi import (
    AUTHENTICATED,
    GENERATES,
    LOADS,
    NAMES_MODEL,
    READS_BODY,
    RETRY_AFTER_HEADER,
    error_responses,
    generation_responses,
    json_body,
)
from server.placement import NoRoomError
from server.protocol import (
    UNION_HINTS,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelDevice,
    ModelList,
    ModelStatus,
)
from server.registry import ModelRegistry, ModelState, ServedModel
from tuner import LoadSettings, Plan

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first"


@dataclass
class AppState:
    settings: Settings
    registry: ModelRegistry
    metrics: Metrics
    auth: ApiKeyChecker


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.llamasplit
    return state


# Declares the key in the OpenAPI document (a security scheme, named on every route that checks it); it never
# refuses by itself: auth.check answers with the server's own 401, and lets everything through without keys.
bearer_key = HTTPBearer(
    auto_error=False, scheme_name="apiKey", description="One of the server's API keys (--api-key), when it has any"
)


async def require_api_key(
    request: Request, _declared: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_key)]
) -> None:
    app_state(request).auth.check(request.headers.get("authorization"))


api = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=error_responses(*AUTHENTICATED))
ops = APIRouter()


# --- request bodies --------------------------------------------------------------------------------------


async def read_json_object(request: Request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past ``max_bytes``, 400 for bad UTF-8, bad JSON or a non-object."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise InvalidRequestError(f"Content-Length {declared!r} is not a number")
        if int(declared) > max_bytes:
            raise PayloadTooLargeError(
                f"the request body is {int(declared):,} bytes; this server accepts at most {max_bytes:,} "
                "(max_body_bytes)"
            )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLargeError(f"the request body exceeds {max_bytes:,} bytes (max_body_bytes)")
    if not body:
        raise InvalidRequestError("the request body is empty; send a JSON object")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"the request body is not valid UTF-8 (bad byte at offset {exc.start})") from exc
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except (ValueError, RecursionError) as exc:  # NaN/Infinity, integers past 4300 digits, deep nesting
        raise InvalidRequestError(f"the request body is not acceptable JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, not a JSON {_json_kind(value)}")
    try:
        # A \uD800-style escape decodes to a lone surrogate: not Unicode, and nothing downstream can encode it.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"the request holds a lone UTF-16 surrogate ({exc.object[exc.start : exc.end]!a}), which is not valid "
            "Unicode; send each character whole"
        ) from exc
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def parse_request(model_cls: type[M], body: dict[str, Any]) -> M:
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc, body, UNION_HINTS) from exc
    except RecursionError as exc:
        raise InvalidRequestError("the request is nested too deeply") from exc


# --- cancellation ----------------------------------------------------------------------------------------


class ClientDisconnected(Exception):
    pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client goes away first; then cancel it (which stops the generation)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class SSEResponse(StreamingResponse):
    """A text/event-stream whose generator is closed, and admission released, however the stream ends."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


# --- the OpenAI API --------------------------------------------------------------------------------------


async def _generate(
    request: Request,
    model_cls: type[ChatCompletionRequest] | type[CompletionRequest],
) -> Response:
    received_s = time.perf_counter()
    state = app_state(request)
    body = await read_json_object(request, state.settings.max_body_bytes)
    parsed = parse_request(model_cls, body)
    endpoint = "/v1/chat/completions" if model_cls is ChatCompletionRequest else "/v1/completions"
    embeddings.refuse_embedding_model(state.registry.find(parsed.model), endpoint)
    model = await state.registry.acquire(parsed.model)
    # Templating, tokenising and compiling a schema's grammar take a while for long inputs: off the event loop.
    whole: Callable[[serving.Prepared, AsyncIterator[GenerationEvent]], Awaitable[BaseModel]]
    if isinstance(parsed, ChatCompletionRequest):
        prepared = await run_in_threadpool(serving.prepare_chat, parsed, model, received_s)
        whole, sse = serving.chat_completion, serving.chat_sse
    else:
        prepared = await run_in_threadpool(serving.prepare_completion, parsed, model, received_s)
        whole, sse = serving.completion, serving.completion_sse
    assert model.queue is not None
    admission = model.queue.reserve(prepared.generation.n)
    events = serving.events(prepared, admission, state.metrics)
    if parsed.stream:
        body_iter = sse(prepared, events)

        async def close() -> None:
            admission.release()
            await body_iter.aclose()
            await events.aclose()

        return SSEResponse(body_iter, close)
    try:
        result = await until_disconnect(request, whole(prepared, events))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        admission.release()
        await events.aclose()
    return JSONResponse(result.model_dump())


@api.post(
    "/chat/completions",
    responses=generation_responses(ChatCompletion, ChatCompletionChunk),
    openapi_extra=json_body(ChatCompletionRequest),
)
async def chat_completions(request: Request) -> Response:
    return await _generate(request, ChatCompletionRequest)


@api.post(
    "/completions",
    responses=generation_responses(Completion, Completion),
    openapi_extra=json_body(CompletionRequest),
)
async def completions(request: Request) -> Response:
    return await _generate(request, CompletionRequest)


@api.post(
    "/embeddings",
    responses={
        200: {"model": embeddings.EmbeddingList, "description": "One vector per input, in input order"},
        # GENERATES: it waits for a slot of the model's queue like a generation (429 when that is full)
        **error_responses(*READS_BODY, *NAMES_MODEL, *GENERATES),
    },
    openapi_extra=json_body(embeddings.EmbeddingRequest),
)
async def create_embeddings(request: Request) -> Response:
    """Embeddings from an embedding model (server/embeddings.py); a chat model is refused by name."""
    state = app_state(request)
    parsed = parse_request(embeddings.EmbeddingRequest, await read_json_object(request, state.settings.max_body_bytes))
    embeddings.refuse_unless_embedding_model(state.registry.find(parsed.model))
    model = await state.registry.acquire(parsed.model)
    try:
        result = await until_disconnect(request, embeddings.create_embeddings(parsed, model))
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    state.metrics.prompt_tokens.labels(model.alias).inc(result.usage.prompt_tokens)
    return JSONResponse(result.model_dump())


def _card(model: ServedModel) -> ModelCard:
    states: dict[str, ModelStatus] = {"ready": "ready", "failed": "failed", "unloaded": "unloaded"}
    status = states.get(model.state, "loading")
    return ModelCard(
        id=model.alias,
        created=model.created_s,
        status=status,
        path=str(model.path),
        n_ctx=model.plan.n_ctx,
        n_ctx_per_seq=model.n_ctx_per_seq,
        parallel=model.plan.n_seq_max,
        kv_unified=model.plan.kv_unified,
        # an embedding model has no chat template to speak of (it renders none)
        chat_template=None if model.engine is None or model.plan.embeddings else model.engine.chat_template_source(),
        embedding=model.plan.embeddings,
        error=model.error,
        pinned=model.pinned,
        keep_alive_s=model.keep_alive_s,
        placement=model.placement if model.state == "ready" else None,
        devices=[
            ModelDevice(name=d.name, bytes=d.total_bytes, layers=d.layers)
            for d in model.plan.devices
            if d.total_bytes and model.state == "ready"
        ],
        host_bytes=model.plan.host.total_bytes if model.state == "ready" else None,
        loads=model.loads,
        evictions=model.evictions,
    )


@api.get("/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(m) for m in app_state(request).registry.models.values()])


@api.get("/models/{model_id:path}", responses=error_responses(*NAMES_MODEL))
async def get_model(request: Request, model_id: str) -> ModelCard:
    return _card(app_state(request).registry.find(model_id))


class PlanEntry(BaseModel):
    """One model in GET /v1/plan: how it is loaded, the tuner's plan and, once loaded, the bytes measured."""

    model: str
    status: ModelState
    error: str | None
    load_settings: LoadSettings
    plan: Plan
    memory: MemoryReport | None


class PlanList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PlanEntry]


@api.get("/plan")
async def get_plan(request: Request) -> PlanList:
    """Every model's plan with predicted and (once loaded) actual bytes per device."""
    return PlanList(
        data=[
            PlanEntry(
                model=m.alias,
                status=m.state,
                error=m.error,
                load_settings=m.load_settings,
                plan=m.plan,
                memory=m.memory,
            )
            for m in app_state(request).registry.models.values()
        ]
    )


# --- operations --------------------------------------------------------------------------------------------


HealthStatus = Literal["ok", "loading", "error"]


class HealthReport(BaseModel):
    """The body of /health, ready or not."""

    status: HealthStatus
    models: dict[str, ModelState]  # by alias
    errors: dict[str, str] | None = None  # why a model failed, by alias; absent when none did


@ops.get(
    "/health",
    responses={
        200: {"model": HealthReport, "description": "Every model is loaded"},
        503: {
            "model": HealthReport,
            "description": "A model is still loading (start-up), unloaded, or failed",
            "headers": RETRY_AFTER_HEADER,
        },
    },
)
async def health(request: Request) -> JSONResponse:
    """200 when every model is loaded; 503 (with Retry-After) while loading, unloaded, or after a failure."""
    registry = app_state(request).registry
    models = {m.alias: m.state for m in registry.models.values()}
    errors = {m.alias: m.error for m in registry.models.values() if m.error}
    status: HealthStatus = "ok" if registry.ready else "error" if registry.failed else "loading"  # start-up loading
    report = HealthReport(status=status, models=models, errors=errors or None).model_dump(exclude_none=True)
    if status == "ok":
        return JSONResponse(report)
    return JSONResponse(report, status_code=503, headers={"Retry-After": "5"})


class ModelAction(BaseModel):
    """The body of POST /models/load and /models/unload (llama-server's router uses the same)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)


@ops.post(
    "/models/load",
    dependencies=[Depends(require_api_key)],
    responses=error_responses(
        *AUTHENTICATED,
        *READS_BODY,
        *NAMES_MODEL,
        *LOADS,
        descriptions={
            500: "Loading failed; the message gives llama.cpp's reason",
            503: "No room for the model: the models that could make room stayed busy (`no_room`)",
        },
    ),
    openapi_extra=json_body(ModelAction),
)
async def load_model(request: Request) -> ModelCard:
    """Load a model that is unloaded or whose engine died; returns its card once it is ready."""
    state = app_state(request)
    action = parse_request(ModelAction, await read_json_object(request, state.settings.max_body_bytes))
    state.registry.find(action.model)
    try:
        model = await run_in_threadpool(state.registry.load_model, action.model)
    except NoRoomError as exc:
        raise ModelNotReadyError(str(exc), code="no_room", retry_after_s=30) from exc
    except EngineError as exc:
        raise ServerError(f"loading {action.model} failed: {exc.message}") from exc
    return _card(model)


@ops.post(
    "/models/unload",
    dependencies=[Depends(require_api_key)],
    responses=error_responses(*AUTHENTICATED, *READS_BODY, *NAMES_MODEL),
    openapi_extra=json_body(ModelAction),
)
async def unload_model(request: Request) -> ModelCard:
    """Unload a model: its requests in flight end, its memory is freed."""
    state = app_state(request)
    action = parse_request(ModelAction, await read_json_object(request, state.settings.max_body_bytes))
    state.registry.find(action.model)
    return _card(await run_in_threadpool(state.registry.unload_model, action.model))


class PrometheusText(Response):
    media_type = CONTENT_TYPE


@ops.get(
    "/metrics",
    dependencies=[Depends(require_api_key)],
    response_class=PrometheusText,
    responses={200: {"description": "Prometheus text exposition format"}, **error_responses(*AUTHENTICATED)},
)
async def metrics(request: Request) -> Response:
    return PrometheusText(app_state(request).metrics.render())

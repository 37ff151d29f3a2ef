"""The app factory: FastAPI app, routes, OpenAI-shaped error handlers, request metrics, model loading.

``create_app(settings)`` plans the models at once (so a setting that cannot fit fails here, before any
socket is bound) and loads them in the background when the app starts; /health is 503 until they are ready.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client.core import Metric
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import __version__
from server.auth import ApiKeyChecker
from server.config import Settings
from server.engine import EngineError, EngineStats, StepStats
from server.errors import (
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    ServerError,
    error_response,
    param_path,
)
from server.metrics import Metrics, counter, gauge
from server.openapi import install as install_openapi
from server.registry import ModelRegistry, ServedModel
from server.routes import AppState, api, ops
from server.rpc_health import start_rpc_recovery
from server.ui import ui

log = logging.getLogger("llamasplit.app")


def create_app(
    settings: Settings,
    registry: ModelRegistry | None = None,
    *,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """Build the app; ``registry`` defaults to planning the models the settings name."""
    registry = registry if registry is not None else ModelRegistry.plan(settings)
    metrics = Metrics()
    metrics.add_live_collector(lambda: live_metrics(registry, metrics))

    def on_step(alias: str, step: StepStats | None, _stats: EngineStats | None) -> None:
        if step is not None:
            metrics.observe_step(alias, step)

    registry.step_observer = on_step
    state = AppState(settings=settings, registry=registry, metrics=metrics, auth=ApiKeyChecker(settings.api_keys))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry.start_loading(on_load_failure, event_loop=asyncio.get_running_loop())
        recovery = start_rpc_recovery(registry, settings)  # reloads models when a dead RPC worker is back
        try:
            yield
        finally:
            if recovery is not None:
                await asyncio.to_thread(recovery.stop)
            await asyncio.to_thread(registry.close)

    app = FastAPI(title="llamasplit", version=__version__, lifespan=lifespan)
    app.state.llamasplit = state
    app.include_router(api)
    app.include_router(ops)
    app.include_router(ui)  # the web page at / (server/static)
    install_openapi(app)
    _add_error_handlers(app)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def server_error(_request: Request, exc: ServerError) -> JSONResponse:
        if exc.status_code >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        return error_response(exc)

    @app.exception_handler(EngineError)
    async def engine_error(_request: Request, exc: EngineError) -> JSONResponse:
        # A request the model refused (EngineRequestError, a 400) or an engine that failed; handled here and
        # not by the catch-all below, which Starlette re-raises after answering (dropping the connection).
        response = error_response(exc)
        if response.status_code >= 500:
            log.warning("%s: %s", type(exc).__name__, exc)
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # Only path and query parameters reach FastAPI's validation (bodies are parsed in routes.py).
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = tuple(p for p in first.get("loc", ()) if p not in ("path", "query", "header", "body"))
        param = param_path(loc) or None
        return error_response(InvalidRequestError(f"{param or 'request'}: {first.get('msg')}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err: ServerError
        if exc.status_code == 404:
            err = NotFoundError(f"no route {request.method} {request.url.path}; the API lives under /v1")
        elif exc.status_code == 405:
            err = MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}")
        else:
            err = ServerError(str(exc.detail))
            err.status_code = exc.status_code
            err.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        response = error_response(err)
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc)
        return error_response(exc)


class RequestMetrics:
    """Pure ASGI middleware counting every HTTP request by route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(path, scope["method"], str(status["code"])).inc()


def live_metrics(registry: ModelRegistry, metrics: Metrics) -> Iterable[Metric]:
    """Gauges read at scrape time: readiness, the engine's accounting, throughput, memory predicted vs actual."""
    models = list(registry.models.values())
    stats = {m.alias: m.engine.stats() if m.engine is not None else None for m in models}

    def per_model(value: Callable[[ServedModel, EngineStats | None], float]) -> list[tuple[list[str], float]]:
        return [([m.alias], value(m, stats[m.alias])) for m in models]

    yield gauge("llamasplit_model_ready", "1 when the model is loaded", ["model"],
                per_model(lambda m, _: float(m.state == "ready")))  # fmt: skip
    yield gauge("llamasplit_model_state", "1 for the model's current state", ["model", "state"],
                [([m.alias, state], float(m.state == state)) for m in models
                 for state in ("planned", "loading", "ready", "failed", "unloaded")])  # fmt: skip
    yield counter("llamasplit_model_loads", "Loads of the model (start-up, on demand, after a failure)", ["model"],
                  per_model(lambda m, _: float(m.loads)))  # fmt: skip
    yield counter("llamasplit_model_evictions", "Times the model was evicted to make room for another", ["model"],
                  per_model(lambda m, _: float(m.evictions)))  # fmt: skip
    yield counter("llamasplit_model_oversize_loads", "Loads that took more device memory than predicted", ["model"],
                  per_model(lambda m, _: float(m.oversize_loads)))  # fmt: skip
    yield gauge("llamasplit_model_load_seconds", "Seconds the model's latest load took", ["model"],
                per_model(lambda m, _: float(m.load_seconds or 0.0)))  # fmt: skip
    yield gauge("llamasplit_queue_depth", "Requests waiting for a sequence (HTTP queue and engine queue)", ["model"],
                per_model(lambda m, s: float((m.queue.waiting if m.queue else 0) + (s.waiting_requests if s else 0))),
                )  # fmt: skip
    yield gauge("llamasplit_requests_running", "Requests holding a place in the batch", ["model"],
                per_model(lambda m, _: float(m.queue.running if m.queue else 0)))  # fmt: skip
    yield gauge("llamasplit_sequences", "llama.cpp sequences of the context (parallel slots)", ["model"],
                per_model(lambda m, s: float(s.sequences if s else m.plan.n_seq_max)))  # fmt: skip
    yield gauge("llamasplit_sequences_busy", "Sequences serving a request in the engine", ["model"],
                per_model(lambda _, s: float(s.busy_sequences if s else 0)))  # fmt: skip
    yield gauge("llamasplit_kv_cells", "KV cache cells, all sequences together", ["model"],
                per_model(lambda m, s: float(s.kv_cells if s else m.plan.n_ctx)))  # fmt: skip
    yield gauge("llamasplit_kv_cells_used", "KV cells held by running requests", ["model"],
                per_model(lambda _, s: float(s.kv_cells_busy if s else 0)))  # fmt: skip
    yield gauge("llamasplit_kv_cells_cached", "KV cells kept by idle sequences for prompt-prefix reuse", ["model"],
                per_model(lambda _, s: float(s.kv_cells_cached if s else 0)))  # fmt: skip
    yield gauge("llamasplit_kv_cells_untracked", "KV cells llama.cpp holds that the engine does not track (a leak)",
                ["model"], per_model(lambda _, s: float(s.kv_cells_untracked if s else 0)))  # fmt: skip
    yield gauge("llamasplit_prompt_tokens_per_second", "Prompt tokens processed per second, last 10 s", ["model"],
                per_model(lambda m, _: metrics.throughput(m.alias)[0]))  # fmt: skip
    yield gauge("llamasplit_generated_tokens_per_second", "Tokens generated per second, last 10 s", ["model"],
                per_model(lambda m, _: metrics.throughput(m.alias)[1]))  # fmt: skip
    predicted: list[tuple[list[str], float]] = []
    actual: list[tuple[list[str], float]] = []
    for m in models:
        for dp in m.plan.devices:
            predicted.append(([m.alias, dp.name, dp.kind], float(dp.total_bytes)))
        predicted.append(([m.alias, "host", "host"], float(m.plan.host.total_bytes)))
        if m.memory is None:
            continue
        for row in m.memory.devices:
            if row.actual_bytes is not None:
                actual.append(([m.alias, row.name, row.kind, "llama.cpp"], float(row.actual_bytes)))
            if row.nvml_used_bytes is not None:
                actual.append(([m.alias, row.name, row.kind, "nvml"], float(row.nvml_used_bytes)))
        if m.memory.host.actual_bytes is not None:
            actual.append(([m.alias, "host", "host", "llama.cpp"], float(m.memory.host.actual_bytes)))
    yield gauge("llamasplit_device_memory_predicted_bytes", "Bytes the tuner predicted per device",
                ["model", "device", "kind"], predicted)  # fmt: skip
    yield gauge("llamasplit_device_memory_actual_bytes", "Bytes measured after loading, by source",
                ["model", "device", "kind", "source"], actual)  # fmt: skip

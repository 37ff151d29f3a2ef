"""The web page: the split per device (predicted against allocated) and a chat, served at ``/``.

The page and its assets are static files of this package (no CDN: it works offline) and load without an API
key, since they hold no data; everything the page shows comes from the API, behind the key. ``/ui/stats`` gives
the page the live figures of ``/metrics`` as JSON, read from the same Prometheus registry, so that the browser
need not parse Prometheus text.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request
from starlette.responses import FileResponse, Response

from server.errors import NotFoundError
from server.openapi import AUTHENTICATED, error_responses
from server.routes import app_state, require_api_key

STATIC_DIR = Path(__file__).parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}  # fmt: skip
# Defence in depth behind the page's own escaping: no inline script, nothing from another origin, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The files change with the package; revalidating costs a 304 and never shows a stale page after an upgrade.
    "Cache-Control": "no-cache",
}
# Gauges the page shows per model, by their Prometheus names.
LIVE_GAUGES = {
    "llamasplit_generated_tokens_per_second": "generated_tokens_per_s",
    "llamasplit_prompt_tokens_per_second": "prompt_tokens_per_s",
    "llamasplit_queue_depth": "waiting",
    "llamasplit_requests_running": "running",
    "llamasplit_sequences_busy": "sequences_busy",
    "llamasplit_sequences": "sequences",
    "llamasplit_kv_cells_used": "kv_cells_used",
    "llamasplit_kv_cells": "kv_cells",
}

ui = APIRouter()


def _static(name: str) -> Response:
    # Only plain files directly in STATIC_DIR with a known type: no path from the URL reaches the file system.
    files = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in MEDIA_TYPES}
    path = files.get(name)
    if path is None:
        raise NotFoundError(f"no file {name!r} in the web page's assets")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


@ui.get("/", include_in_schema=False)
async def page() -> Response:
    return _static("index.html")


@ui.get("/ui/stats", dependencies=[Depends(require_api_key)], responses=error_responses(*AUTHENTICATED))
async def stats(request: Request) -> dict[str, dict[str, dict[str, float]]]:
    """Per model: the live gauges of /metrics plus the time-to-first-token histogram's sum and count."""
    models: dict[str, dict[str, float]] = {}
    for family in app_state(request).metrics.registry.collect():
        for sample in family.samples:
            model = sample.labels.get("model")
            if model is None:
                continue
            if sample.name in LIVE_GAUGES:
                models.setdefault(model, {})[LIVE_GAUGES[sample.name]] = sample.value
            elif sample.name == "llamasplit_time_to_first_token_seconds_sum":
                models.setdefault(model, {})["ttft_sum_s"] = sample.value
            elif sample.name == "llamasplit_time_to_first_token_seconds_count":
                models.setdefault(model, {})["ttft_count"] = sample.value
            elif sample.name == "llamasplit_requests_cancelled_total":
                models.setdefault(model, {})["cancelled"] = sample.value
    return {"models": models}


@ui.get("/ui/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    return _static(name)

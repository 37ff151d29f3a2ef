"""Server fixtures: one real uvicorn server per session, on loopback, serving SmolLM2 through llama.cpp.

The session server has two API keys, a context of 2048 tokens, one slot and a queue of one (so that a third
concurrent request is refused), and a 64 KiB body limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.app import create_app
from server.config import Settings
from server.registry import ModelRegistry
from tests.server.support import ALIAS, API_KEYS, CTX, MAX_BODY_BYTES, LiveServer, make_settings


@pytest.fixture(scope="session")
def server_settings(smollm2: Path) -> Settings:
    return make_settings(
        models=[{"path": str(smollm2), "alias": ALIAS}],
        ctx=CTX,
        parallel=1,
        api_keys=API_KEYS,
        max_queue=1,
        max_body_bytes=MAX_BODY_BYTES,
    )


@pytest.fixture(scope="session")
def live_server(server_settings: Settings) -> Iterator[LiveServer]:
    app = create_app(server_settings)
    server = LiveServer(app).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def registry(live_server: LiveServer) -> ModelRegistry:
    return live_server.app.state.llamasplit.registry  # type: ignore[no-any-return]


@pytest.fixture
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEYS[0], max_retries=0, timeout=120)


@pytest.fixture
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, headers={"Authorization": f"Bearer {API_KEYS[0]}"}, timeout=120) as c:
        yield c

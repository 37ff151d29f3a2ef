"""Schemathesis hooks for tests/server/test_server_openapi.py, loaded by the schemathesis CLI (config `hooks`).

A generated request to a route that runs a model names the model served for it where it names one as a
string (any other name is a 404 before anything runs). Generation is the slow part on two cores, so a request
to a generating route is also made cheap without being made valid or invalid: at most MAX_TOKENS_CAP tokens
where its limit is a valid one or absent. Half of them stream: left to itself, schemathesis sends
``"stream": true`` almost never.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import strategies as st

from tests.server.support import ALIAS

GENERATING_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
EMBEDDER = "minilm"  # the embedding model's alias in test_server_openapi.py
MODEL_BY_PATH = {"/v1/chat/completions": ALIAS, "/v1/completions": ALIAS, "/v1/embeddings": EMBEDDER}
MAX_TOKENS_CAP = 2  # enough to stream a chunk and finish
TOKEN_LIMITS = ("max_tokens", "max_completion_tokens")


def name_the_served_model(path: str, body: Any) -> Any:
    if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"]:
        body["model"] = MODEL_BY_PATH[path]
    return body


def cap_generation(body: Any) -> Any:
    if not isinstance(body, dict):
        return body
    limits = [key for key in TOKEN_LIMITS if key in body]
    if not limits:
        body["max_tokens"] = MAX_TOKENS_CAP  # chat has no default limit: it would run to the end of the context
    for key in limits:
        value = body[key]
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS_CAP:
            body[key] = MAX_TOKENS_CAP
    return body


@schemathesis.hook("map_body")
def served_model_and_cheap_generation(context: schemathesis.HookContext, body: Any) -> Any:
    path = context.operation.path if context.operation is not None else None
    if path in MODEL_BY_PATH:
        body = name_the_served_model(path, body)
    if path in GENERATING_PATHS:
        body = cap_generation(body)
    return body


@schemathesis.hook("flatmap_body")
def stream_half(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    generating = context.operation is not None and context.operation.path in GENERATING_PATHS
    # Only where "stream" is absent or a boolean: a request made invalid through it stays invalid.
    if not generating or not isinstance(body, dict) or not isinstance(body.get("stream", False), bool | None):
        return st.just(body)
    return st.booleans().map(lambda stream: {**body, "stream": True} if stream else body)

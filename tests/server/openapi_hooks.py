"""Schemathesis hooks for tests/server/test_server_openapi.py, loaded by the schemathesis CLI (config `hooks`).

Generation is the slow part on two cores, so a generated request to a generating route is made cheap without
being made valid or invalid: it names the served model where it names one as a string (any other name is a
404 before anything runs), and asks for at most MAX_TOKENS_CAP tokens where its limit is a valid one or absent.
Half of them stream: left to itself, schemathesis sends ``"stream": true`` almost never.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import strategies as st

from tests.server.support import ALIAS

GENERATING_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
MAX_TOKENS_CAP = 2  # enough to stream a chunk and finish
TOKEN_LIMITS = ("max_tokens", "max_completion_tokens")


def cap_generation(body: Any) -> Any:
    if not isinstance(body, dict):
        return body
    if isinstance(body.get("model"), str) and body["model"]:
        body["model"] = ALIAS
    limits = [key for key in TOKEN_LIMITS if key in body]
    if not limits:
        body["max_tokens"] = MAX_TOKENS_CAP  # chat has no default limit: it would run to the end of the context
    for key in limits:
        value = body[key]
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS_CAP:
            body[key] = MAX_TOKENS_CAP
    return body


@schemathesis.hook("map_body")
def cheap_generation(context: schemathesis.HookContext, body: Any) -> Any:
    if context.operation is not None and context.operation.path in GENERATING_PATHS:
        return cap_generation(body)
    return body


@schemathesis.hook("flatmap_body")
def stream_half(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    generating = context.operation is not None and context.operation.path in GENERATING_PATHS
    # Only where "stream" is absent or a boolean: a request made invalid through it stays invalid.
    if not generating or not isinstance(body, dict) or not isinstance(body.get("stream", False), bool | None):
        return st.just(body)
    return st.booleans().map(lambda stream: {**body, "stream": True} if stream else body)

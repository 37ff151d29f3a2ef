"""Errors of the inference engine; plain Python, so that the engine knows nothing of HTTP.

Hierarchy::

    EngineError             the engine failed (llama.cpp returned an error, a step failed); not the client's fault
    ├── EngineDeadError     the engine's process is gone (crashed, killed, or its RPC device died); the
    │                       model must be loaded again
    └── EngineRequestError  the request is invalid for this model (a token id it does not have, a JSON schema
                            llama.cpp cannot turn into a grammar); ``param`` names the request field

The HTTP layer (server/errors.py) maps them to 500, 503 and 400.
"""

from __future__ import annotations


class EngineError(Exception):
    """The engine failed while loading or generating; the message says what llama.cpp reported."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EngineDeadError(EngineError):
    """The engine process exited (or was killed) while it held this model; in-flight requests end with it."""


class EngineRequestError(EngineError):
    """Only the model can judge this request invalid (token ids, grammars); ``param`` names the field."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

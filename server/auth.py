"""API-key check: ``Authorization: Bearer <key>`` against the configured keys, in constant time.

Every configured key is compared (no early exit), so the time taken says nothing about which key, or how
much of one, matched. Keys are never logged; a failure names only what was wrong with the header.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from pydantic import SecretStr

from server.errors import AuthenticationError


class ApiKeyChecker:
    def __init__(self, keys: Sequence[SecretStr]) -> None:
        self._keys = tuple(k.get_secret_value().encode("utf-8") for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Raise AuthenticationError unless the header carries one of the keys (no-op without keys)."""
        if not self._keys:
            return
        if not authorization:
            raise AuthenticationError(
                "no API key provided; send it as 'Authorization: Bearer YOUR_KEY' (the openai client's api_key)"
            )
        scheme, _, candidate = authorization.partition(" ")
        if scheme.lower() != "bearer" or not candidate.strip():
            raise AuthenticationError("the Authorization header must be 'Bearer YOUR_KEY'")
        given = candidate.strip().encode("utf-8", errors="surrogateescape")
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise AuthenticationError("incorrect API key provided")

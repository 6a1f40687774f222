"""Upstream providers: anything that answers an OpenAI chat request.

The seam is `Provider`: `chat(payload) -> response dict`, `stream(payload) -> async iterator of
chunk dicts`, `aclose()`. Providers raise `ProviderError` only; the dispatcher (`gateway.upstreams`)
decides about retries, fallbacks and circuit breakers, and maps the last error to the client's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

ErrorKind = Literal["connect", "timeout", "status", "protocol", "unconfigured", "stream"]


class ProviderError(Exception):
    """One failed upstream attempt.

    `retryable` says whether the same model may be tried again (connect errors, 408, 409, 429,
    5xx, a dropped connection). A client error (`is_client_error`) means the upstream refused the
    request itself: the dispatcher returns that to the caller instead of falling back.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.body = body

    @property
    def is_client_error(self) -> bool:
        """The request itself was refused (malformed, too large, unprocessable). Other 4xx are the
        model's problem, not the caller's: a bad or exhausted key (401, 402, 403), a wrong model
        id (404), rate limits (429): those fall back to the next model and count against it."""
        return self.status in (400, 413, 415, 422)

    def __str__(self) -> str:
        return self.message


class Provider(Protocol):
    async def chat(self, payload: dict[str, Any]) -> dict[str, Any]: ...

    def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    async def aclose(self) -> None: ...

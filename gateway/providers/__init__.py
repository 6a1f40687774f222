"""Upstream providers: anything that answers an OpenAI chat request.

The seam is `Provider`: `chat(payload) -> response dict`, `stream(payload) -> async iterator of
chunk dicts`, `aclose()`. A provider that also speaks the rest of the OpenAI API (embeddings, the
Responses API) is an `ApiProvider` as well: `send(api, payload)` and `send_stream(api, payload)`.
Providers raise `ProviderError` only; the dispatcher (`gateway.upstreams`) decides about retries,
fallbacks and circuit breakers, and maps the last error to the client's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

# `refused`: a local upstream (Ollama, vLLM, anything on loopback) refused the connection: it is not
# running, and no retry will start it. `unconfigured`: the model cannot be called as configured.
ErrorKind = Literal["connect", "refused", "timeout", "status", "protocol", "unconfigured", "stream"]


@dataclass(frozen=True)
class Api:
    """One of the OpenAI APIs an upstream may speak, as providers and the dispatcher see it."""

    name: str
    path: str  # under the model's base URL
    answer_key: str  # what a successful answer holds ("choices", "output", "data")
    token_caps: tuple[str, ...] = ()  # the fields a model's max_output_tokens caps (the last is set)
    # Stream events after which a stream is complete (besides `[DONE]`, which ends any stream).
    terminal: frozenset[str] = frozenset()

    def failed(self, obj: dict[str, Any]) -> bool:
        """An error sent with HTTP 200 (OpenRouter does), or an error event in a stream."""
        return obj.get("type") == "error" or ("error" in obj and self.answer_key not in obj)


CHAT = Api("chat", "/chat/completions", "choices", ("max_completion_tokens", "max_tokens"))
RESPONSES = Api(
    "responses",
    "/responses",
    "output",
    ("max_output_tokens",),
    terminal=frozenset({"response.completed", "response.incomplete", "response.failed"}),
)
EMBEDDINGS = Api("embeddings", "/embeddings", "data")


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


@runtime_checkable
class ApiProvider(Protocol):
    """A provider that speaks the OpenAI APIs beyond chat completions."""

    async def send(self, api: Api, payload: dict[str, Any]) -> dict[str, Any]: ...

    def send_stream(self, api: Api, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

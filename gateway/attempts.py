"""What the attempts of one call say: each model tried and how it went, and the error a client
sees when none of them answered."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import (
    GatewayError,
    ServiceUnavailable,
    UpstreamClientError,
    UpstreamError,
    UpstreamTimeout,
    unavailable,
)
from gateway.providers import ProviderError


@dataclass
class Attempt:
    model: str
    outcome: str  # ok | error | circuit_open | unavailable | busy
    ms: float = 0.0
    error: str | None = None
    status: int | None = None
    kind: str | None = None
    at: float = field(default_factory=time.time)  # when it started (epoch seconds): a trace's timeline

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def client_error(exc: ProviderError) -> UpstreamClientError:
    body = exc.body or {}
    message = str(body.get("message") or exc.message)
    param = body.get("param") if isinstance(body.get("param"), str) else None
    code = body.get("code") if isinstance(body.get("code"), str) else None
    assert exc.status is not None
    return UpstreamClientError(exc.status, message, param=param, code=code)


def final_error(attempts: list[Attempt], upstream_ms: float = 0.0) -> GatewayError:
    """The error a client sees when no attempt succeeded (`upstream_ms`: time spent trying)."""
    error = _final_error(attempts)
    error.upstream_ms = upstream_ms
    error.attempts = [a.as_dict() for a in attempts]
    return error


def _final_error(attempts: list[Attempt]) -> GatewayError:
    if not attempts:
        return ServiceUnavailable("no model is configured for this request")
    # One line per model and error, with a count for retries: "m: HTTP 500: boom (3 attempts)".
    seen: dict[tuple[str, str | None], int] = {}
    for a in attempts:
        seen[(a.model, a.error)] = seen.get((a.model, a.error), 0) + 1
    detail = "; ".join(f"{m}: {e}" + (f" ({n} attempts)" if n > 1 else "") for (m, e), n in seen.items())
    kinds = {a.kind or "" for a in attempts}
    if kinds <= {"unconfigured", "refused", "circuit_open", "connect", "busy"}:
        return unavailable(f"no model could take the request: {detail}", kinds)
    if attempts[-1].kind == "timeout":
        return UpstreamTimeout(f"the upstream timed out: {detail}")
    return UpstreamError(f"all upstream attempts failed: {detail}")

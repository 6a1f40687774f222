"""The gateway's one small exception tree, rendered in OpenAI's error shape: as a JSON body
(`json`), or as a server-sent event when a stream has already started (`sse`)."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import orjson


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"
    # Time spent on upstreams before the call failed (retries and fallbacks), for its record.
    upstream_ms: float | None = None
    # The upstream attempts that failed (Attempt.as_dict() each), for its record and its trace.
    attempts: list[dict[str, Any]] | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json(self) -> bytes:
        return orjson.dumps(self.body())

    def sse(self) -> bytes:
        return b"data: " + self.json() + b"\n\n"


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unprocessable(InvalidRequest):
    status = 422


class AuthenticationError(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(GatewayError):
    """A client key (or address) went over RATE_LIMIT_RPM or RATE_LIMIT_TPM: 429 with Retry-After,
    in OpenAI's shape (`type` is "requests" or "tokens", as OpenAI's own limits say)."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, kind: str, retry_after_s: float | None) -> None:
        headers = {} if retry_after_s is None else {"retry-after": str(max(1, math.ceil(retry_after_s)))}
        super().__init__(message, headers=headers)
        self.type = kind


class BudgetExceeded(RateLimited):
    """A virtual key's budget (USD a day, a month, or in total) would be passed: 429 with
    Retry-After until the period resets (none for a total budget, which never does)."""

    code = "budget_exceeded"

    def __init__(self, message: str, period: str, retry_after_s: float | None, resets_at: Any = None) -> None:
        super().__init__(message, "insufficient_quota", retry_after_s)
        self.period = period
        self.resets_at = resets_at


class ServiceUnavailable(GatewayError):
    """No model can take the request (all circuits open, no key, unreachable), or the store is down."""

    status = 503
    type = "service_unavailable"
    code = "no_available_model"


class NotConfigured(ServiceUnavailable):
    """The models this request could use are unavailable for reasons no retry can fix: an API key
    that is not set (`upstream_key_missing`), a local server that refuses connections
    (`upstream_unreachable`), or both (`upstream_not_configured`). Answered at once, without
    Retry-After and with `x-should-retry: false` (the OpenAI SDKs obey it), so that a client does
    not spend seconds retrying what the operator must fix; the message says what to fix."""

    CODES = {"unconfigured": "upstream_key_missing", "refused": "upstream_unreachable"}

    def __init__(self, message: str, kinds: Collection[str]) -> None:
        codes = {self.CODES[k] for k in kinds}
        code = codes.pop() if len(codes) == 1 else "upstream_not_configured"
        super().__init__(message, code=code, headers={"x-should-retry": "false"})


# The kinds of unavailability only the operator can fix (gateway.health.Unavailable.kind).
LASTING = frozenset(NotConfigured.CODES)


def unavailable(message: str, kinds: Collection[str]) -> ServiceUnavailable:
    """No model could take the request, for reasons of these `kinds`: when they are all lasting
    (the operator's to fix), a NotConfigured; otherwise a 503 worth retrying after a while."""
    if kinds and set(kinds) <= LASTING:
        return NotConfigured(message, kinds)
    return ServiceUnavailable(message, headers={"retry-after": "5"})


class StoreUnavailable(ServiceUnavailable):
    """The database cannot be reached: 503 with Retry-After; the recorder keeps records waiting."""

    code = "store_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"retry-after": "5"})


class UpstreamError(GatewayError):
    """Every attempt failed after retries and fallbacks."""

    status = 502
    type = "upstream_error"
    code = "upstream_failed"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout"
    code = "upstream_timeout"


class UpstreamClientError(GatewayError):
    """The upstream refused the request itself (a 4xx other than 408/409/429): the caller's
    problem, passed back with the upstream's status and message, never retried."""

    type = "invalid_request_error"
    code = "upstream_rejected"

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.status = status


class ClientDisconnected(Exception):
    """The client went away before its response was sent; nothing is rendered."""

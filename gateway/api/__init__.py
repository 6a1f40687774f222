"""HTTP endpoints. Every error is raised as a `GatewayError` and rendered by one handler."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import AuthenticationError, PermissionDenied

if TYPE_CHECKING:
    from gateway.app import Gateway


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


def require_admin(request: Request, gw: Gateway, *, open_without_keys: bool = False) -> None:
    """Admin endpoints need `Authorization: Bearer <ADMIN_API_KEY>` (compared in constant time);
    without ADMIN_API_KEY they are disabled. With `open_without_keys`, a gateway that runs
    without GATEWAY_API_KEYS (open, as in development) lets anyone in."""
    if open_without_keys and not gw.settings.gateway_api_keys:
        return
    key = gw.settings.admin_api_key.get_secret_value() if gw.settings.admin_api_key else ""
    if not key:
        raise PermissionDenied("admin endpoints are disabled: set ADMIN_API_KEY", code="admin_disabled")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise AuthenticationError("this endpoint needs 'Authorization: Bearer <ADMIN_API_KEY>'")

"""HTTP endpoints. Every error is raised as a `GatewayError` and rendered by one handler (the
middleware's); endpoints find the gateway's parts in the request's scope (`services_of`)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.asgi import dump_json
from gateway.auth import presented, require_admin
from gateway.services import Services, services_of


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dump_json(body), status_code=status, headers=headers, media_type="application/json")


def services(request: Request) -> Services:
    return services_of(request.scope)


def admin_only(request: Request, *, open_without_keys: bool = False) -> Services:
    """The services, for an admin caller only (see `gateway.auth.require_admin`)."""
    found = services(request)
    headers: dict[bytes, bytes] = {}
    for name, value in request.headers.raw:
        headers.setdefault(name, value)
    require_admin(found.settings, presented(headers), open_without_keys=open_without_keys)
    return found

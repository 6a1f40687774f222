"""HTTP endpoints. Every error is raised as a `GatewayError` and rendered by one handler (the
middleware's); endpoints find the gateway's parts in the request's scope (`services_of`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from gateway.asgi import dump_json
from gateway.auth import presented, require_admin
from gateway.errors import StoreUnavailable
from gateway.services import Services, services_of

T = TypeVar("T")


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


async def bounded(gw: Services, work: Awaitable[T]) -> T:
    """`work` (on the database), or 503 with Retry-After once STORE_TIMEOUT_S has passed: a hung
    database must not hold a request. The work is cancelled but not waited for (its connection's
    clean-up may itself wait on the database)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=gw.settings.store_timeout_s)
    if not done:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise StoreUnavailable(
            f"the database did not answer within {gw.settings.store_timeout_s:g} s (STORE_TIMEOUT_S)"
        )
    return task.result()

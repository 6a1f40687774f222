"""Models list, probes and figures: GET /v1/models, /live, /ready, /health, /metrics, /v1/stats."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from gateway.api import json_response, require_admin
from gateway.errors import InvalidRequest
from gateway.store import utcnow

if TYPE_CHECKING:
    from gateway.app import Gateway


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gw
    return gw


async def list_models(request: Request) -> Response:
    gw = _gw(request)
    data: list[dict[str, Any]] = []
    for name in gw.settings.virtual_model_names:
        entry: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "llm-router"}
        constraints = gw.settings.virtual_models.get(name)
        if constraints is not None:
            entry["router"] = constraints.model_dump(exclude_defaults=True)
        data.append(entry)
    for m in gw.settings.models:
        data.append(
            {
                "id": m.name,
                "object": "model",
                "created": 0,
                "owned_by": m.provider,
                "context_window": m.context_window,
                "pricing": {
                    "input_usd_per_mtok": m.input_usd_per_mtok,
                    "output_usd_per_mtok": m.output_usd_per_mtok,
                },
                "capabilities": sorted(m.capabilities),
                "available": gw.upstreams.is_available(m.name),
            }
        )
    return json_response({"object": "list", "data": data})


async def live(request: Request) -> Response:
    return json_response({"status": "ok"})


async def ready(request: Request) -> Response:
    gw = _gw(request)
    checks = await gw.readiness()
    ok = all(v == "ok" for v in checks.values())
    return json_response({"status": "ready" if ok else "not_ready", "checks": checks}, 200 if ok else 503)


async def health(request: Request) -> Response:
    gw = _gw(request)
    checks = await gw.readiness()
    body = {
        "status": "ok" if all(v == "ok" for v in checks.values()) else "degraded",
        "checks": checks,
        "providers": gw.upstreams.snapshot(),
        "recorder": gw.recorder_state(),
    }
    return json_response(body)


async def prometheus(request: Request) -> Response:
    return Response(_gw(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


_WINDOW = re.compile(r"^(\d+)([mhd])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


async def stats(request: Request) -> Response:
    """Per-model share, latency, cost and feedback over a time window (`?window=24h`; m, h or d).
    Admin only when the gateway has client keys: the figures cover every caller."""
    require_admin(request, _gw(request), open_without_keys=True)
    window = request.query_params.get("window", "24h")
    match = _WINDOW.match(window)
    if not match or int(match.group(1)) == 0:
        raise InvalidRequest("window must look like 15m, 24h or 7d", param="window", code="invalid_value")
    since = utcnow() - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    rows = await _gw(request).store.usage_stats(since)
    total = sum(r["requests"] for r in rows)
    for r in rows:
        r["share"] = round(r["requests"] / total, 4) if total else 0.0
    body = {
        "window": window,
        "since": since.isoformat(),
        "requests": total,
        "cost_usd": sum(r["cost_usd"] or 0.0 for r in rows),
        "models": sorted(rows, key=lambda r: -r["requests"]),
    }
    return json_response(body)

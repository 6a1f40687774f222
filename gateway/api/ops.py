"""Models list and probes: GET /v1/models, /live, /ready, /health."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.api import json_response

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

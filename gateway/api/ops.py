"""Models, probes and figures: GET /v1/models, /v1/models/{id}, /live, /ready, /health, /metrics,
/v1/stats."""

from __future__ import annotations

import asyncio
import re
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from gateway.api import admin_only, bounded, json_response, services
from gateway.domain import utcnow
from gateway.errors import InvalidRequest, NotFound
from gateway.metrics import ArmGauge, Gauges
from gateway.routing.policies import POLICIES
from gateway.services import Services


async def readiness(s: Services) -> dict[str, str]:
    """What /ready and /health report (through `Services.readiness`, cached)."""
    checks: dict[str, str] = {}
    try:
        bound = min(2.0, s.settings.store_timeout_s)
        checks["store"] = "ok" if await asyncio.wait_for(s.store.ping(), bound) else "unreachable"
    except Exception as exc:
        checks["store"] = f"unreachable: {type(exc).__name__}"
    available = [m.name for m in s.settings.models if s.upstreams.is_available(m.name)]
    if available:
        checks["models"] = "ok"
    else:  # say why: a key to set, a local server to start (the probes keep this true)
        why = "; ".join(f"{m.name}: {s.upstreams.why_unavailable(m.name)}" for m in s.settings.models)
        checks["models"] = f"no model available: {why}" if why else "no model configured"
    shared = s.shared.status()
    if not shared.up and s.settings.redis_fail_closed:
        checks["shared_state"] = "unreachable: limited requests are refused (REDIS_FAIL_CLOSED)"
    if POLICIES[s.settings.router_policy].needs_embedding:
        checks["embedder"] = "ok" if s.embedder is not None else "unavailable: routing without context"
    rec = s.recorder.state()
    if rec.spool is not None and rec.spool.bytes >= rec.spool.max_bytes:
        checks["recorder"] = "full: new calls are refused until the database catches up"
    elif rec.failing:
        checks["recorder"] = f"failing: the oldest record has waited {rec.oldest_s:.0f} s for the database"
    else:
        checks["recorder"] = "ok"
    return checks


def gauges(s: Services, auth_failures: int = 0) -> Gauges:
    """What /metrics reads at scrape time."""
    arms = {}
    for m in s.settings.models:
        stats = s.router.stats.get(m.name)
        arms[m.name] = ArmGauge(s.router.quality(m.name), stats.rated if stats else 0)
    cache = s.embedder.cache_stats() if s.embedder is not None else None
    return Gauges(s.upstreams.snapshot(), s.recorder.state(), cache, arms, auth_failures, s.shared.status())


def model_entry(gw: Services, name: str) -> dict[str, Any] | None:
    """A model (catalogue or virtual) in OpenAI's shape, with what the gateway knows of it."""
    m = gw.settings.model(name)
    if m is None:
        if name not in gw.settings.virtual_model_names:
            return None
        entry: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "llm-router"}
        constraints = gw.settings.virtual_models.get(name)
        if constraints is not None:
            entry["router"] = constraints.model_dump(exclude_defaults=True)
        return entry
    return {
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


async def list_models(request: Request) -> Response:
    gw = services(request)
    names = [*gw.settings.virtual_model_names, *(m.name for m in gw.settings.models)]
    return json_response({"object": "list", "data": [model_entry(gw, name) for name in names]})


async def get_model(request: Request) -> Response:
    """GET /v1/models/{id}: `auto`, a virtual model or a catalogue model (ids may hold '/')."""
    name = request.path_params["model"]
    entry = model_entry(services(request), name)
    if entry is None:
        raise NotFound(
            f"The model '{name}' does not exist; GET /v1/models lists the models and virtual models",
            param="model",
            code="model_not_found",
        )
    return json_response(entry)


async def live(request: Request) -> Response:
    return json_response({"status": "ok"})


def _cache_headers(gw: Services) -> dict[str, str]:
    return {"cache-control": f"max-age={int(gw.settings.health_cache_s)}"}


async def ready(request: Request) -> Response:
    gw = services(request)
    r = await gw.readiness.get()
    body = {"status": "ready" if r.ok else "not_ready", "checks": r.checks}
    return json_response(body, 200 if r.ok else 503, _cache_headers(gw))


async def health(request: Request) -> Response:
    gw = services(request)
    r = await gw.readiness.get()
    shared = gw.shared.status()  # live, beside the cached checks
    body = {
        "status": "ok" if r.ok and shared.up else "degraded",
        "checks": r.checks,
        "providers": gw.upstreams.snapshot(),
        "recorder": gw.recorder.state(),
        "shared_state": shared.as_dict(),
    }
    return json_response(body, headers=_cache_headers(gw))


async def prometheus(request: Request) -> Response:
    return Response(services(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


_WINDOW = re.compile(r"^(\d+)([mhd])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}
_MAX_WINDOW = timedelta(days=3650)


async def stats(request: Request) -> Response:
    """Per-model share, latency, cost and feedback over a time window (`?window=24h`; m, h or d).
    Admin only when the gateway has client keys: the figures cover every caller."""
    gw = admin_only(request, open_without_keys=True)
    window = request.query_params.get("window", "24h")
    match = _WINDOW.fullmatch(window)
    span = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))}) if match and len(window) <= 8 else None
    if span is None or not timedelta(0) < span <= _MAX_WINDOW:
        raise InvalidRequest(
            "window must look like 15m, 24h or 7d, at most 3650d", param="window", code="invalid_value"
        )
    since = utcnow() - span
    rows = await bounded(gw, gw.store.usage_stats(since))
    total = sum(r.requests for r in rows)
    models: list[dict[str, Any]] = [
        {**asdict(r), "share": round(r.requests / total, 4) if total else 0.0}
        for r in sorted(rows, key=lambda r: -r.requests)
    ]
    body = {
        "window": window,
        "since": since.isoformat(),
        "requests": total,
        "cost_usd": sum(r.cost_usd or 0.0 for r in rows),
        "models": models,
    }
    return json_response(body)

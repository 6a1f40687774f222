"""Virtual keys: `POST /v1/keys` (issue; the secret is in this answer only), `GET /v1/keys`,
`GET /v1/keys/{id}`, `POST /v1/keys/{id}/revoke` (or `DELETE /v1/keys/{id}`),
`POST /v1/keys/{id}/rotate` (a new secret for the same key), all for the admin; and
`GET /v1/keys/{id}/spend` (the admin, or the key itself): spend per day and per model, and where
each budget stands."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api import admin_only, bounded, json_response, services
from gateway.context import request_state
from gateway.domain import VirtualKey, utcnow
from gateway.errors import InvalidRequest, NotFound
from gateway.keys import KeyRequest, issue, revoked, rotated
from gateway.limits import period_bounds
from gateway.schemas import parse_json_object, validate
from gateway.services import Services

_KEY_ID = re.compile(r"vk_[0-9a-f]{16}")


async def _find(gw: Services, key_id: str) -> VirtualKey:
    key = await bounded(gw, gw.store.find_key(key_id=key_id)) if _KEY_ID.fullmatch(key_id) else None
    if key is None:
        raise NotFound(f"no key with id {key_id!r}", param="id", code="key_not_found")
    return key


async def _admin_or_self(request: Request) -> tuple[Services, VirtualKey]:
    """The key of the path, for the admin or for that key itself (anyone else: 401, whether the key
    exists or not)."""
    gw = services(request)
    key_id = request.path_params["key_id"]
    caller = request_state(request.scope).caller
    if caller != key_id:
        gw = admin_only(request)
    return gw, await _find(gw, key_id)


async def create(request: Request) -> Response:
    gw = admin_only(request)
    req: KeyRequest = validate(KeyRequest, parse_json_object(await request.body()))
    known = {m.name for m in gw.settings.models} | set(gw.settings.virtual_model_names)
    unknown = sorted(set(req.models or ()) - known)
    if unknown:
        raise InvalidRequest(
            f"unknown models {unknown}: GET /v1/models lists the models and virtual models",
            param="models",
            code="invalid_value",
        )
    now = utcnow()
    key, secret = issue(req, now)
    if key.expires_at is not None and key.expires_at <= now:
        raise InvalidRequest("expires_at is in the past", param="expires_at", code="invalid_value")
    await bounded(gw, gw.store.save_key(key))
    return json_response({**key.public(now), "key": secret}, 201)


async def list_keys(request: Request) -> Response:
    gw = admin_only(request)
    now = utcnow()
    keys = await bounded(gw, gw.store.list_keys(request.query_params.get("owner")))
    return json_response({"object": "list", "data": [k.public(now) for k in keys]})


async def get_key(request: Request) -> Response:
    _, key = await _admin_or_self(request)
    return json_response(key.public(utcnow()))


async def revoke(request: Request) -> Response:
    gw = admin_only(request)
    key = revoked(await _find(gw, request.path_params["key_id"]))
    await bounded(gw, gw.store.save_key(key))
    await gw.directory.changed(key.id)
    return json_response(key.public(utcnow()))


async def rotate(request: Request) -> Response:
    gw = admin_only(request)
    key = await _find(gw, request.path_params["key_id"])
    if key.revoked_at is not None:
        raise InvalidRequest("a revoked key cannot be rotated; issue a new one", code="key_revoked")
    key, secret = rotated(key)
    await bounded(gw, gw.store.save_key(key))
    await gw.directory.changed(key.id)
    return json_response({**key.public(utcnow()), "key": secret})


async def spend(request: Request) -> Response:
    """`?days=N` (default 31, at most 366): spend per UTC day and model over the last N days."""
    gw, key = await _admin_or_self(request)
    try:
        days = int(request.query_params.get("days", "31"))
    except ValueError:
        days = 0
    if not 1 <= days <= 366:
        raise InvalidRequest("days must be a whole number from 1 to 366", param="days", code="invalid_value")
    await bounded(gw, gw.recorder.flush())  # calls still in the write-behind queue count too
    now = utcnow()
    since = now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=days - 1)
    rows = await bounded(gw, gw.store.spend_by_day(key.id, since))
    by_day: dict[str, dict[str, Any]] = {}
    for r in rows:
        day = by_day.setdefault(r.day, {"date": r.day, "cost_usd": 0.0, "requests": 0, "models": []})
        day["cost_usd"] += r.cost_usd
        day["requests"] += r.requests
        day["models"].append(
            {
                "model": r.model,
                "cost_usd": r.cost_usd,
                "requests": r.requests,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
            }
        )
    budgets = []
    for period, usd in (
        ("day", key.budget_day_usd),
        ("month", key.budget_month_usd),
        ("total", key.budget_total_usd),
    ):
        if usd is None:
            continue
        _, start, end = period_bounds(period, now)
        spent = await bounded(gw, gw.store.spent(key.id, start))
        budgets.append(
            {
                "period": period,
                "limit_usd": usd,
                "spent_usd": spent,
                "remaining_usd": max(0.0, usd - spent),
                "resets_at": end.isoformat() if end is not None else None,
            }
        )
    body = {
        "id": key.id,
        "owner": key.owner,
        "since": since.date().isoformat(),
        "cost_usd": sum(d["cost_usd"] for d in by_day.values()),
        "requests": sum(d["requests"] for d in by_day.values()),
        "budgets": budgets,
        "days": list(by_day.values()),
    }
    return json_response(body)


ROUTES = [
    Route("/v1/keys", create, methods=["POST"]),
    Route("/v1/keys", list_keys, methods=["GET"]),
    Route("/v1/keys/{key_id}", get_key, methods=["GET"]),
    Route("/v1/keys/{key_id}", revoke, methods=["DELETE"]),
    Route("/v1/keys/{key_id}/revoke", revoke, methods=["POST"]),
    Route("/v1/keys/{key_id}/rotate", rotate, methods=["POST"]),
    Route("/v1/keys/{key_id}/spend", spend, methods=["GET"]),
]

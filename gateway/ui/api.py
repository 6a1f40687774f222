"""The dashboard's JSON API (admin key only): what the page needs to know, the overview over time,
the calls list and one call, and DPO pair counts. Every list is paged and every aggregate has a
time window; README "Dashboard" documents the parameters."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

import gateway
from gateway.api import admin_only, bounded, json_response
from gateway.api.records import stored_call
from gateway.domain import DPOPair
from gateway.insights import BucketRow, Window, bucket_width, floor_time
from gateway.ui.params import call_query, checked, cursor_text, window

LAYERS = ("explicit", "keyword", "semantic", "bandit", "strategy", "default")
STATUSES = ("ok", "error", "interrupted", "cancelled")


async def meta(request: Request) -> Response:
    """What the page shows in its menus; also how it checks a key at login."""
    gw = admin_only(request)
    s = gw.settings
    return json_response(
        {
            "version": gateway.__version__,
            "models": [m.name for m in s.models],
            "virtual_models": s.virtual_model_names,
            "policy": s.router_policy,
            "layers": LAYERS,
            "statuses": STATUSES,
            "tracing": gw.tracing.enabled,
        }
    )


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _buckets(window: Window) -> list[datetime]:
    """Every bucket of the window, empty ones included (a chart shows a quiet hour as zero)."""
    out, at, step = [], floor_time(window.since, window.bucket), bucket_width(window.bucket)
    while at < window.until:
        out.append(at)
        at += step
    return out


def _overview(window: Window, rows: list[BucketRow]) -> dict[str, Any]:
    per: dict[datetime, dict[str, Any]] = {
        b: {"requests": 0, "errors": 0, "cost_usd": 0.0, "side_cost_usd": 0.0, "rated": 0, "score_sum": 0.0}
        for b in _buckets(window)
    }
    by_model: dict[datetime, dict[str, int]] = {b: {} for b in per}
    totals = {"requests": 0, "errors": 0, "cost_usd": 0.0, "side_cost_usd": 0.0, "rated": 0, "score_sum": 0.0}
    models: dict[str, int] = {}
    for r in rows:
        entry = per.setdefault(r.bucket, dict.fromkeys(totals, 0))
        for key in totals:
            value = getattr(r, key)
            entry[key] += value
            totals[key] += value
        if r.model is not None and r.requests:
            by_model.setdefault(r.bucket, {})[r.model] = r.requests
            models[r.model] = models.get(r.model, 0) + r.requests
    requests = int(totals["requests"])
    return {
        "totals": {
            "requests": requests,
            "errors": int(totals["errors"]),
            "error_rate": _ratio(totals["errors"], requests),
            "cost_usd": totals["cost_usd"],
            "side_cost_usd": totals["side_cost_usd"],
            "rated": int(totals["rated"]),
            "mean_score": _ratio(totals["score_sum"], totals["rated"]),
        },
        "models": [
            {"model": m, "requests": n, "share": n / requests}
            for m, n in sorted(models.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
        "buckets": [
            {
                "t": b,
                "requests": int(v["requests"]),
                "errors": int(v["errors"]),
                "cost_usd": v["cost_usd"],
                "side_cost_usd": v["side_cost_usd"],
                "rated": int(v["rated"]),
                "mean_score": _ratio(v["score_sum"], v["rated"]),
                "models": by_model.get(b, {}),
            }
            for b, v in sorted(per.items())
        ],
    }


async def overview(request: Request) -> Response:
    """Requests, errors, cost and mean feedback score per bucket; traffic per model; latency."""
    gw = admin_only(request)
    w = window(checked(request.query_params), "24h")
    rows = await gw.store.call_buckets(w)
    latency = await gw.store.latency(w)
    body = {"since": w.since, "until": w.until, "bucket": w.bucket, "caller": w.caller, **_overview(w, rows)}
    body["totals"].update(asdict(latency))
    return json_response(body)


async def calls(request: Request) -> Response:
    """A page of calls, newest first; `next_cursor` (when set) asks for the next page."""
    gw = admin_only(request)
    query = call_query(checked(request.query_params))
    await gw.recorder.flush()  # what was answered a moment ago is in the list
    rows = await gw.store.list_calls(query)
    nxt = cursor_text(*rows[-1].cursor) if len(rows) == query.limit else None
    return json_response({"data": [asdict(r) for r in rows], "next_cursor": nxt})


def _pair(pair: DPOPair, request_id: str) -> dict[str, Any]:
    out = asdict(pair)
    out.pop("messages")  # the call's own messages, shown beside
    out["margin"] = pair.margin
    out["role"] = "chosen" if pair.chosen_id == request_id else "rejected"
    return out


async def call(request: Request) -> Response:
    """One call: everything recorded about it, its ratings, and the DPO pairs it is in."""
    gw = admin_only(request)
    request_id = request.path_params["request_id"]
    # A call id is unique within its tenant; `?caller=` says whose (else any tenant's).
    stored = await bounded(gw, stored_call(gw, request.query_params.get("caller") or None, request_id))
    body = stored.as_dict()
    body["has_embedding"] = body.pop("embedding") is not None
    pairs = await gw.store.pairs_of(stored.record.caller or "", request_id)
    body["pairs"] = [_pair(p, request_id) for p in pairs]
    return json_response(body)


async def dpo(request: Request) -> Response:
    """DPO pairs created per bucket (the export itself is GET /v1/dpo/pairs)."""
    gw = admin_only(request)
    w = window(checked(request.query_params), "30d")
    counts = {p.bucket: p.pairs for p in await gw.store.pair_buckets(w)}
    buckets = [{"t": b, "pairs": counts.get(b, 0)} for b in _buckets(w)]
    return json_response(
        {
            "since": w.since,
            "until": w.until,
            "bucket": w.bucket,
            "pairs": sum(counts.values()),
            "buckets": buckets,
        }
    )

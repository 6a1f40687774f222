"""The learning loop's endpoints: POST /feedback, GET /requests/{id}, GET /metrics/{id}, and the
admin-only GET /v1/dpo/pairs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway import dpo
from gateway.api import admin_only, json_response, services
from gateway.auth import is_admin
from gateway.context import request_state
from gateway.domain import Feedback
from gateway.errors import InvalidRequest, NotFound
from gateway.schemas import CALL_ID, FeedbackRequest, parse_json_object, validate
from gateway.services import Services

_TIMINGS = (
    "id",
    "created_at",
    "model",
    "requested_model",
    "layer",
    "status",
    "http_status",
    "stream",
    "overhead_ms",
    "upstream_ms",
    "ttft_ms",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
)


async def _call(gw: Services, request: Request, request_id: str) -> dict[str, Any]:
    """A call record, for its own caller: with GATEWAY_API_KEYS set, one client key cannot read or
    rate another's calls (the admin key can); to others it does not exist."""
    if not CALL_ID.fullmatch(request_id):  # no call has such an id
        raise NotFound(f"no request with id {request_id!r}", param="request_id", code="request_not_found")
    if gw.recorder.has(request_id):
        await gw.recorder.flush()
    stored = await gw.store.get_call(request_id)
    if stored is not None and gw.settings.gateway_api_keys:
        caller = request_state(request.scope).caller
        if not is_admin(gw.settings, caller) and stored.record.caller != caller:
            stored = None
    if stored is None:
        raise NotFound(f"no request with id {request_id!r}", param="request_id", code="request_not_found")
    return stored.as_dict()


async def feedback(request: Request) -> Response:
    gw = services(request)
    data = parse_json_object(await request.body())
    fb: FeedbackRequest = validate(FeedbackRequest, data)
    if gw.settings.gateway_api_keys:
        await _call(gw, request, fb.request_id)
    learned = await gw.learner.learn(Feedback(fb.request_id, fb.score, fb.feedback_text, fb.source))
    return json_response(learned)


async def get_request(request: Request) -> Response:
    record = await _call(services(request), request, request.path_params["request_id"])
    record["request_id"] = record.pop("id")
    return json_response(record)


async def get_metrics(request: Request) -> Response:
    record = await _call(services(request), request, request.path_params["request_id"])
    out = {k: record.get(k) for k in _TIMINGS}
    out["request_id"] = out.pop("id")
    return json_response(out)


def _time(value: str | None, param: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidRequest(f"{param} must be an ISO 8601 time", param=param, code="invalid_value") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


async def dpo_pairs(request: Request) -> Response:
    """NDJSON of DPO pairs (or routing labels), paged by time: follow `x-next-cursor`."""
    gw = admin_only(request)
    q = request.query_params
    kind = q.get("kind", "responses")
    try:
        fmt = dpo.export_format(kind, q.get("format"))
    except ValueError as exc:
        param = "kind" if kind not in dpo.EXPORT_FORMATS else "format"
        raise InvalidRequest(str(exc), param=param, code="invalid_value") from exc
    try:
        limit = min(int(q.get("limit", "1000")), 10_000)
        min_margin = float(q.get("min_margin", str(gw.settings.dpo_min_margin)))
    except ValueError as exc:
        raise InvalidRequest("limit and min_margin must be numbers", code="invalid_value") from exc
    after = None
    if q.get("cursor"):
        stamp, _, pair_id = q["cursor"].rpartition("|")
        moment = _time(stamp, "cursor")
        if moment is None or not pair_id.isdigit():
            raise InvalidRequest(
                "cursor must be as given in x-next-cursor", param="cursor", code="invalid_value"
            )
        after = (moment, int(pair_id))
    lines: list[bytes] = []
    cursor: tuple[datetime, int] | None = None
    async for record, position in dpo.export_records(
        gw.store,
        kind=kind,
        fmt=fmt,
        since=_time(q.get("since"), "since"),
        min_margin=min_margin,
        specs={m.name: m for m in gw.settings.models},
        after=after,
        limit=limit,
    ):
        lines.append(orjson.dumps(record, default=str) + b"\n")
        cursor = position
    headers = {}
    if cursor is not None and len(lines) == limit:
        headers["x-next-cursor"] = f"{cursor[0].isoformat()}|{cursor[1]}"
    return Response(b"".join(lines), media_type="application/x-ndjson", headers=headers)

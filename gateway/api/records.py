"""The learning loop's endpoints: POST /feedback, GET /requests/{id}, GET /metrics/{id}, and the
admin-only GET /v1/dpo/pairs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway import dpo
from gateway.api import admin_only, bounded, json_response, services
from gateway.auth import is_admin
from gateway.context import request_state
from gateway.domain import Feedback, StoredCall
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


def _tenant(gw: Services, request: Request) -> str | None:
    """Whose calls a request may see: its own tenant's (a call id is scoped by its caller, and the
    query says so: another tenant's id is as unknown as an id nobody used, in time too). The admin
    sees every tenant's (`?caller=` narrows it to one)."""
    state = request_state(request.scope)
    if gw.settings.keys_required and is_admin(gw.settings, state.caller):
        return request.query_params.get("caller") or None
    return state.tenant


def _unknown(request_id: str) -> NotFound:
    return NotFound(f"no request with id {request_id!r}", param="request_id", code="request_not_found")


async def stored_call(gw: Services, caller: str | None, request_id: str) -> StoredCall:
    if not CALL_ID.fullmatch(request_id):  # no call has such an id
        raise _unknown(request_id)
    if caller is not None and gw.recorder.has(caller, request_id):
        await gw.recorder.wait_written(caller, request_id, gw.settings.store_timeout_s)
    stored = await gw.store.get_call(caller, request_id)
    if stored is None:
        raise _unknown(request_id)
    return stored


async def _call(gw: Services, request: Request, request_id: str) -> dict[str, Any]:
    stored = await bounded(gw, stored_call(gw, _tenant(gw, request), request_id))
    return stored.as_dict()


async def _learn(gw: Services, caller: str | None, fb: FeedbackRequest) -> Any:
    if caller is None:  # the admin rating some tenant's call: whose it is
        caller = (await stored_call(gw, None, fb.request_id)).record.caller
    return await gw.learner.learn(
        Feedback(fb.request_id, fb.score, fb.feedback_text, fb.source, caller=caller)
    )


async def feedback(request: Request) -> Response:
    gw = services(request)
    data = parse_json_object(await request.body(), gw.settings.max_json_elements)
    fb: FeedbackRequest = validate(FeedbackRequest, data)
    return json_response(await bounded(gw, _learn(gw, _tenant(gw, request), fb)))


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
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidRequest(f"{param} must be an ISO 8601 time", param=param, code="invalid_value") from exc


def _number(value: str, param: str, kind: type[int] | type[float], lo: float, hi: float) -> Any:
    """A query parameter in [lo, hi], or 400 naming it."""
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not lo <= number <= hi:  # NaN fails the comparison too
        raise InvalidRequest(
            f"{param} must be a number from {lo:g} to {hi:g}", param=param, code="invalid_value"
        )
    return number


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
    limit = _number(q.get("limit", "1000"), "limit", int, 1, 10_000)
    min_margin = _number(q.get("min_margin", str(gw.settings.dpo_min_margin)), "min_margin", float, 0, 1)
    after = None
    if q.get("cursor"):
        stamp, _, pair_id = q["cursor"].rpartition("|")
        moment = _time(stamp, "cursor")
        if moment is None or not pair_id.isdigit() or len(pair_id) > 18:
            raise InvalidRequest(
                "cursor must be as given in x-next-cursor", param="cursor", code="invalid_value"
            )
        after = (moment, int(pair_id))
    since = _time(q.get("since"), "since")
    lines: list[bytes] = []
    cursor: tuple[datetime, int] | None = None

    async def collect() -> None:
        nonlocal cursor
        async for record, position in dpo.export_records(
            gw.store,
            kind=kind,
            fmt=fmt,
            since=since,
            min_margin=min_margin,
            specs={m.name: m for m in gw.settings.models},
            after=after,
            limit=limit,
            caller=q.get("caller") or None,  # one tenant's pairs, or every tenant's
        ):
            lines.append(orjson.dumps(record, default=str) + b"\n")
            cursor = position

    await bounded(gw, collect())
    headers = {}
    if cursor is not None and len(lines) == limit:
        headers["x-next-cursor"] = f"{cursor[0].isoformat()}|{cursor[1]}"
    return Response(b"".join(lines), media_type="application/x-ndjson", headers=headers)

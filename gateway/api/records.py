"""The learning loop's endpoints: POST /feedback, GET /requests/{id}, GET /metrics/{id}."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.api import json_response
from gateway.errors import NotFound
from gateway.schemas import FeedbackRequest, parse_json_object, validate
from gateway.store import Feedback

if TYPE_CHECKING:
    from gateway.app import Gateway

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


async def _call(gw: Gateway, request_id: str) -> dict[str, Any]:
    if gw.recorder.has(request_id):
        await gw.recorder.flush()
    record = await gw.store.get_call(request_id)
    if record is None:
        raise NotFound(f"no request with id {request_id!r}", param="request_id", code="request_not_found")
    return record


async def feedback(request: Request) -> Response:
    gw: Gateway = request.app.state.gw
    data = parse_json_object(await request.body())
    fb: FeedbackRequest = validate(FeedbackRequest, data)
    if gw.recorder.has(fb.request_id):
        await gw.recorder.flush()  # the call is still queued: write it first (503 if the store is down)
    outcome = await gw.learn(Feedback(fb.request_id, fb.score, fb.feedback_text, fb.source))
    return json_response(outcome)


async def get_request(request: Request) -> Response:
    gw: Gateway = request.app.state.gw
    record = await _call(gw, request.path_params["request_id"])
    record["request_id"] = record.pop("id")
    return json_response(record)


async def get_metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gw
    record = await _call(gw, request.path_params["request_id"])
    out = {k: record.get(k) for k in _TIMINGS}
    out["request_id"] = out.pop("id")
    return json_response(out)

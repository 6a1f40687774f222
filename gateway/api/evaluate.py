"""POST /v1/evaluate: off-policy evaluation of candidate configurations on the logged calls
(admin-only once the gateway has client keys, as /v1/stats: the figures cover every caller)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.api import admin_only, json_response
from gateway.evaluation.service import EvaluateBody
from gateway.schemas import parse_json_object, validate


async def evaluate(request: Request) -> Response:
    gw = admin_only(request, open_without_keys=True)
    body: EvaluateBody = validate(EvaluateBody, parse_json_object(await request.body()))
    report = await gw.evaluator.evaluate(body.question())
    return json_response(report.as_dict())

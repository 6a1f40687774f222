"""POST /v1/embeddings (and /embeddings): passed through to the catalogue model the request names,
which must have the `embeddings` capability; the body goes upstream unchanged but `model`.

Embeddings are not routed: vectors from different models do not compare, so `auto` and virtual
models are refused with the list of embedding models, and a failing model does not fall back to
another (it is retried, as any upstream). The call is rate-limited (its input tokens estimated,
then settled with the upstream's count), held against a virtual key's budgets when the model has a
price (settled with the real cost), checked against the key's models, metered in /metrics and
logged; it is not recorded as a call (nor traced, nor refused when the recorder's spool is full),
since there is no answer to rate or learn from: so its spend is in the budgets' shared counters, not
in the ledger of calls (`/v1/keys/{id}/spend`, and a counter seeded again from it). Its body
fields are checked against the embeddings API's allowlist (`gateway.fields`).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway import fields
from gateway.api import json_response, services
from gateway.api.routed import within_deadline
from gateway.asgi import header_value, until_disconnect
from gateway.catalogue import ModelSpec
from gateway.context import admit, request_state
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.keys import allow
from gateway.providers import EMBEDDINGS
from gateway.schemas import EmbeddingsRequest, parse_json_object, require_model, validate
from gateway.services import Services


def embedding_model(gw: Services, name: str) -> ModelSpec:
    spec = gw.settings.model(name)
    if spec is not None and "embeddings" in spec.capabilities:
        return spec
    known = [m.name for m in gw.settings.models if "embeddings" in m.capabilities]
    choose = (
        f"name one of: {', '.join(known)}"
        if known
        else "the catalogue has no model with the `embeddings` capability"
    )
    if spec is None and name not in gw.settings.virtual_model_names:
        raise NotFound(f"The model '{name}' does not exist; {choose}", param="model", code="model_not_found")
    why = (
        "is not an embeddings model"
        if spec is not None
        else "is routed, and embeddings are not (vectors of different models do not compare)"
    )
    raise InvalidRequest(f"the model '{name}' {why}; {choose}", param="model", code="model_not_supported")


def input_size(given: str | list[Any]) -> tuple[int, int]:
    """The input's characters and estimated tokens (a token array counts its length)."""
    items = [given] if isinstance(given, str) or (given and isinstance(given[0], int)) else given
    chars = sum(len(i) for i in items if isinstance(i, str))
    tokens = sum(len(i) // 4 + 1 if isinstance(i, str) else len(i) for i in items)
    return chars, tokens


async def embeddings(request: Request) -> Response:
    gw = services(request)
    state = request_state(request.scope)
    data = parse_json_object(await request.body(), gw.settings.max_json_elements)
    require_model(data)
    req: EmbeddingsRequest = validate(EmbeddingsRequest, data)
    fields.check(data, gw.settings.models, EMBEDDINGS)
    spec = embedding_model(gw, req.model)
    allow(state.key, spec.name)
    chars, tokens = input_size(req.input)
    if chars > gw.settings.max_input_chars:
        raise InvalidRequest(
            f"the input holds {chars} characters, at most {gw.settings.max_input_chars}",
            param="input",
            code="input_too_long",
        )
    await admit(gw.limits, state, tokens, spec.cost_usd(tokens, 0))
    body = {k: v for k, v in data.items() if k != "router"}
    try:
        work = gw.upstreams.answer([spec.name], lambda _: (EMBEDDINGS, body))
        result = await until_disconnect(request.receive, within_deadline(gw, state, work))
    except Exception as exc:  # refused, an error, or the client gone (ClientDisconnected): nothing used
        if state.reservation is not None:
            state.reservation.release()
        status = exc.status if isinstance(exc, GatewayError) else 499
        gw.metrics.embedded(spec.name, status, 0, 0.0)
        raise
    reported = (result.data.get("usage") or {}).get("prompt_tokens")
    used = reported if isinstance(reported, int) else tokens
    cost = spec.cost_usd(used, 0)
    if state.reservation is not None:
        state.reservation.settle(used, cost)
    state.mark_overhead(result.upstream_ms)
    gw.metrics.embedded(spec.name, 200, used, cost)
    upstream_model = result.data.get("model")
    if not isinstance(upstream_model, str):
        upstream_model = spec.upstream_id
    result.data["model"] = spec.name
    headers = {
        "x-router-model": spec.name,
        "x-router-upstream-model": header_value(upstream_model).decode("latin-1"),
        "x-router-cost-usd": f"{cost:.8f}",
    }
    return json_response(result.data, headers=headers)

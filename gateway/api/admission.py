"""Admitting a routed call, whatever API it came in: the size limits, the caller's limits (one
request, the prompt and the most output it may ask for and, for a key with budgets, the most the
call may cost on the dearest model it may end on: one operation, before any routing work for a key
without budgets and once routed for one with them), the routing constraints (a virtual model's, the
body's `router`, the X-Router-* headers, narrowed to a virtual key's models), room to record it and
the router's decision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.types import Scope

from gateway.catalogue import QUALITY_TARGET_MAX, ModelSpec, RouterConstraints
from gateway.context import RequestState
from gateway.context import admit as admit_limits
from gateway.domain import text_of
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.keys import fallbacks_for, narrow
from gateway.routing import Decision, RouteContext
from gateway.services import Services
from gateway.wire import tokens_of

_HEADER_CONSTRAINTS = {
    b"x-router-strategy": "strategy",
    b"x-router-policy": "policy",
    b"x-router-max-cost-usd": "max_cost_usd",
    b"x-router-max-latency-ms": "max_latency_ms",
    b"x-router-min-quality": "min_quality",
    b"x-router-capability": "capability",
    b"x-router-models": "models",
    b"x-router-dial-mode": "dial_mode",
    b"x-router-dial-target": "dial_target",
}


def header_constraints(scope: Scope) -> RouterConstraints | None:
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        field = _HEADER_CONSTRAINTS.get(name)
        if field is not None:
            found[field] = value.decode("latin-1")
    if not found:
        return None
    try:
        return RouterConstraints.model_validate(found)
    except ValueError as exc:
        first = exc.errors(include_url=False)[0]  # type: ignore[attr-defined]
        header = "X-Router-" + str(first["loc"][0]).replace("_", "-").title()
        raise InvalidRequest(
            f"invalid {header} header: {first['msg']}", param=header, code="invalid_value"
        ) from exc


def measure(services: Services, messages: list[dict[str, Any]]) -> int:
    """Refuses what MAX_MESSAGES and MAX_INPUT_CHARS do not allow; returns the prompt's estimated
    tokens."""
    settings = services.settings
    if len(messages) > settings.max_messages:
        raise InvalidRequest(
            f"too many messages: {len(messages)}, at most {settings.max_messages}",
            param="messages",
            code="too_many_messages",
        )
    lengths = [len(text_of(m.get("content"))) for m in messages]
    chars = sum(lengths)
    if chars > settings.max_input_chars:
        raise InvalidRequest(
            f"the messages hold {chars} characters, at most {settings.max_input_chars}",
            param="messages",
            code="input_too_long",
        )
    return tokens_of(lengths)


def _each(asked: int | None, cap: int | None) -> int | None:
    """One choice's most output: what it asks for, cut to `cap` (None: neither says)."""
    return min(asked, cap) if asked and cap else (asked or cap)


def output_tokens(services: Services, n: int, asked: int | None) -> int:
    """The output tokens a call may use at most, all choices together (what its token reservation
    holds beside the prompt): n x (what it asks for cut to MAX_OUTPUT_TOKENS, or MAX_OUTPUT_TOKENS)."""
    settings = services.settings
    if n > settings.max_n:
        raise InvalidRequest(f"n is {n}, at most {settings.max_n} (MAX_N)", param="n", code="invalid_value")
    return n * (_each(asked, settings.max_output_tokens) or 0)


def most_cost_usd(services: Services, chain: list[str], prompt_tokens: int, ask: Ask) -> float:
    """What a call may cost at most (its budget reservation): its prompt and its most output (n x
    what it asks for, cut to the model's cap or MAX_OUTPUT_TOKENS; with neither, what the model's
    context window leaves), at the price of the dearest model it may end on (fallbacks included)."""
    worst = 0.0
    for name in chain:
        spec: ModelSpec | None = services.settings.model(name)
        if spec is not None:
            each = _each(ask.max_tokens, services.upstreams.output_cap(spec))
            out = ask.n * (each or max(1, spec.context_window - prompt_tokens))
            worst = max(worst, spec.cost_usd(prompt_tokens, out))
    return worst


def constraints_of(
    services: Services, scope: Scope, model: str, router: RouterConstraints | None
) -> RouterConstraints:
    """The routing constraints: the virtual model's, overridden by the body's, then the headers'."""
    settings = services.settings
    spec = settings.model(model)
    if model != "auto" and model not in settings.virtual_models and spec is None:
        raise NotFound(
            f"The model '{model}' does not exist; GET /v1/models lists the models and virtual models",
            param="model",
            code="model_not_found",
        )
    if spec is not None and "chat" not in spec.capabilities:
        raise InvalidRequest(
            f"the model '{model}' does not chat (its capabilities: {', '.join(sorted(spec.capabilities))})",
            param="model",
            code="model_not_supported",
        )
    constraints = settings.virtual_models.get(model) or RouterConstraints()
    if router is not None:
        constraints = constraints.merged(router)
    from_headers = header_constraints(scope)
    if from_headers is not None:
        constraints = constraints.merged(from_headers)
    mode = constraints.dial_mode or settings.router_dial_mode
    if mode == "quality" and (constraints.dial_target or 0) > QUALITY_TARGET_MAX:
        raise InvalidRequest(
            f"a quality dial_target is a share of the best model's quality, at most {QUALITY_TARGET_MAX}",
            param="router.dial_target",
            code="invalid_value",
        )
    return constraints


@dataclass(frozen=True)
class Ask:
    """What a client asks for, as the router sees it (chat-shaped, whatever API it came in):
    `max_tokens` per choice (None: not said), `n` choices."""

    model: str
    router: RouterConstraints | None
    messages: list[dict[str, Any]]
    needs: frozenset[str]
    max_tokens: int | None
    n: int = 1


async def admit(
    services: Services, state: RequestState, scope: Scope, ask: Ask
) -> tuple[RouteContext, Decision]:
    """Size limits, the caller's limits, constraints, room to record the call, the router's
    decision and the budget reservation."""
    prompt_tokens = measure(services, ask.messages)
    most = prompt_tokens + output_tokens(services, ask.n, ask.max_tokens)
    budgets = state.policy is not None and bool(state.policy.budgets)
    if not budgets:
        await admit_limits(services.limits, state, most)  # before any routing work
    catalogue = {m.name for m in services.settings.models}
    constraints = narrow(
        state.key, ask.model, constraints_of(services, scope, ask.model, ask.router), catalogue
    )
    services.recorder.admit()  # no room to record the call: refuse it before it costs
    ctx = RouteContext(
        request_id=state.request_id,
        requested_model=ask.model,
        messages=ask.messages,
        constraints=constraints,
        needs=ask.needs,
        prompt_tokens=prompt_tokens,
        max_tokens=ask.max_tokens,
        tenant=state.tenant,
    )
    decision = await services.router.decide(ctx)
    decision.fallbacks = fallbacks_for(state.key, decision.fallbacks, catalogue)
    if budgets:  # the most it may cost is known once routed: one operation holds it all
        await admit_limits(
            services.limits, state, most, most_cost_usd(services, decision.chain, prompt_tokens, ask)
        )
    return ctx, decision


def refused(services: Services, state: RequestState, exc: GatewayError) -> None:
    """A call refused before any model was chosen: counted all the same, its tokens given back."""
    services.metrics.refused(exc.status)
    if state.reservation is not None:
        state.reservation.release()

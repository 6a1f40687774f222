"""Which arms may answer a request: capabilities it needs, a context window large enough for the
prompt, the caller's constraints (models, cost, latency, quality), and an available upstream (key
set, circuit closed). When the constraints leave no model, the error says which one excluded them
all (its text is built only then)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from gateway.catalogue import CAPABILITIES, ModelSpec, RouterConstraints
from gateway.domain import ArmStats
from gateway.errors import InvalidRequest, unavailable
from gateway.health import Unavailable
from gateway.routing import RouteContext
from gateway.spelling import unknown


class Availability(Protocol):
    def is_available(self, name: str) -> bool: ...

    def why_unavailable(self, name: str) -> Unavailable | None: ...

    def in_flight(self, name: str) -> int: ...


def _keep(arms: list[str], ok: Callable[[str], bool], why: Callable[[], str], param: str) -> list[str]:
    """The arms that pass `ok`; none is a 400 that says `why()`."""
    kept = [a for a in arms if ok(a)]
    if not kept:
        raise InvalidRequest(why(), param=param, code="no_eligible_model")
    return kept


def _bounded(
    arms: list[str],
    value: Callable[[str], float],
    ok: Callable[[float], bool],
    nearest: Callable[..., str],
    why: Callable[[str, float], str],
    param: str,
) -> list[str]:
    """The arms whose `value` is `ok`; none is a 400 naming the arm `nearest` to passing."""
    values = {a: value(a) for a in arms}
    best = nearest(arms, key=values.__getitem__)
    return _keep(arms, lambda a: ok(values[a]), lambda: why(best, values[best]), param)


def eligible(
    names: list[str],
    ctx: RouteContext,
    c: RouterConstraints,
    specs: Mapping[str, ModelSpec],
    stats: Mapping[str, ArmStats],
    *,
    cost: Callable[[str], float],
    quality: Callable[[str], float],
    availability: Availability,
) -> list[str]:
    if c.models:
        strangers = [m for m in c.models if m not in specs]
        if strangers:
            raise InvalidRequest(
                f"router.models: {unknown('model', strangers[0], specs)}",
                param="router.models",
                code="invalid_value",
            )
        names = [n for n in names if n in c.models]
        if not names:
            raise InvalidRequest(
                "router.models: none of the allowed models is in the chosen policy",
                param="router.models",
                code="no_eligible_model",
            )
    if c.capability:
        known = set(CAPABILITIES).union(*(s.capabilities for s in specs.values()))
        for capability in c.capability:
            if capability not in known:
                raise InvalidRequest(
                    f"router.capability: {unknown('capability', capability, known)}",
                    param="router.capability",
                    code="invalid_value",
                )
    needs = set(ctx.needs - {"streaming"}) | set(c.capability)
    arms = names
    if needs:
        arms = _keep(
            arms,
            lambda a: needs <= specs[a].capabilities,
            lambda: (
                f"no model among {', '.join(arms)} has the capabilities this request needs: "
                f"{', '.join(sorted(needs))}"
            ),
            "router.capability",
        )
    needed = ctx.prompt_tokens + (ctx.max_tokens or 0)
    arms = _keep(
        arms,
        lambda a: specs[a].context_window >= needed,
        lambda: (
            f"the prompt (about {ctx.prompt_tokens} tokens"
            + (f" + max_tokens {ctx.max_tokens}" if ctx.max_tokens else "")
            + f") does not fit the context window of any model (largest: "
            f"{max(specs[a].context_window for a in arms)})"
        ),
        "messages",
    )
    if c.max_cost_usd is not None:
        limit = c.max_cost_usd
        arms = _bounded(
            arms,
            cost,
            lambda v: v <= limit,
            min,
            lambda cheapest, v: (
                f"max_cost_usd={limit:g} excludes every model: the cheapest, {cheapest}, costs an "
                f"estimated ${v:.6g} for this request"
            ),
            "router.max_cost_usd",
        )
    if c.max_latency_ms is not None:
        limit_ms = c.max_latency_ms

        def fast(a: str) -> bool:
            s = stats.get(a)
            return s is None or s.latency_ms_avg is None or s.latency_ms_avg <= limit_ms

        arms = _keep(
            arms,
            fast,
            lambda: (
                f"max_latency_ms={limit_ms:g} excludes every model: none has answered that fast on average"
            ),
            "router.max_latency_ms",
        )
    if c.min_quality is not None:
        floor = c.min_quality
        arms = _bounded(
            arms,
            quality,
            lambda v: v >= floor,
            max,
            lambda best, v: (
                f"min_quality={floor:g} excludes every model: the best, {best}, has an estimated "
                f"quality of {v:.3f}"
            ),
            "router.min_quality",
        )
    available = [a for a in arms if availability.is_available(a)]
    if not available:
        why = {a: availability.why_unavailable(a) for a in arms}
        reasons = "; ".join(f"{a}: {r}" for a, r in why.items())
        kinds = {r.kind if r else "" for r in why.values()}
        raise unavailable(f"no eligible model is available: {reasons}", kinds)
    return available

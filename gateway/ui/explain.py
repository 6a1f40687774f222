"""What the router believes: each model's posterior quality with its credible interval and its
traffic (GET /ui/api/router), and "why this model" for a typed prompt (POST /ui/api/explain).

"Why this model" runs the gateway's own Router.decide on the prompt, exactly as a chat request
would be routed (rules, routes, eligibility, the policy's posteriors and its Thompson draw), and
stops there: no upstream is called and nothing is recorded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from gateway.api import admin_only, json_response
from gateway.api.admission import constraints_of, measure
from gateway.errors import InvalidRequest
from gateway.routing import RouteContext
from gateway.routing.bandit import Posterior
from gateway.schemas import ChatRequest, parse_json_object, validate
from gateway.ui.params import checked, window
from gateway.wire import needs_of

LEVEL = 0.95
_Z = 1.959963984540054  # the standard normal's 97.5% quantile


def credible_interval(p: Posterior, draws: int = 20_000) -> tuple[float, float]:
    """The central 95% interval of a posterior as the bandit samples it (a Normal clipped to
    [0, 1], or a Beta: its quantiles from a fixed-seed sample, good to about 0.003)."""
    if p.kind == "normal":
        return max(0.0, min(1.0, p.a - _Z * p.b)), max(0.0, min(1.0, p.a + _Z * p.b))
    sample = np.random.default_rng(0).beta(p.a, p.b, draws)
    low, high = np.quantile(sample, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(low), float(high)


def _posterior(p: Posterior) -> dict[str, Any]:
    low, high = credible_interval(p)
    return {"kind": p.kind, "a": p.a, "b": p.b, "mean": p.mean, "low": low, "high": high}


async def router(request: Request) -> Response:
    """Per model: the global posterior of its quality (every rated call) with a 95% credible
    interval, its ratings and cost, and in the window its share of routed traffic and how much of
    that was exploration."""
    gw = admin_only(request)
    w = window(checked(request.query_params), "7d")
    if gw.router.clock() - gw.router.stats_at >= gw.settings.stats_refresh_s:
        await gw.router.refresh_stats()  # as routing would: an idle gateway's view may be old
    traffic: dict[str, dict[str, int]] = {}
    for r in await gw.store.call_buckets(w):
        if r.model is not None:
            t = traffic.setdefault(r.model, {"requests": 0, "routed": 0, "explored": 0})
            t["requests"] += r.requests
            t["routed"] += r.routed
            t["explored"] += r.explored
    routed = sum(t["routed"] for t in traffic.values())
    arms = []
    for spec in gw.settings.models:
        if spec.name not in gw.router.chat_models:
            continue  # an embeddings model is no arm of the router
        stats = gw.router.stats.get(spec.name)
        why = gw.upstreams.why_unavailable(spec.name)
        t = traffic.get(spec.name, {"requests": 0, "routed": 0, "explored": 0})
        arms.append(
            {
                "model": spec.name,
                "available": gw.upstreams.is_available(spec.name),
                "unavailable_because": why.reason if why is not None else None,
                "posterior": _posterior(gw.router.arms.posterior(spec.name)),
                "rated": stats.rated if stats else 0,
                "mean_score": stats.mean_score if stats else None,
                "calls": stats.calls if stats else 0,
                "cost_per_call_usd": stats.cost_usd_sum / stats.ok_calls
                if stats and stats.ok_calls
                else None,
                "latency_ms_avg": stats.latency_ms_avg if stats else None,
                **t,
                "share": t["routed"] / routed if routed else None,
                "exploration_rate": t["explored"] / t["routed"] if t["routed"] else None,
            }
        )
    s = gw.settings
    knobs = {
        k: getattr(s, k)
        for k in ("exploration_rate", "exploration_bonus", "feedback_weight", "latency_weight", "cost_weight")
    }
    return json_response(
        {
            "since": w.since,
            "until": w.until,
            "policy": s.router_policy,
            "knobs": knobs,
            "routed": routed,
            "arms": arms,
        }
    )


async def explain(request: Request) -> Response:
    """`{"prompt": "...", "model": "auto", "router": {...}}`: the decision the gateway would make
    for that prompt now (its draw is one of many: ask again and a close call may go the other way)."""
    gw = admin_only(request)
    data = parse_json_object(await request.body())
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("prompt must be a non-empty string", param="prompt", code="invalid_value")
    body: dict[str, Any] = {
        "model": data.get("model", "auto"),
        "messages": [{"role": "user", "content": prompt}],
    }
    if data.get("router") is not None:
        body["router"] = data["router"]
    req: ChatRequest = validate(ChatRequest, body)
    messages = body["messages"]
    ctx = RouteContext(
        request_id="explain",
        requested_model=req.model,
        messages=messages,
        constraints=constraints_of(gw, request.scope, req.model, req.router),
        needs=needs_of(body, messages),
        prompt_tokens=measure(gw, messages),
    )
    # every arm's propensity, which a call computes while it waits for its upstream: here, now
    decision = (await gw.router.decide(ctx)).resolve()
    candidates = {c["model"]: c for c in decision.candidates}
    order = [c["model"] for c in decision.candidates] or [v.name for v in decision.arms]
    views = {v.name: v for v in decision.arms}
    arms = [
        {
            "model": name,
            "chosen": name == decision.model,
            **({"posterior": _posterior(views[name].posterior)} if name in views else {}),
            **candidates.get(name, {}),
            **({"propensity": decision.propensities[name]} if name in decision.propensities else {}),
        }
        for name in order
    ]
    return json_response(
        {
            "prompt_tokens": ctx.prompt_tokens,
            "model": decision.model,
            "layer": decision.layer,
            "strategy": decision.strategy,
            "policy": decision.policy or gw.settings.router_policy,
            "rule": decision.rule,
            "propensity": decision.propensity,
            "explored": decision.explored,
            "fallbacks": decision.fallbacks,
            "timings_ms": {k: round(v, 3) for k, v in decision.timings.items()},
            "embedded": decision.embedding is not None,
            "embedder": decision.embedder,
            "arms": arms,
        }
    )

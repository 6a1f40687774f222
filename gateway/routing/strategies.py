"""The fixed strategies, selectable per request: deterministic picks over the eligible arms.

`bandit` (Thompson sampling, see `bandit.choose`) is the default for `auto`; these are for callers
who want a plain rule: the cheapest, the fastest, the best, a balance, turns, or the least busy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gateway.routing.bandit import ArmView, Choice, Knobs, normalise_cost, normalise_speed

INF = float("inf")


def _rank(arms: Sequence[ArmView], key: Callable[[int], Any]) -> list[int]:
    return sorted(range(len(arms)), key=key)


def rank(
    strategy: str,
    arms: Sequence[ArmView],
    knobs: Knobs,
    *,
    turn: int = 0,
    in_flight: Callable[[str], int] = lambda name: 0,
) -> Choice:
    quality = [a.posterior.mean for a in arms]
    cost = [a.cost_usd for a in arms]
    latency = [INF if a.latency_ms is None else a.latency_ms for a in arms]
    metric: list[float]
    if strategy == "cost_optimized":
        order = _rank(arms, lambda i: (cost[i], -quality[i]))
        metric = cost
    elif strategy == "latency_optimized":
        order = _rank(arms, lambda i: (latency[i], cost[i]))
        metric = latency
    elif strategy == "quality_optimized":
        order = _rank(arms, lambda i: (-quality[i], cost[i]))
        metric = quality
    elif strategy == "balanced":
        speed = normalise_speed([a.latency_ms for a in arms])
        costs = normalise_cost(cost)
        metric = [
            knobs.feedback_weight * quality[i]
            + knobs.latency_weight * speed[i]
            + knobs.cost_weight * costs[i]
            for i in range(len(arms))
        ]
        order = _rank(arms, lambda i: (-metric[i], cost[i]))
    elif strategy == "round_robin":
        n = len(arms)
        order = [(turn + j) % n for j in range(n)]
        metric = [float((i - turn) % n) for i in range(n)]
    elif strategy == "least_loaded":
        load = [in_flight(a.name) for a in arms]
        n = len(arms)
        order = _rank(arms, lambda i: (load[i], (i - turn) % n))
        metric = [float(v) for v in load]
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    candidates = [
        {
            "model": arms[i].name,
            "metric": None if metric[i] == INF else round(float(metric[i]), 6),
            "quality_mean": round(quality[i], 4),
            "cost_usd": cost[i],
            "latency_ms": arms[i].latency_ms,
        }
        for i in order
    ]
    return Choice(
        arm=arms[order[0]].name,
        explored=False,
        propensity=1.0,
        ranking=[arms[i].name for i in order],
        candidates=candidates,
    )

"""The fixed strategies, selectable per request: deterministic picks over the eligible arms.

`bandit` (the routing policy, see `gateway.routing.policies`) is the default for `auto`; these are
for callers who want a plain rule: the cheapest, the fastest, the best, a balance, turns, or the
least busy. Each is an ordering of the arms (best first) and the metric it ordered by.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.routing.bandit import ArmView, Choice, Knobs, normalise_cost, normalise_speed

INF = float("inf")


@dataclass(frozen=True)
class Inputs:
    arms: Sequence[ArmView]
    knobs: Knobs
    turn: int
    in_flight: Callable[[str], int]

    @property
    def quality(self) -> list[float]:
        return [a.posterior.mean for a in self.arms]

    @property
    def cost(self) -> list[float]:
        return [a.cost_usd for a in self.arms]


Ordering = tuple[list[int], list[float]]  # arm indices best first, and each arm's metric


def _sorted(inp: Inputs, key: Callable[[int], object]) -> list[int]:
    return sorted(range(len(inp.arms)), key=key)  # type: ignore[arg-type]


def cost_optimized(inp: Inputs) -> Ordering:
    quality, cost = inp.quality, inp.cost
    return _sorted(inp, lambda i: (cost[i], -quality[i])), cost


def latency_optimized(inp: Inputs) -> Ordering:
    cost = inp.cost
    latency = [INF if a.latency_ms is None else a.latency_ms for a in inp.arms]
    return _sorted(inp, lambda i: (latency[i], cost[i])), latency


def quality_optimized(inp: Inputs) -> Ordering:
    """The best estimate first; equal estimates (before any feedback every arm has the same prior)
    go by the catalogue's quality hint, then by price, dearer first: the market's own guess."""
    quality, cost = inp.quality, inp.cost
    hint = [-1.0 if a.hint is None else a.hint for a in inp.arms]
    return _sorted(inp, lambda i: (-quality[i], -hint[i], -cost[i])), quality


def balanced(inp: Inputs) -> Ordering:
    quality, cost, knobs = inp.quality, inp.cost, inp.knobs
    speed = normalise_speed([a.latency_ms for a in inp.arms])
    costs = normalise_cost(cost)
    metric = [
        knobs.feedback_weight * quality[i] + knobs.latency_weight * speed[i] + knobs.cost_weight * costs[i]
        for i in range(len(inp.arms))
    ]
    return _sorted(inp, lambda i: (-metric[i], cost[i])), metric


def round_robin(inp: Inputs) -> Ordering:
    n, turn = len(inp.arms), inp.turn
    return [(turn + j) % n for j in range(n)], [float((i - turn) % n) for i in range(n)]


def least_loaded(inp: Inputs) -> Ordering:
    n, turn = len(inp.arms), inp.turn
    load = [inp.in_flight(a.name) for a in inp.arms]
    return _sorted(inp, lambda i: (load[i], (i - turn) % n)), [float(v) for v in load]


STRATEGIES: dict[str, Callable[[Inputs], Ordering]] = {
    "cost_optimized": cost_optimized,
    "latency_optimized": latency_optimized,
    "quality_optimized": quality_optimized,
    "balanced": balanced,
    "round_robin": round_robin,
    "least_loaded": least_loaded,
}


def rank(
    strategy: str,
    arms: Sequence[ArmView],
    knobs: Knobs,
    *,
    turn: int = 0,
    in_flight: Callable[[str], int] = lambda name: 0,
) -> Choice:
    order_of = STRATEGIES.get(strategy)
    if order_of is None:
        raise ValueError(f"unknown strategy {strategy!r}")
    inp = Inputs(arms, knobs, turn, in_flight)
    order, metric = order_of(inp)
    quality, cost = inp.quality, inp.cost
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
    return Choice.deterministic([arms[i].name for i in order], candidates)

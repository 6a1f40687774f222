"""The router against the zero router, in shares of the best single model (issue 12).

Everything here is on the second half of the stream (after learning), as a share of what the best
single model (highest whole-file mean score; ties: the cheaper) scores and costs on the same
prompts: a point is (cost share, score share).

- The zero router: what a user gets without per-request routing, always one model or a random mix
  of two, at a given cost: the upper hull of the single models' points.
- A strategy's operating point, the zero router's hull at its cost share, and the lift: its score
  share minus that (positive: above the zero router).
- A strategy's hull (over a sweep's settings; a single replay is one point, so its hull is
  undefined below that point's cost share: n/a) at 10/20/35/50 % cost share, and the smallest cost
  share at which it reaches 95 % and 100 % of the best model's score (n/a when it never does).

The same arithmetic as the research prototype that set issue 12's targets (not in this repository).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.lab.report import Trace, hull
from gateway.providers.replay import ReplayData

CUTS = (0.10, 0.20, 0.35, 0.50)  # cost shares at which a hull is read
TARGETS = (0.95, 1.00)  # score shares whose cost is reported

Point = tuple[float, float]  # (cost share, score share)


def hull_at(h: Sequence[Point], cost: float) -> float:
    """The hull's score share at `cost`: NaN below its cheapest point (nothing there reaches that
    cost), flat beyond its dearest (spending more gains nothing), linear in between (a mix)."""
    if not h or math.isnan(cost) or cost < h[0][0] - 1e-12:
        return float("nan")
    return float(np.interp(cost, [p[0] for p in h], [p[1] for p in h]))


def cost_to_reach(h: Sequence[Point], share: float) -> float:
    """The smallest cost share at which the hull reaches `share` (NaN if it never does)."""
    if not h or h[-1][1] < share:
        return float("nan")
    if h[0][1] >= share:
        return h[0][0]
    j = next(k for k, p in enumerate(h) if p[1] >= share)
    (x0, y0), (x1, y1) = h[j - 1], h[j]
    return x0 + (share - y0) * (x1 - x0) / (y1 - y0)


def point(trace: Trace, best: Trace) -> Point:
    """A trace's (cost share, score share) of `best` on the same prompts (NaN where `best` is 0)."""
    cost, score = float(best.costs.mean()), float(best.scores.mean())
    return (
        float(trace.costs.mean()) / cost if cost else float("nan"),
        float(trace.scores.mean()) / score if score else float("nan"),
    )


def single_points(scores: np.ndarray, costs: np.ndarray, best: int) -> list[Point]:
    """Every single model's point on these prompts (rows), in shares of model `best`'s."""
    s, c = scores.mean(axis=0), costs.mean(axis=0)
    nan = float("nan")
    return [
        (float(c[j] / c[best]) if c[best] else nan, float(s[j] / s[best]) if s[best] else nan)
        for j in range(scores.shape[1])
    ]


@dataclass(frozen=True)
class Curve:
    """A hull over points, read at the CUTS and for the TARGETS."""

    hull: list[Point]

    @classmethod
    def of(cls, points: Sequence[Point]) -> Curve:
        finite = [p for p in points if not (math.isnan(p[0]) or math.isnan(p[1]))]
        return cls(hull(finite))

    def at(self, cost: float) -> float:
        return hull_at(self.hull, cost)

    def cost_for(self, share: float) -> float:
        return cost_to_reach(self.hull, share)

    def figures(self) -> dict[str, Any]:
        return {
            "hull": [[c, q] for c, q in self.hull],
            "hull_at_cost_share": {_key(x): _num(self.at(x)) for x in CUTS},
            "cost_share_for_score_share": {_key(q): _num(self.cost_for(q)) for q in TARGETS},
        }


def operating(p: Point, zero: Curve) -> dict[str, Any]:
    """A strategy's point, the zero router's hull at its cost share, and its lift over it."""
    z = zero.at(p[0])
    return {
        "cost_share": _num(p[0]),
        "score_share": _num(p[1]),
        "zero_router_at_cost": _num(z),
        "lift": _num(p[1] - z),
    }


def figures(points: Mapping[str, Point], zero: Curve) -> dict[str, Any]:
    """Per strategy its operating point and lift; and the hull of all of them, read."""
    return {
        "points": {name: operating(p, zero) for name, p in points.items()},
        **Curve.of(list(points.values())).figures(),
    }


def _key(share: float) -> str:
    return f"{round(share * 100)}%"


def _num(value: float) -> float | None:
    """JSON has no NaN: n/a is null."""
    return None if value is None or math.isnan(value) else float(value)


# --- the printed table

_HEAD = (
    f"{'':<22} {'cost%':>6} {'score%':>6} {'zero@c':>6} {'lift':>6} |"
    + "".join(f" {'@' + _key(x):>5}" for x in CUTS)
    + " | cost% for"
    + "".join(f" {_key(q):>5}" for q in TARGETS)
)


def _pc(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "   n/a"
    return f"{100 * value:+6.1f}" if signed else f"{100 * value:6.1f}"


def table(rows: Mapping[str, dict[str, Any]], note: str) -> str:
    """`rows`: name -> `figures()` (or `Curve.figures()`, a hull without points). One line each:
    the operating point, the zero router at its cost and the lift (when there is one point), and
    the hull's reads."""
    lines = [note, _HEAD]
    for name, f in rows.items():
        points = list(f.get("points", {}).values())
        op = points[0] if len(points) == 1 else {}
        cells = (
            f"{_pc(op.get('cost_share'))} {_pc(op.get('score_share'))} "
            f"{_pc(op.get('zero_router_at_cost'))} {_pc(op.get('lift'), signed=True)}"
            if op
            else f"{'':>6} {'':>6} {'':>6} {'':>6}"
        )
        at = "".join(f" {_pc(v)[1:]}" for v in f["hull_at_cost_share"].values())
        reach = "".join(f" {_pc(v)[1:]}" for v in f["cost_share_for_score_share"].values())
        lines.append(f"{name:<22} {cells} |{at} | {'':>9}{reach}")
    return "\n".join(lines)


def zero_router(data: ReplayData, order: Sequence[int], best: str) -> Curve:
    """The zero router on the second half of `order`, in shares of model `best`'s."""
    rows = np.asarray(order[len(order) // 2 :])
    return Curve.of(single_points(data.scores()[rows], data.costs()[rows], data.models.index(best)))

"""The lab's arithmetic: per-strategy summaries, shares of the best single model, regret against
the oracle, model shares over time, and RouterBench's AIQ of a cost-quality curve."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Trace:
    """One strategy's picks over the ordered stream, with what each pick scored and cost."""

    name: str
    picks: list[str]
    scores: np.ndarray
    costs: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def window(self, start: int, stop: int | None = None) -> Trace:
        return Trace(
            self.name, self.picks[start:stop], self.scores[start:stop], self.costs[start:stop], self.meta
        )


def summary(trace: Trace, best: Trace) -> dict[str, float]:
    """Mean score and cost, and both as shares of the best single model's on the same prompts."""
    score, cost = float(trace.scores.mean()), float(trace.costs.mean())
    best_score, best_cost = float(best.scores.mean()), float(best.costs.mean())
    return {
        "mean_score": score,
        "mean_cost_usd": cost,
        "score_share_of_best": score / best_score if best_score else float("nan"),
        "cost_share_of_best": cost / best_cost if best_cost else float("nan"),
        "n": len(trace.picks),
    }


def halves(trace: Trace, best: Trace) -> dict[str, dict[str, float]]:
    """The whole stream, and its second half (after learning)."""
    mid = len(trace.picks) // 2
    return {"all": summary(trace, best), "second_half": summary(trace.window(mid), best.window(mid))}


def regret(trace: Trace, oracle: Trace) -> np.ndarray:
    """Cumulative regret against the per-prompt oracle: the score left on the table."""
    return np.cumsum(oracle.scores - trace.scores)


def model_shares(trace: Trace, models: Sequence[str], windows: int = 20) -> dict[str, list[float]]:
    """For each of `windows` consecutive slices of the stream, the share of calls each model got."""
    n = len(trace.picks)
    edges = np.linspace(0, n, min(windows, n) + 1).astype(int)
    out: dict[str, list[float]] = {m: [] for m in models}
    for lo, hi in itertools.pairwise(edges):
        chunk = trace.picks[lo:hi]
        for m in models:
            out[m].append(chunk.count(m) / len(chunk) if chunk else 0.0)
    return out


def hull(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-decreasing upper convex hull of (cost, quality) points (RouterBench)."""
    pts = sorted(set(points))
    frontier: list[tuple[float, float]] = []
    for c, q in pts:  # non-decreasing: a dearer point must be better to count
        if frontier and q <= frontier[-1][1]:
            continue
        while frontier and frontier[-1][0] == c:
            frontier.pop()
        frontier.append((c, q))
    upper: list[tuple[float, float]] = []
    for p in frontier:  # upper hull (monotone chain)
        while len(upper) >= 2:
            (x1, y1), (x2, y2) = upper[-2], upper[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # upper[-1] is under the chord
                upper.pop()
            else:
                break
        upper.append(p)
    return upper


def aiq(points: Sequence[tuple[float, float]], c_lo: float | None = None, c_hi: float | None = None) -> float:
    """RouterBench's Average Improvement in Quality: the area under the hull between c_lo and c_hi
    divided by (c_hi - c_lo). By default the hull's own cost range; beyond its dearest point the
    curve stays flat (spending more gains nothing); c_lo may not be below its cheapest point."""
    h = hull(points)
    if not h:
        return float("nan")
    lo = h[0][0] if c_lo is None else max(c_lo, h[0][0])
    hi = h[-1][0] if c_hi is None else c_hi
    if hi <= lo:
        return h[-1][1] if len(h) == 1 or hi == lo else float("nan")
    xs = np.array([p[0] for p in h])
    ys = np.array([p[1] for p in h])
    grid = np.unique(np.concatenate([[lo, hi], xs[(xs > lo) & (xs < hi)]]))
    vals = np.interp(grid, xs, ys)  # flat beyond the last point
    return float(np.trapezoid(vals, grid) / (hi - lo))

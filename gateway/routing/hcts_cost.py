"""HCTS's cost correction: what a call of each arm really costs against its estimate, by prompt group.

The gateway's estimate of a call's cost before making it (`gateway.routing.stats`) knows the
prompt's length and each model's mean answer length, not that a model answers a multiple-choice
question in one token and a coding task in three hundred. On RouterBench gpt-4's calls cost about
$0.005 on ARC questions and $0.009 on MBPP tasks against one estimate from its mean answer: the
decision's cost penalty mis-prices both, and a budget's reference (the best arm's mean cost, read
from estimates on the prompts the router happened to send it) came out 7-23 % high, so a budget of
35 % spent 40 % of the best model's cost.

Every finished call's realised / estimated cost is kept per arm and per (coarse cluster, arm), and
a decision multiplies each arm's estimate by

    r(c, a) = (n_ca * own_ca + N0 * lean_c * f_a) / (n_ca + N0)

- own_ca: the mean of realised / estimated over the n_ca calls of arm a on prompts of coarse
  cluster c (a mean of ratios, not a ratio of sums: an arm's first calls, priced before its answer
  length was known, count as calls, not by the weight of their inflated estimates);
- f_a * lean_c: an arm factor times a cluster factor fitted to every cell at once, each shrunk to
  1 by N0 calls: an arm never sent a kind of prompt is read there as the other arms were (if
  they cost six times more on it than elsewhere, so does it).
N0 is COST_N0. The calls are kept (as many as the prompts' history) so that a re-clustering
rebuilds the cells; the ratios are recomputed every REFRESH calls, not on every decision.
"""

from __future__ import annotations

from typing import Any

import numpy as np

REFRESH = 16  # calls between recomputations of the ratios
ROUNDS = 5  # alternating updates of the arm and cluster factors
RATIO_MIN = 1e-3  # a call's realised / estimated cost is taken within [RATIO_MIN, 1 / RATIO_MIN]


class CostModel:
    def __init__(self, k: int, n0: float) -> None:
        self.k, self.n0 = k, n0
        self.g = np.zeros((2, k))  # per arm: calls, sum of realised / estimated
        self.c = np.zeros((2, 0, k))  # the same per (coarse cluster, arm)
        self.rows = np.zeros((64, 3))  # the calls: prompt's history row, arm, realised / estimated
        self.length = 0
        self._r: np.ndarray | None = None
        self._since = 0

    def add(self, cl: tuple[int, ...], seq: int, arm: int, estimate: float, cost: float) -> None:
        """A finished call: its realised cost and the estimate before any correction."""
        if not (estimate > 0 and np.isfinite(estimate) and np.isfinite(cost) and cost >= 0):
            return
        ratio = min(max(cost / estimate, RATIO_MIN), 1.0 / RATIO_MIN)
        self.g[:, arm] += (1.0, ratio)
        if cl and cl[0] < self.c.shape[1]:
            self.c[:, cl[0], arm] += (1.0, ratio)
        if self.length == len(self.rows):
            self.rows = np.concatenate([self.rows, np.zeros_like(self.rows)])
        self.rows[self.length] = (seq, arm, ratio)
        self.length += 1
        self._since += 1

    def ratio(self, cl: tuple[int, ...]) -> np.ndarray:
        """Per arm, the factor for estimates of prompts in clusters `cl` (all 1 before any call)."""
        if self._r is None or self._since >= REFRESH:
            self._r, self._since = self._ratios(), 0
        return self._r[cl[0] + 1 if cl and cl[0] + 1 < len(self._r) else 0]

    def _ratios(self) -> np.ndarray:
        """Row 0: no cluster known (the arms' own ratios); row 1 + c: coarse cluster c. The prior
        of a cell is an arm factor times a cluster factor, fitted to all cells together (a few
        rounds of alternating updates, each factor shrunk to 1 by N0 calls)."""
        n0 = self.n0
        n, s = self.g
        g = (s + n0) / (n + n0)
        cn, cs = self.c
        arm, lean = g.copy(), np.ones(len(cn))
        for _ in range(ROUNDS if len(cn) else 0):
            lean = (cs.sum(1) + n0) / ((cn * arm[None, :]).sum(1) + n0)
            arm = (s + n0) / ((cn * lean[:, None]).sum(0) + (n - cn.sum(0)) + n0)
        cells = (cs + n0 * lean[:, None] * arm[None, :]) / (cn + n0)
        return np.vstack([g[None, :], cells])

    def rebuild(self, coarse: np.ndarray, clusters: int, base: int, keep_from: int) -> None:
        """New clusters: `coarse[i]` is the coarse cluster (of `clusters`) of the prompts' history
        row `base + i`; calls on rows before `keep_from` (dropped from the history) are forgotten."""
        rows = self.rows[: self.length]
        rows = rows[rows[:, 0] >= keep_from]
        self.length = len(rows)
        self.rows[: self.length] = rows
        i = rows[:, 0].astype(np.int64) - base
        ok = (i >= 0) & (i < len(coarse))
        self.c = np.zeros((2, clusters, self.k))
        where, arm = coarse[i[ok]], rows[ok, 1].astype(np.int64)
        np.add.at(self.c[0], (where, arm), 1.0)
        np.add.at(self.c[1], (where, arm), rows[ok, 2])
        self._r = None

    def state(self) -> dict[str, Any]:
        return {"cost_g": self.g, "cost_c": self.c, "cost_rows": self.rows[: self.length]}

    def load(self, d: dict[str, Any]) -> None:
        if "cost_g" not in d:  # (a state saved before the costs were kept starts them afresh)
            return
        self.g = np.array(d["cost_g"], dtype=np.float64).reshape(2, self.k)
        self.c = np.array(d["cost_c"], dtype=np.float64).reshape(2, -1, self.k)
        rows = np.array(d["cost_rows"], dtype=np.float64).reshape(-1, 3)
        self.rows = np.zeros((max(64, len(rows)), 3))
        self.rows[: len(rows)], self.length = rows, len(rows)
        self._r = None

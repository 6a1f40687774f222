"""HCTS's cost correction: what a call of each arm really costs against its estimate, by prompt group.

The gateway's estimate of a call's cost before making it (`gateway.routing.stats`) knows the
prompt's length and each model's mean answer length, not that a model answers a multiple-choice
question in one token and a coding task in three hundred. On RouterBench gpt-4's calls cost about
$0.005 on ARC questions and $0.009 on MBPP tasks against one estimate from its mean answer: the
decision's cost penalty mis-prices both, and a budget's reference (the best arm's mean cost, read
from estimates on the prompts the router happened to send it) came out 7-23 % high, so a budget of
35 % spent 40 % of the best model's cost.

Every finished call's realised and estimated cost are kept per arm and per (cluster, arm), the
clusters of level COST_LEVEL (default 0, the coarse ones), and a decision multiplies each arm's
estimate by

    r(c, a) = (n_ca * own_ca + N0 * lean_c * f_a) / (n_ca + N0)

- own_ca: realised / estimated cost summed over the n_ca calls of arm a on prompts of cluster c
  (a ratio of sums, so that the corrected estimates' mean is the realised mean in money:
  a mean of ratios read llmrouter_dev's best model 12 % cheap, its small prompts' ratio weighing as
  much as its large ones'; the prompts an arm is sent within a cluster still differ from the
  cluster's: 4-6 % there at level 0, 1 % at level 1); an arm's first WARM calls weigh less
  (0, 1/WARM, 2/WARM, ...: they were priced before the estimates knew its answer lengths, up to
  20 times off, and measure that, not the prompts), and any call counts at most CAP times off
  either way;
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
CAP = 4.0  # a call's estimate counts at most CAP x its realised cost, and the other way round
WARM = 5  # an arm's first calls weigh 0, 1/WARM, 2/WARM, ... (its answer lengths were not yet known)


class CostModel:
    def __init__(self, k: int, n0: float, level: int = 0) -> None:
        if level < 0:
            raise ValueError(f"the cost cells' clustering level must be 0 or more, not {level}")
        self.k, self.n0, self.level = k, n0, level
        self.g = np.zeros((3, k))  # per arm: calls, estimated, realised (weighted, each within CAP)
        self.seen = np.zeros(k)  # calls per arm
        self.c = np.zeros((3, 0, k))  # the same per (cluster, arm)
        self.rows = np.zeros((64, 5))  # the calls: prompt's history row, arm, weight, estimated, realised
        self.length = 0
        self._r: np.ndarray | None = None
        self._since = 0

    def add(self, cl: tuple[int, ...], seq: int, arm: int, estimate: float, cost: float) -> None:
        """A finished call: its realised cost and the estimate before any correction."""
        if not (estimate > 0 and np.isfinite(estimate) and np.isfinite(cost) and cost > 0):
            return
        w = min(1.0, self.seen[arm] / WARM)
        self.seen[arm] += 1
        q, r = w * min(estimate, CAP * cost), w * min(cost, CAP * estimate)
        self.g[:, arm] += (w, q, r)
        c = self.cell(cl)
        if 0 <= c < self.c.shape[1]:
            self.c[:, c, arm] += (w, q, r)
        if self.length == len(self.rows):
            self.rows = np.concatenate([self.rows, np.zeros_like(self.rows)])
        self.rows[self.length] = (seq, arm, w, q, r)
        self.length += 1
        self._since += 1

    def ratio(self, cl: tuple[int, ...]) -> np.ndarray:
        """Per arm, the factor for estimates of prompts in clusters `cl` (all 1 before any call)."""
        if self._r is None or self._since >= REFRESH:
            self._r, self._since = self._ratios(), 0
        c = self.cell(cl)
        return self._r[c + 1 if 0 <= c < len(self._r) - 1 else 0]

    def cell(self, cl: tuple[int, ...]) -> int:
        """The cluster a prompt's costs are kept under: its cluster at LEVEL (the finest there is
        if fewer); -1 before any clustering."""
        return cl[min(self.level, len(cl) - 1)] if cl else -1

    def _ratios(self) -> np.ndarray:
        """Row 0: no cluster known (the arms' own ratios); row 1 + c: cluster c. The prior
        of a cell is an arm factor times a cluster factor, fitted to all cells together (a few
        rounds of alternating updates, each factor shrunk to 1 by N0 calls)."""
        n0 = self.n0

        def shrunk(n: np.ndarray, real: np.ndarray, expected: np.ndarray) -> np.ndarray:
            own = np.where(expected > 0, real / np.maximum(expected, 1e-300), 1.0)
            return np.where(n + n0 > 0, (n * own + n0) / np.maximum(n + n0, 1e-300), 1.0)

        n, q, r = self.g
        g = shrunk(n, r, q)
        cn, cq, cr = self.c
        arm, lean = g, np.ones(len(cn))
        for _ in range(ROUNDS if len(cn) else 0):
            lean = shrunk(cn.sum(1), cr.sum(1), (cq * arm[None, :]).sum(1))
            outside = q - cq.sum(0)  # calls made before any clusters
            arm = shrunk(n, r, (cq * lean[:, None]).sum(0) + outside)
        own = np.where(cq > 0, cr / np.maximum(cq, 1e-300), 0.0)
        prior = lean[:, None] * arm[None, :]
        cells = np.where(cn + n0 > 0, (cn * own + n0 * prior) / np.maximum(cn + n0, 1e-300), prior)
        return np.vstack([g[None, :], cells])

    def rebuild(self, assigned: np.ndarray, clusters: int, base: int, keep_from: int) -> None:
        """New clusters: `assigned[i]` is the cluster (of `clusters`, at the level `cell` reads) of
        the prompts' history row `base + i`; calls on rows before `keep_from` (dropped from the
        history) are forgotten."""
        rows = self.rows[: self.length]
        rows = rows[rows[:, 0] >= keep_from]
        self.length = len(rows)
        self.rows[: self.length] = rows
        i = rows[:, 0].astype(np.int64) - base
        ok = (i >= 0) & (i < len(assigned))
        self.c = np.zeros((3, clusters, self.k))
        where, arm = assigned[i[ok]], rows[ok, 1].astype(np.int64)
        for j in range(3):
            np.add.at(self.c[j], (where, arm), rows[ok, 2 + j])
        self._r = None

    def state(self) -> dict[str, Any]:
        rows = self.rows[: self.length]
        return {"cost_g": self.g, "cost_seen": self.seen, "cost_c": self.c, "cost_rows": rows}

    def load(self, d: dict[str, Any]) -> None:
        if "cost_g" not in d:  # (a state saved before the costs were kept starts them afresh)
            return
        self.g = np.array(d["cost_g"], dtype=np.float64).reshape(3, self.k)
        self.seen = np.array(d["cost_seen"], dtype=np.float64).reshape(self.k)
        self.c = np.array(d["cost_c"], dtype=np.float64).reshape(3, -1, self.k)
        rows = np.array(d["cost_rows"], dtype=np.float64).reshape(-1, 5)
        self.rows = np.zeros((max(64, len(rows)), 5))
        self.rows[: len(rows)], self.length = rows, len(rows)
        self._r = None

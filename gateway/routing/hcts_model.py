"""HCTS's model of quality: a Gaussian hierarchy over clusterings of the prompt space.

    level 0:  mu_a          ~ N(prior_a, PRIOR_VAR)            (arm a's mean over all prompts)
    level l:  mu_a(c_l(x))  ~ N(mu_a at level l-1, tau2_l)     (c_l(x): x's cluster at level l)
    score     ~ N(mu_a(c_L(x)), sigma2_a)

Spherical k-means at 4, 16, 64 clusters (at most #prompts / MIN_CLUSTER each), re-fitted on every prompt
seen on a doubling schedule, in a background thread (`snapshot` -> `hcts_math.compute_clusters` -> `apply`).
tau2_l is estimated by empirical Bayes against the within-cluster noise, so when the context carries nothing
the model collapses to the arms' global means. Level 0 is post-stratified over the coarse clusters (an arm's
raw mean is biased once routing depends on the prompt). A gate (safe fallback) keeps decisions on level 0
until a chi-square test finds the arms' means heterogeneous across the coarse clusters and the contextual
predictions are not significantly worse than the global ones on the rated calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.routing.hcts_cost import CostModel
from gateway.routing.hcts_math import Clustering, logit, onehot, shifted


@dataclass(frozen=True)
class HctsKnobs:
    """HCTS's knobs (the defaults came from issue 12's research; changes since: docs/hcts-notebook.md)."""

    levels: tuple[int, ...] = (4, 16, 64)  # k-means granularities; () = non-contextual
    min_cluster: int = 24  # a level has at most (#prompts seen) / MIN_CLUSTER clusters
    recluster_first: int = 64  # first re-clustering after this many prompts, then doubling ...
    recluster_max_gap: int = 16_384  # ... with at most this many prompts between two
    kmeans_iters: int = 12
    kmeans_sample: int = 8192  # k-means runs on at most this many prompts (then every one is assigned)
    prior_var: float = 0.05  # variance of an arm's global mean around its prior mean
    sigma2_floor: float = 0.01
    tau2_floor: float = 1e-4
    history_cap: int = 50_000  # prompts kept for re-clustering (oldest dropped)
    ts_scale: float = 0.3  # posterior sd multiplier of Thompson sampling, long run ...
    ts_boost: float = 2.7  # ... plus TS_BOOST * TS_N0 / (TS_N0 + prompts seen in x's coarse cluster)
    ts_n0: float = 100.0
    ts_level: int = 0  # the level whose posterior sd Thompson sampling draws with (-1: the finest)
    eps_max: float = 0.0  # uniform exploration: EPS_MIN + (EPS_MAX - EPS_MIN) sqrt(t0 / (t0 + rated))
    eps_min: float = 0.002  # keeps every eligible arm's propensity >= EPS_MIN / K (off-policy evaluation)
    eps_t0: float = 200.0
    min_ratings: int = 30  # an arm with fewer ratings than this is tried on a share of calls ...
    few_share: float = 0.2  # ... FEW_SHARE x (such arms / eligible arms), whatever it is believed
    few_calls: float = 1.0  # ... and fewer than FEW_CALLS x MIN_RATINGS calls (sparse feedback)
    quad_nodes: int = 20  # quadrature nodes per arm for the propensities
    gate: bool = True
    gate_z: float = 3.0
    gate_min: int = 30  # rated calls before the gate may open
    shared_offsets: bool = True  # a coarse cluster's difficulty, shared by the arms (see `glob`)
    offset_n0: float = 10.0  # pseudo-ratings shrinking a cluster's offset to 0 (a paired advantage too)
    # the dial's calibrator (gateway.routing.hcts_dial)
    lam0: float = 0.05
    lam_min: float = 1e-4
    lam_max: float = 1e3
    solve_every: int = 20  # calls of a dial between re-solves of its multiplier
    solve_buffer: int = 400  # recent prompts a re-solve uses
    solve_max_step: float = 0.25  # largest move of log(lam) per re-solve
    bias_halflife: float = 400.0  # EW window (ratings) of the chosen arm's (predicted - realised)
    explore_halflife: float = 100.0  # EW window (calls) of the exploration's predicted loss
    integral_max: float = 0.1  # |correction| cap (share units)
    cost_gain: float = 0.005  # a budget's integral: moved by this x (realised share - target) per call
    cost_integral_max: float = 0.25  # ... within +/- this share of the target
    dr_halflife: float = 1000.0  # EW window of the doubly robust arm means
    ref_cover: float = 0.5  # below this share of calls with propensity >= DR_CLIP, the best arm's
    # quality is at least its level-0 mean (its clipped DR mean leans on the model's predictions)
    dr_clip: float = 0.05  # propensities are clipped here in the doubly robust weights
    cost_n0: float = 20.0  # calls shrinking a cost ratio (gateway.routing.hcts_cost) ...
    cost_level: int = 0  # ... kept per cluster of this level
    ratio_calls: float = 20.0  # calls of the budget's reference arm before its own cost ratio is used
    pbest_every: int = 8  # ratings between updates of P(arm is best) when no dial re-solves


class History:
    """The prompts seen (for re-clustering) and the scores known for them (nan: unknown); rows are
    addressed by a sequence number that survives the oldest rows being dropped."""

    def __init__(self, dim: int, k: int) -> None:
        self.x = np.zeros((64, dim), dtype=np.float32)
        self.s = np.full((64, k), np.nan, dtype=np.float32)
        self.length = self.base = 0  # base: the sequence number of row 0

    def _room(self, extra: int) -> None:
        need = self.length + extra
        if need > len(self.x):
            size = max(need, 2 * len(self.x))
            x = np.zeros((size, self.x.shape[1]), dtype=np.float32)
            s = np.full((size, self.s.shape[1]), np.nan, dtype=np.float32)
            x[: self.length], s[: self.length] = self.x[: self.length], self.s[: self.length]
            self.x, self.s = x, s

    def append(self, x: np.ndarray, scores: np.ndarray | None = None) -> int:
        """Rows (one prompt or a batch); returns the first one's sequence number."""
        xs = np.atleast_2d(x)
        self._room(len(xs))
        i = self.length
        self.x[i : i + len(xs)] = xs
        self.s[i : i + len(xs)] = np.nan if scores is None else np.atleast_2d(scores)
        self.length += len(xs)
        return self.base + i

    def score(self, seq: int, arm: int, value: float) -> None:
        i = seq - self.base
        if 0 <= i < self.length:
            self.s[i, arm] = value

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x[: self.length], self.s[: self.length]

    def trim(self, cap: int) -> None:
        drop = self.length - cap
        if drop > 0:
            self.x[:cap], self.s[:cap] = self.x[drop : self.length], self.s[drop : self.length]
            self.length, self.base = cap, self.base + drop


class ClusterModel:
    def __init__(self, k: int, dim: int, knobs: HctsKnobs, prior: np.ndarray | None = None) -> None:
        self.k, self.dim, self.kn = k, dim, knobs
        # per-arm prior means (the catalogue's quality hints; nan: the pooled mean of all ratings)
        self.prior = np.full(k, np.nan) if prior is None else np.asarray(prior, dtype=np.float64)
        self.n, self.s, self.ss = np.zeros(k), np.zeros(k), np.zeros(k)
        self.history = History(dim, k)
        self.seen = 0  # prompts seen
        self.rated = 0
        self.next_recluster = knobs.recluster_first
        self.epoch = 0  # bumped by every re-clustering (a cluster index is valid within its epoch)
        self.cents: list[np.ndarray] = []
        self.allc = np.zeros((0, dim), dtype=np.float32)
        self.offsets = np.zeros(1, dtype=np.int64)
        self.ln: list[np.ndarray] = []  # ratings per (cluster, arm)
        self.ls: list[np.ndarray] = []  # score sums per (cluster, arm)
        self.lc: list[np.ndarray] = []  # prompts per cluster
        self.lq = np.zeros((0, k))  # squared score sums per (finest cluster, arm)
        self.tau2 = np.zeros(0)
        self.gd, self.gv, self.gn = 0.0, 0.0, 0  # the gate's prequential error differences
        self.use_ctx = not knobs.gate
        self._glob: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.p0 = np.zeros((0, k))  # each coarse cluster's prior per arm (set with `_glob`)
        self.cost = CostModel(k, knobs.cost_n0, knobs.cost_level)  # realised / estimated cost, by cluster

    # --- posteriors
    def sigma2(self) -> np.ndarray:
        """Per-arm noise: the pooled within-cluster variance at the finest level (the global
        variance includes the between-cluster part), shrunk to the arm's global variance."""
        n = self.n
        m = np.where(n > 0, self.s / np.maximum(n, 1), 0.5)
        var = np.where(n > 1, (self.ss - n * m * m) / np.maximum(n - 1, 1), 0.25)
        var = (var * np.maximum(n - 1, 0) + 0.25 * 2) / (np.maximum(n - 1, 0) + 2)
        if self.cents:
            nn, ss, qq = self.ln[-1], self.ls[-1], self.lq
            ok = nn >= 2
            within = np.where(ok, qq - ss * ss / np.maximum(nn, 1), 0.0).sum(0)
            dof = np.where(ok, nn - 1, 0.0).sum(0)
            var = (within + 5.0 * var) / (dof + 5.0)
        return np.asarray(np.maximum(var, self.kn.sigma2_floor))

    def glob(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Level 0 (mean, variance, noise) per arm, post-stratified over the coarse clusters.

        With SHARED_OFFSETS a coarse cluster's prior for an arm is its level-0 mean shifted (logit
        scale) by the cluster's offset: how far the arms rated there score from their level-0
        means, pooled over arms and shrunk by OFFSET_N0. An arm sent only the hard prompts is then
        not read as bad everywhere (the best arm, so starved, sank below the second best)."""
        if self._glob is None:
            kn = self.kn
            sig2 = self.sigma2()
            tot = self.n.sum()
            pooled = self.s.sum() / tot if tot > 0 else 0.5
            pm = np.where(np.isnan(self.prior), pooled, self.prior)
            prec = 1.0 / kn.prior_var + self.n / sig2
            m = (pm / kn.prior_var + self.s / sig2) / prec
            v = 1.0 / prec
            d = np.zeros(len(self.lc[0]) if self.cents else 0)
            if self.cents and self.lc[0].sum() > 0:
                w = self.lc[0] / self.lc[0].sum()
                nn, ss = self.ln[0], self.ls[0]
                p1, nn2, den = prec, nn + 2.0, nn.sum(1) + kn.offset_n0
                for _ in range(3 if kn.shared_offsets else 2):
                    prior = m
                    if kn.shared_offsets:
                        lm = logit(m)
                        d = (nn * (logit((ss + 2.0 * m) / nn2) - lm)).sum(1) / den
                        prior = shifted(lm, d[:, None])
                    pv = v + self.tau2[0]
                    p1 = 1.0 / pv + nn / sig2
                    m = w @ ((prior / pv + ss / sig2) / p1)
                v = (w * w) @ (1.0 / p1)
            self.p0 = shifted(logit(m), d[:, None]) if kn.shared_offsets else m + 0 * d[:, None]
            self._glob = (m, v, sig2)
        return self._glob

    def clusters(self, x: np.ndarray) -> tuple[int, ...]:
        if not self.cents:
            return ()
        sims = self.allc @ x
        o = self.offsets
        return tuple(int(np.argmax(sims[o[i] : o[i + 1]])) for i in range(len(self.cents)))

    def posterior(
        self, x: np.ndarray, cl: tuple[int, ...], spread: int = -1
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Global and contextual (mean, variance) per arm for prompt x in clusters `cl`; with
        0 <= `spread` < len(cl) the contextual variance is level `spread`'s (the finest's else)."""
        m0, v0, sig2 = self.glob()
        m, v = m0, v0
        vs = None
        for li, c in enumerate(cl):
            pv = v + self.tau2[li]
            prec = 1.0 / pv + self.ln[li][c] / sig2
            prior = self.p0[c] if li == 0 else m
            m = (prior / pv + self.ls[li][c] / sig2) / prec
            v = 1.0 / prec
            if li == spread:
                vs = v
        return m0, v0, m, v if vs is None else vs

    def predict(self, x: np.ndarray, upto: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Contextual (mean, variance), shape (B, K), for a batch; levels < `upto` only."""
        m0, v0, sig2 = self.glob()
        m = np.broadcast_to(m0, (len(x), self.k)).copy()
        v = np.broadcast_to(v0, (len(x), self.k)).copy()
        for li in range(len(self.cents) if upto is None else min(upto, len(self.cents))):
            c = np.argmax(x @ self.cents[li].T, axis=1)
            pv = v + self.tau2[li]
            prec = 1.0 / pv + self.ln[li][c] / sig2
            prior = self.p0[c] if li == 0 else m
            m = (prior / pv + self.ls[li][c] / sig2) / prec
            v = 1.0 / prec
        return m, v

    def decision_means(self, x: np.ndarray) -> np.ndarray:
        """(B, K) means the decisions use: contextual once the gate is open, else level 0."""
        if self.use_ctx:
            return self.predict(x)[0]
        return np.broadcast_to(self.glob()[0], (len(x), self.k))

    # --- learning
    def add_prompt(self, x: np.ndarray, cl: tuple[int, ...], epoch: int) -> int:
        """A prompt seen (rated or not); returns its history sequence number."""
        if epoch == self.epoch:
            for li, c in enumerate(cl):
                self.lc[li][c] += 1
        self.seen += 1
        return self.history.append(x)

    def add_rating(
        self,
        cl: tuple[int, ...],
        arm: int,
        score: float,
        previous: float | None,
        seq: int | None,
        m0: float,
        mc: float,
    ) -> None:
        """A rating (`previous`: the score it replaces); `m0`, `mc`: the global and contextual
        predictions for it before it was known (the gate's prequential test)."""
        y, first = float(score), previous is None
        old = 0.0 if previous is None else float(previous)
        if first:
            d = (y - m0) ** 2 - (y - mc) ** 2
            self.gd, self.gv, self.gn = self.gd + d, self.gv + d * d, self.gn + 1
            self.n[arm] += 1
            self.rated += 1
        self.s[arm] += y - old
        self.ss[arm] += y * y - old * old
        for li, c in enumerate(cl):
            self.ln[li][c, arm] += first
            self.ls[li][c, arm] += y - old
        if cl:
            self.lq[cl[-1], arm] += y * y - old * old
        if seq is not None:
            self.history.score(seq, arm, y)
        self._glob = None
        if first and self.kn.gate and self.rated % 16 == 0:
            self.update_gate()
        if first and self.cents and self.rated % 64 == 0:
            self.estimate_tau2()

    def fit_rows(self, x: np.ndarray, scores: np.ndarray) -> None:
        """Full-information rows (every arm's score per prompt, nan: unknown)."""
        known = ~np.isnan(scores)
        s0 = np.where(known, scores, 0.0)
        self.n += known.sum(0)
        self.s += s0.sum(0)
        self.ss += (s0 * s0).sum(0)
        self.rated += int(known.any(axis=1).sum())
        self.seen += len(x)
        self.history.append(x, scores)
        self._glob = None

    # --- re-clustering
    def due(self) -> bool:
        return self.seen >= self.next_recluster

    def snapshot(self) -> np.ndarray:
        """The prompts to cluster (a copy); schedules the next re-clustering."""
        self.next_recluster = self.seen + min(self.seen, self.kn.recluster_max_gap)
        return self.history.rows()[0].copy()

    def apply(self, result: Clustering) -> None:
        """Installs a re-clustering; the statistics are rebuilt from the history as it is now
        (prompts and ratings that came while k-means ran included)."""
        x, scores = self.history.rows()
        known = ~np.isnan(scores)
        s0 = np.where(known, scores, 0.0).astype(np.float64)
        self.cents = result.cents
        self.allc = np.concatenate(result.cents) if result.cents else np.zeros((0, self.dim), np.float32)
        self.offsets = np.cumsum([0] + [len(c) for c in result.cents])
        self.ln, self.ls, self.lc = [], [], []
        keep = self.history.base + max(0, self.history.length - self.kn.history_cap)  # calls kept: ...
        self.cost.rebuild(np.zeros(0, np.int64), 0, self.history.base, keep)  # ... their cells below
        cost_level = min(self.kn.cost_level, len(result.cents) - 1)
        for c, first in zip(result.cents, result.assigned, strict=True):
            a = np.concatenate([first, np.argmax(x[result.rows :] @ c.T, axis=1)])
            oh = onehot(a, len(c))
            if len(self.lc) == cost_level:
                self.cost.rebuild(a, len(c), self.history.base, keep)
            self.lc.append(oh.sum(0))
            self.ln.append(oh.T @ known.astype(np.float64))
            self.ls.append(oh.T @ s0)
            self.lq = oh.T @ (s0 * s0)
        self.tau2 = np.zeros(len(result.cents))
        self.epoch += 1
        self._glob = None
        self.estimate_tau2()
        self.history.trim(self.kn.history_cap)

    def estimate_tau2(self) -> None:
        """Empirical Bayes, level by level: the between-cluster variance of the arms' means around
        the parent level's prediction at the centroid (method of moments, pooled over arms)."""
        _, _, sig2 = self.glob()
        for li, c in enumerate(self.cents):
            mp, _ = self.predict(c, upto=li)
            if li == 0:
                mp = self.p0
            nn, ss = self.ln[li], self.ls[li]
            ok = nn >= 2
            if not ok.any():
                self.tau2[li] = self.kn.tau2_floor
                continue
            r2 = (ss[ok] / nn[ok] - mp[ok]) ** 2
            w = np.minimum(nn[ok], 50.0)
            noise = np.broadcast_to(sig2, nn.shape)[ok] / nn[ok]
            self.tau2[li] = max(float((w * (r2 - noise)).sum() / w.sum()), self.kn.tau2_floor)
            self._glob = None

    def heterogeneity_z(self) -> float:
        """z of a chi-square test that the arms' means differ across the coarse clusters."""
        if not self.cents:
            return 0.0
        _, _, sig2 = self.glob()
        nn, ss = self.ln[0], self.ls[0]
        tot = nn.sum(0)
        ok = tot >= 2
        ybar = np.where(ok, ss.sum(0) / np.maximum(tot, 1), 0.0)
        has = nn >= 1
        q = float((np.where(has, nn * (ss / np.maximum(nn, 1) - ybar) ** 2, 0.0).sum(0) / sig2)[ok].sum())
        df = float(np.maximum(has.sum(0) - 1, 0)[ok].sum())
        return (q - df) / math.sqrt(2 * df) if df > 0 else 0.0

    def update_gate(self) -> None:
        kn = self.kn
        not_worse = self.gd > -kn.gate_z * math.sqrt(self.gv)
        self.use_ctx = self.gn >= kn.gate_min and not_worse and self.heterogeneity_z() > kn.gate_z

    # --- state
    _ARRAYS = ("prior", "n", "s", "ss", "lq", "tau2")
    _SCALARS = ("seen", "rated", "next_recluster", "epoch", "gd", "gv", "gn", "use_ctx")

    def state(self) -> dict[str, Any]:
        x, s = self.history.rows()
        out: dict[str, Any] = {key: getattr(self, key) for key in self._ARRAYS + self._SCALARS}
        out.update(hx=x, hs=s, hbase=self.history.base, cents=self.cents, ln=self.ln, ls=self.ls, lc=self.lc)
        out.update(self.cost.state())
        return out

    def load(self, d: dict[str, Any]) -> None:
        for key in self._ARRAYS:
            setattr(self, key, np.array(d[key], dtype=np.float64))
        for key in self._SCALARS:
            setattr(self, key, type(getattr(self, key))(d[key]))
        self.history.length = 0
        self.history.append(np.asarray(d["hx"], np.float32).reshape(-1, self.dim), np.asarray(d["hs"]))
        self.history.base = int(d["hbase"])
        self.cents = [np.asarray(c, dtype=np.float32) for c in d["cents"]]
        self.allc = np.concatenate(self.cents) if self.cents else np.zeros((0, self.dim), np.float32)
        self.offsets = np.cumsum([0] + [len(c) for c in self.cents])
        self.ln = [np.asarray(a, dtype=np.float64) for a in d["ln"]]
        self.ls = [np.asarray(a, dtype=np.float64) for a in d["ls"]]
        self.lc = [np.asarray(a, dtype=np.float64) for a in d["lc"]]
        self.cost.load(d)
        self._glob = None

"""HCTS's dial: one number a user understands, honoured on average by a calibrated multiplier.

A decision maximises  quality - lam * cost_estimate / c_norm  (c_norm: the mean over arms of their
mean pre-call cost estimate, known from the prices before any feedback). The dial says what lam
must achieve:

- `quality` q (default 0.95): the router's mean score is q x the best single arm's mean score;
- `budget` b: the mean cost per call is b x the best arm's mean cost;
- `usd` u: the mean cost per call is u USD;
- `fixed` l: lam = l (no calibration; research sweeps).

Every SOLVE_EVERY calls of a dial its lam is re-solved (bisection) so that the greedy policy's
predicted quality (or cost) on the last SOLVE_BUFFER prompts meets the target, corrected for what
the greedy prediction misses (quality: the exponentially weighted gap between prediction and
outcome, the model's optimism, and the cost of exploring; budgets: the cost of exploring and an
integral of the realised overspend, see `Dial.cost`), moving log(lam) by at most SOLVE_MAX_STEP. The
best arm's quality is E[max] of the arms' means while they are uncertain (optimistic: dear arms get
explored rather than priced out), then the doubly robust mean (logged propensities) of the arm the
model deems best.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gateway.catalogue import QUALITY_TARGET_MAX, DialMode
from gateway.routing.hcts_math import argmax_probs, expected_max
from gateway.routing.hcts_model import ClusterModel, HctsKnobs

DIAL_MODES: tuple[DialMode, ...] = ("quality", "budget", "usd", "fixed")


@dataclass(frozen=True)
class DialSpec:
    mode: DialMode = "quality"
    target: float = 0.95

    def __post_init__(self) -> None:
        if self.mode not in DIAL_MODES:
            raise ValueError(f"dial mode must be one of {', '.join(DIAL_MODES)}, not {self.mode!r}")
        if not (math.isfinite(self.target) and self.target > 0):
            raise ValueError(f"dial target must be a positive number, not {self.target!r}")
        if self.mode == "quality" and self.target > QUALITY_TARGET_MAX:
            raise ValueError(
                f"a quality target is a share of the best model's quality, at most {QUALITY_TARGET_MAX}"
            )


class Reference:
    """What every dial measures against, shared: the arms' mean cost estimates, P(arm is the best),
    the best arm's quality, the doubly robust arm means, and the recent prompts."""

    def __init__(self, k: int, dim: int, knobs: HctsKnobs) -> None:
        self.kn = knobs
        self.nodes = np.linspace(-5.0, 5.0, knobs.quad_nodes)
        self.cest_sum, self.cest_cnt = np.zeros(k), np.zeros(k)
        self.pbest = np.full(k, 1.0 / k)  # P(arm is the best): the larger of two estimates (`refresh`)
        self.emax = 1.0
        self.dr, self.dr_w = np.zeros(k), 0.0
        self.cover = np.ones(k)  # EW share of rated calls on which an arm's propensity was >= DR_CLIP
        self.spent, self.quoted = np.zeros(k), np.zeros(k)  # realised and estimated cost of calls made
        self.rsum, self.rcnt = np.zeros((k, k)), np.zeros(k)  # [a, b]: a's ratings minus b's predictions
        self.bx = np.zeros((knobs.solve_buffer, dim), dtype=np.float32)
        self.bc = np.zeros((knobs.solve_buffer, k))
        self.bpos = self.blen = 0

    def book(self, x: np.ndarray, costs: np.ndarray, elig: np.ndarray) -> None:
        """A request's prompt and the cost estimates of its eligible arms."""
        self.cest_sum[elig] += costs[elig]
        self.cest_cnt[elig] += 1
        self.bx[self.bpos], self.bc[self.bpos] = x, costs
        self.bpos = (self.bpos + 1) % len(self.bx)
        self.blen = min(self.blen + 1, len(self.bx))

    def book_rows(self, x: np.ndarray, costs: np.ndarray) -> None:
        self.cest_sum += costs.sum(0)
        self.cest_cnt += len(costs)
        tail = min(len(x), len(self.bx))
        self.bx[:tail], self.bc[:tail] = x[-tail:], costs[-tail:]
        self.blen, self.bpos = tail, tail % len(self.bx)

    def c_norm(self) -> float:
        m = self.cest_sum / np.maximum(self.cest_cnt, 1)
        return float(max(m.mean(), 1e-300))

    def paid(self, arm: int, cost: float, quoted: float) -> None:
        """A finished call's realised cost and the estimate it was chosen on."""
        if quoted > 0 and math.isfinite(cost):
            self.spent[arm] += cost
            self.quoted[arm] += quoted

    def ref_cost(self, m: np.ndarray | None = None) -> float:
        """The budget's reference: the best arm's mean cost; while it is not identified, the
        dearest arm that may still be the best (optimistic: exploration is not priced out). In
        what calls really cost: the estimates (of output lengths, mostly) can be off by a share, and
        a budget read against an estimate 10 % high spends 10 % more than it says. The arm's own
        realised/estimated ratio once it has been paid for a while, else all arms' together."""
        m = self.cest_sum / np.maximum(self.cest_cnt, 1) if m is None else m
        plausible = self.pbest >= 0.05
        if not plausible.any():
            plausible = self.pbest >= self.pbest.max()
        a = int(np.flatnonzero(plausible)[np.argmax(m[plausible])])
        pooled = self.spent.sum() / self.quoted.sum() if self.quoted.sum() > 0 else 1.0
        own = self.quoted[a] / max(m[a], 1e-300)  # calls' worth of estimates behind its ratio
        ratio = self.spent[a] / self.quoted[a] if own >= self.kn.ratio_calls else pooled
        return float(max(m[a] * ratio, 1e-300))

    def update_dr(self, mdec: np.ndarray, arm: int, score: float, props: np.ndarray) -> None:
        dr = mdec.copy()
        dr[arm] += (score - mdec[arm]) / max(float(props[arm]), self.kn.dr_clip)
        w = 1.0 - 0.5 ** (1.0 / self.kn.dr_halflife)
        self.dr_w = self.dr_w * (1 - w) + w
        self.dr += (dr - self.dr) * w / self.dr_w
        self.cover += ((props >= self.kn.dr_clip) - self.cover) * w / self.dr_w

    def paired(self, mdec: np.ndarray, arm: int, score: float) -> None:
        """A first rating of a decision's arm, minus what the decision predicted for every arm on
        that prompt: how much better than each other arm it did on the prompts it was sent."""
        self.rsum[arm] += score - mdec
        self.rcnt[arm] += 1

    def update_pbest(self, model: ClusterModel) -> None:
        m0, v0, _ = model.glob()
        sd = np.sqrt(v0) + 1e-9
        self.pbest, _ = argmax_probs(m0, sd, self.nodes)
        self.emax = expected_max(m0, sd, self.nodes)

    def refresh(self, model: ClusterModel) -> tuple[np.ndarray, np.ndarray]:
        """Before a re-solve: predictions and costs of the recent prompts, and the best arm on them."""
        x, c = self.bx[: self.blen], self.bc[: self.blen]
        m = model.decision_means(x)
        _, v0, sig2 = model.glob()
        sd = np.sqrt(v0) + 1e-9
        cm = m.mean(axis=0)
        self.pbest, _ = argmax_probs(cm, sd, self.nodes)
        self.emax = expected_max(cm, sd, self.nodes)
        # P(best) also by each arm's paired advantage over the arm with the most ratings (whose
        # predictions are the best measure of how hard a prompt is): that arm's mean prediction on
        # the recent prompts plus the arm's mean rating minus that arm's predictions on the prompts
        # it was rated on. Routing chose by those predictions, so an arm sent only prompts hard for
        # every arm is not read as bad (the model's means, post-stratified on the coarse clusters
        # only, read llmrouter_dev's best model 0.42 for 0.62, and the budget's reference fell on a
        # cheap model for good). Its prior is the model's mean, worth OFFSET_N0 ratings plus the
        # arm's ratings that no decision chose (a warm start's rows, every arm's outcome known: free
        # of routing's choices, they count in full, so a few lucky ratings after a fit move nothing).
        # An arm plausible by either estimate counts.
        if self.rcnt.any():
            r, n = int(np.argmax(model.n)), self.rcnt
            n0 = self.kn.offset_n0 + np.maximum(model.n - n, 0.0)
            paired = (float(m[:, r].mean()) * n + self.rsum[:, r] + n0 * cm) / (n + n0)
            self.pbest = np.maximum(self.pbest, argmax_probs(paired, np.sqrt(sig2 / (n + n0)), self.nodes)[0])
        if self.dr_w > 0.5 and model.use_ctx:
            best = int(np.argmax(cm))
            self.emax = float(self.dr[best])
            if self.cover[best] < self.kn.ref_cover:  # starved: its DR mean leans on the model's
                self.emax = max(self.emax, float(model.glob()[0][best]))
        return m, c

    _ARRAYS = ("cest_sum", "cest_cnt", "pbest", "dr", "cover", "spent", "quoted", "rsum", "rcnt", "bx", "bc")
    _SCALARS = ("emax", "dr_w", "bpos", "blen")

    def state(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._ARRAYS + self._SCALARS}

    def load(self, d: dict[str, Any]) -> None:
        for key in self._ARRAYS:
            if key in d:  # (a state saved before `cover`, `spent` existed starts them afresh)
                setattr(self, key, np.array(d[key], dtype=getattr(self, key).dtype))
        for key in self._SCALARS:
            setattr(self, key, type(getattr(self, key))(d[key]))


class CostTicket(Protocol):
    quote: float  # the chosen arm's estimated cost
    gcost: float  # the greedy pick's
    ecost: float  # the decision's expected cost (nan: unknown)


def _ew(mean: float, weight: float, value: float, halflife: float) -> tuple[float, float]:
    """One step of an exponentially weighted mean (normalised by its weight, so that the first
    values are not pulled towards 0): the new mean and weight."""
    w = 1.0 - 0.5 ** (1.0 / halflife)
    weight = weight * (1 - w) + w
    return mean + (value - mean) * w / weight, weight


class Dial:
    """One dial setting's multiplier and its correction."""

    def __init__(self, spec: DialSpec, knobs: HctsKnobs) -> None:
        self.spec, self.kn = spec, knobs
        self.log_lam = math.log(spec.target if spec.mode == "fixed" else knobs.lam0)
        self.integ = self.bias = self.bias_w = 0.0
        self.xgap = self.xgap_w = 0.0  # EW (greedy pick's predicted quality - the decision's expected)
        self.calls = 0
        # At the last re-solve, a budget below what even the cheapest picks cost. Either the user
        # asked for less than the cheapest model costs, or the reference is wrong: an arm read best
        # while the best had only a few unlucky ratings (llmrouter_dev at 30 % feedback: a cheap
        # model, 35 % of whose cost buys nothing, the best read worse on 13 ratings), a belief the
        # starved budget never lets routing test. `Hcts` then gives the arms with fewer than
        # MIN_RATINGS ratings another FEW_CALLS x MIN_RATINGS calls of trials (in the first case
        # that is their cost, once).
        self.starved = False

    @property
    def lam(self) -> float:
        return math.exp(self.log_lam)

    def set_lam(self, lam: float) -> None:
        self.log_lam = min(math.log(self.kn.lam_max), max(math.log(self.kn.lam_min), math.log(lam)))

    def _quality_integ(self, emax: float) -> None:
        cap = self.kn.integral_max
        self.integ = min(cap, max(-cap, (self.bias + self.xgap) / max(emax, 1e-3)))

    def rated(self, predicted: float, score: float, emax: float) -> None:
        """A rated call of this dial: the gap between the chosen arm's predicted quality and the
        outcome (the model's optimism, measured on rated calls only)."""
        if self.spec.mode == "quality":
            self.bias, self.bias_w = _ew(self.bias, self.bias_w, predicted - score, self.kn.bias_halflife)
            self._quality_integ(emax)

    def explored(self, gap: float, emax: float) -> None:
        """A decision of this dial: what exploring cost by the model's own means (the greedy pick's
        predicted quality minus the propensity-weighted one), known without a rating and followed
        over a short window: it shrinks as the posteriors tighten, which a long window of rated
        outcomes would remember long after it has gone."""
        if self.spec.mode == "quality":
            self.xgap, self.xgap_w = _ew(self.xgap, self.xgap_w, gap, self.kn.explore_halflife)
            self._quality_integ(emax)

    def cost(self, realised: float, ticket: CostTicket, ref: Reference) -> None:
        """A finished call of this dial. Its correction has two parts: what exploring costs by the
        estimates (the decision's expected cost minus the greedy pick's: known at once and free of
        the realised costs' heavy tail, a dear model's call costing 15x a cheap one's; over a short
        window, as it shrinks), and an integral of the realised overspend (a dual variable, moved
        COST_GAIN x (realised share - target) per call): whatever else makes the realised mean
        miss the target (estimates of answer lengths, the solve's lag) moves it until it does not.
        """
        if self.spec.mode in ("budget", "usd"):
            unit = ref.ref_cost() if self.spec.mode == "budget" else 1.0
            cap = self.kn.integral_max * self.spec.target * 5
            if math.isfinite(ticket.ecost):
                gap = ticket.ecost - ticket.gcost
                self.xgap, self.xgap_w = _ew(self.xgap, self.xgap_w, gap, self.kn.explore_halflife)
            step = self.kn.cost_gain * (realised / unit - self.spec.target)
            icap = self.kn.cost_integral_max * self.spec.target  # (no wind-up from the first calls)
            self.bias = min(icap, max(-icap, self.bias + step))  # (`bias`: the integral, for a budget)
            self.integ = min(cap, max(-cap, self.bias + self.xgap / unit))

    def solve(self, m: np.ndarray, c: np.ndarray, ref: Reference, step: float | None = None) -> None:
        if self.spec.mode == "fixed" or len(m) == 0:
            return
        lam, self.starved = _solve(self.spec, m, c, ref, self.kn, self.integ)
        move = math.log(lam) - self.log_lam
        if step is not None:
            move = max(-step, min(step, move))
        self.set_lam(math.exp(self.log_lam + move))

    def state(self) -> dict[str, Any]:
        keys = ("log_lam", "integ", "bias", "bias_w", "xgap", "xgap_w", "calls", "starved")
        return {"mode": self.spec.mode, "target": self.spec.target, **{k: getattr(self, k) for k in keys}}

    @classmethod
    def from_state(cls, d: dict[str, Any], knobs: HctsKnobs) -> Dial:
        dial = cls(DialSpec(d["mode"], float(d["target"])), knobs)
        dial.log_lam, dial.integ = float(d["log_lam"]), float(d["integ"])
        dial.bias, dial.bias_w, dial.calls = float(d["bias"]), float(d["bias_w"]), int(d["calls"])
        dial.xgap, dial.xgap_w = float(d.get("xgap", 0.0)), float(d.get("xgap_w", 0.0))
        dial.starved = bool(d.get("starved", False))
        return dial


def solve_lambda(
    spec: DialSpec, m: np.ndarray, c: np.ndarray, ref: Reference, knobs: HctsKnobs, integ: float = 0.0
) -> float:
    """The multiplier with which the greedy policy meets the dial on predictions `m` (B, K) and
    cost estimates `c` (B, K)."""
    return _solve(spec, m, c, ref, knobs, integ)[0]


def _solve(
    spec: DialSpec, m: np.ndarray, c: np.ndarray, ref: Reference, knobs: HctsKnobs, integ: float = 0.0
) -> tuple[float, bool]:
    """`solve_lambda`, and whether a budget (a share of the reference arm's cost) is below what
    even the cheapest picks cost."""
    if spec.mode == "fixed":
        return spec.target, False
    cn = ref.c_norm()
    rows = np.arange(len(m))

    def picks(ll: float) -> np.ndarray:
        return np.asarray(np.argmax(m - math.exp(ll) * c / cn, axis=1))

    lo, hi = math.log(knobs.lam_min), math.log(knobs.lam_max)
    if spec.mode == "quality":
        goal = (spec.target + integ) * ref.emax

        def excess(ll: float) -> float:  # decreasing in ll
            return float(m[rows, picks(ll)].mean() - goal)
    else:
        unit = ref.ref_cost(c.mean(0)) if spec.mode == "budget" else 1.0
        budget = max(spec.target - integ, 1e-3 * spec.target) * unit
        floor = float(c[rows, picks(hi)].mean())  # what even the cheapest picks cost

        def excess(ll: float) -> float:  # budget left: increasing in ll
            return -float(budget - c[rows, picks(ll)].mean())

    starved = spec.mode == "budget" and spec.target * unit < floor
    if excess(lo) <= 0:
        return math.exp(lo), starved
    if excess(hi) >= 0:
        if spec.mode == "quality":
            return math.exp(hi), False
        # A budget below what even the cheapest picks cost: the smallest multiplier that makes
        # them, not LAM_MAX, whose penalty would drown the samples' spread for good (the arms
        # that may be better than believed would never be tried again, and a reference wrongly
        # set on a cheap arm could never be corrected).
        cheapest = floor * (1 + 1e-6)
        return math.exp(_bisect(lambda ll: float(c[rows, picks(ll)].mean()) - cheapest, lo, hi)), starved
    return math.exp(_bisect(excess, lo, hi)), starved


def _bisect(excess: Callable[[float], float], lo: float, hi: float) -> float:
    """The log-multiplier where `excess` (positive below it, not above) changes sign."""
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)

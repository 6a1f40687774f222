"""Off-policy estimators over logged calls: inverse propensity scoring (IPS), self-normalised IPS
(SNIPS) and doubly robust (DR), each with a confidence interval, and the diagnostics that say when
not to trust them (effective sample size, support, small propensities).

Inputs, for n logged calls and m arms (columns): the logged arm of each call, the logging
policy's propensity of every arm (`logged`, 0 where it could not pick the arm), the candidate's
(`target`), the observed outcome y of the logged arm (a score, or a cost), and a reward model's
prediction for every arm (`model`). With w_i = target[i, a_i] / logged[i, a_i]:

    IPS   = mean(w_i y_i)
    SNIPS = sum(w_i y_i) / sum(w_i)
    DR    = mean(sum_a target[i, a] model[i, a] + w_i (y_i - model[i, a_i]))

Intervals: "clt" is the normal approximation on the per-call terms (for SNIPS, its linearisation
w_i (y_i - SNIPS) / mean(w)); "bootstrap" resamples the calls (percentile interval). The terms are
a martingale difference sequence when the logging policy learned as it went, which the CLT covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import ndtri

Method = Literal["clt", "bootstrap"]
BOOTSTRAP_ROUNDS = 2000


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}

    def covers(self, x: float) -> bool:
        return self.low <= x <= self.high


@dataclass(frozen=True)
class Estimates:
    ips: Interval
    snips: Interval
    dr: Interval

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {"ips": self.ips.as_dict(), "snips": self.snips.as_dict(), "dr": self.dr.as_dict()}


def _normal(terms: np.ndarray, value: float, z: float) -> Interval:
    n = len(terms)
    se = float(np.std(terms, ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    return Interval(value, value - z * se, value + z * se)


def weights(chosen: np.ndarray, logged: np.ndarray, target: np.ndarray) -> np.ndarray:
    rows = np.arange(len(chosen))
    return target[rows, chosen] / logged[rows, chosen]


def estimate(
    chosen: np.ndarray,
    logged: np.ndarray,
    target: np.ndarray,
    y: np.ndarray,
    model: np.ndarray,
    *,
    confidence: float = 0.9,
    method: Method = "clt",
    rng: np.random.Generator | None = None,
) -> Estimates:
    rows = np.arange(len(chosen))
    w = weights(chosen, logged, target)
    direct = (target * model).sum(axis=1)
    ips_terms = w * y
    dr_terms = direct + w * (y - model[rows, chosen])
    ips = float(ips_terms.mean())
    dr = float(dr_terms.mean())
    snips = float(ips_terms.sum() / w.sum()) if w.sum() > 0 else float("nan")
    if method == "bootstrap":
        rng = rng if rng is not None else np.random.default_rng(0)
        idx = rng.integers(len(w), size=(BOOTSTRAP_ROUNDS, len(w)))
        tail = (1 - confidence) / 2 * 100
        with np.errstate(invalid="ignore", divide="ignore"):
            boots = {
                "ips": ips_terms[idx].mean(axis=1),
                "snips": ips_terms[idx].sum(axis=1) / w[idx].sum(axis=1),
                "dr": dr_terms[idx].mean(axis=1),
            }

        def pct(name: str, value: float) -> Interval:
            lo, hi = np.nanpercentile(boots[name], [tail, 100 - tail])
            return Interval(value, float(lo), float(hi))

        return Estimates(pct("ips", ips), pct("snips", snips), pct("dr", dr))
    z = float(ndtri(0.5 + confidence / 2))
    mean_w = float(w.mean())
    snips_terms = w * (y - snips) / mean_w if mean_w > 0 else np.full(len(w), np.nan)
    snips_ci = _normal(snips_terms, snips, z)
    return Estimates(_normal(ips_terms, ips, z), snips_ci, _normal(dr_terms, dr, z))


def observed(y: np.ndarray, *, confidence: float = 0.9) -> Interval:
    """What the logging policy itself got: the mean outcome, with its normal interval."""
    z = float(ndtri(0.5 + confidence / 2))
    return _normal(y, float(y.mean()), z)


@dataclass(frozen=True)
class Diagnostics:
    n: int
    effective_sample_size: float  # (sum w)^2 / sum w^2
    mean_weight: float  # near 1 when the propensities are right and the support is full
    max_weight: float
    unsupported_mass: float  # the candidate's share of picks the logging policy could not make
    small_propensity_mass: float  # its share on arms the logging policy picked with p < the floor
    unsupported_arms: dict[str, float]  # per arm, its share of those picks


def diagnose(
    chosen: np.ndarray,
    logged: np.ndarray,
    target: np.ndarray,
    arms: list[str],
    min_propensity: float,
) -> Diagnostics:
    w = weights(chosen, logged, target)
    unsupported = np.where(logged <= 0, target, 0.0)
    small = np.where((logged > 0) & (logged < min_propensity), target, 0.0)
    per_arm = unsupported.mean(axis=0)
    return Diagnostics(
        n=len(w),
        effective_sample_size=float(w.sum() ** 2 / (w * w).sum()) if (w * w).sum() > 0 else 0.0,
        mean_weight=float(w.mean()),
        max_weight=float(w.max()) if len(w) else 0.0,
        unsupported_mass=float(unsupported.sum(axis=1).mean()),
        small_propensity_mass=float(small.sum(axis=1).mean()),
        unsupported_arms={arms[j]: float(v) for j, v in enumerate(per_arm) if v > 0},
    )


def warnings_for(d: Diagnostics, min_propensity: float, min_ess: float = 30.0) -> list[str]:
    """Plain-language warnings: what makes an estimate untrustworthy, and how much."""
    out = []
    if d.unsupported_mass > 0.01:
        top = sorted(d.unsupported_arms.items(), key=lambda kv: -kv[1])[:3]
        where = ", ".join(f"{arm} ({share:.1%})" for arm, share in top)
        out.append(
            f"support: the candidate makes {d.unsupported_mass:.1%} of its picks where the logging policy "
            f"could not go ({where}); IPS and SNIPS count those as nothing, DR relies on its reward "
            "model there"
        )
    if d.small_propensity_mass > 0.1:
        out.append(
            f"small propensities: {d.small_propensity_mass:.1%} of the candidate's picks are arms the "
            f"logging policy chose with probability below {min_propensity:g} (largest weight "
            f"{d.max_weight:.0f}); the intervals are wide and may under-cover"
        )
    if d.effective_sample_size < max(min_ess, 0.05 * d.n):
        out.append(
            f"effective sample size {d.effective_sample_size:.0f} of {d.n} calls: the logs say little "
            "about this candidate; explore more (EXPLORATION_RATE) or evaluate a longer window"
        )
    return out

"""The bandit's pure core: posteriors, Thompson sampling, scores, propensities. No I/O, no clock;
all randomness comes from the numpy Generator passed in, so a seeded run is reproducible.

Two ways to form each arm's quality posterior for a request:
- kNN Thompson sampling (`knn_posteriors`): a Beta posterior from the similar past requests that
  have feedback, weighted by similarity, on top of a prior (OPTIMISTIC_PRIOR for an arm with little
  history, the arm's global mean once it has MIN_REQUESTS_FOR_GLOBAL rated calls). With too little
  context it falls back to each arm's global posterior.
- Linear Thompson sampling (`LinTS`): per-arm Bayesian ridge regression of the score on the
  embedding; the posterior of the predicted score for this request is a Normal.

Then `choose`: sample each posterior and score
    FEEDBACK_WEIGHT * quality + LATENCY_WEIGHT * speed + COST_WEIGHT * cost + bonus
with speed and cost normalised to [0, 1] across the eligible arms (speed 1 = fastest; cost 0 =
cheapest, on a log scale since prices span orders of magnitude; COST_WEIGHT is negative), a bonus
of EXPLORATION_BONUS for arms with little data, and with probability EXPLORATION_RATE a uniform
pick. Every arm's propensity (its probability of being picked) is computed, not resampled:
`gateway.routing.propensity`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.domain import ArmStats, Neighbour
from gateway.routing.propensity import Pending, Resolvable

COST_FLOOR_USD = 1e-7  # free arms sit at the floor of the log scale
MEAN_CLIP = 0.01  # prior means stay in [0.01, 0.99]: a Beta needs both parameters > 0


def _clip(m: float) -> float:
    return min(max(m, MEAN_CLIP), 1.0 - MEAN_CLIP)


@dataclass(frozen=True)
class Knobs:
    """The bandit's settings (defaults as Settings', which a test keeps in step)."""

    feedback_weight: float = 0.6
    latency_weight: float = 0.2
    cost_weight: float = -0.2
    exploration_rate: float = 0.02
    exploration_bonus: float = 0.1
    optimistic_prior: float = 0.8
    prior_strength: float = 2.0
    min_requests_for_global: int = 10
    min_similar_requests: int = 5
    min_confidence_score: float = 0.1
    propensity_samples: int = 4096  # resampling, only for a posterior kind without a computation

    @classmethod
    def from_settings(cls, settings: Any) -> Knobs:
        return cls(**{f: getattr(settings, f) for f in cls.__dataclass_fields__ if hasattr(settings, f)})


@dataclass(frozen=True)
class Posterior:
    """Beta(a, b), or Normal(a, b) = mean and standard deviation, clipped to [0, 1] when sampled."""

    kind: str
    a: float
    b: float

    @property
    def mean(self) -> float:
        if self.kind == "beta":
            return self.a / (self.a + self.b)
        return min(1.0, max(0.0, self.a))

    def sample(self, rng: np.random.Generator, n: int | None = None) -> Any:
        if self.kind == "beta":
            return rng.beta(self.a, self.b, size=n)
        return np.clip(rng.normal(self.a, self.b, size=n), 0.0, 1.0)


@dataclass
class ArmView:
    """What the policy knows about one eligible arm for this request."""

    name: str
    posterior: Posterior
    rated: int = 0
    latency_ms: float | None = None
    cost_usd: float = 0.0
    evidence: float = 0.0  # contextual evidence weight (kNN), for the record
    hint: float | None = None  # the catalogue's prior guess of quality (`quality:`)


@dataclass
class Choice:
    """A pick, its propensity, the arms ranked (fallbacks follow the pick), and per arm what the
    record keeps. `propensities` holds every eligible arm's probability of being picked (what
    off-policy evaluation needs); a deterministic pick is {arm: 1}. A policy that cannot say
    leaves it empty, and its decisions cannot be evaluated off-line. A Thompson pick leaves the
    computation `pending` until `resolve()` (the decision does not wait for it)."""

    arm: str
    explored: bool
    propensity: float | None
    ranking: list[str]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    propensities: dict[str, float] = field(default_factory=dict)
    propensity_error: float = 0.0  # each of `propensities` is within about this of the truth
    pending: Resolvable | None = None

    @classmethod
    def deterministic(cls, ranking: list[str], candidates: list[dict[str, Any]] | None = None) -> Choice:
        return cls(ranking[0], False, 1.0, ranking, candidates or [], {ranking[0]: 1.0})

    def resolve(self) -> Choice:
        if self.pending is not None:
            self.propensities, self.propensity_error = self.pending.resolve()
            self.propensity = self.propensities[self.arm]
            self.pending = None
        return self


def quality_prior(stats: ArmStats | None, knobs: Knobs, hint: float | None = None) -> float:
    """The prior mean of an arm's quality: its global mean once it has enough rated calls,
    else the optimistic prior (or the catalogue's hint for the arm)."""
    if stats is not None and stats.rated >= max(1, knobs.min_requests_for_global):
        return _clip(stats.score_sum / stats.rated)
    return _clip(knobs.optimistic_prior if hint is None else hint)


def global_posterior(stats: ArmStats | None, knobs: Knobs, hint: float | None = None) -> Posterior:
    """Beta posterior of an arm's quality from all its rated calls, on an optimistic prior."""
    m = _clip(knobs.optimistic_prior if hint is None else hint)
    s = knobs.prior_strength
    rated = stats.rated if stats else 0
    total = stats.score_sum if stats else 0.0
    return Posterior("beta", m * s + total, (1 - m) * s + max(rated - total, 0.0))


def knn_posteriors(
    names: Sequence[str],
    stats: dict[str, ArmStats],
    neighbours: Sequence[Neighbour],
    knobs: Knobs,
    hints: dict[str, float | None] | None = None,
) -> tuple[list[Posterior], list[float], bool, float]:
    """Per arm: (posteriors, contextual evidence weights, whether context was used, confidence).

    Context counts when there are at least MIN_SIMILAR_REQUESTS neighbours and the confidence
    W / (W + PRIOR_STRENGTH), W the total similarity, reaches MIN_CONFIDENCE_SCORE.
    """
    hints = hints or {}
    weight = sum(max(n.similarity, 0.0) for n in neighbours)
    confidence = weight / (weight + knobs.prior_strength) if weight > 0 else 0.0
    use_context = (
        len(neighbours) >= max(1, knobs.min_similar_requests) and confidence >= knobs.min_confidence_score
    )
    if not use_context:
        return (
            [global_posterior(stats.get(n), knobs, hints.get(n)) for n in names],
            [0.0] * len(names),
            False,
            confidence,
        )
    alpha: dict[str, float] = {}
    beta: dict[str, float] = {}
    for nb in neighbours:
        w = max(nb.similarity, 0.0)
        alpha[nb.model] = alpha.get(nb.model, 0.0) + w * nb.score
        beta[nb.model] = beta.get(nb.model, 0.0) + w * (1.0 - nb.score)
    out = []
    evidence = []
    s = knobs.prior_strength
    for name in names:
        m = quality_prior(stats.get(name), knobs, hints.get(name))
        a, b = alpha.get(name, 0.0), beta.get(name, 0.0)
        out.append(Posterior("beta", m * s + a, (1 - m) * s + b))
        evidence.append(a + b)
    return out, evidence, True, confidence


class LinTS:
    """Linear Thompson sampling: per arm, Bayesian ridge regression of score on [embedding, 1].

    Model: score = OPTIMISTIC_PRIOR + w . [x, 1] + noise, w ~ N(0, I / ridge). Only the scalar
    prediction for this request's x is sampled, N(mu . x, v^2 x' A^-1 x), which is exact for
    Thompson sampling and costs O(d^2) instead of a d x d Cholesky per arm. A^-1 is kept with
    Sherman-Morrison updates. A re-rated call moves only b (same x, same A).
    """

    def __init__(
        self,
        dim: int = 384,
        ridge: float = 1.0,
        noise: float = 0.25,
        prior_mean: float = 0.8,
        bias_ridge: float | None = None,
    ) -> None:
        self.dim = dim + 1
        self.ridge = ridge
        self.bias_ridge = ridge if bias_ridge is None else bias_ridge
        self.noise = noise
        self.prior_mean = prior_mean
        self.a_inv: dict[str, np.ndarray] = {}
        self.b: dict[str, np.ndarray] = {}
        self.n: dict[str, int] = {}

    def _x(self, x: np.ndarray) -> np.ndarray:
        return np.append(np.asarray(x, dtype=np.float64), 1.0)

    def _arm(self, arm: str) -> tuple[np.ndarray, np.ndarray]:
        if arm not in self.a_inv:
            # The intercept (an arm's overall quality) can have a weaker prior than the weights on
            # the embedding (how its quality varies with the request).
            self.a_inv[arm] = np.diag(np.append(np.full(self.dim - 1, 1 / self.ridge), 1 / self.bias_ridge))
            self.b[arm] = np.zeros(self.dim)
            self.n[arm] = 0
        return self.a_inv[arm], self.b[arm]

    def update(
        self, arm: str, x: np.ndarray, score: float, previous: float | None = None, weight: float = 1.0
    ) -> None:
        """One observation, with `weight` (a re-rating: the weight it was absorbed with)."""
        a_inv, b = self._arm(arm)
        xv = self._x(x)
        if previous is not None:  # a re-rating: same x, only the target changes
            b += weight * (score - previous) * xv
            return
        ax = a_inv @ xv
        a_inv -= weight * np.outer(ax, ax) / (1.0 + weight * (xv @ ax))
        b += weight * (score - self.prior_mean) * xv
        self.n[arm] += 1

    def forget(self, arm: str, x: np.ndarray, score: float, weight: float = 1.0) -> None:
        """Takes an observation out again (it left the recency window): Sherman-Morrison backwards."""
        if arm not in self.a_inv:
            return
        a_inv, b = self.a_inv[arm], self.b[arm]
        xv = self._x(x)
        ax = a_inv @ xv
        denominator = 1.0 - weight * (xv @ ax)
        if denominator <= 1e-9:  # numerically unsafe: keep the observation rather than break A
            return
        a_inv += weight * np.outer(ax, ax) / denominator
        b -= weight * (score - self.prior_mean) * xv
        self.n[arm] = max(0, self.n[arm] - 1)

    def update_many(self, arm: str, xs: np.ndarray, scores: np.ndarray) -> None:
        """Many new observations at once (a replica warming up): one inversion instead of one
        Sherman-Morrison step each; the same result."""
        if len(xs) < 64:
            for x, score in zip(xs, scores, strict=True):
                self.update(arm, x, float(score))
            return
        a_inv, b = self._arm(arm)
        design = np.hstack([np.asarray(xs, dtype=np.float64), np.ones((len(xs), 1))])
        precision = np.linalg.inv(a_inv) + design.T @ design
        self.a_inv[arm] = np.linalg.inv(precision)
        b += design.T @ (np.asarray(scores, dtype=np.float64) - self.prior_mean)
        self.n[arm] += len(xs)

    def posterior(self, arm: str, x: np.ndarray) -> Posterior:
        a_inv, b = self._arm(arm)
        xv = self._x(x)
        ax = a_inv @ xv
        mean = self.prior_mean + float(ax @ b)  # mu . x with mu = A^-1 b
        std = self.noise * math.sqrt(max(float(xv @ ax), 1e-12))
        return Posterior("normal", mean, std)


def normalise_speed(latencies: Sequence[float | None]) -> np.ndarray:
    """1 for the fastest arm, 0 for the slowest; arms never observed get the middle of the known."""
    known = [v for v in latencies if v is not None]
    if len(known) < 2 or max(known) == min(known):
        return np.full(len(latencies), 0.5)
    lo, hi = min(known), max(known)
    fill = float(np.median(known))
    vals = np.array([fill if v is None else v for v in latencies], dtype=np.float64)
    return (hi - vals) / (hi - lo)


def normalise_cost(costs: Sequence[float]) -> np.ndarray:
    """0 for the cheapest arm, 1 for the dearest, on a log scale."""
    logs = np.log(np.asarray(costs, dtype=np.float64) + COST_FLOOR_USD)
    lo, hi = float(logs.min()), float(logs.max())
    if hi - lo < 1e-12:
        return np.zeros(len(costs))
    return (logs - lo) / (hi - lo)


def bonus(rated: int, knobs: Knobs) -> float:
    """EXPLORATION_BONUS, fading linearly to 0 as an arm reaches MIN_REQUESTS_FOR_GLOBAL ratings."""
    if knobs.min_requests_for_global <= 0:
        return 0.0
    return knobs.exploration_bonus * max(0.0, 1.0 - rated / knobs.min_requests_for_global)


def choose(arms: Sequence[ArmView], knobs: Knobs, rng: np.random.Generator) -> Choice:
    """Thompson sampling over `arms` (at least one)."""
    k = len(arms)
    speed = normalise_speed([a.latency_ms for a in arms])
    cost = normalise_cost([a.cost_usd for a in arms])
    fixed = (
        knobs.latency_weight * speed
        + knobs.cost_weight * cost
        + np.array([bonus(a.rated, knobs) for a in arms])
    )
    samples = np.array([a.posterior.sample(rng) for a in arms], dtype=np.float64)
    scores = knobs.feedback_weight * samples + fixed
    explored = bool(rng.random() < knobs.exploration_rate)
    pick = int(rng.integers(k)) if explored else int(np.argmax(scores))
    pending = Pending(
        [a.name for a in arms],
        [a.posterior for a in arms],
        fixed,
        knobs.feedback_weight,
        knobs.exploration_rate,
        knobs.propensity_samples,
    )
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    if explored:
        order = [pick, *(i for i in order if i != pick)]
    candidates = [
        {
            "model": arms[i].name,
            "score": round(float(scores[i]), 4),
            "quality_sample": round(float(samples[i]), 4),
            "quality_mean": round(arms[i].posterior.mean, 4),
            "speed": round(float(speed[i]), 4),
            "cost": round(float(cost[i]), 4),
            "bonus": round(bonus(arms[i].rated, knobs), 4),
            "evidence": round(arms[i].evidence, 3),
        }
        for i in order
    ]
    return Choice(
        arm=arms[pick].name,
        explored=explored,
        propensity=None,
        ranking=[arms[i].name for i in order],
        candidates=candidates,
        pending=pending,
    )

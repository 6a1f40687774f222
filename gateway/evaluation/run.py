"""An evaluation, end to end: read the logs (`load`, I/O), embed what the logs lack (`vectors`),
then decide and estimate (`compute`, CPU: the admin endpoint runs it on a worker thread).

The question each estimate answers: what would the candidate have scored and cost, on average
per call, on the window's rated calls, had it decided them with what the gateway had learned
when the window began, frozen (no learning during the window)? The logging policy's own figures
(what it got, learning as it went) stand beside them; the current settings, frozen the same
way, are always evaluated too, so that the difference learning makes is visible.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from gateway.config import Settings
from gateway.domain import StoredCall
from gateway.embedder import Embedder, routing_text
from gateway.embedders import embedder_id
from gateway.errors import InvalidRequest
from gateway.evaluation import estimators, reward
from gateway.evaluation.candidate import Candidate, Decided, decide_all, settings_of, texts_needed
from gateway.evaluation.estimators import Diagnostics, Estimates, Interval, Method
from gateway.evaluation.logs import LoggedCall, Window, snapshot, split
from gateway.store import LogStore

QUESTION = (
    "mean score and cost per call on the window's rated calls, had each candidate decided them "
    "with the state learned from the logs before the window, frozen (no learning in the window)"
)
CURRENT = Candidate("current settings", {})


@dataclass(frozen=True)
class Question:
    since: datetime
    until: datetime
    candidates: list[Candidate]
    caller: str | None = None
    train_since: datetime | None = None  # default: since - RECENCY_DAYS
    confidence: float = 0.9
    interval: Method = "clt"
    min_propensity: float = 0.01
    max_calls: int = 100_000
    include_current: bool = True


@dataclass
class Loaded:
    window: Window
    before: list[StoredCall]
    train_since: datetime


@dataclass
class CandidateResult:
    candidate: Candidate
    n: int  # calls it decided (the others it refused)
    score: Estimates
    cost: Estimates
    diagnostics: Diagnostics
    warnings: list[str]
    decided: Decided
    target: np.ndarray  # calls x arms: its propensities (rows of refused calls are zero)

    def as_dict(self) -> dict[str, Any]:
        d = self.diagnostics
        return {
            "name": self.candidate.name,
            "settings": self.candidate.overrides,
            "calls": self.n,
            "score": self.score.as_dict(),
            "cost_usd": self.cost.as_dict(),
            "diagnostics": {
                "effective_sample_size": d.effective_sample_size,
                "mean_weight": d.mean_weight,
                "max_weight": d.max_weight,
                "unsupported_mass": d.unsupported_mass,
                "unsupported_arms": d.unsupported_arms,
                "small_propensity_mass": d.small_propensity_mass,
                "propensity_error_max": max(self.decided.errors, default=0.0),
            },
            "refused": self.decided.refused,
            "layers": self.decided.layers,
            "seconds": round(self.decided.seconds, 2),
            "warnings": self.warnings,
        }


@dataclass
class Report:
    question: Question
    train_since: datetime
    arms: list[str]
    calls: int
    skipped: dict[str, int]
    logged_score: Interval
    logged_cost: Interval
    logged_propensity_error: float
    logged_layers: dict[str, int]
    candidates: list[CandidateResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    window_calls: list[LoggedCall] = field(default_factory=list, repr=False)
    # the reward models' predictions (calls x arms), for whoever wants other estimators
    score_model: np.ndarray | None = field(default=None, repr=False)
    cost_model: np.ndarray | None = field(default=None, repr=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything the estimates were computed from, per call (for `np.savez`)."""
        col = {a: j for j, a in enumerate(self.arms)}
        calls = self.window_calls
        out = {
            "arms": np.array(self.arms),
            "chosen": np.array([col[c.arm] for c in calls]),
            "logged": _matrix([c.propensities for c in calls], self.arms),
            "score": np.array([c.score for c in calls]),
            "cost_usd": np.array([c.cost_usd for c in calls]),
            "ids": np.array([c.id for c in calls]),
        }
        if self.score_model is not None and self.cost_model is not None:
            out["score_model"], out["cost_model"] = self.score_model, self.cost_model
        for n, c in enumerate(self.candidates):
            out[f"target_{n}"] = c.target
        return out

    def as_dict(self) -> dict[str, Any]:
        q = self.question
        return {
            "question": QUESTION,
            "window": {
                "since": q.since.isoformat(),
                "until": q.until.isoformat(),
                "caller": q.caller,
                "state_learned_from": self.train_since.isoformat(),
            },
            "calls": self.calls,
            "skipped": self.skipped,
            "confidence": q.confidence,
            "interval": {
                "clt": "normal approximation on the per-call terms (SNIPS: its linearisation)",
                "bootstrap": f"percentile bootstrap over calls ({estimators.BOOTSTRAP_ROUNDS} rounds)",
            }[q.interval],
            "arms": self.arms,
            "logged": {
                "score": self.logged_score.as_dict(),
                "cost_usd": self.logged_cost.as_dict(),
                "propensity_error_max": self.logged_propensity_error,
                "layers": self.logged_layers,
            },
            "candidates": [c.as_dict() for c in self.candidates],
            "warnings": self.warnings,
        }


async def load(store: LogStore, base: Settings, q: Question) -> Loaded:
    if q.until <= q.since:
        raise InvalidRequest("until must be after since", param="until", code="invalid_value")
    train_since = q.train_since or q.since - timedelta(days=base.recency_days)
    if train_since > q.since:
        raise InvalidRequest("train_since must not be after since", param="train_since", code="invalid_value")
    window, before = await split(store.iter_calls(train_since, q.until), q.since, q.caller)
    if len(window.calls) > q.max_calls:
        raise InvalidRequest(
            f"the window holds {len(window.calls)} rated calls, more than {q.max_calls}: narrow it",
            param="since",
            code="window_too_large",
        )
    return Loaded(window, before, train_since)


def candidates_of(q: Question) -> list[Candidate]:
    found = [CURRENT, *q.candidates] if q.include_current else list(q.candidates)
    names = [c.name for c in found]
    for name in names:
        if names.count(name) > 1:
            raise InvalidRequest(
                f"two candidates are named {name!r}", param="candidates", code="invalid_value"
            )
    if not found:
        raise InvalidRequest("no candidate to evaluate", param="candidates", code="invalid_value")
    return found


async def vectors(
    loaded: Loaded, base: Settings, q: Question, embedder: Embedder | None
) -> dict[str, np.ndarray]:
    """Every text a candidate may embed: the logged embeddings (of the configured embedder only:
    another's are in another space), and the rest embedded now."""
    calls = loaded.window.calls
    current = embedder_id(base)
    out = {
        routing_text(c.context.messages, base.embedding_max_chars): c.embedding
        for c in calls
        if c.embedding is not None and c.embedder == current
    }
    wanted: set[str] = set()
    for cand in candidates_of(q):
        wanted.update(t for t in texts_needed(settings_of(base, cand.overrides), calls) if t)
    missing = sorted(wanted - out.keys())
    if missing and embedder is None:
        raise InvalidRequest(
            f"{len(missing)} texts have no logged embedding and no embedder is loaded",
            code="embeddings_missing",
        )
    for start in range(0, len(missing), 64):
        chunk = missing[start : start + 64]
        assert embedder is not None
        out.update(zip(chunk, await embedder.embed(chunk), strict=True))
    return out


def _matrix(rows: Sequence[Mapping[str, float] | None], arms: list[str]) -> np.ndarray:
    col = {a: j for j, a in enumerate(arms)}
    out = np.zeros((len(rows), len(arms)))
    for i, row in enumerate(rows):
        for arm, p in (row or {}).items():
            out[i, col[arm]] = p
    return out


async def compute(
    loaded: Loaded,
    base: Settings,
    q: Question,
    vecs: dict[str, np.ndarray],
    progress: Callable[[int], None] | None = None,
) -> Report:
    calls = loaded.window.calls
    if len(calls) < 2:
        raise InvalidRequest(
            f"the window holds {len(calls)} rated calls with propensities: nothing to evaluate"
            f" (left out: {loaded.window.skipped})",
            param="since",
            code="window_empty",
        )
    store = await snapshot(loaded.before, q.since)
    decided: list[tuple[Candidate, Decided]] = []
    for cand in candidates_of(q):
        settings = settings_of(base, cand.overrides)
        decided.append((cand, await decide_all(settings, store, calls, vecs, progress)))
    arms = sorted(
        {a for c in calls for a in c.propensities}
        | {c.arm for c in calls}
        | {a for _, d in decided for row in d.propensities for a in (row or {})}
    )
    logged = _matrix([c.propensities for c in calls], arms)
    chosen = np.array([arms.index(c.arm) for c in calls])
    score = np.array([c.score for c in calls])
    cost = np.array([c.cost_usd for c in calls])
    score_model, cost_model = reward.fit(calls, loaded.before, arms, {m.name: m for m in base.models})
    report = Report(
        question=q,
        train_since=loaded.train_since,
        arms=arms,
        calls=len(calls),
        skipped=loaded.window.skipped,
        logged_score=estimators.observed(score, confidence=q.confidence),
        logged_cost=estimators.observed(cost, confidence=q.confidence),
        logged_propensity_error=max(c.propensity_error for c in calls),
        logged_layers=_count(c.layer or "?" for c in calls),
        window_calls=list(calls),
        score_model=score_model,
        cost_model=cost_model,
    )
    for cand, d in decided:
        target = _matrix(d.propensities, arms)
        keep = np.array([p is not None for p in d.propensities])
        if keep.sum() < 2:
            raise InvalidRequest(f"candidate {cand.name!r} refused the window's calls", code="not_evaluable")
        args = (chosen[keep], logged[keep], target[keep])
        rng = np.random.default_rng(0)
        s = estimators.estimate(
            *args, score[keep], score_model[keep], confidence=q.confidence, method=q.interval, rng=rng
        )
        c = estimators.estimate(
            *args, cost[keep], cost_model[keep], confidence=q.confidence, method=q.interval, rng=rng
        )
        diag = estimators.diagnose(*args, arms, q.min_propensity)
        warnings = estimators.warnings_for(diag, q.min_propensity)
        if not keep.all():
            warnings.append(
                f"refused {int((~keep).sum())} of {len(keep)} calls ({_codes(d.refused)}): the estimates "
                "cover the calls it would have served"
            )
        report.candidates.append(CandidateResult(cand, int(keep.sum()), s, c, diag, warnings, d, target))
    if report.logged_propensity_error > 0.01:
        report.warnings.append(
            f"logged propensities carry a numerical error up to {report.logged_propensity_error:.3g}"
        )
    return report


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _codes(refused: dict[str, int]) -> str:
    return ", ".join(f"{code}: {n}" for code, n in sorted(refused.items()))

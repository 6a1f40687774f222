"""The reward models of the doubly robust estimator, fitted on the logs.

Score: per arm, a ridge regression of the score on the call's embedding (with the arm's mean as
intercept), cross-fitted: the window's calls are split in two folds, and each fold is predicted
by a model fitted on the calls before the window and on the other fold, so that no call's own
score enters its prediction. An arm without rated calls is predicted at the mean of all scores;
a call without an embedding at its arm's mean.

Cost: what the catalogue's prices make of the call's prompt tokens and the arm's average
completion length in the logs (the arithmetic the router uses to estimate a cost); an arm the
catalogue does not price is predicted at its mean logged cost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gateway.catalogue import ModelSpec
from gateway.domain import StoredCall
from gateway.evaluation.logs import LoggedCall
from gateway.routing.stats import DEFAULT_COMPLETION_TOKENS

RIDGE = 1.0
FOLDS = 2


@dataclass
class Example:
    arm: str
    x: np.ndarray | None
    score: float | None
    cost: float
    completion_tokens: int | None


def examples_before(calls: Sequence[StoredCall]) -> list[Example]:
    """What the calls before the window teach the reward models (their effective scores now)."""
    out = []
    for c in calls:
        rec = c.record
        if rec.model is None or rec.kind == "judge" or rec.status != "ok":
            continue
        x = None if rec.embedding is None else np.asarray(rec.embedding, dtype=np.float64)
        out.append(Example(rec.model, x, c.score, float(rec.cost_usd or 0.0), rec.completion_tokens))
    return out


def _example(c: LoggedCall) -> Example:
    x = None if c.embedding is None else c.embedding.astype(np.float64)
    return Example(c.arm, x, c.score, c.cost_usd, c.completion_tokens)


def _fit_scores(train: list[Example], arms: Sequence[str], xs: np.ndarray, has_x: np.ndarray) -> np.ndarray:
    """Predicted scores (len(xs) x arms)."""
    rated = [e for e in train if e.score is not None]
    overall = float(np.mean([e.score for e in rated])) if rated else 0.5
    out = np.full((len(xs), len(arms)), overall)
    for j, arm in enumerate(arms):
        mine = [e for e in rated if e.arm == arm]
        if not mine:
            continue
        mean = float(np.mean([e.score for e in mine]))
        out[:, j] = mean
        with_x = [e for e in mine if e.x is not None]
        if not with_x or not has_x.any():
            continue
        design = np.stack([e.x for e in with_x])  # type: ignore[misc]
        y = np.array([e.score for e in with_x]) - mean
        gram = design.T @ design + RIDGE * np.eye(design.shape[1])
        beta = np.linalg.solve(gram, design.T @ y)
        out[has_x, j] = mean + xs[has_x] @ beta
    return np.clip(out, 0.0, 1.0)


def _fit_costs(
    train: list[Example], arms: Sequence[str], prompt_tokens: np.ndarray, specs: Mapping[str, ModelSpec]
) -> np.ndarray:
    out = np.zeros((len(prompt_tokens), len(arms)))
    for j, arm in enumerate(arms):
        mine = [e for e in train if e.arm == arm]
        spec = specs.get(arm)
        if spec is None:
            out[:, j] = float(np.mean([e.cost for e in mine])) if mine else 0.0
            continue
        lengths = [e.completion_tokens for e in mine if e.completion_tokens is not None]
        completion = float(np.mean(lengths)) if lengths else float(DEFAULT_COMPLETION_TOKENS)
        out[:, j] = (prompt_tokens * spec.input_usd_per_mtok + completion * spec.output_usd_per_mtok) / 1e6
    return out


def fit(
    window: Sequence[LoggedCall],
    before: Sequence[StoredCall],
    arms: Sequence[str],
    specs: Mapping[str, ModelSpec],
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fitted predictions of every arm's score and cost for every call of the window."""
    n = len(window)
    prior = examples_before(before)
    mine = [_example(c) for c in window]
    dim = next((len(c.embedding) for c in window if c.embedding is not None), 1)
    xs = np.zeros((n, dim))
    has_x = np.array([c.embedding is not None for c in window], dtype=bool)
    for i, c in enumerate(window):
        if c.embedding is not None:
            xs[i] = c.embedding
    tokens = np.array([c.prompt_tokens for c in window], dtype=np.float64)
    fold = np.random.default_rng(seed).permutation(n) % FOLDS
    scores = np.zeros((n, len(arms)))
    costs = np.zeros((n, len(arms)))
    for f in range(FOLDS):
        rows = np.flatnonzero(fold == f)
        if not len(rows):
            continue
        train = prior + [mine[i] for i in np.flatnonzero(fold != f)]
        scores[rows] = _fit_scores(train, arms, xs[rows], has_x[rows])
        costs[rows] = _fit_costs(train, arms, tokens[rows], specs)
    return scores, costs

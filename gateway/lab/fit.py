"""`llm-router fit FILE ...`: HCTS's starting state from replay-format files (a user's own eval of
their candidate models on their prompts: every model's outcome known for every prompt), written to
ROUTER_STATE_PATH (default DATA_DIR/router_state.npz). A gateway whose catalogue has the same models
starts from it and keeps learning online. A record's `task` is never read: the router finds the
structure in the embeddings itself."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.config import Settings
from gateway.embedders import open_encoder
from gateway.lab import baselines
from gateway.lab.runner import embeddings_for
from gateway.providers.replay import Record, load
from gateway.routing import hcts_state
from gateway.routing.bandit import Knobs
from gateway.routing.hcts import Hcts
from gateway.routing.hcts_policy import default_dial
from gateway.routing.stats import ArmStatsCache


@dataclass(frozen=True)
class Fitted:
    path: Path
    models: list[str]
    prompts: int
    clusters: list[int]
    contextual: bool  # the gate opened on the fitted rows (the clusters predict better than the means)
    lam: float


def fit(files: list[str], settings: Settings, out: Path | None = None, seed: int = 0) -> Fitted:
    datasets = [load(f) for f in files]
    models = datasets[0].models
    for d in datasets[1:]:
        if sorted(d.models) != sorted(models):
            raise ValueError(f"{d.path} has other models ({', '.join(d.models)}) than {datasets[0].path}")
    xs, scores, costs, estimates = [], [], [], []
    encoder = open_encoder(settings, threads=2)  # the configured EMBEDDER: the gateway's space
    answers = answer_lengths([r for d in datasets for r in d.records], models)
    for d in datasets:
        _, vectors = embeddings_for(d, settings.data_dir / "lab-cache", settings.embedding_max_chars, encoder)
        order = [d.models.index(m) for m in models]
        xs.append(vectors)
        scores.append(d.scores()[:, order])
        costs.append(d.costs()[:, order])
        estimates.append(pre_call_estimates(d.records, models, settings, answers))
    path = out or hcts_state.state_file(settings)
    x, s, c = np.concatenate(xs), np.concatenate(scores), np.concatenate(costs)
    return fit_rows(models, x, s, c, settings, path, encoder.id, seed, answers, np.concatenate(estimates))


def fit_rows(
    models: list[str],
    x: np.ndarray,
    scores: np.ndarray,
    costs: np.ndarray,
    settings: Settings,
    path: Path,
    embedder: str,
    seed: int = 0,
    answers: dict[str, float] | None = None,
    estimates: np.ndarray | None = None,
) -> Fitted:
    """HCTS fitted on full-information rows (`x`: the prompts' embeddings by `embedder`; `scores`,
    `costs`: every model's, in the order of `models`; `answers`: each model's mean completion
    tokens there, see `answer_lengths`; `estimates`: the gateway's cost estimates before each
    call, see `pre_call_estimates`), stored at `path`. `fit` for files; the lab's
    warm-start check for the first half of its stream."""
    x = unit_rows(x)
    quality = {m.name: m.quality for m in settings.models}
    prior = np.array([np.nan if quality.get(m) is None else quality[m] for m in models], dtype=np.float64)
    policy = Hcts(len(models), x.shape[1], seed, dial=default_dial(settings), prior=prior)
    policy.fit(x, scores, costs, estimates)
    hcts_state.save(policy, models, path, embedder=embedder, answers=answers)
    return Fitted(
        path, models, len(x), [len(c) for c in policy.model.cents], policy.model.use_ctx, policy.dial().lam
    )


def answer_lengths(records: Sequence[Record], models: list[str]) -> dict[str, float]:
    """Each model's mean completion tokens over `records` (the outcomes that report them)."""
    out = {}
    for m in models:
        counts = [
            o.completion_tokens
            for r in records
            if (o := r.outcomes.get(m)) and o.completion_tokens is not None
        ]
        if counts:
            out[m] = float(np.mean(counts))
    return out


def pre_call_estimates(
    records: Sequence[Record], models: list[str], settings: Settings, answers: dict[str, float]
) -> np.ndarray:
    """(records, models): the cost the gateway estimates for a call before making it, by its own
    estimator (`ArmStatsCache.estimated_cost`, with the answer lengths a gateway started from the
    fit is given). nan for a model with no price or no answer lengths in the data: the gateway
    prices its answers at a default length until it has served it, then at the lengths it sees,
    another basis than any the fit could take (its cost correction is then learnt online, as
    without a fit)."""
    arms = ArmStatsCache(settings.models, Knobs.from_settings(settings))
    arms.expected_answers.update(answers)
    contexts = [baselines._context(r, t) for t, r in enumerate(records)]
    out = np.full((len(records), len(models)), np.nan)
    for j, name in enumerate(models):
        if name in arms.specs and name in answers:
            out[:, j] = [arms.estimated_cost(name, ctx) for ctx in contexts]
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    """The rows of `x` as float32 unit vectors (a copy): the space HCTS's clusters live in."""
    x = np.array(x, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x

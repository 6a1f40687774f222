"""Baselines, run on the same order as the router: random, round robin, always-cheapest,
always-best-single, the per-prompt oracle, the original proxy's algorithm, and Thompson sampling
without context with the router's objective: HCTS's core without clusters under ROUTER_POLICY=hcts
(its dial), the bandit's Thompson step on the arms' global posteriors under the other policies."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from gateway.config import Settings
from gateway.domain import ArmStats
from gateway.lab.report import Trace
from gateway.providers.replay import Record, ReplayData
from gateway.routing import RouteContext
from gateway.routing.bandit import Knobs, choose
from gateway.routing.hcts import Hcts
from gateway.routing.hcts_model import HctsKnobs
from gateway.routing.hcts_policy import chat_arms, core_seed, default_dial
from gateway.routing.stats import ArmStatsCache
from gateway.wire import estimate_tokens


def _trace(
    name: str,
    data: ReplayData,
    order: Sequence[int],
    picks: Sequence[int],
    meta: dict[str, Any] | None = None,
) -> Trace:
    scores = data.scores()
    costs = data.costs()
    rows = np.asarray(order)
    cols = np.asarray(picks)
    return Trace(name, [data.models[j] for j in picks], scores[rows, cols], costs[rows, cols], meta or {})


def best_single(data: ReplayData) -> str:
    """Highest mean score over the whole file; ties: the lower mean cost."""
    means, costs = data.scores().mean(axis=0), data.costs().mean(axis=0)
    return data.models[min(range(len(data.models)), key=lambda j: (-means[j], costs[j]))]


def cheapest(data: ReplayData) -> str:
    costs = data.costs().mean(axis=0)
    return data.models[int(np.argmin(costs))]


def single(data: ReplayData, order: Sequence[int], model: str, name: str | None = None) -> Trace:
    j = data.models.index(model)
    return _trace(name or model, data, order, [j] * len(order))


def oracle(data: ReplayData, order: Sequence[int]) -> Trace:
    """The best score per prompt; ties broken by the lower cost, then by model order."""
    scores, costs = data.scores(), data.costs()
    k = len(data.models)
    picks = [min(range(k), key=lambda j: (-scores[i, j], costs[i, j], j)) for i in order]
    return _trace("oracle", data, order, picks)


def random_uniform(data: ReplayData, order: Sequence[int], seed: int) -> Trace:
    rng = np.random.default_rng(seed)
    return _trace("random", data, order, list(rng.integers(len(data.models), size=len(order))))


def round_robin(data: ReplayData, order: Sequence[int]) -> Trace:
    return _trace("round_robin", data, order, [t % len(data.models) for t in range(len(order))])


def original_proxy(
    data: ReplayData,
    order: Sequence[int],
    embeddings: np.ndarray,
    rated: Sequence[bool],
    seed: int,
    *,
    threshold: float = 0.7,
    max_similar: int = 50,
    exploration_rate: float = 0.1,
    exploration_bonus: float = 0.1,
    optimistic_prior: float = 0.8,
) -> Trace:
    """The original proxy's algorithm as its README documents it (our reading):

    for each model, the similarity-weighted average of a reward 0.6 x feedback + 0.2 x speed -
    0.2 x cost over the similar past requests (cosine >= 0.7, at most 50) it answered, missing
    feedback counted as 0.5; a Beta sample around that average (its strength the number of those
    requests); models with no similar history sample from an optimistic prior (0.8) plus an
    exploration bonus (0.1); with probability 0.1 a uniform pick. Replay data has no latency, so
    speed is the same for every model (1); cost is the model's price normalised to [0, 1].
    """
    rng = np.random.default_rng(seed)
    scores, costs = data.scores(), data.costs()
    k = len(data.models)
    price = costs.mean(axis=0)
    cost_norm = (
        (price - price.min()) / (price.max() - price.min()) if price.max() > price.min() else np.zeros(k)
    )
    past_e: list[np.ndarray] = []
    past_model: list[int] = []
    past_reward: list[float] = []
    picks: list[int] = []
    for t, i in enumerate(order):
        if rng.random() < exploration_rate:
            pick = int(rng.integers(k))
        else:
            samples = np.empty(k)
            if past_e:
                sims = np.asarray(past_e) @ embeddings[i]
                idx = np.argsort(-sims)[:max_similar]
                idx = idx[sims[idx] >= threshold]
            else:
                idx = np.array([], dtype=int)
            models_arr = np.asarray(past_model)
            rewards = np.asarray(past_reward)
            for j in range(k):
                mine = idx[models_arr[idx] == j] if len(idx) else idx
                if len(mine) == 0:
                    samples[j] = (
                        rng.beta(optimistic_prior * 2, (1 - optimistic_prior) * 2) + exploration_bonus
                    )
                    continue
                w = sims[mine]
                avg = float(np.clip((w * rewards[mine]).sum() / w.sum(), 0.0, 1.0))
                n = len(mine)
                samples[j] = rng.beta(1 + avg * n, 1 + (1 - avg) * n)
            pick = int(np.argmax(samples))
        picks.append(pick)
        feedback = scores[i, pick] if rated[t] else 0.5
        past_e.append(embeddings[i])
        past_model.append(pick)
        past_reward.append(0.6 * feedback + 0.2 * 1.0 - 0.2 * cost_norm[pick])
    return _trace("original_proxy", data, order, picks)


def _context(record: Record, t: int) -> RouteContext:
    """What the gateway's router knows of a lab call before deciding (the prompt, as it counts it)."""
    return RouteContext(
        request_id=f"r{t}",
        requested_model="auto",
        messages=record.messages,
        prompt_tokens=estimate_tokens(record.messages),
    )


def _book_call(cache: ArmStatsCache, data: ReplayData, record: Record, model: str) -> None:
    """A finished call in the arm statistics: its tokens (as the provider reports them) and cost."""
    stats = cache.stats.setdefault(model, ArmStats(model))
    stats.calls += 1
    stats.ok_calls += 1
    stats.completion_tokens_sum += record.outcomes[model].completion_tokens or 0
    stats.cost_usd_sum += data.cost(record, model)


def noncontextual_ts(
    data: ReplayData, order: Sequence[int], rated: Sequence[bool], seed: int, knobs: Knobs
) -> Trace:
    """Thompson sampling without context, with the objective of the bandit policies (lin_ts,
    knn_ts, default): each arm's global Beta posterior from its rated calls (on the catalogue's
    prior, as the router's arm statistics form it), scored by the router's Thompson step
    (`bandit.choose` with the lab's knobs: FEEDBACK_WEIGHT x quality + COST_WEIGHT x the
    log-normalised estimated cost + the exploration bonus and rate). The cost estimate is the
    router's: the prompt's estimated tokens at the arm's prices plus its running mean completion
    tokens. Fed as the gateway is: every call's tokens, the score of the rated calls (`rated`, the
    router's feedback mask). It reads a record's messages (for the prompt's length) and the chosen
    model's outcome, never its task nor any embedding: what context is worth is the router's lift
    over this. Seeded: the same seed, the same picks."""
    rng = np.random.default_rng(seed)
    cache = ArmStatsCache(data.catalogue(), knobs)
    names = list(data.models)
    picks: list[int] = []
    for t, i in enumerate(order):
        record = data.records[i]
        model = choose(cache.views(names, _context(record, t)), knobs, rng).arm
        _book_call(cache, data, record, model)
        if rated[t]:
            cache.observe(model, record.outcomes[model].score, None)
        picks.append(names.index(model))
    return _trace("noncontextual_ts", data, order, picks)


NO_CONTEXT = np.ones(1, dtype=np.float32)  # every prompt is the same point: HCTS without context


def noncontextual_hcts(
    data: ReplayData, order: Sequence[int], rated: Sequence[bool], seed: int, settings: Settings
) -> Trace:
    """Thompson sampling without context for ROUTER_POLICY=hcts: HCTS's own core (`Hcts`) with no
    clustering levels and no gate, so it decides on the arms' global posteriors only, with the dial
    of `settings` (ROUTER_DIAL_MODE / ROUTER_DIAL_TARGET) calibrated online as in the gateway. Made
    as `HctsPolicy` makes its core: the chat arms and the catalogue's quality hints as the prior, the
    seed the policy draws from the gateway's Generator seeded with `seed`; fed as the policy is:
    each decision gets every arm's pre-call cost estimate (`ArmStatsCache.estimated_cost`: the
    prompt's estimated tokens at the arm's prices plus its running mean completion tokens), every
    call is observed with its realised cost, the rated calls (`rated`, the router's feedback mask)
    also with their score. Every prompt is the same point (`NO_CONTEXT`): it reads a record's
    messages (for the prompt's length) and the chosen model's outcome, never its task nor any
    embedding. Seeded: the same seed, the same picks."""
    knobs = Knobs.from_settings(settings)
    cache = ArmStatsCache(settings.models, knobs)
    arms, prior = chat_arms(settings)
    core = Hcts(
        len(arms),
        len(NO_CONTEXT),
        core_seed(np.random.default_rng(seed)),
        dataclasses.replace(HctsKnobs(), levels=(), gate=False),
        default_dial(settings),
        prior,
        inline=True,
    )
    models = list(data.models)
    picks: list[int] = []
    for t, i in enumerate(order):
        record = data.records[i]
        costs = np.array([v.cost_usd for v in cache.views(arms, _context(record, t))])
        pick = core.choose(NO_CONTEXT, None, costs)
        model = arms[pick.arm]
        core.observe_call(pick.ticket, NO_CONTEXT, pick.arm, data.cost(record, model))
        _book_call(cache, data, record, model)
        if rated[t]:
            core.observe_rating(NO_CONTEXT, pick.arm, record.outcomes[model].score, ticket=pick.ticket)
        picks.append(models.index(model))
    dial = core.default
    return _trace("noncontextual_ts", data, order, picks, {"objective": f"hcts {dial.mode} {dial.target:g}"})

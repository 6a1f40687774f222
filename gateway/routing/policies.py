"""Routing policies (ROUTER_POLICY): how `auto` picks among the eligible arms, by name.

A policy forms each arm's quality posterior for the request and makes the pick (`choose`), learns
from this replica's feedback at once (`observe`), and catches up with what other replicas learnt
(`sync`, every STATS_REFRESH_S). The Thompson step itself, the posteriors' arithmetic and the
propensities are the pure core in `gateway.routing.bandit`. The `Choice` must say every eligible
arm's propensity (`propensities`, or a `pending` computation: `bandit.choose` does both); that is
what off-policy evaluation (`gateway.evaluation`) weights the logs by, and it evaluates any policy
of this registry through the real Router.

- `hcts` (the default): hierarchical-cluster Thompson sampling with a calibrated cost/quality dial
  (`gateway.routing.hcts_policy`).
- `knn_ts`: Thompson sampling on the similar past requests found in the store (pgvector).
- `lin_ts`: linear Thompson sampling on the embedding (per-arm Bayesian ridge regression).
- `default`: `auto` goes to DEFAULT_MODEL (rules, routes and strategies still apply); when that
  model is not eligible, Thompson sampling on the arms' global statistics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import ClassVar, Protocol

import numpy as np

from gateway.config import Settings
from gateway.domain import Neighbour, Rating, utcnow
from gateway.routing.bandit import ArmView, Choice, LinTS, knn_posteriors
from gateway.routing.hcts_policy import HctsPolicy
from gateway.routing.seam import (
    FinishedCall,
    Observed,
    PolicyDeps,
    PolicyRequest,
    PolicyStore,
    RoutingPolicy,
    pinned,
    thompson,
)
from gateway.store import Key, NeighbourStore

log = logging.getLogger("gateway.router")


class _CallBlind:
    """A policy that learns from ratings only (the store has every call it needs)."""

    def observe_call(self, call: FinishedCall) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def settle(self) -> None:
        pass  # (no background work)


class KnnTS(_CallBlind):
    """Contextual evidence per tenant: the neighbours are the tenant's own rated calls."""

    needs_embedding: ClassVar[bool] = True
    layer: ClassVar[str] = "bandit"

    def __init__(self, deps: PolicyDeps) -> None:
        self.deps = deps
        self.settings = deps.settings
        self.store_down_until = float("-inf")

    async def choose(
        self,
        views: list[ArmView],
        embedding: np.ndarray | None,
        timings: dict[str, float],
        tenant: str = "",
        request: PolicyRequest | None = None,
    ) -> Choice:
        arms = [v.name for v in views]
        if embedding is not None and self.deps.store is not None:
            t = time.perf_counter()
            neighbours = await self._neighbours(self.deps.store, embedding, arms, tenant)
            timings["neighbours_ms"] = (time.perf_counter() - t) * 1000
            eligible = set(arms)
            neighbours = [n for n in neighbours if n.model in eligible]
            cache = self.deps.arms
            posteriors, evidence, _, _ = knn_posteriors(
                arms, cache.view_stats(arms, tenant), neighbours, self.deps.knobs, cache.hints
            )
            for view, posterior, ev in zip(views, posteriors, evidence, strict=True):
                view.posterior, view.evidence = posterior, ev
        return thompson(views, self.deps.knobs, self.deps.rng, timings)

    async def _neighbours(
        self, store: NeighbourStore, embedding: np.ndarray, arms: list[str], tenant: str
    ) -> list[Neighbour]:
        """Similar rated calls; an unreachable or slow database means routing without context
        (and no more tries for a few seconds), never a failed call."""
        clock = self.deps.clock
        if clock() < self.store_down_until:
            return []
        s = self.settings
        since = utcnow() - timedelta(days=s.recency_days)
        embedder = self.deps.embedder
        if embedder is None:
            return []
        try:
            query = (
                store.neighbours(
                    embedding,
                    s.neighbours_per_arm,
                    since,
                    s.similarity_threshold,
                    arms,
                    tenant,
                    embedder=embedder,
                )
                if s.neighbours_per_arm
                else store.neighbours(
                    embedding,
                    s.max_similar_requests,
                    since,
                    s.similarity_threshold,
                    None,
                    tenant,
                    embedder=embedder,
                )
            )
            return await asyncio.wait_for(query, s.neighbour_timeout_s)
        except Exception as exc:
            self.store_down_until = clock() + 5.0
            log.warning("neighbour search failed (%s); routing without context for 5 s", type(exc).__name__)
            return []

    def observe(self, rating: Observed) -> None:
        """Nothing to do: the rating is in the store, where the next neighbour search finds it."""

    async def sync(self) -> None:
        pass


class LinTSPolicy(_CallBlind):
    """One linear model shared by every tenant, each tenant's influence capped: a tenant's ratings
    of an arm weigh 1 up to TENANT_RATING_CAP of them, then CAP/n each (an open gateway is one
    tenant: uncapped). What it has absorbed is bounded to RECENCY_DAYS: older ratings are taken
    out again (their embeddings read back from the store), so a long-running replica learns from
    the same window as a fresh one."""

    needs_embedding: ClassVar[bool] = True
    layer: ClassVar[str] = "bandit"

    def __init__(self, deps: PolicyDeps) -> None:
        s = deps.settings
        self.deps = deps
        self.lin = LinTS(ridge=s.lin_ridge, noise=s.lin_noise, prior_mean=s.optimistic_prior)
        # What the linear model has absorbed, per call, oldest rating first: ratings from other
        # replicas (read from the store) and re-ratings are applied once each.
        self.seen: OrderedDict[Key, _Absorbed] = OrderedDict()
        self.counts: dict[tuple[str, str], int] = {}  # (caller, model) -> ratings absorbed
        self.synced = utcnow() - timedelta(days=s.recency_days)

    async def choose(
        self,
        views: list[ArmView],
        embedding: np.ndarray | None,
        timings: dict[str, float],
        tenant: str = "",
        request: PolicyRequest | None = None,
    ) -> Choice:
        if embedding is not None:
            for view in views:
                view.posterior = self.lin.posterior(view.name, embedding)
                view.evidence = float(self.lin.n.get(view.name, 0))
        return thompson(views, self.deps.knobs, self.deps.rng, timings)

    def observe(self, rating: Observed) -> None:
        if rating.embedding is not None:
            key = (rating.caller, rating.request_id)
            self._absorb(key, rating.model, rating.score, rating.embedding, utcnow())

    def _weight(self, caller: str, model: str) -> float:
        n = self.counts.get((caller, model), 0) + 1
        self.counts[(caller, model)] = n
        cap = self.deps.settings.tenant_rating_cap
        return 1.0 if caller == "" or n <= cap else cap / n

    def _absorb(self, key: Key, model: str, score: float, embedding: np.ndarray, at: datetime) -> bool:
        """Apply one rating to the linear model, once (a re-rating moves it, a repeat does not)."""
        seen = self.seen.get(key)
        if seen is not None and seen.score == score:
            return False
        if seen is not None:
            self.lin.update(model, embedding, score, seen.score, seen.weight)
            self.seen[key] = _Absorbed(model, score, seen.weight, at)
            self.seen.move_to_end(key)
            return True
        weight = self._weight(key[0], model)
        self.lin.update(model, embedding, score, None, weight)
        self.seen[key] = _Absorbed(model, score, weight, at)
        return True

    async def sync(self) -> None:
        store = self.deps.store
        if store is None or self.deps.embedder is None:
            return  # without an embedder, no request has an embedding to use what it would learn
        await self._forget(store)
        while True:
            # Look 10 s back: a rating becomes visible when its transaction commits, a little after
            # its time. What was already absorbed (same call, same score) is skipped, and only the
            # rest's embeddings are fetched.
            rows = await store.rated_since(self.synced - timedelta(seconds=10), limit=10_000)
            for r in rows:
                self.synced = max(self.synced, r.at)
            todo = [r for r in rows if (seen := self.seen.get(r.key)) is None or seen.score != r.score]
            embeddings = await store.embeddings_of([r.key for r in todo], self.deps.embedder) if todo else {}
            new: dict[str, list[Rating]] = {}
            for r in todo:
                if r.key not in embeddings:
                    continue  # no embedding (yet): nothing to learn from
                if r.key in self.seen or r.caller != "":
                    self._absorb(r.key, r.model, r.score, embeddings[r.key], r.at)
                else:
                    new.setdefault(r.model, []).append(r)
            for model, ratings in new.items():  # one tenant, weight 1: all at once
                xs = np.stack([embeddings[r.key] for r in ratings])
                self.lin.update_many(model, xs, np.array([r.score for r in ratings]))
                for r in ratings:
                    self.counts[("", model)] = self.counts.get(("", model), 0) + 1
                    self.seen[r.key] = _Absorbed(model, r.score, 1.0, r.at)
            if len(rows) < 10_000 or not todo:
                return

    async def _forget(self, store: PolicyStore) -> None:
        """Takes ratings older than RECENCY_DAYS out of the model again."""
        horizon = utcnow() - timedelta(days=self.deps.settings.recency_days)
        old: list[tuple[Key, _Absorbed]] = []
        for key, absorbed in self.seen.items():
            if absorbed.at >= horizon or len(old) >= 10_000:
                break
            old.append((key, absorbed))
        if not old:
            return
        assert self.deps.embedder is not None
        embeddings = await store.embeddings_of([key for key, _ in old], self.deps.embedder)
        for key, absorbed in old:
            if self.seen.get(key) is not absorbed:
                continue  # re-rated meanwhile: it stays
            del self.seen[key]
            x = embeddings.get(key)
            if x is not None:
                self.lin.forget(absorbed.model, x, absorbed.score, absorbed.weight)
            count = (key[0], absorbed.model)
            self.counts[count] = max(0, self.counts.get(count, 0) - 1)


@dataclass(frozen=True)
class _Absorbed:
    model: str
    score: float
    weight: float
    at: datetime


class DefaultPolicy(_CallBlind):
    needs_embedding: ClassVar[bool] = False
    layer: ClassVar[str] = "default"

    def __init__(self, deps: PolicyDeps) -> None:
        self.deps = deps

    async def choose(
        self,
        views: list[ArmView],
        embedding: np.ndarray | None,
        timings: dict[str, float],
        tenant: str = "",
        request: PolicyRequest | None = None,
    ) -> Choice:
        model = self.deps.settings.default_model
        if model is not None and any(v.name == model for v in views):
            return pinned(model, views, self.deps.knobs)
        return thompson(views, self.deps.knobs, self.deps.rng, timings)

    def observe(self, rating: Observed) -> None:
        """The global statistics (moved by the router) are all this policy uses."""

    async def sync(self) -> None:
        pass


class PolicyClass(Protocol):
    @property
    def needs_embedding(self) -> bool: ...

    def __call__(self, deps: PolicyDeps) -> RoutingPolicy: ...


POLICIES: dict[str, PolicyClass] = {
    "hcts": HctsPolicy,
    "knn_ts": KnnTS,
    "lin_ts": LinTSPolicy,
    "default": DefaultPolicy,
}


def needs_embedder(settings: Settings) -> bool:
    """Whether the gateway needs an embedding model: for its policy, or for semantic routes."""
    return POLICIES[settings.router_policy].needs_embedding or bool(settings.routes)

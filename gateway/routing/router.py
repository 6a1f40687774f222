"""Router.decide: which model answers a request, in layers.

1. an explicit catalogue model            -> that model (plain proxy)            layer "explicit"
2. keyword rules (first match)            -> a model, or a policy (set of arms)  layer "keyword"
3. semantic routes (best passing route)   -> a model, or a policy                layer "semantic"
4. among the eligible arms (of the policy, the caller's list, or all), by the strategy:
   `bandit` (Thompson sampling, the default)                                     layer "bandit"
   or a fixed one (cost / latency / quality / balanced / round robin / least loaded)  "strategy"

Rules and routes apply to `auto` and virtual models unless the caller named a policy or a model
list. Eligibility: capabilities the request needs, a context window large enough for the prompt,
the caller's constraints (models, cost, latency, quality), and an available upstream (key set,
circuit closed). When the constraints leave no model, the error says which one excluded them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import numpy as np

from gateway.config import ModelSpec, RouterConstraints, Settings
from gateway.embedder import Embedder, routing_text
from gateway.errors import InvalidRequest, ServiceUnavailable
from gateway.routing import Decision, RouteContext
from gateway.routing.bandit import ArmView, Choice, Knobs, LinTS, choose, global_posterior, knn_posteriors
from gateway.routing.rules import KeywordRules, SemanticRoutes
from gateway.routing.strategies import rank
from gateway.store import ArmStats, Neighbour, Rating, Store, utcnow

log = logging.getLogger("gateway.router")

DEFAULT_COMPLETION_TOKENS = 256  # completion length assumed for an arm before any is observed


class Availability(Protocol):
    def is_available(self, name: str) -> bool: ...

    def why_unavailable(self, name: str) -> str | None: ...

    def in_flight(self, name: str) -> int: ...


@dataclass
class _Target:
    layer: str
    name: str
    model: str | None
    policy: str | None


class Router:
    def __init__(
        self,
        settings: Settings,
        availability: Availability,
        *,
        store: Store | None = None,
        embedder: Embedder | None = None,
        rng: np.random.Generator | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.availability = availability
        self.store = store
        self.embedder = embedder
        self.rng = rng if rng is not None else np.random.default_rng()
        self.clock = clock
        self.knobs = Knobs.from_settings(settings)
        self.specs = {m.name: m for m in settings.models}
        self.rules = KeywordRules(settings.rules)
        self.routes: SemanticRoutes | None = None
        self.stats: dict[str, ArmStats] = {}
        self.stats_at = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None
        self.lin = (
            LinTS(ridge=settings.lin_ridge, noise=settings.lin_noise, prior_mean=settings.optimistic_prior)
            if settings.router_policy == "lin_ts"
            else None
        )
        self.turns: dict[tuple[str, ...], int] = {}
        self.store_down_until = float("-inf")
        # What the linear model has absorbed, per call: ratings from other replicas (read from the
        # store) and re-ratings are applied once each.
        self.lin_seen: dict[str, float] = {}
        self.lin_synced = utcnow() - timedelta(days=settings.recency_days)
        self.hints = {m.name: m.quality for m in settings.models}

    # --- lifecycle
    async def start(self) -> None:
        if self.embedder is not None and self.settings.routes:
            self.routes = await SemanticRoutes.build(self.settings.routes, self.embedder)
        await self.refresh_stats()
        if self.lin is not None:
            log.info("linear Thompson sampling warmed up from %d rated calls", len(self.lin_seen))

    async def aclose(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refreshing

    async def refresh_stats(self) -> None:
        """Arm statistics from the store (every replica's calls and feedback), and for the linear
        policy the ratings given since the last look."""
        if self.store is None:
            return
        try:
            self.stats = await self.store.arm_stats()
            if self.lin is not None:
                await self._sync_lin()
        except Exception as exc:  # routing goes on with what it knows
            log.warning("cannot refresh arm statistics: %s", exc)
        self.stats_at = self.clock()

    async def _sync_lin(self) -> None:
        assert self.lin is not None and self.store is not None
        while True:
            # Look 10 s back: a rating becomes visible when its transaction commits, a little after
            # its time. What was already absorbed (same call, same score) is skipped, and only the
            # rest's embeddings are fetched.
            rows = await self.store.rated_since(self.lin_synced - timedelta(seconds=10), limit=10_000)
            for r in rows:
                self.lin_synced = max(self.lin_synced, r.at)
            todo = [r for r in rows if self.lin_seen.get(r.request_id) != r.score]
            embeddings = await self.store.embeddings_of([r.request_id for r in todo]) if todo else {}
            new: dict[str, list[Rating]] = {}
            for r in todo:
                if r.request_id not in embeddings:
                    continue  # no embedding (yet): nothing to learn from
                if r.request_id in self.lin_seen:
                    self._absorb(r.request_id, r.model, r.score, embeddings[r.request_id])  # a re-rating
                else:
                    new.setdefault(r.model, []).append(r)
            for model, ratings in new.items():
                xs = np.stack([embeddings[r.request_id] for r in ratings])
                self.lin.update_many(model, xs, np.array([r.score for r in ratings]))
                for r in ratings:
                    self.lin_seen[r.request_id] = r.score
            if len(rows) < 10_000 or not todo:
                return

    def _absorb(self, request_id: str, model: str, score: float, embedding: np.ndarray) -> bool:
        """Apply one rating to the linear model, once (a re-rating moves it, a repeat does not)."""
        assert self.lin is not None
        previous = self.lin_seen.get(request_id)
        if previous == score:
            return False
        self.lin.update(model, embedding, score, previous)
        self.lin_seen[request_id] = score
        return True

    def _maybe_refresh(self) -> None:
        if self.clock() - self.stats_at < self.settings.stats_refresh_s:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self.refresh_stats())

    # --- learning
    def observe_feedback(
        self, request_id: str, model: str, score: float, previous: float | None, embedding: np.ndarray | None
    ) -> None:
        """Feedback moves the global statistics at once (and the linear model, if in use)."""
        stats = self.stats.setdefault(model, ArmStats(model))
        if previous is None:
            stats.rated += 1
            stats.score_sum += score
        else:
            stats.score_sum += score - previous
        if self.lin is not None and embedding is not None:
            self._absorb(request_id, model, score, embedding)

    # --- deciding
    async def embed(self, text: str) -> np.ndarray | None:
        if self.embedder is None or not text:
            return None
        try:
            return (await self.embedder.embed([text]))[0]
        except Exception as exc:
            log.warning("embedding failed (%s); routing without context", exc)
            return None

    async def decide(self, ctx: RouteContext) -> Decision:
        spec = self.specs.get(ctx.requested_model)
        if spec is not None:
            return Decision(model=spec.name, layer="explicit", fallbacks=list(spec.fallbacks))
        self._maybe_refresh()
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        c = ctx.constraints
        text = routing_text(ctx.messages, self.settings.embedding_max_chars)
        embedding: np.ndarray | None = None
        target: _Target | None = None
        if not c.policy and not c.models:
            rule = self.rules.match(text)
            if rule is not None:
                target = _Target("keyword", rule.name, rule.model, rule.policy)
            elif self.routes is not None and self.routes.routes:
                t = time.perf_counter()
                embedding = await self.embed(text)
                timings["embed_ms"] = (time.perf_counter() - t) * 1000
                matched = self.routes.match(embedding) if embedding is not None else None
                if matched is not None:
                    route, _ = matched
                    target = _Target("semantic", route.name, route.model, route.policy)
        policy_name = c.policy or (target.policy if target else None)
        policy = self.settings.policies.get(policy_name) if policy_name else None
        strategy = c.strategy or (policy.strategy if policy else None) or "bandit"
        if (
            self.settings.router_policy == "default"
            and strategy == "bandit"
            and not (target and target.model)
        ):
            target = _Target(
                target.layer if target else "default",
                target.name if target else "",
                self.settings.default_model,
                None,
            )
        names = list(policy.models) if policy else list(self.specs)
        arms = self._eligible(names, ctx, c)
        choice: Choice
        layer = target.layer if target else ("bandit" if strategy == "bandit" else "strategy")
        if target is not None and target.model is not None and target.model in arms:
            rest = [a for a in arms if a != target.model]
            ranked = rank("quality_optimized", self._views(rest, ctx), self.knobs) if rest else None
            choice = Choice(target.model, False, 1.0, [target.model, *(ranked.ranking if ranked else [])])
        elif strategy == "bandit":
            if embedding is None and "embed_ms" not in timings:
                t = time.perf_counter()
                embedding = await self.embed(text)
                timings["embed_ms"] = (time.perf_counter() - t) * 1000
            choice = await self._bandit(arms, ctx, embedding, timings)
        else:
            choice = self._fixed(strategy, arms, ctx)
        timings["routing_ms"] = (time.perf_counter() - t0) * 1000
        return Decision(
            model=choice.arm,
            layer=layer,
            fallbacks=choice.ranking[1 : 1 + self.settings.max_fallbacks],
            strategy=strategy,
            policy=policy_name,
            rule=target.name if target else None,
            candidates=choice.candidates,
            propensity=choice.propensity,
            embedding=embedding,
            timings=timings,
        )

    async def _bandit(
        self, arms: list[str], ctx: RouteContext, embedding: np.ndarray | None, timings: dict[str, float]
    ) -> Choice:
        views = self._views(arms, ctx)
        if self.lin is not None and embedding is not None:
            for view in views:
                view.posterior = self.lin.posterior(view.name, embedding)
                view.evidence = float(self.lin.n.get(view.name, 0))
        elif embedding is not None and self.store is not None:
            t = time.perf_counter()
            neighbours = await self._neighbours(embedding, arms)
            timings["neighbours_ms"] = (time.perf_counter() - t) * 1000
            eligible = set(arms)
            neighbours = [n for n in neighbours if n.model in eligible]
            posteriors, evidence, _, _ = knn_posteriors(arms, self.stats, neighbours, self.knobs, self.hints)
            for view, posterior, ev in zip(views, posteriors, evidence, strict=True):
                view.posterior, view.evidence = posterior, ev
        t = time.perf_counter()
        choice = choose(views, self.knobs, self.rng)
        timings["sample_ms"] = (time.perf_counter() - t) * 1000
        return choice

    async def _neighbours(self, embedding: np.ndarray, arms: list[str]) -> list[Neighbour]:
        """Similar rated calls; an unreachable or slow database means routing without context
        (and no more tries for a few seconds), never a failed call."""
        assert self.store is not None
        if self.clock() < self.store_down_until:
            return []
        since = utcnow() - timedelta(days=self.settings.recency_days)
        try:
            per_arm = self.settings.neighbours_per_arm
            query = (
                self.store.neighbours(embedding, per_arm, since, self.settings.similarity_threshold, arms)
                if per_arm
                else self.store.neighbours(
                    embedding, self.settings.max_similar_requests, since, self.settings.similarity_threshold
                )
            )
            return await asyncio.wait_for(query, self.settings.neighbour_timeout_s)
        except Exception as exc:
            self.store_down_until = self.clock() + 5.0
            log.warning("neighbour search failed (%s); routing without context for 5 s", type(exc).__name__)
            return []

    def _fixed(self, strategy: str, arms: list[str], ctx: RouteContext) -> Choice:
        key = tuple(arms)
        turn = self.turns.get(key, 0)
        self.turns[key] = turn + 1
        return rank(
            strategy, self._views(arms, ctx), self.knobs, turn=turn, in_flight=self.availability.in_flight
        )

    def _views(self, arms: Sequence[str], ctx: RouteContext) -> list[ArmView]:
        views = []
        for name in arms:
            stats = self.stats.get(name)
            views.append(
                ArmView(
                    name=name,
                    posterior=global_posterior(stats, self.knobs, self.hints.get(name)),
                    rated=stats.rated if stats else 0,
                    latency_ms=stats.latency_ms_avg if stats else None,
                    cost_usd=self.estimated_cost(self.specs[name], ctx),
                )
            )
        return views

    def estimated_cost(self, spec: ModelSpec, ctx: RouteContext) -> float:
        stats = self.stats.get(spec.name)
        completion = stats.completion_tokens_avg if stats and stats.completion_tokens_avg else None
        completion = completion or DEFAULT_COMPLETION_TOKENS
        if ctx.max_tokens:
            completion = min(completion, ctx.max_tokens)
        return spec.cost_usd(ctx.prompt_tokens, int(completion))

    # --- eligibility
    def _eligible(self, names: list[str], ctx: RouteContext, c: RouterConstraints) -> list[str]:
        if c.models:
            unknown = [m for m in c.models if m not in self.specs]
            if unknown:
                raise InvalidRequest(
                    f"router.models: unknown model {unknown[0]!r}",
                    param="router.models",
                    code="invalid_value",
                )
            names = [n for n in names if n in c.models]
            if not names:
                raise InvalidRequest(
                    "router.models: none of the allowed models is in the chosen policy",
                    param="router.models",
                    code="no_eligible_model",
                )
        needs = set(ctx.needs - {"streaming"}) | set(c.capability)

        def keep(arms: list[str], ok: Callable[[str], bool], why: Callable[[], str], param: str) -> list[str]:
            """The arms that pass `ok`; none is a 400 that says `why()` (built only then)."""
            kept = [a for a in arms if ok(a)]
            if not kept:
                raise InvalidRequest(why(), param=param, code="no_eligible_model")
            return kept

        arms = names
        if needs:
            arms = keep(
                arms,
                lambda a: needs <= self.specs[a].capabilities,
                lambda: (
                    f"no model among {', '.join(arms)} has the capabilities this request needs: "
                    f"{', '.join(sorted(needs))}"
                ),
                "router.capability",
            )
        needed = ctx.prompt_tokens + (ctx.max_tokens or 0)
        arms = keep(
            arms,
            lambda a: self.specs[a].context_window >= needed,
            lambda: (
                f"the prompt (about {ctx.prompt_tokens} tokens"
                + (f" + max_tokens {ctx.max_tokens}" if ctx.max_tokens else "")
                + f") does not fit the context window of any model (largest: "
                f"{max(self.specs[a].context_window for a in arms)})"
            ),
            "messages",
        )
        if c.max_cost_usd is not None:
            limit = c.max_cost_usd
            cost = {a: self.estimated_cost(self.specs[a], ctx) for a in arms}
            cheapest = min(arms, key=cost.__getitem__)
            arms = keep(
                arms,
                lambda a: cost[a] <= limit,
                lambda: (
                    f"max_cost_usd={limit:g} excludes every model: the cheapest, {cheapest}, costs an "
                    f"estimated ${cost[cheapest]:.6g} for this request"
                ),
                "router.max_cost_usd",
            )
        if c.max_latency_ms is not None:
            limit_ms = c.max_latency_ms

            def fast(a: str) -> bool:
                s = self.stats.get(a)
                return s is None or s.latency_ms_avg is None or s.latency_ms_avg <= limit_ms

            arms = keep(
                arms,
                fast,
                lambda: (
                    f"max_latency_ms={limit_ms:g} excludes every model: none has answered that fast "
                    "on average"
                ),
                "router.max_latency_ms",
            )
        if c.min_quality is not None:
            floor = c.min_quality
            quality = {a: self.quality(a) for a in arms}
            best = max(arms, key=quality.__getitem__)
            arms = keep(
                arms,
                lambda a: quality[a] >= floor,
                lambda: (
                    f"min_quality={floor:g} excludes every model: the best, {best}, has an estimated "
                    f"quality of {quality[best]:.3f}"
                ),
                "router.min_quality",
            )
        available = [a for a in arms if self.availability.is_available(a)]
        if not available:
            reasons = "; ".join(f"{a}: {self.availability.why_unavailable(a)}" for a in arms)
            raise ServiceUnavailable(
                f"no eligible model is available: {reasons}", headers={"retry-after": "5"}
            )
        return available

    def quality(self, name: str) -> float:
        """The arm's estimated quality: its global posterior mean (feedback, else the prior)."""
        return global_posterior(self.stats.get(name), self.knobs, self.hints.get(name)).mean

"""Router.decide: which model answers a request, in layers.

1. an explicit catalogue model            -> that model (plain proxy)            layer "explicit"
2. keyword rules (first match)            -> a model, or a policy (set of arms)  layer "keyword"
3. semantic routes (best passing route)   -> a model, or a policy                layer "semantic"
4. among the eligible arms (of the policy, the caller's list, or all), by the strategy:
   `bandit` (the routing policy, ROUTER_POLICY; the default)      layer "bandit" (or "default")
   or a fixed one (cost / latency / quality / balanced / round robin / least loaded)  "strategy"

Rules and routes apply to `auto` and virtual models unless the caller named a policy or a model
list. Which arms are eligible is `gateway.routing.eligibility`; how the bandit picks is the
policy's (`gateway.routing.policies`); the arms' statistics are `ArmStatsCache`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gateway.catalogue import DIAL_DEFAULTS, RouterConstraints
from gateway.config import Settings
from gateway.domain import ArmStats, CallRecord
from gateway.embedder import Embedder, routing_text
from gateway.errors import InvalidRequest
from gateway.routing import Decision, RouteContext
from gateway.routing.bandit import ArmView, Choice, Knobs
from gateway.routing.eligibility import Availability, eligible
from gateway.routing.hcts_dial import DialSpec
from gateway.routing.policies import POLICIES
from gateway.routing.rules import KeywordRules, SemanticRoutes
from gateway.routing.seam import (
    FinishedCall,
    Observed,
    PolicyDeps,
    PolicyRequest,
    PolicyStore,
    RoutingPolicy,
    pinned,
)
from gateway.routing.stats import ArmStatsCache
from gateway.routing.strategies import rank
from gateway.spelling import unknown
from gateway.store import StatsStore

log = logging.getLogger("gateway.router")


class RouterStore(PolicyStore, StatsStore, Protocol):
    """What the router reads from the store."""


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
        store: RouterStore | None = None,
        embedder: Embedder | None = None,
        rng: np.random.Generator | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.availability = availability
        self.embedder = embedder
        self.clock = clock
        self.knobs = Knobs.from_settings(settings)
        self.specs = {m.name: m for m in settings.models}
        # The arms `auto` may choose: models that chat (not an embeddings-only model).
        self.chat_models = [m.name for m in settings.models if "chat" in m.capabilities]
        self.arms = ArmStatsCache(settings.models, self.knobs, store, settings.tenant_rating_cap)
        self.policy: RoutingPolicy = POLICIES[settings.router_policy](
            PolicyDeps(
                settings,
                self.knobs,
                self.arms,
                store,
                rng if rng is not None else np.random.default_rng(),
                clock,
                embedder.id if embedder is not None else None,
            )
        )
        self.rules = KeywordRules(settings.rules)
        self.routes: SemanticRoutes | None = None
        self.stats_at = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None
        self.turns: dict[tuple[str, ...], int] = {}

    @property
    def stats(self) -> dict[str, ArmStats]:
        return self.arms.stats

    # --- lifecycle
    async def start(self) -> None:
        if self.embedder is not None and self.settings.routes:
            self.routes = await SemanticRoutes.build(self.settings.routes, self.embedder)
        await self.refresh_stats()

    async def aclose(self) -> None:
        if self._refreshing is not None:  # first: the policy may save its state (nothing moves it)
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refreshing
        await self.policy.aclose()

    async def refresh_stats(self) -> None:
        """Arm statistics from the store (every replica's calls and feedback), and what the policy
        learns from other replicas."""
        try:
            await self.arms.load()
            await self.policy.sync()
        except Exception as exc:  # routing goes on with what it knows
            log.warning("cannot refresh arm statistics: %s", exc)
        self.stats_at = self.clock()

    def _maybe_refresh(self) -> None:
        if self.clock() - self.stats_at < self.settings.stats_refresh_s:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self.refresh_stats())

    # --- learning
    def observe_feedback(
        self,
        caller: str,
        request_id: str,
        model: str,
        score: float,
        previous: float | None,
        embedding: np.ndarray | None,
    ) -> None:
        """Feedback moves the global statistics at once (the rating tenant's share), and the
        policy's own model."""
        self.arms.observe(model, score, previous, caller)
        self.policy.observe(Observed(caller, request_id, model, score, previous, embedding))

    def observe_call(self, record: CallRecord) -> None:
        """Every finished call: the policy learns from its prompt and cost (its rating comes later)."""
        ok = record.status == "ok"
        self.policy.observe_call(FinishedCall(record.caller, record.id, record.model, record.cost_usd, ok))

    def quality(self, name: str, tenant: str | None = None) -> float:
        """The arm's estimated quality, as `tenant` sees it (None: every tenant's ratings)."""
        return self.arms.quality(name, tenant)

    # --- deciding
    async def embed(self, text: str) -> np.ndarray | None:
        if self.embedder is None or not text:
            return None
        try:
            return (await self.embedder.embed([text]))[0]
        except Exception as exc:
            log.warning("embedding failed (%s); routing without context", exc)
            return None

    async def _timed_embed(self, text: str, timings: dict[str, float]) -> np.ndarray | None:
        t = time.perf_counter()
        embedding = await self.embed(text)
        timings["embed_ms"] = (time.perf_counter() - t) * 1000
        return embedding

    async def decide(self, ctx: RouteContext) -> Decision:
        spec = self.specs.get(ctx.requested_model)
        if spec is not None:
            return Decision(
                model=spec.name,
                layer="explicit",
                fallbacks=list(spec.fallbacks),
                propensity=1.0,
                propensities={spec.name: 1.0},
                context=ctx,
            )
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
                embedding = await self._timed_embed(text, timings)
                matched = self.routes.match(embedding) if embedding is not None else None
                if matched is not None:
                    route, _ = matched
                    target = _Target("semantic", route.name, route.model, route.policy)
        if c.policy and c.policy not in self.settings.policies:
            raise InvalidRequest(
                f"router.policy: {unknown('policy', c.policy, self.settings.policies)}",
                param="router.policy",
                code="invalid_value",
            )
        policy_name = c.policy or (target.policy if target else None)
        named = self.settings.policies.get(policy_name) if policy_name else None
        strategy = c.strategy or (named.strategy if named else None) or "bandit"
        arms = eligible(
            list(named.models) if named else self.chat_models,
            ctx,
            c,
            self.specs,
            self.arms.stats,
            cost=lambda a: self.arms.estimated_cost(a, ctx),
            quality=lambda a: self.arms.quality(a, ctx.tenant),
            availability=self.availability,
        )
        choice: Choice
        views: list[ArmView] = []
        if target is not None and target.model is not None and target.model in arms:
            views = self.arms.views(arms, ctx)
            choice = pinned(target.model, views, self.knobs)
            layer = target.layer
        elif strategy == "bandit":
            if embedding is None and "embed_ms" not in timings and self.policy.needs_embedding:
                embedding = await self._timed_embed(text, timings)
            views = self.arms.views(arms, ctx)
            request = PolicyRequest(ctx.request_id, ctx.tenant, self._dial(c))
            choice = await self.policy.choose(views, embedding, timings, ctx.tenant, request)
            layer = target.layer if target else self.policy.layer
        else:
            choice = self._fixed(strategy, arms, ctx)
            layer = target.layer if target else "strategy"
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
            embedder=self.embedder.id if embedding is not None and self.embedder is not None else None,
            timings=timings,
            explored=choice.explored,
            arms=views,
            propensities=choice.propensities,
            propensity_error=choice.propensity_error,
            context=ctx,
            unavailable=[m for m in self.specs if not self.availability.is_available(m)],
            choice=choice,
        )

    def _dial(self, c: RouterConstraints) -> DialSpec | None:
        """The request's dial, where it set one (else the policy's default)."""
        if c.dial_mode is None and c.dial_target is None:
            return None
        mode = c.dial_mode or self.settings.router_dial_mode
        if c.dial_target is not None:
            return DialSpec(mode, c.dial_target)
        return DialSpec(
            mode,
            self.settings.router_dial_target
            if mode == self.settings.router_dial_mode
            else DIAL_DEFAULTS[mode],
        )

    def _fixed(self, strategy: str, arms: list[str], ctx: RouteContext) -> Choice:
        key = tuple(arms)
        turn = self.turns.get(key, 0)
        self.turns[key] = turn + 1
        return rank(
            strategy, self.arms.views(arms, ctx), self.knobs, turn=turn, in_flight=self.availability.in_flight
        )

"""Each arm's global statistics (calls, latency, cost, ratings of every replica), as the router sees
them: read from the store every STATS_REFRESH_S, moved at once by this replica's own feedback."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.catalogue import ModelSpec
from gateway.domain import ArmStats
from gateway.routing import RouteContext
from gateway.routing.bandit import ArmView, Knobs, Posterior, global_posterior
from gateway.store import StatsStore

DEFAULT_COMPLETION_TOKENS = 256  # completion length assumed for an arm before any is observed


class ArmStatsCache:
    def __init__(self, specs: Sequence[ModelSpec], knobs: Knobs, store: StatsStore | None = None) -> None:
        self.specs = {m.name: m for m in specs}
        self.hints = {m.name: m.quality for m in specs}
        self.knobs = knobs
        self.store = store
        self.stats: dict[str, ArmStats] = {}

    async def load(self) -> None:
        """Raises what the store raises (the caller decides how to go on without it)."""
        if self.store is not None:
            self.stats = await self.store.arm_stats()

    def observe(self, model: str, score: float, previous: float | None) -> None:
        self.stats.setdefault(model, ArmStats(model)).add_rating(score, previous)

    def posterior(self, name: str) -> Posterior:
        return global_posterior(self.stats.get(name), self.knobs, self.hints.get(name))

    def quality(self, name: str) -> float:
        """The arm's estimated quality: its global posterior mean (feedback, else the prior)."""
        return self.posterior(name).mean

    def estimated_cost(self, name: str, ctx: RouteContext) -> float:
        stats = self.stats.get(name)
        completion = stats.completion_tokens_avg if stats and stats.completion_tokens_avg else None
        completion = completion or DEFAULT_COMPLETION_TOKENS
        if ctx.max_tokens:
            completion = min(completion, ctx.max_tokens)
        return self.specs[name].cost_usd(ctx.prompt_tokens, int(completion))

    def views(self, arms: Sequence[str], ctx: RouteContext) -> list[ArmView]:
        """What a policy starts from for each arm: the global posterior, latency and cost."""
        views = []
        for name in arms:
            stats = self.stats.get(name)
            views.append(
                ArmView(
                    name=name,
                    posterior=self.posterior(name),
                    rated=stats.rated if stats else 0,
                    latency_ms=stats.latency_ms_avg if stats else None,
                    cost_usd=self.estimated_cost(name, ctx),
                    hint=self.hints.get(name),
                )
            )
        return views

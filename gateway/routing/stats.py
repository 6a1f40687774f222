"""Each arm's global statistics (calls, latency, cost, ratings of every replica), as the router sees
them: read from the store every STATS_REFRESH_S, moved at once by this replica's own feedback.

Ratings are per tenant. A tenant's view of an arm's quality counts its own ratings fully and the
other tenants' each capped at TENANT_RATING_CAP, the largest of them left out: one tenant alone
can never move another tenant's view (a tenant rating an expensive model 1.0 cannot steer another
tenant's `quality_optimized` calls onto it), while what several tenants agree on is shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from gateway.catalogue import ModelSpec
from gateway.domain import ArmStats
from gateway.routing import RouteContext
from gateway.routing.bandit import ArmView, Knobs, Posterior, global_posterior
from gateway.store import StatsStore

DEFAULT_COMPLETION_TOKENS = 256  # completion length assumed for an arm before any is observed


@dataclass
class _Shares:
    """One arm's ratings by tenant, and what they add up to once each is capped."""

    raw: dict[str, tuple[int, float]] = field(default_factory=dict)  # caller -> (rated, score_sum)
    total: tuple[float, float] = (0.0, 0.0)
    top: list[tuple[str, float, float]] = field(default_factory=list)  # the two largest, capped

    def refresh(self, cap: int) -> None:
        capped = [(c, *_capped(r, s, cap)) for c, (r, s) in self.raw.items()]
        self.total = (sum(x[1] for x in capped), sum(x[2] for x in capped))
        self.top = sorted(capped, key=lambda x: -x[1])[:2]

    def view(self, tenant: str, cap: int) -> tuple[float, float]:
        own_r, own_s = self.raw.get(tenant, (0, 0.0))
        cap_r, cap_s = _capped(own_r, own_s, cap)
        largest = next(((r, s) for c, r, s in self.top if c != tenant), (0.0, 0.0))
        others_r = self.total[0] - cap_r - largest[0]
        others_s = self.total[1] - cap_s - largest[1]
        return own_r + max(others_r, 0.0), own_s + max(others_s, 0.0)


def _capped(rated: int, total: float, cap: int) -> tuple[float, float]:
    if rated <= cap:
        return float(rated), total
    return float(cap), total * cap / rated


class ArmStatsCache:
    def __init__(
        self,
        specs: Sequence[ModelSpec],
        knobs: Knobs,
        store: StatsStore | None = None,
        tenant_cap: int = 1000,
    ) -> None:
        self.specs = {m.name: m for m in specs}
        self.hints = {m.name: m.quality for m in specs}
        self.knobs = knobs
        self.store = store
        self.tenant_cap = tenant_cap
        self.stats: dict[str, ArmStats] = {}  # every tenant's together
        self.shares: dict[str, _Shares] = {}
        # A model's answer length from a fitted router state (`llm-router fit`): its cost estimates
        # stay on it, the basis HCTS's cost correction was fitted against (the mean answer of the
        # calls routing sends a model drifts with routing: gpt-4's is 1 token on ARC, 306 on MBPP).
        # Without one, what the model's calls here have answered, else DEFAULT_COMPLETION_TOKENS.
        self.expected_answers: dict[str, float] = {}

    async def load(self) -> None:
        """Raises what the store raises (the caller decides how to go on without it)."""
        if self.store is not None:
            stats = await self.store.arm_stats()
            ratings = await self.store.tenant_ratings()
            self.stats = stats
            self.shares = {}
            for model, by_caller in ratings.items():
                shares = self.shares[model] = _Shares(dict(by_caller))
                shares.refresh(self.tenant_cap)

    def observe(self, model: str, score: float, previous: float | None, caller: str = "") -> None:
        self.stats.setdefault(model, ArmStats(model)).add_rating(score, previous)
        shares = self.shares.setdefault(model, _Shares())
        rated, total = shares.raw.get(caller, (0, 0.0))
        shares.raw[caller] = (rated + (previous is None), total + score - (previous or 0.0))
        shares.refresh(self.tenant_cap)

    def of(self, name: str, tenant: str | None = None) -> ArmStats | None:
        """The arm's statistics as `tenant` sees them (None: every tenant's together)."""
        stats = self.stats.get(name)
        shares = self.shares.get(name)
        if tenant is None or shares is None:
            return stats if shares is not None or tenant is None else _without_ratings(stats)
        rated, total = shares.view(tenant, self.tenant_cap)
        return replace(stats or ArmStats(name), rated=round(rated), score_sum=total)

    def view_stats(self, names: Sequence[str], tenant: str) -> dict[str, ArmStats]:
        out = {}
        for name in names:
            stats = self.of(name, tenant)
            if stats is not None:
                out[name] = stats
        return out

    def posterior(self, name: str, tenant: str | None = None) -> Posterior:
        return global_posterior(self.of(name, tenant), self.knobs, self.hints.get(name))

    def quality(self, name: str, tenant: str | None = None) -> float:
        """The arm's estimated quality: its global posterior mean (feedback, else the prior)."""
        return self.posterior(name, tenant).mean

    def estimated_cost(self, name: str, ctx: RouteContext) -> float:
        stats = self.stats.get(name)
        observed = stats.completion_tokens_avg if stats is not None else None
        # an observed mean of 0 tokens is a measurement (answers billed for their prompt only, as in
        # a replay file without completion tokens), not "nothing observed"
        seen = DEFAULT_COMPLETION_TOKENS if observed is None else observed
        completion = self.expected_answers.get(name, seen)
        if ctx.max_tokens:
            completion = min(completion, ctx.max_tokens)
        return self.specs[name].cost_usd(ctx.prompt_tokens, int(completion))

    def views(self, arms: Sequence[str], ctx: RouteContext) -> list[ArmView]:
        """What a policy starts from for each arm: the global posterior (as the request's tenant
        sees it), latency and cost."""
        views = []
        for name in arms:
            stats = self.of(name, ctx.tenant)
            views.append(
                ArmView(
                    name=name,
                    posterior=global_posterior(stats, self.knobs, self.hints.get(name)),
                    rated=stats.rated if stats else 0,
                    latency_ms=stats.latency_ms_avg if stats else None,
                    cost_usd=self.estimated_cost(name, ctx),
                    hint=self.hints.get(name),
                )
            )
        return views


def _without_ratings(stats: ArmStats | None) -> ArmStats | None:
    return None if stats is None else replace(stats, rated=0, score_sum=0.0)

"""The routing policies' seam: what a policy is given and what it must do (`RoutingPolicy`), and
the small helpers every policy shares. The policies themselves are in `gateway.routing.policies`
(the registry) and their own modules."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from gateway.config import Settings
from gateway.routing.bandit import ArmView, Choice, Knobs, choose
from gateway.routing.hcts_dial import DialSpec
from gateway.routing.stats import ArmStatsCache
from gateway.routing.strategies import rank
from gateway.store import NeighbourStore, RatingStore


@dataclass(frozen=True)
class PolicyRequest:
    """Which request a decision is for (its call and rating come back under this key), and the
    dial it asked for (None: the gateway's ROUTER_DIAL_MODE / ROUTER_DIAL_TARGET)."""

    request_id: str
    tenant: str = ""
    dial: DialSpec | None = None


@dataclass(frozen=True)
class FinishedCall:
    """A call that ended (any way): which model answered, at what cost."""

    caller: str
    request_id: str
    model: str | None
    cost_usd: float | None
    ok: bool


class RoutingPolicy(Protocol):
    needs_embedding: ClassVar[bool]
    layer: ClassVar[str]  # the decision's layer when this policy picks

    async def choose(
        self,
        views: list[ArmView],
        embedding: np.ndarray | None,
        timings: dict[str, float],
        tenant: str = "",
        request: PolicyRequest | None = None,
    ) -> Choice:
        """`tenant`: whose request this is (its contextual evidence is its own)."""
        ...

    def observe(self, rating: Observed) -> None: ...

    def observe_call(self, call: FinishedCall) -> None:
        """Every finished call of this replica (rated or not, later or never)."""
        ...

    async def aclose(self) -> None: ...

    async def sync(self) -> None: ...

    async def settle(self) -> None:
        """Waits for learning work the policy runs in the background (the lab: deterministic runs)."""
        ...


@dataclass(frozen=True)
class Observed:
    """A rating this replica took: which tenant's call, of which model, the score and the one it
    replaces, and the call's embedding if known."""

    caller: str
    request_id: str
    model: str
    score: float
    previous: float | None
    embedding: np.ndarray | None


class PolicyStore(NeighbourStore, RatingStore, Protocol):
    """What the policies read from the store."""


@dataclass
class PolicyDeps:
    settings: Settings
    knobs: Knobs
    arms: ArmStatsCache
    store: PolicyStore | None
    rng: np.random.Generator
    clock: Callable[[], float]
    # The id of the embedder whose vectors the policy gets: the store's embeddings of other ids
    # (another embedder's space) are never read back (None: no embedder, none are).
    embedder: str | None = None


def thompson(
    views: list[ArmView], knobs: Knobs, rng: np.random.Generator, timings: dict[str, float]
) -> Choice:
    t = time.perf_counter()
    choice = choose(views, knobs, rng)
    timings["sample_ms"] = (time.perf_counter() - t) * 1000
    return choice


def pinned(model: str, views: list[ArmView], knobs: Knobs) -> Choice:
    """A deterministic pick of `model` (a rule, a route, the default model), the others ranked by
    quality behind it as fallbacks."""
    rest = [v for v in views if v.name != model]
    ranked = rank("quality_optimized", rest, knobs) if rest else None
    return Choice.deterministic([model, *(ranked.ranking if ranked else [])])

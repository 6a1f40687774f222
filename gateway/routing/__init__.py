"""Routing: which model answers a request. See `Router.decide`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.catalogue import RouterConstraints

if TYPE_CHECKING:
    from gateway.routing.bandit import ArmView


@dataclass
class RouteContext:
    request_id: str
    requested_model: str
    messages: list[dict[str, Any]]
    constraints: RouterConstraints = field(default_factory=RouterConstraints)
    needs: frozenset[str] = frozenset()
    prompt_tokens: int = 0
    max_tokens: int | None = None
    tenant: str = ""  # whose request: its arm statistics and contextual evidence are its own view


@dataclass
class Decision:
    model: str
    layer: str  # explicit | keyword | semantic | bandit | strategy | default
    fallbacks: list[str] = field(default_factory=list)
    strategy: str | None = None
    policy: str | None = None
    rule: str | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    propensity: float | None = None
    embedding: np.ndarray | None = None
    embedder: str | None = None  # the id of the embedder that made `embedding`
    timings: dict[str, float] = field(default_factory=dict)
    explored: bool = False  # a uniform EXPLORATION_RATE pick, not the posteriors' choice
    # What the policy believed about each eligible arm for this request (the posteriors it sampled):
    # not recorded, but the dashboard's "why this model" view shows it.
    arms: list[ArmView] = field(default_factory=list)

    @property
    def chain(self) -> list[str]:
        return [self.model, *self.fallbacks]

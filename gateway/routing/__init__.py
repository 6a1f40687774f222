"""Routing: which model answers a request. See `Router.decide`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.catalogue import RouterConstraints

if TYPE_CHECKING:
    from gateway.routing.bandit import ArmView, Choice


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

    def logged(self) -> dict[str, Any]:
        """What a call record keeps of the context beside the messages and the requested model,
        so that another configuration can decide the same request again (off-policy evaluation)."""
        out: dict[str, Any] = {"prompt_tokens": self.prompt_tokens}
        if self.max_tokens is not None:
            out["max_tokens"] = self.max_tokens
        if self.needs:
            out["needs"] = sorted(self.needs)
        constraints = self.constraints.model_dump(mode="json", exclude_defaults=True)
        if constraints:
            out["constraints"] = constraints
        return out

    @classmethod
    def from_logged(
        cls,
        request_id: str,
        requested_model: str,
        messages: list[dict[str, Any]],
        logged: dict[str, Any],
        tenant: str = "",
    ) -> RouteContext:
        """The context a call was decided from, again (`tenant`: the record's caller)."""
        return cls(
            request_id=request_id,
            requested_model=requested_model,
            messages=messages,
            constraints=RouterConstraints(**logged.get("constraints", {})),
            needs=frozenset(logged.get("needs", ())),
            prompt_tokens=int(logged.get("prompt_tokens", 0)),
            max_tokens=logged.get("max_tokens"),
            tenant=tenant,
        )


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
    # every eligible arm's probability of being picked ({model: 1} when deterministic; empty when
    # the policy cannot say), the numerical error of each, and what it was decided from
    propensities: dict[str, float] = field(default_factory=dict)
    propensity_error: float = 0.0
    context: RouteContext | None = None
    unavailable: list[str] = field(default_factory=list)  # catalogue models down at the time
    choice: Choice | None = field(default=None, repr=False)  # a pick whose propensities may be pending

    @property
    def pending(self) -> bool:
        """Whether its propensities are still to be computed (`resolve`)."""
        return self.choice is not None and self.choice.pending is not None

    def resolve(self) -> Decision:
        """Computes the propensities a Thompson pick left pending (while the call is upstream: the
        call's record needs them, the decision did not)."""
        if self.choice is not None and self.choice.pending is not None:
            c = self.choice.resolve()
            self.propensity, self.propensities, self.propensity_error = (
                c.propensity,
                c.propensities,
                c.propensity_error,
            )
        return self

    @property
    def chain(self) -> list[str]:
        return [self.model, *self.fallbacks]

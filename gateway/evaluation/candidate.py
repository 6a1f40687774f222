"""A candidate configuration, and its decisions on logged calls.

A candidate is a set of settings overrides with the names used everywhere else (ROUTER_POLICY or
`policy`, COST_WEIGHT, EXPLORATION_RATE, LLM_MODELS, ...), on top of the gateway's settings. It
decides each logged call with the real routing code: a `Router` built from its settings (the
policy from the registry, eligibility, rules, routes, strategies) over a snapshot of the store as
it stood when the window began, deciding the call's logged context (its messages, constraints,
needs, token estimate, the models that were down) with the logged embedding. The router is
frozen: it never refreshes, and nothing it decides is rated, so every call sees the same state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import ValidationError

from gateway.config import Settings
from gateway.embedder import CacheStats, Embedder, routing_text
from gateway.embedders import embedder_id
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.evaluation.logs import LoggedCall
from gateway.health import Unavailable
from gateway.routing.router import Router, RouterStore

ALIASES = {"policy": "router_policy"}
# What an evaluation may not override: where the gateway listens, its secrets and its storage.
FIXED = {
    "host",
    "port",
    "config_file",
    "gateway_api_keys",
    "require_api_keys",
    "admin_api_key",
    "openrouter_api_key",
    "database_url",
    "database_host",
    "database_port",
    "database_user",
    "database_password",
    "database_name",
    "database_ssl_mode",
    "data_dir",
    "models_dir",
    "enable_persistence",
}
# the candidate never refreshes its state during the window, and never starts from (or saves) what
# the live gateway learnt: that has seen the window's outcomes
FROZEN = {"stats_refresh_s": 1e12, "router_state_keep": False}


@dataclass(frozen=True)
class Candidate:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


def setting_name(key: str) -> str:
    """A settings name as users write it (COST_WEIGHT, cost_weight, policy) -> the field."""
    name = ALIASES.get(key.strip().lower(), key.strip().lower())
    if name not in Settings.model_fields:
        raise InvalidRequest(f"unknown setting {key!r}", param="candidates", code="invalid_value")
    if name in FIXED:
        raise InvalidRequest(
            f"{key!r} cannot differ in an evaluation (it is not a routing setting)",
            param="candidates",
            code="invalid_value",
        )
    return name


def candidate(name: str | None, overrides: dict[str, Any]) -> Candidate:
    fields = {setting_name(k): v for k, v in overrides.items()}
    label = name or (" ".join(f"{k.upper()}={v}" for k, v in overrides.items()) or "current settings")
    return Candidate(label, fields)


def settings_of(base: Settings, overrides: dict[str, Any]) -> Settings:
    """The base settings with the candidate's overrides, validated as any configuration is."""
    values = {**base.model_dump(), **overrides, **FROZEN, "config_file": None}
    if (
        "router_dial_mode" in overrides
        and "router_dial_target" not in overrides
        and overrides["router_dial_mode"] != base.router_dial_mode
    ):
        del values["router_dial_target"]  # another mode alone: its default target, not ours
    if "llm_models" in overrides and "default_model" not in overrides:
        names = overrides["llm_models"]
        names = names.split(",") if isinstance(names, str) else names
        if base.default_model not in [n.strip() for n in names]:
            values["default_model"] = None  # the first model of the subset
    try:
        return Settings(_env_file=None, **values)
    except (ValidationError, ValueError) as exc:
        raise InvalidRequest(
            f"candidate settings are invalid: {exc}", param="candidates", code="invalid_value"
        ) from exc


def _known(settings: Settings, requested: str) -> bool:
    """Whether the gateway would route a request for this model (else: 404, as chat answers)."""
    return (
        requested == "auto" or requested in settings.virtual_models or settings.model(requested) is not None
    )


class LoggedAvailability:
    """The models as they were when the call was decided: up unless its record says down."""

    def __init__(self) -> None:
        self.down: frozenset[str] = frozenset()

    def is_available(self, name: str) -> bool:
        return name not in self.down

    def why_unavailable(self, name: str) -> Unavailable | None:
        # a passing kind (not one of errors.LASTING): down then, not misconfigured
        if name not in self.down:
            return None
        return Unavailable("unavailable when the call was logged", "logged_down")

    def in_flight(self, name: str) -> int:
        return 0


class LoggedEmbeddings:
    """The embedder a candidate sees: the logged embedding of each call's routing text, and
    whatever else was embedded ahead of time (route utterances, texts without a logged one)."""

    def __init__(self, vectors: dict[str, np.ndarray], id: str) -> None:
        self.vectors = vectors
        self.id = id  # the embedder that made the logged embeddings (the configured one)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self.vectors]
        if missing:
            raise LookupError(f"{len(missing)} texts have no embedding in the logs")
        return np.stack([self.vectors[t] for t in texts])

    def cache_stats(self) -> CacheStats | None:
        return None

    async def aclose(self) -> None:
        pass


def texts_needed(settings: Settings, calls: Sequence[LoggedCall]) -> list[str]:
    """What a candidate may embed: each call's routing text (as its settings cut it) and its
    routes' utterances."""
    texts = [routing_text(c.context.messages, settings.embedding_max_chars) for c in calls]
    return [*texts, *(u for r in settings.routes for u in r.utterances)]


@dataclass
class Decided:
    """A candidate's decisions: per call, its propensity of every arm (None: refused)."""

    propensities: list[dict[str, float] | None]
    errors: list[float]
    refused: dict[str, int]
    layers: dict[str, int]
    seconds: float


async def decide_all(
    settings: Settings,
    store: RouterStore,
    calls: Sequence[LoggedCall],
    vectors: dict[str, np.ndarray],
    progress: Callable[[int], None] | None = None,
    seed: int = 0,
) -> Decided:
    t0 = time.perf_counter()
    availability = LoggedAvailability()
    embedder: Embedder = LoggedEmbeddings(vectors, embedder_id(settings))
    router = Router(settings, availability, store=store, embedder=embedder, rng=np.random.default_rng(seed))
    await router.start()
    out: list[dict[str, float] | None] = []
    errors: list[float] = []
    refused: dict[str, int] = {}
    layers: dict[str, int] = {}
    try:
        for n, call in enumerate(calls):
            availability.down = call.unavailable
            try:
                if not _known(settings, call.context.requested_model):
                    raise NotFound("not in the candidate's catalogue", code="model_not_found")
                decision = (await router.decide(call.context)).resolve()
            except GatewayError as exc:
                out.append(None)
                errors.append(0.0)
                refused[exc.code] = refused.get(exc.code, 0) + 1
            else:
                if not decision.propensities:
                    raise InvalidRequest(
                        f"policy {settings.router_policy!r} gives no propensities: its decisions cannot "
                        "be evaluated off-line",
                        param="candidates",
                        code="not_evaluable",
                    )
                out.append(decision.propensities)
                errors.append(decision.propensity_error)
                layers[decision.layer] = layers.get(decision.layer, 0) + 1
            if progress is not None:
                progress(n)
    finally:
        await router.aclose()
    return Decided(out, errors, refused, layers, time.perf_counter() - t0)

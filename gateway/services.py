"""What request handlers are given: every part of a running gateway, built once by the app factory
and handed down as lifespan state (starlette copies it into each request's scope). Behaviour lives
in the parts; this container has none."""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.auth import Keys
    from gateway.calls import Calls
    from gateway.config import Settings
    from gateway.duels import Duels
    from gateway.embedder import Embedder
    from gateway.evaluation.service import Evaluator
    from gateway.feedback import Learner
    from gateway.keys import KeyDirectory
    from gateway.limits import RateLimits
    from gateway.logs import Redactor
    from gateway.metrics import Metrics
    from gateway.readiness import ReadinessCache
    from gateway.recorder import Recorder
    from gateway.routing.router import Router
    from gateway.shared import Backend
    from gateway.store import Store
    from gateway.tracing import Tracing
    from gateway.upstreams import Upstreams

SERVICES_KEY = "services"


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: Store
    upstreams: Upstreams
    router: Router
    recorder: Recorder
    calls: Calls
    learner: Learner
    duels: Duels
    metrics: Metrics
    limits: RateLimits
    shared: Backend
    keys: Keys
    directory: KeyDirectory
    redact: Redactor
    embedder: Embedder | None
    tracing: Tracing
    readiness: ReadinessCache  # what /ready and /health answer from
    evaluator: Evaluator


def services_of(scope: MutableMapping[str, Any]) -> Services:
    services: Services = scope["state"][SERVICES_KEY]
    return services

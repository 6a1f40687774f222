"""Each upstream model's health: a circuit breaker and the running figures /health shows."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


class CircuitBreaker:
    """Closed -> open after `threshold` consecutive failures -> half-open after `cooldown_s`
    (one probe request) -> closed on its success, open again on its failure."""

    def __init__(self, threshold: int, cooldown_s: float, clock: Clock = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at >= self.cooldown_s:
            return "half_open"
        return "open"

    def available(self) -> bool:
        """Whether a request may go now (without taking the half-open probe slot)."""
        state = self.state
        return state == "closed" or (state == "half_open" and not self.probing)

    def acquire(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.threshold:
            self.opened_at = self.clock()
        self.probing = False

    def release(self) -> None:
        """The request ended without telling anything about the model (cancelled, 4xx)."""
        self.probing = False


@dataclass
class ModelHealth:
    requests: int = 0
    failures: int = 0
    in_flight: int = 0
    latency_ms_avg: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    # Why a local upstream is down (it refused a connection, or its probe failed); None: up. A
    # down model is left out of routing until a probe or a call reaches it again.
    down: str | None = None
    probed_at: float | None = None  # when a probe last ran (time.time())

    def observe_latency(self, ms: float) -> None:
        # Exponentially weighted, so it follows an upstream that slows down.
        self.latency_ms_avg = ms if self.latency_ms_avg is None else 0.9 * self.latency_ms_avg + 0.1 * ms


@dataclass(frozen=True)
class Unavailable:
    """Why a model cannot take calls now (`kind`: unconfigured, refused, circuit_open, no_provider;
    see `gateway.errors.LASTING` for those no retry can fix)."""

    reason: str
    kind: str

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class ModelStatus:
    """A model's health as /health and /metrics show it."""

    status: str  # up | unavailable | down | circuit_open | circuit_half_open
    circuit: str
    reason: str | None
    in_flight: int
    requests: int
    failures: int
    latency_ms_avg: float | None
    last_error: str | None
    last_error_at: float | None
    probed_at: float | None = None

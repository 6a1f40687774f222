"""One request's state, typed, under one key of the ASGI scope's `state` (uvicorn's per-request
cycle object is the model): the middleware creates it, the endpoints fill it in, and the middleware
reads it back for the response headers and the access log line."""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

from gateway.domain import CallRecord, VirtualKey
from gateway.limits import Policy, Quota, RateLimits, Reservation
from gateway.routing import Decision
from gateway.tracing import CallTrace

STATE_KEY = "request"


@dataclass(slots=True)
class RequestState:
    t0: float  # time.perf_counter() at arrival
    request_id: str = ""
    caller: str | None = None  # the caller's key id
    key: VirtualKey | None = None  # the caller's virtual key (models, limits, budgets)
    # The tenant whose request ids, ratings, pairs and arm statistics these are: a virtual key's
    # owner; an environment client key's id on a gateway that requires keys; "" otherwise (an open
    # gateway: one tenant, anyone may read and rate its calls). See gateway.auth.Caller.
    tenant: str = ""
    limit_id: str | None = None  # whose rate limits apply: a key id, or "ip:<address>"
    policy: Policy | None = None  # the limits that apply to limit_id (None: none)
    admitted: bool = False  # the request has been counted against `policy`
    quotas: list[Quota] = field(default_factory=list)  # what is left, for the x-ratelimit-* headers
    reservation: Reservation | None = None  # tokens (prompt, most output) and cost held for the call
    overhead_ms: float | None = None
    record: CallRecord | None = None  # the call this request made, once it has one
    decision: Decision | None = None  # how its model was chosen
    trace: CallTrace | None = None  # its trace, when tracing is on

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000

    def mark_overhead(self, upstream_ms: float) -> None:
        """The gateway's own time: all that has elapsed but the time spent on upstreams."""
        self.overhead_ms = self.elapsed_ms() - upstream_ms

    def overhead(self) -> float:
        """As marked, or (no upstream was called) everything elapsed until now."""
        if self.overhead_ms is None:
            self.overhead_ms = self.elapsed_ms()
        return self.overhead_ms


def request_state(scope: MutableMapping[str, Any]) -> RequestState:
    state: RequestState = scope["state"][STATE_KEY]
    return state


async def admit(
    limits: RateLimits, state: RequestState, tokens: int | None = None, cost_usd: float = 0.0
) -> None:
    """Counts the request against its caller's limits (once), holding `tokens` and `cost_usd` (its
    key's budgets) for a call that goes upstream: the headers' figures go into `state`; a refusal
    is raised."""
    if state.policy is None or state.limit_id is None or state.admitted:
        return
    state.admitted = True
    held, state.quotas, refused = await limits.admit(state.limit_id, state.policy, tokens, cost_usd)
    if refused is not None:
        raise refused
    state.reservation = held

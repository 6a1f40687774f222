"""One request's state, typed, under one key of the ASGI scope's `state` (uvicorn's per-request
cycle object is the model): the middleware creates it, the endpoints fill it in, and the middleware
reads it back for the response headers and the access log line."""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from gateway.domain import CallRecord
from gateway.limits import Reservation
from gateway.routing import Decision
from gateway.tracing import CallTrace

STATE_KEY = "request"


@dataclass(slots=True)
class RequestState:
    t0: float  # time.perf_counter() at arrival
    request_id: str = ""
    caller: str | None = None  # the caller's key id
    # The tenant whose request ids, ratings and pairs these are: the key id on a gateway with
    # client keys, "" on an open one (one tenant: anyone may read and rate any call).
    tenant: str = ""
    limit_id: str | None = None  # whose rate limits apply: a key id, or "ip:<address>"
    reservation: Reservation | None = None  # prompt tokens held for the call
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

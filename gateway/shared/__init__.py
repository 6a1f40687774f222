"""The shared-state seam: what replicas must agree on (rate limits, spend counters) and the notices
they send each other (a key was revoked), behind one small protocol.

Implementations: in-process (`gateway.shared.local`, one replica, the default), a Redis-protocol
server (`gateway.shared.redis`, REDIS_URL: Redis or Valkey, any number of replicas), and a guard
(`gateway.shared.guarded`) that serves from the in-process state while the server is unreachable
(fail-open) or refuses (fail-closed).

One operation does all the counting: `apply(ops)` checks every op and applies all of them or none,
atomically (a Lua script on the server). The policy (which cells a request takes, what the headers
say, when a budget resets) lives once, in `gateway.limits`; the backends only keep two kinds of cell:

- `Rate`: a GCRA cell (the generic cell rate algorithm): `limit` units per `period_s`, refilled
  continuously. It is a token bucket of capacity `limit` kept as one number, the theoretical
  arrival time (TAT): taking `cost` units moves it `cost * period_s / limit` seconds on; the cell
  admits while the TAT stays within `period_s` of now. A negative cost gives units back; a forced
  cost (`check=False`) may push it past the window: a debt the next calls wait out.
- `Sum`: an integer counter (spend in nano-USD) with an optional cap, a time to live set when it
  is created, and a seed: a counter that does not exist yet is reported `missing` (nothing is
  applied) unless the op brings the value to start from (the ledger's figure, see limits).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

# What `listen` yields after it has (re)subscribed: notices sent meanwhile may have been missed.
RESYNC = ""


class SharedStateDown(Exception):
    """The shared state cannot be reached (connection refused, timed out, reset)."""


@dataclass(frozen=True, slots=True)
class Rate:
    key: str
    cost: float  # units to take; negative gives back
    limit: int  # units per period (> 0)
    period_s: float = 60.0
    check: bool = True  # False: take anyway (a debt), or peek with cost 0


@dataclass(frozen=True, slots=True)
class Sum:
    key: str
    amount: int  # added; 0 peeks
    cap: int | None = None  # refused when a positive amount would take the sum past it
    ttl_s: int | None = None  # set when the counter is created (None: it never expires)
    seed: int | None = None  # where a counter that does not exist yet starts


Op = Rate | Sum


@dataclass(frozen=True, slots=True)
class Cell:
    """One op's cell after the operation (as it stands when the operation was refused)."""

    ok: bool  # this op's check passed
    value: float  # Rate: units available now; Sum: the sum
    reset_s: float = 0.0  # Rate: until the cell is full again
    retry_s: float | None = None  # Rate refused: until `cost` is available (None: never, cost > limit)
    missing: bool = False  # Sum: the counter does not exist (and the op brought no seed)


@dataclass(frozen=True, slots=True)
class Outcome:
    applied: bool  # every check passed and every op was applied; otherwise none was
    cells: tuple[Cell, ...]


class SharedState(Protocol):
    async def apply(self, ops: Sequence[Op]) -> Outcome:
        """Atomically: every op's check passes and all are applied, or none is. A `Sum` with a
        non-zero amount whose counter is missing (and no seed) refuses the whole operation."""
        ...

    async def publish(self, channel: str, message: str) -> None: ...

    def listen(self, channel: str) -> AsyncIterator[str]:
        """Messages published on `channel` by any replica (this one included), and `RESYNC`
        whenever they may have been missed (first of all, when listening starts)."""
        ...


@dataclass(frozen=True)
class SharedStatus:
    """What /health and /metrics say about the shared state."""

    backend: str  # redis | local
    up: bool
    mode: str  # shared | per-replica (in-process) | per-replica (fail-open) | refusing (fail-closed)
    down_since: float | None = None  # time.time() when the server became unreachable
    fallbacks: int = 0  # operations served per replica because the server was unreachable
    last_error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "status": "ok" if self.up else "unreachable",
            "mode": self.mode,
            "down_since": self.down_since,
            "fallbacks": self.fallbacks,
            "last_error": self.last_error,
        }


class Backend(SharedState, Protocol):
    """A shared state the app owns: it tells its status and is closed at shutdown."""

    def status(self) -> SharedStatus: ...

    async def aclose(self) -> None: ...


def gcra(tat: float, now: float, op: Rate) -> tuple[Cell, float]:
    """One GCRA step: the cell's state and the new TAT (unchanged when refused). The Lua script in
    `gateway.shared.redis` is this function, line by line."""
    interval = op.period_s / op.limit
    base = max(tat, now)
    new = base + op.cost * interval
    if op.cost < 0 and new < now:
        new = now  # a refund fills the bucket at most
    if op.check and op.cost > 0 and new - now > op.period_s + 1e-6:
        retry = new - now - op.period_s if op.cost <= op.limit else None
        return Cell(False, max(0.0, (now + op.period_s - base) / interval), base - now, retry), tat
    return Cell(True, max(0.0, (now + op.period_s - new) / interval), max(0.0, new - now)), new


def ttl_ms(tat: float, now: float) -> int:
    """How long a rate cell must live: until its bucket is full again (then it may as well not exist)."""
    return max(1, math.ceil((tat - now) * 1000)) + 1000

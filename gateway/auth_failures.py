"""Failed authentication, counted and limited per client address: AUTH_FAILURES_PER_MINUTE
failures (a token bucket, refilled continuously), then 429 with Retry-After for every request of
that address to a protected path, before its key is even looked at, until the bucket refills.
Guessing keys becomes slow; a client with a good key is never counted."""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.errors import RateLimited


class AuthFailures:
    def __init__(
        self, per_minute: int, clock: Callable[[], float] = time.monotonic, max_addresses: int = 100_000
    ):
        self.per_minute = per_minute
        self.clock = clock
        self.max_addresses = max_addresses
        self.buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, last refill)
        self.total = 0  # failures seen (for /metrics)

    def _tokens(self, address: str, now: float) -> float:
        tokens, at = self.buckets.get(address, (float(self.per_minute), now))
        return min(float(self.per_minute), tokens + (now - at) * self.per_minute / 60)

    def check(self, address: str) -> None:
        """Raises RateLimited while `address` has no failures left."""
        if not self.per_minute or address not in self.buckets:
            return
        tokens = self._tokens(address, self.clock())
        if tokens < 1:
            wait = (1 - tokens) * 60 / self.per_minute
            raise RateLimited(
                f"too many failed authentications from this address; try again in {wait:.0f} s",
                "requests",
                wait,
            )

    def failed(self, address: str) -> None:
        self.total += 1
        if not self.per_minute:
            return
        now = self.clock()
        if address not in self.buckets and len(self.buckets) >= self.max_addresses:
            # Forget addresses whose buckets are full again (they would not be limited anyway).
            self.buckets = {a: b for a, b in self.buckets.items() if self._tokens(a, now) < self.per_minute}
        self.buckets[address] = (self._tokens(address, now) - 1, now)

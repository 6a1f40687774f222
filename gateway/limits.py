"""Per-caller rate limits: RATE_LIMIT_RPM and RATE_LIMIT_TPM as token buckets, refilled continuously.

A request takes one request token when it arrives. A chat call reserves its estimated prompt tokens
before it goes upstream (`reserve`, refused when they are not available); when it ends, the
reservation is settled with what the call really used (prompt and completion), so a long answer
leaves a debt the caller's next calls wait out; a call refused before it went upstream releases
its reservation. Limits are per replica (in memory), like the circuit breakers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.errors import RateLimited


class Reservation:
    """Tokens held for one call; settled (or released) exactly once."""

    def __init__(self, limits: RateLimits, caller: str, tokens: int) -> None:
        self.limits, self.caller, self.tokens = limits, caller, tokens
        self.done = False

    def settle(self, used: int) -> None:
        """The call used `used` tokens: the bucket is charged the difference."""
        if not self.done:
            self.done = True
            self.limits.charge(self.caller, used - self.tokens)

    def release(self) -> None:
        """The call never went upstream: the tokens go back."""
        self.settle(0)


class RateLimits:
    def __init__(self, rpm: int, tpm: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.clock = clock
        self.buckets: dict[str, list[float]] = {}  # caller -> [requests, tokens, last refill]

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def _bucket(self, caller: str) -> list[float]:
        now = self.clock()
        bucket = self.buckets.get(caller)
        if bucket is None:
            if len(self.buckets) >= 100_000:
                self._prune(now)
            bucket = self.buckets[caller] = [float(self.rpm), float(self.tpm), now]
        else:
            elapsed = now - bucket[2]
            bucket[0] = min(float(self.rpm), bucket[0] + elapsed * self.rpm / 60)
            bucket[1] = min(float(self.tpm), bucket[1] + elapsed * self.tpm / 60)
            bucket[2] = now
        return bucket

    def _prune(self, now: float) -> None:
        """Forget callers idle for a minute (their buckets are full again anyway); if that is not
        enough, the idlest half (so that the next prune is 50,000 new callers away)."""
        self.buckets = {k: b for k, b in self.buckets.items() if now - b[2] < 60}
        if len(self.buckets) >= 50_000:
            recent = sorted(self.buckets.items(), key=lambda kb: kb[1][2])[len(self.buckets) // 2 :]
            self.buckets = dict(recent)

    def take_request(self, caller: str) -> None:
        if not self.rpm:
            return
        bucket = self._bucket(caller)
        if bucket[0] < 1:
            wait = (1 - bucket[0]) * 60 / self.rpm
            raise RateLimited(
                f"rate limit reached: {self.rpm} requests per minute; try again in {wait:.1f} s",
                "requests",
                wait,
            )
        bucket[0] -= 1

    def reserve(self, caller: str, tokens: int) -> Reservation | None:
        """Admits a call estimated at `tokens` prompt tokens, and holds them (None: no token limit)."""
        if not self.tpm:
            return None
        if tokens > self.tpm:
            raise RateLimited(
                f"this request (about {tokens} tokens) is larger than the limit of {self.tpm} tokens "
                "per minute",
                "tokens",
                None,
            )
        bucket = self._bucket(caller)
        if bucket[1] < tokens:
            wait = (tokens - bucket[1]) * 60 / self.tpm
            raise RateLimited(
                f"rate limit reached: {self.tpm} tokens per minute; try again in {wait:.1f} s",
                "tokens",
                wait,
            )
        bucket[1] -= tokens
        return Reservation(self, caller, tokens)

    def charge(self, caller: str, tokens: int) -> None:
        if self.tpm:
            self._bucket(caller)[1] -= tokens

    def headers(self, caller: str) -> list[tuple[bytes, bytes]]:
        """OpenAI's x-ratelimit-* headers."""
        bucket = self._bucket(caller)
        out = []
        if self.rpm:
            out += [
                (b"x-ratelimit-limit-requests", str(self.rpm).encode()),
                (b"x-ratelimit-remaining-requests", str(max(0, int(bucket[0]))).encode()),
            ]
        if self.tpm:
            out += [
                (b"x-ratelimit-limit-tokens", str(self.tpm).encode()),
                (b"x-ratelimit-remaining-tokens", str(max(0, int(bucket[1]))).encode()),
            ]
        return out

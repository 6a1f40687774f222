"""Readiness, cheap to ask: /ready and /health answer from a result at most HEALTH_CACHE_S old,
computed by one check at a time however many probes come (a database round trip per probe let
any client load the database at will), each check bounded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Readiness:
    checks: dict[str, str]
    at: float  # time.monotonic() of the check

    @property
    def ok(self) -> bool:
        return all(v == "ok" for v in self.checks.values())


class ReadinessCache:
    def __init__(
        self,
        check: Callable[[], Awaitable[dict[str, str]]],
        max_age_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.check = check
        self.max_age_s = max_age_s
        self.clock = clock
        self.last: Readiness | None = None
        self._running: asyncio.Task[Readiness] | None = None

    async def get(self) -> Readiness:
        last = self.last
        if last is not None and self.clock() - last.at <= self.max_age_s:
            return last
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._run())
        return await asyncio.shield(self._running)

    async def _run(self) -> Readiness:
        self.last = Readiness(await self.check(), self.clock())
        return self.last

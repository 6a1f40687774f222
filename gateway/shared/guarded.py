"""The guard in front of a Redis-protocol server: while the server answers, every operation goes
there; when a call fails, the guard serves from the in-process state (per-replica limits,
fail-open, the default) or refuses with 503 (fail-closed, REDIS_FAIL_CLOSED=true), logs it once,
and pings the server in the background every `probe_s` until it answers again. /health shows the
state and /metrics `llm_router_shared_state_up` and `llm_router_shared_state_fallbacks_total`.

An operation that timed out on a hung server may still run there when the server wakes: it is then
counted twice (once per replica, once shared), never not at all."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence

from gateway.errors import ServiceUnavailable
from gateway.shared import Op, Outcome, SharedStateDown, SharedStatus
from gateway.shared.local import LocalState
from gateway.shared.redis import RedisState

log = logging.getLogger("gateway.shared")


class Guarded:
    def __init__(
        self,
        remote: RedisState,
        local: LocalState | None = None,
        *,
        fail_closed: bool = False,
        probe_s: float = 1.0,
    ) -> None:
        self.remote = remote
        self.local = local or LocalState()
        self.fail_closed = fail_closed
        self.probe_s = probe_s
        self.up = True
        self.down_since: float | None = None
        self.fallbacks = 0
        self.last_error: str | None = None
        self.probe: asyncio.Task[None] | None = None

    def status(self) -> SharedStatus:
        mode = "shared"
        if not self.up:
            mode = "refusing (fail-closed)" if self.fail_closed else "per-replica (fail-open)"
        return SharedStatus("redis", self.up, mode, self.down_since, self.fallbacks, self.last_error)

    def mark_down(self, reason: str) -> None:
        self._down(SharedStateDown(reason))

    def _down(self, exc: SharedStateDown) -> None:
        self.last_error = str(exc)
        if not self.up:
            return
        self.up = False
        self.down_since = time.time()
        if self.fail_closed:
            log.error("shared state unreachable (%s): refusing limited requests until it returns", exc)
        else:
            log.warning(
                "shared state unreachable (%s): limits and budgets are PER REPLICA until it returns "
                "(fail-open; REDIS_FAIL_CLOSED=true refuses instead)",
                exc,
            )
        self.probe = asyncio.create_task(self._probe())

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self.probe_s)
            if await self.remote.ping():
                self.up = True
                log.warning(
                    "shared state reachable again after %.1f s: limits are shared again",
                    time.time() - (self.down_since or time.time()),
                )
                self.down_since = None
                return

    def _refuse(self) -> ServiceUnavailable:
        return ServiceUnavailable(
            "the shared rate-limit store is unreachable and the gateway is set to fail closed "
            "(REDIS_FAIL_CLOSED); try again shortly",
            code="shared_state_unavailable",
            headers={"retry-after": "2"},
        )

    async def apply(self, ops: Sequence[Op]) -> Outcome:
        if self.up:
            try:
                return await self.remote.apply(ops)
            except SharedStateDown as exc:
                self._down(exc)
        if self.fail_closed:
            raise self._refuse()
        self.fallbacks += 1
        return await self.local.apply(ops)

    async def publish(self, channel: str, message: str) -> None:
        """To every replica through the server; while it is unreachable, to this one (the others
        drop their cached keys when they subscribe again, and after KEY_CACHE_TTL_S anyway)."""
        if self.up:
            try:
                await self.remote.publish(channel, message)
                return
            except SharedStateDown as exc:
                self._down(exc)
        await self.local.publish(channel, message)

    def listen(self, channel: str) -> AsyncIterator[str]:
        return self.remote.listen(channel)

    async def ping(self) -> bool:
        return self.up

    async def aclose(self) -> None:
        if self.probe is not None:
            self.probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.probe
        await self.remote.aclose()

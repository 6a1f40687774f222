"""Choosing the shared state: a Redis-protocol server behind the guard when REDIS_URL is set,
the in-process state otherwise."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from gateway.config import Settings
from gateway.shared import Backend
from gateway.shared.local import LocalState

log = logging.getLogger("gateway.shared")


@contextlib.asynccontextmanager
async def open_shared(settings: Settings) -> AsyncIterator[Backend]:
    if settings.redis_url is None or not settings.redis_url.get_secret_value():
        yield LocalState()
        return
    from gateway.shared.guarded import Guarded
    from gateway.shared.redis import RedisState

    remote = RedisState(
        settings.redis_url.get_secret_value(),
        timeout_s=settings.redis_timeout_s,
        prefix=settings.redis_prefix,
    )
    guarded = Guarded(remote, fail_closed=settings.redis_fail_closed)
    if not await remote.ping():
        log.warning(
            "REDIS_URL does not answer at start: limits are %s until it does",
            "refused (fail-closed)" if settings.redis_fail_closed else "per replica (fail-open)",
        )
        guarded.mark_down("no answer at start")
    try:
        yield guarded
    finally:
        await guarded.aclose()

"""Probes of local upstreams (Ollama, vLLM, anything on loopback): `GET {base_url}/models` when the
gateway starts and every LOCAL_PROBE_INTERVAL_S, so that routing, /ready and /health know that a
local server is not running before any call fails on it.

A probe that cannot connect, or gets no answer within its timeout, marks the model down (routing
leaves it out; /health shows `down` and why; /ready counts it out); any HTTP answer marks it up
again, as does a call that reaches it. Remote upstreams are not probed: their failures are the
circuit breakers' business, and a probe would cost their owners requests.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Mapping, Sequence

import aiohttp

from gateway.catalogue import ModelSpec
from gateway.health import ModelHealth
from gateway.logs import hide_addresses
from gateway.providers.http import refused

log = logging.getLogger("gateway.probes")


class LocalProbes:
    def __init__(
        self,
        specs: Sequence[ModelSpec],
        health: Mapping[str, ModelHealth],
        session: aiohttp.ClientSession,
        *,
        interval_s: float,
        timeout_s: float = 2.0,
    ) -> None:
        self.specs = [s for s in specs if s.is_local and s.base_url]
        self.health = health
        self.session = session
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def _reason(self, spec: ModelSpec) -> str | None:
        """Why the model's server is down (None: it answered, whatever the status)."""
        assert spec.base_url is not None
        url = spec.base_url.rstrip("/") + "/models"
        try:
            async with self.session.get(url, timeout=self.timeout, allow_redirects=False):
                return None
        except aiohttp.ClientConnectorError as exc:
            if getattr(exc.os_error, "errno", None) == errno.ECONNREFUSED:
                return refused(spec)
            return f"cannot connect to {spec.base_url} ({exc.os_error})"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"no answer from {url} within {self.timeout.total:g} s ({type(exc).__name__})"

    async def probe(self, spec: ModelSpec) -> None:
        reason = await self._reason(spec)
        health = self.health[spec.name]
        health.probed_at = time.time()
        if reason is not None and health.down is None:
            log.warning("model %s is down: %s; routing leaves it out until it answers", spec.name, reason)
        elif reason is None and health.down is not None:
            log.info("model %s answers again", spec.name)
        # What /health and error bodies show: no internal address (the log line above has it).
        health.down = None if reason is None else hide_addresses(reason)

    async def round(self) -> None:
        await asyncio.gather(*(self.probe(s) for s in self.specs))

    async def run(self) -> None:
        """Probes every `interval_s` (the first round is the caller's, at start), until cancelled."""
        if not self.specs:
            return
        while True:
            await asyncio.sleep(self.interval_s)
            await self.round()

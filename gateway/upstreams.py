"""Calling upstream models: retries with backoff, a fallback chain, a circuit breaker per model.

Everything here happens before the first byte reaches the client; once a stream has started,
a failure ends it with an error event instead (see `gateway.api`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway import fields
from gateway.attempts import Attempt, client_error, final_error
from gateway.catalogue import ModelSpec
from gateway.config import Settings
from gateway.health import CircuitBreaker, Clock, ModelHealth, ModelStatus, Unavailable
from gateway.logs import hide_addresses
from gateway.providers import CHAT, Api, ApiProvider, Provider, ProviderError

# What each model of a chain is sent: the API it is asked in, and the body (before `model` and the
# model's caps are applied). A chat call sends every model the same; a Responses call sends a model
# that speaks it natively the Responses body, and the others its translation to chat completions.
Plan = Callable[[ModelSpec], tuple[Api, dict[str, Any]]]


@dataclass
class ChatResult:
    spec: ModelSpec
    data: dict[str, Any]
    upstream_ms: float  # time spent on upstreams (failed attempts and backoff included)
    attempts: list[Attempt]
    api: Api = CHAT  # what the answering model was asked in


@dataclass
class OpenStream:
    spec: ModelSpec
    first: dict[str, Any]
    rest: AsyncIterator[dict[str, Any]]
    ttft_ms: float  # the answering model's time to its first chunk
    upstream_ms: float  # time spent on upstreams until the first chunk (failed attempts included)
    attempts: list[Attempt]
    release: Callable[[], None] = lambda: None
    api: Api = CHAT

    async def aclose(self) -> None:
        """Closes the upstream connection (idempotent) and frees the model's slot."""
        try:
            aclose = getattr(self.rest, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self.release()


class Upstreams:
    """The providers of every catalogue model, with their breakers, limits and health."""

    def __init__(
        self,
        settings: Settings,
        providers: dict[str, Provider],
        unavailable: dict[str, str] | None = None,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
        redact: Callable[[str], str] = str,
    ) -> None:
        self.settings = settings
        self.specs = {m.name: m for m in settings.models}
        self.providers = providers
        self.unavailable = dict(unavailable or {})
        self.clock = clock
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.redact = redact
        self.breakers = {
            name: CircuitBreaker(
                settings.circuit_breaker_failure_threshold, settings.circuit_breaker_cooldown_s, clock
            )
            for name in self.specs
        }
        self.health = {name: ModelHealth() for name in self.specs}
        self.limits = {
            m.name: asyncio.Semaphore(m.max_concurrency) for m in settings.models if m.max_concurrency
        }
        self.waiting = dict.fromkeys(self.limits, 0)
        self.on_fallback: Callable[[str, str], None] | None = None

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()

    # --- what the router needs to know
    def is_available(self, name: str) -> bool:
        return (
            name in self.providers
            and name not in self.unavailable
            and self.health[name].down is None
            and self.breakers[name].available()
        )

    def why_unavailable(self, name: str) -> Unavailable | None:
        if name in self.unavailable:
            return Unavailable(self.unavailable[name], "unconfigured")
        if name not in self.providers:
            return Unavailable("no provider", "no_provider")
        down = self.health[name].down
        if down is not None:
            return Unavailable(down, "refused")
        if not self.breakers[name].available():
            return Unavailable("circuit open", "circuit_open")
        return None

    def in_flight(self, name: str) -> int:
        return self.health[name].in_flight

    def snapshot(self) -> dict[str, ModelStatus]:
        out = {}
        for name, h in self.health.items():
            reason = self.unavailable.get(name) or h.down
            state = self.breakers[name].state
            status = "up" if state == "closed" else f"circuit_{state}"
            out[name] = ModelStatus(
                status="unavailable" if name in self.unavailable else ("down" if h.down else status),
                circuit=state,
                reason=reason,
                in_flight=h.in_flight,
                requests=h.requests,
                failures=h.failures,
                latency_ms_avg=None if h.latency_ms_avg is None else round(h.latency_ms_avg, 2),
                last_error=h.last_error,
                last_error_at=h.last_error_at,
                probed_at=h.probed_at,
            )
        return out

    # --- calling
    def output_cap(self, spec: ModelSpec) -> int | None:
        """The most output tokens a call to `spec` may ask for: its own cap, else MAX_OUTPUT_TOKENS."""
        return spec.max_output_tokens or self.settings.max_output_tokens or None

    def _payload(self, spec: ModelSpec, api: Api, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        payload = fields.for_model(spec, body, api)
        payload["model"] = spec.upstream_id
        cap = self.output_cap(spec)
        if cap is not None and api.token_caps:
            asked = [k for k in api.token_caps if payload.get(k) is not None]
            for key in asked:
                if not isinstance(payload[key], int) or payload[key] > cap:
                    payload[key] = cap
            if not asked:
                payload[api.token_caps[-1]] = cap
        if stream and api is CHAT:
            options = dict(payload.get("stream_options") or {})
            options["include_usage"] = True  # so that every streamed call can be priced
            payload["stream_options"] = options
        return payload

    async def _with_retries(
        self, name: str, call: Callable[[], Any], attempts: list[Attempt], *, hold: bool = False
    ) -> Any:
        """Calls `call` with retries. Returns None when the model failed (or was skipped).

        With `hold`, a success keeps the model's concurrency slot and returns `(result, release)`:
        a stream holds its slot until it ends.
        """
        health = self.health[name]
        breaker = self.breakers[name]
        if name in self.unavailable:
            attempts.append(Attempt(name, "unavailable", error=self.unavailable[name], kind="unconfigured"))
            return None
        if not breaker.acquire():
            attempts.append(Attempt(name, "circuit_open", error="circuit open", kind="circuit_open"))
            return None
        limit = self.limits.get(name)
        if limit is not None and not await self._slot(name, limit, attempts):
            breaker.release()  # busy tells nothing about the model's health
            return None
        health.in_flight += 1
        released = False
        handed_over = False
        settled = False  # the breaker has been told how this went

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                health.in_flight -= 1
                if limit is not None:
                    limit.release()

        try:
            for i in range(self.settings.upstream_retries + 1):
                at, t0 = time.time(), time.perf_counter()
                try:
                    result = await call()
                except ProviderError as exc:
                    ms = (time.perf_counter() - t0) * 1000
                    self._redact(exc)
                    attempts.append(Attempt(name, "error", ms, exc.message, exc.status, exc.kind, at))
                    health.requests += 1
                    if exc.is_client_error:
                        raise
                    health.failures += 1
                    health.last_error, health.last_error_at = exc.message, time.time()
                    if exc.kind == "refused":  # not running: down (out of routing) until it answers;
                        health.down = exc.message  # its breaker stays out of it (breaker.release)
                        return None
                    if not exc.retryable or i == self.settings.upstream_retries:
                        breaker.failure()
                        settled = True
                        return None
                    delay = self.settings.retry_backoff_ms / 1000 * (2**i) * (0.5 + self.rng.random())
                    if exc.retry_after_s is not None:
                        delay = max(delay, exc.retry_after_s)
                    await self.sleep(min(delay, 5.0))
                    continue
                ms = (time.perf_counter() - t0) * 1000
                attempts.append(Attempt(name, "ok", ms, at=at))
                health.requests += 1
                health.observe_latency(ms)
                health.down = None
                breaker.success()
                settled = True
                if hold:
                    handed_over = True
                    return result, release
                return result
            return None  # pragma: no cover - the loop always returns
        finally:
            if not settled:
                # Cancelled (during a call or a backoff), or refused as the caller's fault: this
                # tells nothing about the model, but a half-open probe slot must not stay taken.
                breaker.release()
            if not handed_over:
                release()

    async def _slot(self, name: str, limit: asyncio.Semaphore, attempts: list[Attempt]) -> bool:
        """A concurrency slot of the model: at once, or after a short wait in a bounded queue."""
        spec = self.specs[name]
        if limit.locked():
            if self.waiting[name] >= spec.max_queue:
                attempts.append(
                    Attempt(name, "busy", error=f"busy ({spec.max_queue} calls already waiting)", kind="busy")
                )
                return False
            self.waiting[name] += 1
            try:
                await asyncio.wait_for(limit.acquire(), spec.queue_timeout_s)
            except TimeoutError:
                attempts.append(
                    Attempt(
                        name, "busy", error=f"busy (no slot within {spec.queue_timeout_s:g} s)", kind="busy"
                    )
                )
                return False
            except BaseException:
                self.breakers[name].release()  # cancelled while waiting: free the probe slot
                raise
            finally:
                self.waiting[name] -= 1
            return True
        await limit.acquire()  # free now: returns at once
        return True

    def _redact(self, exc: ProviderError) -> None:
        """Upstream error texts can quote our API key back ("Incorrect API key provided: sk-..."),
        and name internal addresses (a connection error's URL): neither reaches a client."""
        exc.message = hide_addresses(self.redact(exc.message))
        if exc.body and isinstance(exc.body.get("message"), str):
            exc.body["message"] = hide_addresses(self.redact(exc.body["message"]))

    def stream_failed(self, name: str, exc: ProviderError) -> None:
        """A stream broke after its first chunk: that counts against the model."""
        self._redact(exc)
        message = exc.message
        health = self.health[name]
        health.failures += 1
        health.last_error, health.last_error_at = message, time.time()
        self.breakers[name].failure()

    def _chain(self, chain: Sequence[str]) -> list[str]:
        seen: list[str] = []
        for name in chain:
            if name in self.specs and name not in seen:
                seen.append(name)
        return seen

    async def _first_answer(
        self, chain: Sequence[str], plan: Plan, *, stream: bool
    ) -> tuple[ModelSpec, Api, Any, float, list[Attempt]]:
        """The first model of `chain` that answers (each with its retries): its spec, the API it
        was asked in, its answer (with `stream`, the first chunk and what holds its slot), the time
        spent on upstreams, and every attempt."""
        ask = _first_chunk if stream else _complete
        attempts: list[Attempt] = []
        t0 = time.perf_counter()
        for n, name in enumerate(self._chain(chain)):
            if n > 0 and self.on_fallback is not None:
                self.on_fallback(chain[0], name)
            spec = self.specs[name]
            provider = self.providers.get(name)
            api, body = plan(spec)
            payload = self._payload(spec, api, body, stream=stream)

            async def call(
                provider: Provider | None = provider, api: Api = api, payload: dict[str, Any] = payload
            ) -> Any:
                assert provider is not None
                return await ask(provider, api, payload)

            try:
                answer = await self._with_retries(name, call, attempts, hold=stream)
            except ProviderError as exc:
                raise client_error(exc) from exc
            if answer is not None:
                return spec, api, answer, (time.perf_counter() - t0) * 1000, attempts
        raise final_error(attempts, (time.perf_counter() - t0) * 1000)

    async def answer(self, chain: Sequence[str], plan: Plan) -> ChatResult:
        spec, api, data, upstream_ms, attempts = await self._first_answer(chain, plan, stream=False)
        return ChatResult(spec, data, upstream_ms, attempts, api)

    async def open(self, chain: Sequence[str], plan: Plan) -> OpenStream:
        """Opens a stream on the first model of `chain` that yields a first event."""
        spec, api, opened, upstream_ms, attempts = await self._first_answer(chain, plan, stream=True)
        (first, agen, ttft_ms), release = opened
        return OpenStream(spec, first, agen, ttft_ms, upstream_ms, attempts, release=release, api=api)

    async def chat(self, chain: Sequence[str], body: dict[str, Any]) -> ChatResult:
        return await self.answer(chain, lambda spec: (CHAT, body))

    async def open_stream(self, chain: Sequence[str], body: dict[str, Any]) -> OpenStream:
        return await self.open(chain, lambda spec: (CHAT, body))


def _speaking(provider: Provider, api: Api) -> ApiProvider:
    if not isinstance(provider, ApiProvider):
        raise ProviderError("unconfigured", f"this provider does not speak {api.path}")
    return provider


async def _complete(provider: Provider, api: Api, payload: dict[str, Any]) -> dict[str, Any]:
    if api is CHAT:
        return await provider.chat(payload)
    return await _speaking(provider, api).send(api, payload)


async def _first_chunk(
    provider: Provider, api: Api, payload: dict[str, Any]
) -> tuple[dict[str, Any], AsyncIterator[dict[str, Any]], float]:
    """A stream's first chunk, the rest of it, and the time to that chunk."""
    t_call = time.perf_counter()
    agen = provider.stream(payload) if api is CHAT else _speaking(provider, api).send_stream(api, payload)
    try:
        first = await agen.__anext__()
    except StopAsyncIteration as exc:
        raise ProviderError("protocol", "empty stream", retryable=True) from exc
    except BaseException:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            await aclose()
        raise
    return first, agen, (time.perf_counter() - t_call) * 1000

"""The app factory: every part is built here, from one Settings, and owned by the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Scope

from gateway import dpo
from gateway.api import chat, ops, records
from gateway.config import ModelSpec, Settings
from gateway.duels import Duels
from gateway.embedder import Embedder, MiniLMEmbedder, routing_text
from gateway.errors import GatewayError, NotFound
from gateway.logs import Redactor
from gateway.metrics import Metrics
from gateway.middleware import RateLimits, RequestContext
from gateway.providers import Provider
from gateway.providers.http import HTTPProvider
from gateway.recorder import Recorder
from gateway.routing import Decision
from gateway.routing.router import Router
from gateway.store import CallRecord, Feedback, Store
from gateway.upstreams import Upstreams

if TYPE_CHECKING:
    from gateway.lab.data import ReplayData

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")

ProviderFactory = Callable[[ModelSpec, "BuildContext"], Provider]


@dataclass
class BuildContext:
    settings: Settings
    session: aiohttp.ClientSession
    replay_data: dict[str, ReplayData] = field(default_factory=dict)  # one load per replay file


def _http(spec: ModelSpec, ctx: BuildContext) -> Provider:
    return HTTPProvider(
        spec,
        ctx.session,
        api_key=ctx.settings.api_key_for(spec),
        app_name=ctx.settings.app_name,
        referer=ctx.settings.referer_url,
    )


def _replay(spec: ModelSpec, ctx: BuildContext) -> Provider:
    from gateway.lab.data import load
    from gateway.providers.replay import ReplayProvider

    assert spec.replay_file is not None
    data = ctx.replay_data.get(spec.replay_file)
    if data is None:
        data = ctx.replay_data[spec.replay_file] = load(spec.replay_file)
    return ReplayProvider(spec, data)


# Provider kinds by name.
PROVIDERS: dict[str, ProviderFactory] = {
    "replay": _replay,
    "openai": _http,
    "openrouter": _http,
    "ollama": _http,
    "vllm": _http,
    "openai_compatible": _http,
}


def missing_key(settings: Settings, spec: ModelSpec) -> str | None:
    if spec.provider in ("openai", "openrouter") and not settings.api_key_for(spec):
        return f"{spec.api_key_env} is not set"
    return None


@dataclass
class Gateway:
    """Everything a request handler needs, built once by the lifespan."""

    settings: Settings
    upstreams: Upstreams
    router: Router
    store: Store
    recorder: Recorder
    redact: Redactor
    metrics: Metrics
    limits: RateLimits
    embedder: Embedder | None = None
    duels: Duels | None = None

    def finish(self, record: CallRecord, state: dict[str, Any]) -> None:
        """A call ended (any way): log fields, metrics, rate-limit tokens, the write-behind record."""
        record.overhead_ms = state.get("overhead_ms")
        if "tokens_reserved" in state:
            used = (record.prompt_tokens or 0) + (record.completion_tokens or 0)
            self.limits.charge_tokens(state["limit_id"], used - state.pop("tokens_reserved"))
        if record.error:
            record.error = self.redact(record.error)
        fields = state.setdefault("log", {})
        fields.update(
            model=record.model,
            outcome=record.status,
            upstream_ms=None if record.upstream_ms is None else round(record.upstream_ms, 3),
            ttft_ms=None if record.ttft_ms is None else round(record.ttft_ms, 3),
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            cost_usd=record.cost_usd,
        )
        if record.error:
            fields["error"] = record.error
        if self.settings.log_prompts:
            fields["messages"] = record.messages
        self.metrics.observe_call(record)
        self.recorder.record(record)

    def start_duel(self, record: CallRecord, decision: Decision, body: dict[str, Any]) -> None:
        if self.duels is not None:
            self.duels.maybe_start(record, decision, body)

    async def learn(self, feedback: Feedback) -> dict[str, Any]:
        """Feedback, durable first; then what it teaches: the arm's global statistics (at once),
        the call's embedding for future neighbour searches (computed now if routing did not), and
        DPO pairs with other answers to the same prompt."""
        if self.recorder.has(feedback.request_id):
            await self.recorder.flush()  # the call is still queued: write it first (503 if the store is down)
        outcome = await self.store.add_feedback(feedback)
        self.metrics.feedback.labels(outcome.model or "none", feedback.source).observe(feedback.score)
        pairs = 0
        if outcome.applied and outcome.model is not None and outcome.score is not None:
            embedding = await self._embedding_of(outcome.request_id)
            self.router.observe_feedback(
                outcome.request_id, outcome.model, outcome.score, outcome.previous, embedding
            )
            pairs = await dpo.mine(
                self.store,
                outcome.request_id,
                similarity=self.settings.dpo_similarity,
                min_margin=self.settings.dpo_min_margin,
            )
            self.metrics.dpo_pairs.inc(pairs)
        return {
            "status": "ok",
            "request_id": outcome.request_id,
            "model": outcome.model,
            "score": outcome.score,
            "previous_score": outcome.previous,
            "applied": outcome.applied,
            "pairs": pairs,
        }

    async def _embedding_of(self, request_id: str) -> np.ndarray | None:
        record = await self.store.get_call(request_id)
        if record is None:
            return None
        if record.get("embedding") is not None:
            return np.asarray(record["embedding"], dtype=np.float32)
        if self.embedder is None:
            return None
        text = routing_text(record["messages"], self.settings.embedding_max_chars)
        if not text:
            return None
        embedding = (await self.embedder.embed([text]))[0]
        await self.store.set_embedding(request_id, embedding)
        return embedding

    async def readiness(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            checks["store"] = "ok" if await asyncio.wait_for(self.store.ping(), 2.0) else "unreachable"
        except Exception as exc:
            checks["store"] = f"unreachable: {type(exc).__name__}"
        available = [m.name for m in self.settings.models if self.upstreams.is_available(m.name)]
        checks["models"] = "ok" if available else "no model available"
        if self.settings.router_policy != "default":
            checks["embedder"] = "ok" if self.embedder is not None else "unavailable: routing without context"
        return checks

    def state(self) -> dict[str, Any]:
        """What /metrics reads at scrape time."""
        embedder = None
        if isinstance(self.embedder, MiniLMEmbedder):
            e = self.embedder
            embedder = {"hits": e.hits, "misses": e.misses, "hit_rate": e.hit_rate}
        arms = {}
        for m in self.settings.models:
            stats = self.router.stats.get(m.name)
            rated = stats.rated if stats else 0
            arms[m.name] = {"posterior_mean": self.router.quality(m.name), "rated": rated}
        return {
            "providers": self.upstreams.snapshot(),
            "recorder": self.recorder_state(),
            "embedder": embedder,
            "arms": arms,
        }

    def recorder_state(self) -> dict[str, Any]:
        return {
            "queue_depth": self.recorder.depth,
            "written": self.recorder.written,
            "dropped": self.recorder.dropped,
            "failing": self.recorder.failing_since is not None,
        }


async def _probe_local(settings: Settings, session: aiohttp.ClientSession) -> None:
    """Warn at start about local upstreams (Ollama, vLLM) that do not answer."""

    async def probe(spec: ModelSpec) -> None:
        assert spec.base_url is not None
        url = spec.base_url.rstrip("/") + "/models"
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status >= 500:
                    log.warning("model %s: %s answered HTTP %d", spec.name, url, resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning(
                "model %s: %s is unreachable (%s); requests for it will get 503 until it answers",
                spec.name,
                spec.base_url,
                type(exc).__name__,
            )

    local = [m for m in settings.models if m.provider in ("ollama", "vllm")]
    await asyncio.gather(*(probe(m) for m in local))


async def _load_embedder(settings: Settings) -> Embedder | None:
    try:
        return await MiniLMEmbedder.load(
            settings.models_dir or settings.data_dir / "models",
            settings.embedding_backend,
            threads=settings.embedding_threads,
            cache_size=settings.embedding_cache_size,
            max_batch=settings.embedding_max_batch,
        )
    except Exception:
        log.exception("the embedding model failed to load: routing goes on without context")
        return None


def _on_finish(scope: Scope, status: int, duration_ms: float) -> None:
    state = scope.get("state", {})
    fields = state.get("log")
    path = scope.get("path", "")
    if fields is None and (path in ("/live", "/ready", "/health", "/metrics") and status < 400):
        return  # probes and scrapes are not worth a line each
    extra = {
        "request_id": state.get("request_id"),
        "method": scope.get("method"),
        "path": path,
        "status": status,
        "duration_ms": round(duration_ms, 3),
        "overhead_ms": round(state["overhead_ms"], 3) if "overhead_ms" in state else None,
    }
    if fields:
        extra.update(fields)
    access_log.info("%s %s %d", scope.get("method"), path, status, extra=extra)


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    providers: dict[str, ProviderFactory] | None = None,
    redact: Redactor | None = None,
    embedder: Embedder | None = None,
    seed: int | None = None,
) -> Starlette:
    """Build the ASGI app. Parts given here are used as they are (tests share a store this way);
    the others are built by the lifespan from `settings`."""
    factories = {**PROVIDERS, **(providers or {})}
    redactor = redact or Redactor(settings.secrets())
    metrics = Metrics()
    limits = RateLimits(settings.rate_limit_rpm, settings.rate_limit_tpm)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Shutdown runs this stack backwards, after uvicorn has stopped accepting and given the
        # calls in flight SHUTDOWN_TIMEOUT_S: duels drain, the recorder flushes, the upstream
        # connection pool closes, the database closes last.
        async with AsyncExitStack() as stack:
            if store is None:
                from gateway.store.factory import open_store

                the_store = await stack.enter_async_context(open_store(settings))
            else:
                the_store = store
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=300
                ),
                auto_decompress=True,
            )
            stack.push_async_callback(session.close)
            ctx = BuildContext(settings, session)
            built: dict[str, Provider] = {}
            unavailable: dict[str, str] = {}
            for spec in settings.models:
                reason = missing_key(settings, spec)
                if reason:
                    unavailable[spec.name] = reason
                    log.warning("model %s is unavailable: %s", spec.name, reason)
                    continue
                built[spec.name] = factories[spec.provider](spec, ctx)
            upstreams = Upstreams(settings, built, unavailable, redact=redactor)
            upstreams.on_fallback = metrics.fallback
            stack.push_async_callback(upstreams.aclose)
            recorder = Recorder(
                the_store, max_queue=settings.recorder_queue_size, batch_size=settings.recorder_batch_size
            )
            await stack.enter_async_context(recorder)
            the_embedder = embedder
            if the_embedder is None and (settings.router_policy != "default" or settings.routes):
                the_embedder = await _load_embedder(settings)
                if the_embedder is not None:
                    stack.push_async_callback(the_embedder.aclose)
            router = Router(
                settings, upstreams, store=the_store, embedder=the_embedder, rng=np.random.default_rng(seed)
            )
            await router.start()
            stack.push_async_callback(router.aclose)
            gw = Gateway(
                settings, upstreams, router, the_store, recorder, redactor, metrics, limits, the_embedder
            )
            gw.duels = Duels(
                settings, upstreams, recorder, metrics, gw.learn, rng=random.Random(seed), redact=redactor
            )
            stack.push_async_callback(gw.duels.drain)
            metrics.add_state(gw.state)
            app.state.gw = gw
            probe = asyncio.create_task(_probe_local(settings, session))
            if not settings.gateway_api_keys:
                log.warning(
                    "NO GATEWAY_API_KEYS: this gateway is OPEN; anyone who can reach it can spend "
                    "your upstream credit and read every call. Set GATEWAY_API_KEYS (and "
                    "REQUIRE_API_KEYS=true) before exposing it beyond this machine."
                )
            log.info("gateway ready: %d models, default %s", len(settings.models), settings.default_model)
            try:
                yield
            finally:
                probe.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probe
                t = time.perf_counter()
                log.info("gateway shutting down")
            log.info("gateway stopped in %.2f s", time.perf_counter() - t)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            error: GatewayError = NotFound(f"no route for {request.method} {request.url.path}")
        else:
            error = GatewayError(
                exc.detail or "error", code="method_not_allowed" if exc.status_code == 405 else None
            )
            error.status, error.type = exc.status_code, "invalid_request_error"
        return Response(error.json(), error.status, media_type="application/json", headers=exc.headers)

    chat_endpoint = chat.ChatCompletions()
    routes = [
        Route("/v1/chat/completions", chat_endpoint, methods=["POST"]),
        Route("/chat/completions", chat_endpoint, methods=["POST"]),
        Route("/v1/models", ops.list_models, methods=["GET"]),
        Route("/models", ops.list_models, methods=["GET"]),
        Route("/live", ops.live, methods=["GET"]),
        Route("/ready", ops.ready, methods=["GET"]),
        Route("/health", ops.health, methods=["GET"]),
        Route("/feedback", records.feedback, methods=["POST"]),
        Route("/v1/feedback", records.feedback, methods=["POST"]),
        Route("/requests/{request_id}", records.get_request, methods=["GET"]),
        Route("/metrics/{request_id}", records.get_metrics, methods=["GET"]),
        Route("/metrics", ops.prometheus, methods=["GET"]),
        Route("/v1/dpo/pairs", records.dpo_pairs, methods=["GET"]),
        Route("/v1/stats", ops.stats, methods=["GET"]),
    ]
    # CORS outermost: it answers preflights (which carry no Authorization) and adds its headers to
    # every response, errors included.
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
                expose_headers=["x-request-id", "x-router-model", "x-router-layer", "x-router-overhead-ms"],
            )
        )
    middleware.append(
        Middleware(
            RequestContext,
            max_body_bytes=settings.max_body_bytes,
            api_keys=settings.gateway_api_keys
            + (
                [settings.admin_api_key.get_secret_value()]
                if settings.gateway_api_keys and settings.admin_api_key
                else []
            ),
            on_finish=_on_finish,
            redact=redactor,
            in_flight=metrics.in_flight,
            limits=limits,
        )
    )
    return Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
    )

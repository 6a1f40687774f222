"""The app factory: every part is built here, from one Settings, and owned by the lifespan, which
hands them to the endpoints as one `Services` (lifespan state)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api import chat, embeddings, evaluate, keys, ops, records, responses
from gateway.api.routed import RoutedEndpoint
from gateway.auth import Keys
from gateway.auth_failures import AuthFailures
from gateway.calls import Calls
from gateway.catalogue import ModelSpec
from gateway.config import Settings
from gateway.config_sources import environ
from gateway.duels import Duels
from gateway.embedder import Embedder
from gateway.embedders import load_embedder
from gateway.errors import GatewayError, NotFound
from gateway.evaluation.service import Evaluator
from gateway.feedback import Learner
from gateway.keys import KeyDirectory
from gateway.limits import RateLimits
from gateway.logs import Redactor
from gateway.metrics import Metrics
from gateway.middleware import RequestContext
from gateway.probes import LocalProbes
from gateway.providers import RESPONSES, Provider
from gateway.providers.http import HTTPProvider
from gateway.providers.replay import ReplayData, ReplayProvider, load
from gateway.readiness import ReadinessCache
from gateway.recorder import Recorder
from gateway.routing.policies import needs_embedder
from gateway.routing.router import Router
from gateway.services import SERVICES_KEY, Services
from gateway.shared.factory import open_shared
from gateway.spool import Spool
from gateway.store import Store
from gateway.tracing import tracing_from_env
from gateway.ui import ui_routes
from gateway.upstreams import Upstreams

log = logging.getLogger("gateway")

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
        return f"{spec.api_key_env} is not set: set it in .env or the environment, then restart"
    return None


async def _load_embedder(settings: Settings) -> Embedder | None:
    try:
        return await load_embedder(settings)
    except Exception:
        log.exception("the embedding model failed to load: routing goes on without context")
        return None


def _upstreams(
    settings: Settings, factories: dict[str, ProviderFactory], ctx: BuildContext, redact: Redactor
) -> Upstreams:
    built: dict[str, Provider] = {}
    unavailable: dict[str, str] = {}
    for spec in settings.models:
        reason = missing_key(settings, spec)
        if reason:
            unavailable[spec.name] = reason
            log.warning("model %s is unavailable: %s", spec.name, reason)
            continue
        built[spec.name] = factories[spec.provider](spec, ctx)
    return Upstreams(settings, built, unavailable, redact=redact)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405, as our errors (the middleware renders them)."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        raise NotFound(f"no route for {request.method} {request.url.path}") from exc
    error = GatewayError(exc.detail or "error", code="method_not_allowed" if exc.status_code == 405 else None)
    error.status, error.type = exc.status_code, "invalid_request_error"
    error.headers = dict(exc.headers or {})
    raise error from exc


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    providers: dict[str, ProviderFactory] | None = None,
    redact: Redactor | None = None,
    embedder: Embedder | None = None,
    seed: int | None = None,
    on_start: Callable[[Services], Any] | None = None,
) -> Starlette:
    """Build the ASGI app. Parts given here are used as they are (tests share a store this way);
    the others are built by the lifespan from `settings`. `on_start` is handed the services once
    they are up (the lab and the tests drive the parts through it)."""
    factories = {**PROVIDERS, **(providers or {})}
    redactor = redact or Redactor(settings.secrets())
    metrics = Metrics()
    auth_failures = AuthFailures(settings.auth_failures_per_minute)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Services]]:
        # Shutdown runs this stack backwards, after uvicorn has stopped accepting and given the
        # calls in flight SHUTDOWN_TIMEOUT_S: duels drain, the recorder flushes, the upstream
        # connection pool closes, the database closes last.
        async with AsyncExitStack() as stack:
            # The spool first: it is this process's (a lock), and holds what a previous run left.
            spool = None
            if settings.enable_persistence:
                spool = Spool(
                    settings.spool_path,
                    max_bytes=settings.spool_max_bytes,
                    fsync=settings.spool_fsync,
                    fsync_interval_ms=settings.spool_fsync_interval_ms,
                )
                await asyncio.to_thread(spool.open)
                stack.callback(spool.close)
            if store is None:
                from gateway.store.factory import open_store

                the_store = await stack.enter_async_context(open_store(settings))
            else:
                the_store = store
            # Limits and budgets (shared across replicas with REDIS_URL), virtual keys.
            shared = await stack.enter_async_context(open_shared(settings))
            limits = RateLimits(
                shared, rpm=settings.rate_limit_rpm, tpm=settings.rate_limit_tpm, ledger=the_store
            )
            stack.push_async_callback(limits.drain)
            directory = await stack.enter_async_context(
                KeyDirectory(the_store, shared, ttl_s=settings.key_cache_ttl_s)
            )
            # A bounded pool: past UPSTREAM_POOL_SIZE connections, calls wait for one (within
            # their deadline) rather than opening sockets without limit.
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=settings.upstream_pool_size,
                    limit_per_host=0,
                    keepalive_timeout=30,
                    ttl_dns_cache=300,
                ),
                auto_decompress=True,
            )
            stack.push_async_callback(session.close)
            upstreams = _upstreams(settings, factories, BuildContext(settings, session), redactor)
            upstreams.on_fallback = metrics.fallback
            stack.push_async_callback(upstreams.aclose)
            tracing = tracing_from_env(environ(), settings.models)  # off unless OTEL_* configures it
            stack.push_async_callback(tracing.aclose)
            recorder = Recorder(
                tracing.wrap(the_store),
                spool,
                queue_bytes=settings.recorder_queue_bytes,
                batch_size=settings.recorder_batch_size,
                batch_bytes=settings.recorder_batch_bytes,
                stall_s=settings.recorder_stall_s,
                write_timeout_s=2 * settings.store_timeout_s,
            )
            await stack.enter_async_context(recorder)
            the_embedder = embedder
            if the_embedder is None and needs_embedder(settings):
                the_embedder = await _load_embedder(settings)
                if the_embedder is not None:
                    stack.push_async_callback(the_embedder.aclose)
            router = Router(
                settings, upstreams, store=the_store, embedder=the_embedder, rng=np.random.default_rng(seed)
            )
            await router.start()
            stack.push_async_callback(router.aclose)
            learner = Learner(settings, the_store, recorder, router, metrics, the_embedder)
            duels = Duels(
                settings,
                upstreams,
                recorder,
                metrics,
                learner.learn,
                rng=random.Random(seed),
                redact=redactor,
            )
            stack.push_async_callback(duels.drain)
            services = Services(
                settings=settings,
                store=the_store,
                upstreams=upstreams,
                router=router,
                recorder=recorder,
                calls=Calls(metrics, recorder, redactor, tracing, router),
                learner=learner,
                duels=duels,
                metrics=metrics,
                limits=limits,
                shared=shared,
                keys=Keys.of(settings, directory),
                directory=directory,
                redact=redactor,
                embedder=the_embedder,
                tracing=tracing,
                readiness=ReadinessCache(lambda: ops.readiness(services), settings.health_cache_s),
                evaluator=Evaluator(settings, the_store, the_embedder),
            )
            stack.push_async_callback(services.calls.drain)  # before the recorder closes
            metrics.add_state(lambda: ops.gauges(services, auth_failures.total))
            # Local upstreams (Ollama, vLLM) are probed before the first call, then periodically.
            probes = LocalProbes(
                [m for m in settings.models if m.name in upstreams.providers],
                upstreams.health,
                session,
                interval_s=settings.local_probe_interval_s,
            )
            await probes.round()
            probe = asyncio.create_task(probes.run())
            # On loopback only this machine can reach it (the lab's and the demo's gateways).
            if not settings.keys_required and settings.host not in ("127.0.0.1", "::1", "localhost"):
                log.warning(
                    "NO GATEWAY_API_KEYS: this gateway is OPEN; anyone who can reach it can spend "
                    "your upstream credit and read every call. Set GATEWAY_API_KEYS (and "
                    "REQUIRE_API_KEYS=true) before exposing it beyond this machine."
                )
            log.info("gateway ready: %d models, default %s", len(settings.models), settings.default_model)
            if on_start is not None:
                on_start(services)
            try:
                yield {SERVICES_KEY: services}
            finally:
                probe.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probe
                t = time.perf_counter()
                log.info("gateway shutting down")
            log.info("gateway stopped in %.2f s", time.perf_counter() - t)

    chat_endpoint = RoutedEndpoint(chat.read)
    responses_endpoint = RoutedEndpoint(responses.read, RESPONSES)
    routes = [
        Route("/v1/chat/completions", chat_endpoint, methods=["POST"]),
        Route("/chat/completions", chat_endpoint, methods=["POST"]),
        Route("/v1/responses", responses_endpoint, methods=["POST"]),
        Route("/responses", responses_endpoint, methods=["POST"]),
        Route("/v1/embeddings", embeddings.embeddings, methods=["POST"]),
        Route("/embeddings", embeddings.embeddings, methods=["POST"]),
        Route("/v1/models", ops.list_models, methods=["GET"]),
        Route("/models", ops.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", ops.get_model, methods=["GET"]),
        Route("/models/{model:path}", ops.get_model, methods=["GET"]),
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
        *keys.ROUTES,
        Route("/v1/evaluate", evaluate.evaluate, methods=["POST"]),
        *ui_routes(),  # the dashboard (/ui) and its JSON API (/ui/api/...)
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
            redact=redactor,
            in_flight=metrics.in_flight,
            log_prompts=settings.log_prompts,
            auth_failures=auth_failures,
        )
    )
    return Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error},
    )

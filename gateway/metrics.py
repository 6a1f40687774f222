"""Prometheus metrics (prometheus-client), one registry per app, for GET /metrics.

Labels stay bounded: model names come from the catalogue, layers and strategies from fixed sets,
statuses are HTTP codes. No request ids, no prompt text. Values that describe state (circuit
breakers, the recorder's queue, the embedding cache, the arms' posteriors) are read at scrape time
by a collector, so the hot path only increments counters and observes histograms.

One process per container: run more replicas rather than more workers (the registry is per process;
prometheus-client's multiprocess mode is not used).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.domain import CallRecord
from gateway.embedder import CacheStats
from gateway.health import ModelStatus
from gateway.recorder import RecorderState
from gateway.shared import SharedStatus

# Fine enough to resolve single milliseconds where the gateway's own overhead lives.
OVERHEAD_BUCKETS = (
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
CIRCUIT = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(frozen=True)
class ArmGauge:
    posterior_mean: float
    rated: int


@dataclass(frozen=True)
class Gauges:
    """The running gateway's state, read at scrape time."""

    providers: dict[str, ModelStatus]
    recorder: RecorderState
    cache: CacheStats | None
    arms: dict[str, ArmGauge]
    auth_failures: int = 0
    shared: SharedStatus | None = None


class Metrics:
    def __init__(self) -> None:
        # No `*_created` series (one per counter and histogram child, doubling the series count;
        # Prometheus reads none of them). prometheus-client's switch is process-wide.
        disable_created_metrics()
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "llm_router_requests",
            "Chat requests by model, route layer, strategy and HTTP status",
            ["model", "layer", "strategy", "status"],
            registry=r,
        )
        self.overhead = Histogram(
            "llm_router_gateway_overhead_seconds",
            "Time spent in the gateway itself (routing included, upstream excluded)",
            ["layer"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.upstream = Histogram(
            "llm_router_upstream_latency_seconds",
            "Upstream time of successful calls",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "llm_router_time_to_first_token_seconds",
            "Time to the first streamed chunk",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("llm_router_tokens", "Tokens by model and kind", ["model", "kind"], registry=r)
        self.cost = Counter(
            "llm_router_cost_usd",
            "USD spent by model and call kind (call, duel, judge, embeddings)",
            ["model", "kind"],
            registry=r,
        )
        self.feedback = Histogram(
            "llm_router_feedback_score",
            "Feedback scores by model",
            ["model", "source"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            "llm_router_fallbacks",
            "Fallbacks from one model to another",
            ["from_model", "to_model"],
            registry=r,
        )
        self.in_flight = Gauge("llm_router_in_flight_requests", "Requests being handled now", registry=r)
        self.dpo_pairs = Counter("llm_router_dpo_pairs", "DPO pairs created or updated", registry=r)

    def observe_call(self, rec: CallRecord) -> None:
        model = rec.model or "none"
        if rec.kind == "call":
            self.requests.labels(
                model, rec.layer or "none", rec.strategy or "none", str(rec.http_status)
            ).inc()
            if rec.overhead_ms is not None:
                self.overhead.labels(rec.layer or "none").observe(rec.overhead_ms / 1000)
        if rec.status == "ok" and rec.upstream_ms is not None and not rec.stream:
            self.upstream.labels(model).observe(rec.upstream_ms / 1000)
        if rec.ttft_ms is not None:
            self.ttft.labels(model).observe(rec.ttft_ms / 1000)
        if rec.prompt_tokens:
            self.tokens.labels(model, "prompt").inc(rec.prompt_tokens)
        if rec.completion_tokens:
            self.tokens.labels(model, "completion").inc(rec.completion_tokens)
        if rec.cost_usd:
            self.cost.labels(model, rec.kind).inc(rec.cost_usd)

    def embedded(self, model: str, status: int, tokens: int, cost_usd: float) -> None:
        """An embeddings call (metered, not recorded: there is no answer to rate)."""
        self.requests.labels(model, "embeddings", "none", str(status)).inc()
        if tokens:
            self.tokens.labels(model, "prompt").inc(tokens)
        if cost_usd:
            self.cost.labels(model, "embeddings").inc(cost_usd)

    def rated(self, model: str | None, source: str, score: float, pairs: int) -> None:
        self.feedback.labels(model or "none", source).observe(score)
        self.dpo_pairs.inc(pairs)

    def refused(self, status: int) -> None:
        """A chat request refused before any model was chosen."""
        self.requests.labels("none", "none", "none", str(status)).inc()

    def fallback(self, from_model: str, to_model: str) -> None:
        self.fallbacks.labels(from_model, to_model).inc()

    def add_state(self, read: Callable[[], Gauges]) -> None:
        self.registry.register(_StateCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """State read from the running gateway at scrape time."""

    def __init__(self, read: Callable[[], Gauges]) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        s = self.read()
        circuit = GaugeMetricFamily(
            "llm_router_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open", labels=["model"]
        )
        available = GaugeMetricFamily(
            "llm_router_model_available", "1 if the model can take requests now", labels=["model"]
        )
        for model, info in s.providers.items():
            circuit.add_metric([model], CIRCUIT.get(info.circuit, 2))
            available.add_metric([model], 1.0 if info.status == "up" else 0.0)
        yield circuit
        yield available
        rec = s.recorder
        yield GaugeMetricFamily(
            "llm_router_recorder_queue_depth", "Call records waiting to be written", value=rec.queue_depth
        )
        yield GaugeMetricFamily(
            "llm_router_recorder_failing",
            "1 while the oldest record not yet stored has waited more than RECORDER_STALL_S",
            value=1.0 if rec.failing else 0.0,
        )
        yield CounterMetricFamily("llm_router_recorder_written", "Call records written", value=rec.written)
        yield CounterMetricFamily(
            "llm_router_recorder_dropped", "Call records the store refused (invalid)", value=rec.dropped
        )
        yield CounterMetricFamily(
            "llm_router_recorder_duplicates",
            "Call records already stored (a reused request id, or a replay after a crash)",
            value=rec.duplicates,
        )
        yield GaugeMetricFamily(
            "llm_router_recorder_oldest_seconds",
            "Age of the oldest record not yet stored",
            value=rec.oldest_s,
        )
        if rec.spool is not None:
            yield GaugeMetricFamily(
                "llm_router_spool_bytes", "Bytes in the spool on disk", value=rec.spool.bytes
            )
        yield CounterMetricFamily(
            "llm_router_auth_failures",
            "Failed authentications (a missing or wrong key)",
            value=s.auth_failures,
        )
        cache = s.cache
        if cache is not None:
            yield CounterMetricFamily(
                "llm_router_embedding_cache_hits", "Embedding cache hits", value=cache.hits
            )
            yield CounterMetricFamily(
                "llm_router_embedding_cache_misses", "Embedding cache misses", value=cache.misses
            )
            yield GaugeMetricFamily(
                "llm_router_embedding_cache_hit_ratio", "Embedding cache hit ratio", value=cache.hit_rate
            )
        posterior = GaugeMetricFamily(
            "llm_router_arm_posterior_mean", "Each arm's global posterior mean of quality", labels=["model"]
        )
        rated = GaugeMetricFamily("llm_router_arm_rated_calls", "Each arm's rated calls", labels=["model"])
        for model, arm in s.arms.items():
            posterior.add_metric([model], arm.posterior_mean)
            rated.add_metric([model], arm.rated)
        yield posterior
        yield rated
        if s.shared is not None:
            yield GaugeMetricFamily(
                "llm_router_shared_state_up",
                "1 while the shared state (REDIS_URL) answers; 0: limits are per replica or refused",
                value=1.0 if s.shared.up else 0.0,
            )
            yield CounterMetricFamily(
                "llm_router_shared_state_fallbacks",
                "Limit operations served per replica because the shared state was unreachable",
                value=s.shared.fallbacks,
            )

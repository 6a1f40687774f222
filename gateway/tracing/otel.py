"""Tracing with the OpenTelemetry SDK (loaded only when OTEL_* configures it: see gateway.tracing).

A provider of our own (never the process-global one), a BatchSpanProcessor and the OTLP/HTTP
protobuf exporter, both configured by the SDK itself from the OTEL_* variables (endpoint, headers,
compression, timeout, OTEL_BSP_*, OTEL_TRACES_SAMPLER, OTEL_SERVICE_NAME, ...).

Attributes follow the OpenTelemetry GenAI semantic conventions (`gen_ai.*`), plus ours
(`llm_router.*`: the request id, layer, propensity, cost...). Stage spans are placed from the
durations the router measures (exact lengths; a stage's start is its predecessor's end, within the
microseconds of the steps between them); attempt spans from each attempt's start and length.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import gateway
from gateway.catalogue import ModelSpec
from gateway.domain import CallRecord
from gateway.tracing import CallTrace, Headers

log = logging.getLogger("gateway.tracing")

SERVICE = "llm-router"
PENDING_MAX = 100_000  # calls whose `record` span waits for the recorder (beyond: the oldest go)


class _Ids(RandomIdGenerator):
    """Random ids, except the trace id a call was given on arrival (set just before its root span)."""

    def __init__(self) -> None:
        self.next_trace_id: int | None = None

    def generate_trace_id(self) -> int:
        preset, self.next_trace_id = self.next_trace_id, None
        return preset if preset is not None else super().generate_trace_id()


def _ns(epoch_s: float) -> int:
    return int(epoch_s * 1e9)


class OtelTracing:
    enabled = True

    def __init__(self, provider: TracerProvider, ids: _Ids, models: Sequence[ModelSpec]) -> None:
        self.provider = provider
        self.ids = ids
        self.tracer = provider.get_tracer("gateway", gateway.__version__)
        self.specs = {m.name: m for m in models}
        self.propagator = TraceContextTextMapPropagator()
        self.pending: OrderedDict[str, trace.SpanContext] = OrderedDict()

    @classmethod
    def from_env(cls, env: Mapping[str, str], models: Sequence[ModelSpec]) -> OtelTracing:
        # The SDK reads os.environ only; OTEL_* set in .env count as well (the environment wins).
        for key, value in env.items():
            if key.startswith("OTEL_") and key not in os.environ:
                os.environ[key] = value
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if protocol and protocol.strip() != "http/protobuf":
            log.warning("OTLP protocol %r is not supported: traces go over http/protobuf", protocol)
        named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
        attributes = {"service.version": gateway.__version__}
        if not named:
            attributes["service.name"] = SERVICE
        ids = _Ids()
        provider = TracerProvider(resource=Resource.create(attributes), id_generator=ids)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info(
            "tracing: OTLP/HTTP spans to %s",
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        )
        return cls(provider, ids, models)

    # --- the hooks
    def begin(self, headers: Headers) -> CallTrace:
        carrier = {}
        for name, value in headers:
            if name in (b"traceparent", b"tracestate"):
                carrier[name.decode()] = value.decode("latin-1")
        if carrier:
            parent = self.propagator.extract(carrier)
            context = trace.get_current_span(parent).get_span_context()
            if context.is_valid:
                return CallTrace(context.trace_id, parent)
        return CallTrace(self.ids.generate_trace_id())

    def end(self, trace_: CallTrace, record: CallRecord, arrived: float) -> None:
        now = time.time_ns()
        start = now - int((time.perf_counter() - arrived) * 1e9)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._spans_safely(trace_, record, start, now)
            return
        # After what the caller is doing now: a stream's last bytes go out before its spans are made.
        loop.call_soon(self._spans_safely, trace_, record, start, now)

    def _spans_safely(self, trace_: CallTrace, record: CallRecord, start: int, now: int) -> None:
        try:
            self._spans(trace_, record, start, now)
        except Exception:  # a trace is never worth a call
            log.exception("tracing: cannot make the spans of call %s", record.id)

    def wrap(self, store: Any) -> Any:
        return _TracedCalls(store, self)

    async def aclose(self) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(self.provider.shutdown), 5.0)
        except TimeoutError:
            log.warning("tracing: spans not exported within 5 s at shutdown were dropped")

    # --- spans
    def _spans(self, trace_: CallTrace, record: CallRecord, start: int, now: int) -> None:
        self.ids.next_trace_id = None if trace_.parent is not None else trace_.trace_id
        root = self.tracer.start_span(
            f"chat {record.requested_model}",
            context=trace_.parent,
            kind=SpanKind.SERVER,
            start_time=start,
            attributes=self._call_attributes(record),
        )
        self.ids.next_trace_id = None
        if not root.is_recording():  # sampled out
            return
        if record.status == "error":
            root.set_status(Status(StatusCode.ERROR, record.error))
            root.set_attribute("error.type", str(record.http_status))
        parent = trace.set_span_in_context(root)
        attempts = record.attempts
        first = _ns(attempts[0]["at"]) if attempts and "at" in attempts[0] else None
        self._routing(parent, record, first if first is not None else now)
        for i, attempt in enumerate(attempts):
            last = i == len(attempts) - 1
            self._attempt(parent, record, attempt, i, now if last and record.stream else None)
        root.end(end_time=now)
        self.pending[record.id] = root.get_span_context()
        if len(self.pending) > PENDING_MAX:
            self.pending.popitem(last=False)

    def _call_attributes(self, record: CallRecord) -> dict[str, Any]:
        spec = self.specs.get(record.model or "")
        out: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": record.requested_model,
            "llm_router.request_id": record.id,
            "llm_router.status": record.status,
            "llm_router.stream": record.stream,
            "http.request.method": "POST",
            "http.response.status_code": record.http_status,
        }
        optional = {
            "gen_ai.system": spec.provider if spec else None,
            "gen_ai.provider.name": spec.provider if spec else None,
            "gen_ai.response.model": record.upstream_model,
            "gen_ai.usage.input_tokens": record.prompt_tokens,
            "gen_ai.usage.output_tokens": record.completion_tokens,
            "llm_router.model": record.model,
            "llm_router.layer": record.layer,
            "llm_router.strategy": record.strategy,
            "llm_router.policy": record.policy,
            "llm_router.propensity": record.propensity,
            "llm_router.cost_usd": record.cost_usd,
            "llm_router.overhead_ms": record.overhead_ms,
            "llm_router.attempts": len(record.attempts) or None,
            "llm_router.explored": True if record.decision.get("explored") else None,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        return out

    def _routing(self, parent: Context, record: CallRecord, end: int) -> None:
        """`route` ending where the first attempt began, and its stages inside it, in order."""
        timings: dict[str, float] = record.decision.get("timings_ms") or {}
        routing = timings.get("routing_ms")
        if routing is None:
            return  # an explicit model: no routing
        start = end - int(routing * 1e6)
        attributes: dict[str, Any] = {
            "llm_router.layer": record.layer or "",
            "llm_router.model": record.model or "",
        }
        if record.propensity is not None:
            attributes["llm_router.propensity"] = record.propensity
        route = self.tracer.start_span("route", context=parent, start_time=start, attributes=attributes)
        inner = trace.set_span_in_context(route)
        at = start
        for stage, key in (("embed", "embed_ms"), ("neighbours", "neighbours_ms"), ("policy", "sample_ms")):
            ms = timings.get(key)
            if ms is None:
                continue
            stage_end = min(at + int(ms * 1e6), end)
            if stage == "policy":  # sampling is the decision's last step
                at = max(at, end - int(ms * 1e6))
                stage_end = end
            span = self.tracer.start_span(stage, context=inner, start_time=at)
            if stage == "policy" and record.policy:
                span.set_attribute("llm_router.policy", record.policy)
            span.end(end_time=stage_end)
            at = stage_end
        route.end(end_time=end)

    def _attempt(
        self, parent: Context, record: CallRecord, attempt: dict[str, Any], n: int, stream_end: int | None
    ) -> None:
        """One upstream attempt (CLIENT); a stream's answering attempt lasts until the stream ended."""
        spec = self.specs.get(attempt.get("model", ""))
        upstream = spec.upstream_id if spec else str(attempt.get("model"))
        start = _ns(attempt.get("at", time.time()))
        ok = attempt.get("outcome") == "ok"
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": upstream,
            "llm_router.model": str(attempt.get("model")),
            "llm_router.attempt": n + 1,
            "llm_router.outcome": str(attempt.get("outcome")),
        }
        if spec is not None:
            attributes["gen_ai.system"] = attributes["gen_ai.provider.name"] = spec.provider
            if spec.base_url:
                url = urlsplit(spec.base_url)
                attributes["server.address"] = url.hostname or ""
                attributes["server.port"] = url.port or (443 if url.scheme == "https" else 80)
        answered = ok and attempt.get("model") == record.model
        if answered:
            for key, value in (
                ("gen_ai.response.model", record.upstream_model),
                ("gen_ai.usage.input_tokens", record.prompt_tokens),
                ("gen_ai.usage.output_tokens", record.completion_tokens),
                ("llm_router.cost_usd", record.cost_usd),
            ):
                if value is not None:
                    attributes[key] = value
        span = self.tracer.start_span(
            f"chat {upstream}", context=parent, kind=SpanKind.CLIENT, start_time=start, attributes=attributes
        )
        if not ok:
            kind = attempt.get("kind") or attempt.get("status") or attempt.get("outcome")
            span.set_attribute("error.type", str(kind))
            span.set_status(Status(StatusCode.ERROR, str(attempt.get("error") or attempt.get("outcome"))))
        elif answered and record.status not in ("ok", "cancelled"):
            span.set_status(Status(StatusCode.ERROR, record.error))  # a stream that broke off
        end = stream_end if (stream_end is not None and answered) else start + int(attempt.get("ms", 0) * 1e6)
        span.end(end_time=end)

    def recorded(self, records: Sequence[CallRecord], start: int, end: int, store: str) -> None:
        """The recorder wrote `records` (one batch) between `start` and `end`: a `record` span each."""
        for rec in records:
            context = self.pending.pop(rec.id, None)
            if context is None:
                continue
            span = self.tracer.start_span(
                "record",
                context=trace.set_span_in_context(trace.NonRecordingSpan(context)),
                start_time=start,
                attributes={
                    "llm_router.request_id": rec.id,
                    "db.system.name": store,
                    "db.operation.batch.size": len(records),
                },
            )
            span.end(end_time=end)


class _TracedCalls:
    """The call store as the recorder sees it: its writes make `record` spans."""

    def __init__(self, store: Any, tracing: OtelTracing) -> None:
        self.store = store
        self.tracing = tracing
        self.system = "postgresql" if type(store).__name__.startswith("Postgres") else "memory"

    async def write_calls(self, records: Sequence[CallRecord]) -> Any:
        start = time.time_ns()
        written = await self.store.write_calls(
            records
        )  # a failed batch is retried: spans for the write that lands
        try:
            self.tracing.recorded(records, start, time.time_ns(), self.system)
        except Exception:
            log.exception("tracing: cannot make the record spans")
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

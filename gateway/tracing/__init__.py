"""Traces of calls, OpenTelemetry over OTLP/HTTP, configured by the standard OTEL_* variables.

Off unless an OTLP endpoint is configured (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none turn it off
again). Off, this module is all there is: `NoTracing` answers every hook with nothing and the
OpenTelemetry SDK is never imported. On, `gateway.tracing.otel` is loaded.

The hot path does not wrap its awaits in spans. A call's trace id is fixed when it arrives (from
an incoming `traceparent`, or new); when the call has ended (after its response went out), its
spans are made at once from the times the gateway measured anyway: the gateway span (SERVER),
`route` with `embed`, `neighbours` and `policy` under it, one CLIENT span per upstream attempt, and
later, when the recorder has written the call, `record`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from gateway.catalogue import ModelSpec
from gateway.domain import CallRecord

log = logging.getLogger("gateway.tracing")

Headers = Sequence[tuple[bytes, bytes]]
S = TypeVar("S")


@dataclass(slots=True)
class CallTrace:
    """A traced call's trace id, and the incoming context it continues (None: a new trace)."""

    trace_id: int
    parent: Any = None  # an opentelemetry Context, opaque here

    @property
    def trace_id_hex(self) -> str:
        return format(self.trace_id, "032x")


class Tracing(Protocol):
    enabled: bool

    def begin(self, headers: Headers) -> CallTrace | None:
        """A call arrived (with these request headers): its trace, or None when not tracing."""
        ...

    def end(self, trace: CallTrace, record: CallRecord, arrived: float) -> None:
        """The call ended (`arrived`: time.perf_counter() at its arrival): make its spans. Never raises."""
        ...

    def wrap(self, store: S) -> S:
        """The call store the recorder writes through: traced writes (`record` spans), or `store`."""
        ...

    async def aclose(self) -> None:
        """Export what is left, within a few seconds."""
        ...


class NoTracing:
    enabled = False

    def begin(self, headers: Headers) -> CallTrace | None:
        return None

    def end(self, trace: CallTrace, record: CallRecord, arrived: float) -> None:
        pass

    def wrap(self, store: S) -> S:
        return store

    async def aclose(self) -> None:
        pass


def configured(env: Mapping[str, str]) -> bool:
    """Whether the OTEL_* variables ask for traces."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def tracing_from_env(env: Mapping[str, str], models: Sequence[ModelSpec]) -> Tracing:
    """Tracing as the OTEL_* variables of `env` (the process environment over .env) configure it."""
    if not configured(env):
        return NoTracing()
    try:
        from gateway.tracing.otel import OtelTracing
    except ImportError as exc:  # a slimmed install without the SDK: say so, serve untraced
        log.warning("OTEL_* asks for traces but the OpenTelemetry SDK is not installed (%s)", exc)
        return NoTracing()
    return OtelTracing.from_env(env, models)

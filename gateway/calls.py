"""A call's book-keeping: its record opened from the decision, its tokens and cost from the
upstream's usage, and its end (however it ends): the rate-limit reservation settled, the error
redacted, metrics observed, the record kept by the recorder (on disk) before the client gets the
last byte."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Protocol

from gateway.catalogue import ModelSpec
from gateway.context import RequestState
from gateway.domain import CallRecord
from gateway.errors import GatewayError
from gateway.routing import Decision
from gateway.tracing import NoTracing, Tracing
from gateway.upstreams import Attempt


class Meter(Protocol):
    def observe_call(self, rec: CallRecord) -> None: ...


class Sink(Protocol):
    def record(self, rec: CallRecord) -> int: ...


class DurableSink(Sink, Protocol):
    async def keep(self, rec: CallRecord) -> None:
        """Kept for good (or RecorderUnavailable): what must happen before the last byte."""
        ...


def account(record: CallRecord, spec: ModelSpec, usage: dict[str, Any], prompt_estimate: int) -> None:
    """A call's tokens and cost, from the upstream's `usage`; what it lacks is estimated (the
    prompt from `prompt_estimate`, the answer at 4 characters a token) and marked so."""
    pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(pt, int):
        pt = prompt_estimate
        record.decision["usage_estimated"] = True
    if not isinstance(ct, int):
        ct = len(record.response or "") // 4
        record.decision["usage_estimated"] = True
    record.prompt_tokens, record.completion_tokens = pt, ct
    record.cost_usd = spec.cost_usd(pt, ct)


def decision_dict(decision: Decision) -> dict[str, Any]:
    out: dict[str, Any] = {"fallbacks": decision.fallbacks}
    if decision.explored:
        out["explored"] = True
    if decision.rule:
        out["rule"] = decision.rule
    if decision.candidates:
        out["candidates"] = decision.candidates
    if decision.timings:
        out["timings_ms"] = {k: round(v, 3) for k, v in decision.timings.items()}
    return out


def open_record(
    state: RequestState,
    messages: list[dict[str, Any]],
    requested_model: str,
    decision: Decision,
    *,
    stream: bool,
) -> CallRecord:
    """The record of a call about to go upstream: an error until it is told otherwise."""
    record = CallRecord(
        id=state.request_id,
        messages=messages,
        requested_model=requested_model,
        model=decision.model,
        status="error",
        http_status=500,
        embedding=decision.embedding,
        embedder=decision.embedder if decision.embedding is not None else None,
        layer=decision.layer,
        strategy=decision.strategy,
        policy=decision.policy,
        propensity=decision.propensity,
        decision=decision_dict(decision),
        stream=stream,
        caller=state.tenant,
        trace_id=state.trace.trace_id_hex if state.trace is not None else None,
    )
    state.record = record
    return record


def answered(record: CallRecord, spec: ModelSpec, upstream_model: str, attempts: list[Attempt]) -> None:
    """Which model answered, after which attempts."""
    record.model, record.upstream_model = spec.name, upstream_model
    record.attempts = [a.as_dict() for a in attempts]


class Calls:
    def __init__(
        self,
        metrics: Meter,
        recorder: DurableSink,
        redact: Callable[[str], str] = str,
        tracing: Tracing | None = None,
    ) -> None:
        self.metrics = metrics
        self.recorder = recorder
        self.redact = redact
        self.tracing = tracing or NoTracing()
        self.open = 0  # calls opened and not finished yet
        self._none_open = asyncio.Event()
        self._none_open.set()

    def opened(self, record: CallRecord) -> CallRecord:
        self.open += 1
        self._none_open.clear()
        return record

    async def drain(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a shutdown bound
        """At shutdown, before the recorder closes: the calls uvicorn cancelled finish (and are
        recorded) in their own tasks a moment later; wait for them."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none_open.wait(), timeout)

    async def finish(self, record: CallRecord, state: RequestState) -> None:
        """A call ended (any way): settle its tokens, meter it, keep its record. Raises
        RecorderUnavailable when the record cannot be kept: then the answer must not go out."""
        self.open -= 1
        if self.open <= 0:
            self.open = 0
            self._none_open.set()
        record.overhead_ms = state.overhead_ms
        if state.reservation is not None:
            state.reservation.settle((record.prompt_tokens or 0) + (record.completion_tokens or 0))
        if record.error:
            record.error = self.redact(record.error)
        self.metrics.observe_call(record)
        await self.recorder.keep(record)
        if state.trace is not None:
            self.tracing.end(state.trace, record, state.t0)

    async def failed(self, record: CallRecord, state: RequestState, exc: BaseException) -> None:
        """The call failed before any answer: its record says how, and how long upstreams took."""
        record.status = "error"
        record.error = str(exc)
        if isinstance(exc, GatewayError):
            record.http_status, record.upstream_ms = exc.status, exc.upstream_ms
            record.attempts = exc.attempts or record.attempts
        else:
            record.http_status, record.upstream_ms = 500, None
        state.mark_overhead(record.upstream_ms or 0.0)
        await self._finish_quietly(record, state)

    async def cancelled(self, record: CallRecord, state: RequestState) -> None:
        record.status, record.http_status, record.error = "cancelled", 499, "client disconnected"
        await self._finish_quietly(record, state)

    async def _finish_quietly(self, record: CallRecord, state: RequestState) -> None:
        """For a call that failed anyway: its own error is what the client gets."""
        try:
            await self.finish(record, state)
        except GatewayError:
            pass  # logged by the recorder

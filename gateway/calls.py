"""A call's book-keeping: its record opened from the decision, its tokens and cost from the
upstream's usage, and its end (however it ends): the rate-limit reservation settled, the error
redacted, metrics observed, the record kept by the recorder (on disk) before the client gets the
last byte."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

from gateway.attempts import Attempt
from gateway.catalogue import ModelSpec
from gateway.context import RequestState
from gateway.domain import CallRecord
from gateway.errors import GatewayError
from gateway.routing import Decision
from gateway.tracing import NoTracing, Tracing

log = logging.getLogger("gateway")


class Meter(Protocol):
    def observe_call(self, rec: CallRecord) -> None: ...


class CallObserver(Protocol):
    def observe_call(self, record: CallRecord) -> None:
        """Every finished call (the routing policy learns from its prompt and cost)."""
        ...


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


def propensity_fields(decision: Decision) -> dict[str, Any]:
    """Every eligible arm's propensity, whether the pick was deterministic, the numerical error."""
    if not decision.propensities:
        return {}
    out: dict[str, Any] = {
        "propensities": decision.propensities,
        "deterministic": decision.propensities == {decision.model: 1.0},
    }
    if decision.propensity_error:
        out["propensity_error"] = decision.propensity_error
    return out


def settle_propensities(record: CallRecord, decision: Decision) -> None:
    """The propensities a Thompson pick left pending, computed now and put in the record (once: a
    second call finds nothing pending); a failure costs the record its propensities, never the
    record."""
    if not decision.pending:
        return
    try:
        decision.resolve()
    except Exception:
        log.exception("could not compute the propensities of call %s", record.id)
        decision.choice = None  # given up: the record goes without them
        return
    record.propensity = decision.propensity
    record.decision.update(propensity_fields(decision))


SETTLE_AFTER_TURNS = 3


def settle_soon(record: CallRecord, decision: Decision, turns: int = SETTLE_AFTER_TURNS) -> None:
    """Computes the pending propensities `turns` turns of the event loop from now, when the call
    has sent its request upstream (its task writes the request's head, aiohttp's writer task the
    body, a turn each): the computation fills the wait for the answer rather than delaying it, and
    the record is complete before it is kept. What is still pending when the call ends (it failed
    at once) `Calls.finish` computes before keeping the record."""
    loop = asyncio.get_running_loop()

    def turn(left: int) -> None:
        if left > 0:
            loop.call_soon(turn, left - 1)
        else:
            settle_propensities(record, decision)

    loop.call_soon(turn, turns)


def decision_dict(decision: Decision) -> dict[str, Any]:
    """The decision as the call record keeps it: what was picked (`arm`; the record's `model` is
    the model that answered, after any fallback), whether the pick was a uniform exploration,
    every eligible arm's propensity (once known: see `settle_propensities`), and the context it
    was decided from, so that other configurations can be evaluated on it off-line."""
    out: dict[str, Any] = {"arm": decision.model, "fallbacks": decision.fallbacks}
    if decision.explored:
        out["explored"] = True
    if decision.rule:
        out["rule"] = decision.rule
    if decision.candidates:
        out["candidates"] = decision.candidates
    out.update(propensity_fields(decision))
    if decision.context is not None:
        out["context"] = decision.context.logged()
    if decision.unavailable:
        out["unavailable"] = decision.unavailable
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
        key_id=state.key.id if state.key is not None else None,
        trace_id=state.trace.trace_id_hex if state.trace is not None else None,
    )
    state.record, state.decision = record, decision
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
        observer: CallObserver | None = None,
    ) -> None:
        self.metrics = metrics
        self.observer = observer
        self.recorder = recorder
        self.redact = redact
        self.tracing = tracing or NoTracing()
        self.open = 0  # calls opened and not finished yet
        self._none_open = asyncio.Event()
        self._none_open.set()

    def opened(self, record: CallRecord, decision: Decision | None = None) -> CallRecord:
        """A call goes upstream: counted until it finishes; its propensities computed meanwhile."""
        self.open += 1
        self._none_open.clear()
        if decision is not None and decision.pending:
            settle_soon(record, decision)
        return record

    async def drain(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a shutdown bound
        """At shutdown, before the recorder closes: the calls uvicorn cancelled finish (and are
        recorded) in their own tasks a moment later; wait for them."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none_open.wait(), timeout)

    async def finish(self, record: CallRecord, state: RequestState) -> None:
        """A call ended (any way): settle its tokens and propensities, meter it, keep its record. Raises
        RecorderUnavailable when the record cannot be kept: then the answer must not go out."""
        self.open -= 1
        if self.open <= 0:
            self.open = 0
            self._none_open.set()
        record.overhead_ms = state.overhead_ms
        if state.reservation is not None and record.kind == "call":
            used = (record.prompt_tokens or 0) + (record.completion_tokens or 0)
            state.reservation.settle(used, record.cost_usd or 0.0)
        if record.error:
            record.error = self.redact(record.error)
        self.metrics.observe_call(record)
        if self.observer is not None:
            self.observer.observe_call(record)
        if state.decision is not None:  # what the wait upstream did not compute (a quick failure)
            settle_propensities(record, state.decision)
        await self.recorder.keep(record)  # with its propensities: the spool's copy has them too
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

"""A call's book-keeping: its record opened from the decision, its tokens and cost from the
upstream's usage, and its end (however it ends): the rate-limit reservation settled, the error
redacted, metrics observed, the record handed to the recorder."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from gateway.catalogue import ModelSpec
from gateway.context import RequestState
from gateway.domain import CallRecord
from gateway.errors import GatewayError
from gateway.routing import Decision
from gateway.upstreams import Attempt

log = logging.getLogger("gateway")


class Meter(Protocol):
    def observe_call(self, rec: CallRecord) -> None: ...


class Sink(Protocol):
    def record(self, rec: CallRecord) -> None: ...


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
    """The propensities a Thompson pick left pending, computed now (the answer is out) and put in
    the record; a failure costs the record its propensities, never the record."""
    try:
        decision.resolve()
    except Exception:
        log.exception("could not compute the propensities of call %s", record.id)
        return
    record.propensity = decision.propensity
    record.decision.update(propensity_fields(decision))


def decision_dict(decision: Decision) -> dict[str, Any]:
    """The decision as the call record keeps it: what was picked (`arm`; the record's `model` is
    the model that answered, after any fallback), every eligible arm's propensity (once known:
    see `settle_propensities`), and the context it was decided from, so that other
    configurations can be evaluated on it off-line."""
    out: dict[str, Any] = {"arm": decision.model, "fallbacks": decision.fallbacks}
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
        layer=decision.layer,
        strategy=decision.strategy,
        policy=decision.policy,
        propensity=decision.propensity,
        decision=decision_dict(decision),
        stream=stream,
        caller=state.caller,
    )
    state.record, state.decision = record, decision
    return record


def answered(record: CallRecord, spec: ModelSpec, upstream_model: str, attempts: list[Attempt]) -> None:
    """Which model answered, after which attempts."""
    record.model, record.upstream_model = spec.name, upstream_model
    record.attempts = [a.as_dict() for a in attempts]


class Calls:
    def __init__(self, metrics: Meter, recorder: Sink, redact: Callable[[str], str] = str) -> None:
        self.metrics = metrics
        self.recorder = recorder
        self.redact = redact

    def finish(self, record: CallRecord, state: RequestState) -> None:
        """A call ended (any way): settle its tokens and propensities, meter it, record it."""
        record.overhead_ms = state.overhead_ms
        if state.reservation is not None:
            state.reservation.settle((record.prompt_tokens or 0) + (record.completion_tokens or 0))
        if record.error:
            record.error = self.redact(record.error)
        self.metrics.observe_call(record)
        self.recorder.record(record)
        # Last, and with no await before it returns: the recorder writes in batches from a task of
        # this event loop, so the record is complete before anything reads or writes it.
        if state.decision is not None:
            settle_propensities(record, state.decision)

    def failed(self, record: CallRecord, state: RequestState, exc: Exception) -> None:
        """The call failed before any answer: its record says how, and how long upstreams took."""
        record.status = "error"
        record.error = str(exc)
        if isinstance(exc, GatewayError):
            record.http_status, record.upstream_ms = exc.status, exc.upstream_ms
        else:
            record.http_status, record.upstream_ms = 500, None
        state.mark_overhead(record.upstream_ms or 0.0)
        self.finish(record, state)

    def cancelled(self, record: CallRecord, state: RequestState) -> None:
        record.status, record.http_status, record.error = "cancelled", 499, "client disconnected"
        self.finish(record, state)

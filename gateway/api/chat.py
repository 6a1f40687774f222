"""POST /v1/chat/completions (and /chat/completions): validate, route, proxy, record.

The body the client sent goes upstream unchanged except `model` (and our `router` extension,
removed). The upstream's answer comes back unchanged except `model`, which names the catalogue
model that answered; the upstream's own model string is in the `x-router-upstream-model` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from starlette.types import Receive, Scope, Send

from gateway import fields
from gateway.asgi import Headers, header_value, read_body, send_bytes, send_stream, until_disconnect
from gateway.calls import account, answered, open_record
from gateway.catalogue import RouterConstraints
from gateway.context import RequestState, request_state
from gateway.domain import CallRecord, text_of
from gateway.errors import (
    ClientDisconnected,
    GatewayError,
    InvalidRequest,
    NotFound,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.providers import ProviderError
from gateway.routing import Decision, RouteContext
from gateway.schemas import ChatRequest, parse_json_object, validate
from gateway.services import Services, services_of
from gateway.upstreams import Attempt, OpenStream
from gateway.wire import SSE_DONE, Completion, StreamAccumulator, needs_of, sse, tokens_of

T = TypeVar("T")

_HEADER_CONSTRAINTS = {
    b"x-router-strategy": "strategy",
    b"x-router-policy": "policy",
    b"x-router-max-cost-usd": "max_cost_usd",
    b"x-router-max-latency-ms": "max_latency_ms",
    b"x-router-min-quality": "min_quality",
    b"x-router-capability": "capability",
    b"x-router-models": "models",
}
_SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def header_constraints(scope: Scope) -> RouterConstraints | None:
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        field = _HEADER_CONSTRAINTS.get(name)
        if field is not None:
            found[field] = value.decode("latin-1")
    if not found:
        return None
    try:
        return RouterConstraints.model_validate(found)
    except ValueError as exc:
        first = exc.errors(include_url=False)[0]  # type: ignore[attr-defined]
        header = "X-Router-" + str(first["loc"][0]).replace("_", "-").title()
        raise InvalidRequest(
            f"invalid {header} header: {first['msg']}", param=header, code="invalid_value"
        ) from exc


def measure(services: Services, messages: list[dict[str, Any]]) -> int:
    """Refuses what MAX_MESSAGES and MAX_INPUT_CHARS do not allow; returns the prompt's estimated
    tokens."""
    settings = services.settings
    if len(messages) > settings.max_messages:
        raise InvalidRequest(
            f"too many messages: {len(messages)}, at most {settings.max_messages}",
            param="messages",
            code="too_many_messages",
        )
    lengths = [len(text_of(m.get("content"))) for m in messages]
    chars = sum(lengths)
    if chars > settings.max_input_chars:
        raise InvalidRequest(
            f"the messages hold {chars} characters, at most {settings.max_input_chars}",
            param="messages",
            code="input_too_long",
        )
    return tokens_of(lengths)


def output_tokens(services: Services, req: ChatRequest) -> int:
    """The output tokens a call may use at most, all choices together (what its token reservation
    holds beside the prompt): n x (max_tokens cut to MAX_OUTPUT_TOKENS, or MAX_OUTPUT_TOKENS)."""
    settings = services.settings
    n = req.n or 1
    if n > settings.max_n:
        raise InvalidRequest(f"n is {n}, at most {settings.max_n} (MAX_N)", param="n", code="invalid_value")
    asked = req.max_completion_tokens or req.max_tokens
    cap = settings.max_output_tokens
    each = min(asked, cap) if asked and cap else (asked or cap)
    return n * each


def constraints_of(services: Services, scope: Scope, req: ChatRequest) -> RouterConstraints:
    """The routing constraints: the virtual model's, overridden by the body's, then the headers'."""
    settings = services.settings
    model = req.model
    if model != "auto" and model not in settings.virtual_models and settings.model(model) is None:
        raise NotFound(
            f"The model '{model}' does not exist; GET /v1/models lists the models and virtual models",
            param="model",
            code="model_not_found",
        )
    constraints = settings.virtual_models.get(model) or RouterConstraints()
    if req.router is not None:
        constraints = constraints.merged(req.router)
    from_headers = header_constraints(scope)
    if from_headers is not None:
        constraints = constraints.merged(from_headers)
    return constraints


class ChatCompletions:
    """The ASGI endpoint (raw ASGI, to keep the hot path short)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = services_of(scope)
        state = request_state(scope)
        if services.tracing.enabled:
            state.trace = services.tracing.begin(scope["headers"])
        try:
            data = parse_json_object(await read_body(receive), services.settings.max_json_elements)
            req: ChatRequest = validate(ChatRequest, data)
            fields.check(data, services.settings.models)
            messages: list[dict[str, Any]] = data["messages"]
            prompt_tokens = measure(services, messages)
            most = prompt_tokens + output_tokens(services, req)
            constraints = constraints_of(services, scope, req)
            services.recorder.admit()  # no room to record the call: refuse it before it costs
            if state.limit_id is not None:
                state.reservation = services.limits.reserve(state.limit_id, most)
            ctx = RouteContext(
                request_id=state.request_id,
                requested_model=req.model,
                messages=messages,
                constraints=constraints,
                needs=needs_of(data, messages),
                prompt_tokens=prompt_tokens,
                max_tokens=req.max_completion_tokens or req.max_tokens,
                tenant=state.tenant,
            )
            decision = await services.router.decide(ctx)
        except GatewayError as exc:  # refused before any model was chosen: count it all the same
            services.metrics.refused(exc.status)
            if state.reservation is not None:
                state.reservation.release()  # a refused call uses no tokens
            raise
        call = ChatCall(
            services,
            state,
            receive,
            send,
            ctx,
            decision,
            body={k: v for k, v in data.items() if k != "router"},
            record=services.calls.opened(
                open_record(state, messages, req.model, decision, stream=req.stream)
            ),
        )
        if req.stream:
            await call.stream(bool(req.stream_options and req.stream_options.include_usage))
        else:
            await call.complete()


@dataclass
class ChatCall:
    """One routed chat call on its way upstream and back (what uvicorn's cycle object is to a
    request): everything `complete` and `stream` share."""

    services: Services
    state: RequestState
    receive: Receive
    send: Send
    ctx: RouteContext
    decision: Decision
    body: dict[str, Any]
    record: CallRecord

    async def _upstream(self, work: Awaitable[T]) -> T:
        """`work` (reaching an upstream), within the deadline and until the client goes away;
        a failure is recorded before it is raised."""
        try:
            result: T = await until_disconnect(self.receive, self._within_deadline(work))
            return result
        except ClientDisconnected:
            await self.services.calls.cancelled(self.record, self.state)
            raise
        except Exception as exc:
            await self.services.calls.failed(self.record, self.state, exc)
            raise

    async def _within_deadline(self, work: Awaitable[T]) -> T:
        """`work`, within what is left of the call's REQUEST_TIMEOUT_S (counted from its arrival)."""
        limit = self.services.settings.request_timeout_s
        try:
            async with asyncio.timeout(limit - self.state.elapsed_ms() / 1000):
                return await work
        except TimeoutError:
            error = UpstreamTimeout(
                f"no answer within the request deadline ({limit:g} s; REQUEST_TIMEOUT_S sets it)",
                code="deadline_exceeded",
            )
            error.upstream_ms = self.state.elapsed_ms()
            raise error from None

    def _headers(self, upstream_model: str, attempts: list[Attempt]) -> Headers:
        headers = [
            (b"x-router-model", (self.record.model or "").encode()),
            (b"x-router-upstream-model", header_value(upstream_model)),
            (b"x-router-layer", self.decision.layer.encode()),
            (b"x-router-attempts", str(len(attempts)).encode()),
        ]
        if self.decision.strategy:
            headers.append((b"x-router-strategy", self.decision.strategy.encode()))
        if self.record.cost_usd is not None:
            headers.append((b"x-router-cost-usd", f"{self.record.cost_usd:.8f}".encode()))
        return headers

    async def _finish(self) -> None:
        """Keeps the record (on disk) before the last byte; raises RecorderUnavailable if it cannot."""
        await self.services.calls.finish(self.record, self.state)
        if self.record.status == "ok":
            self.services.duels.maybe_start(self.record, self.decision, self.body)

    async def complete(self) -> None:
        services, record = self.services, self.record
        result = await self._upstream(services.upstreams.chat(self.decision.chain, self.body))
        try:
            spec, data = result.spec, result.data
            answer = Completion.of(data)
            upstream_model = answer.upstream_model or spec.upstream_id
            data["model"] = spec.name
            record.response = answer.text
            account(record, spec, answer.usage, self.ctx.prompt_tokens)
            answered(record, spec, upstream_model, result.attempts)
            record.synthetic = answer.synthetic
            record.upstream_ms = result.attempts[-1].ms  # the answering model's own time (fallbacks aside)
            payload = orjson.dumps(data)
            self.state.mark_overhead(result.upstream_ms)
            headers = self._headers(upstream_model, result.attempts)
            headers.append((b"content-type", b"application/json"))
            record.status, record.http_status = "ok", 200
        except Exception as exc:  # the answer cannot be sent: the call is recorded as failed all the same
            await services.calls.failed(record, self.state, exc)
            raise
        # The record is on disk before the answer goes out (a 503 instead when it cannot be).
        await self._finish()
        await send_bytes(self.send, 200, payload, headers)

    async def stream(self, include_usage: bool) -> None:
        opened: OpenStream = await self._upstream(
            self.services.upstreams.open_stream(self.decision.chain, self.body)
        )
        relay = StreamRelay(self, opened, include_usage)
        outcome = "cancelled"
        try:
            relay.acc.add(opened.first)
            answered(
                self.record, opened.spec, relay.acc.upstream_model or opened.spec.upstream_id, opened.attempts
            )
            self.record.ttft_ms = opened.ttft_ms
            self.state.mark_overhead(opened.upstream_ms)
            headers = self._headers(self.record.upstream_model or "", opened.attempts) + _SSE_HEADERS
            await send_stream(self.receive, self.send, headers, relay.events())
        except Exception:
            outcome = "error"
            raise
        finally:
            with contextlib.suppress(GatewayError):  # logged; the client has its error already
                await relay.finish(outcome)  # when the stream never started; otherwise already done


class StreamRelay:
    """Relays an open upstream stream to the client, event by event, and records the call exactly
    once however the stream ends (done, deadline, upstream broke off, client gone)."""

    def __init__(self, call: ChatCall, opened: OpenStream, include_usage: bool) -> None:
        self.call = call
        self.opened = opened
        self.include_usage = include_usage
        self.acc = StreamAccumulator()
        self.t_stream = time.perf_counter()
        self.finished = False

    async def finish(self, status: str) -> None:
        """Records the call, once; raises RecorderUnavailable if its record cannot be kept."""
        if self.finished:
            return
        self.finished = True
        call, record, opened = self.call, self.call.record, self.opened
        record.status = status
        record.http_status = {"cancelled": 499, "error": 502}.get(status, 200)
        if status == "cancelled" and record.error is None:
            record.error = "client disconnected"
        record.upstream_ms = opened.ttft_ms + (time.perf_counter() - self.t_stream) * 1000
        record.response = self.acc.text()
        record.synthetic = self.acc.synthetic
        account(record, opened.spec, self.acc.usage or {}, call.ctx.prompt_tokens)
        try:
            await call._finish()  # recorded before closing: a cancellation cannot lose it
        finally:
            await opened.aclose()

    def encode(self, event: dict[str, Any]) -> bytes | None:
        if not self.include_usage:
            if not event.get("choices") and event.get("usage"):
                return None  # the usage-only chunk we asked for, not the client
            event.pop("usage", None)
        event["model"] = self.opened.spec.name
        return sse(event)

    async def events(self) -> AsyncGenerator[bytes, None]:
        call, record, opened = self.call, self.call.record, self.opened
        settings = call.services.settings
        status = "cancelled"
        try:
            first = self.encode(opened.first)
            if first is not None:
                yield first
            loop = asyncio.get_running_loop()
            deadline = loop.time() + settings.request_timeout_s - call.state.elapsed_ms() / 1000
            rest = aiter(opened.rest)
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await anext(rest)
                except StopAsyncIteration:
                    break
                self.acc.add(event)
                chunk = self.encode(event)
                if chunk is not None:
                    yield chunk
            status = "ok"
        except TimeoutError:  # the deadline, not the model's fault: no breaker failure
            status = "interrupted"
            record.error = f"the stream exceeded the request deadline ({settings.request_timeout_s:g} s)"
            yield UpstreamTimeout(
                record.error + "; REQUEST_TIMEOUT_S sets it", code="deadline_exceeded"
            ).sse()
        except Exception as exc:  # the upstream broke off (or sent what we cannot read)
            broken = (
                exc if isinstance(exc, ProviderError) else ProviderError("stream", f"{type(exc).__name__}")
            )
            status = "interrupted"
            call.services.upstreams.stream_failed(opened.spec.name, broken)
            record.error = broken.message
            yield UpstreamError(
                f"the upstream stream broke off: {broken.message}", code="stream_interrupted"
            ).sse()
        finally:
            refusal = await self._kept(status)  # on disk before [DONE]
        yield SSE_DONE if refusal is None else refusal.sse()

    async def _kept(self, status: str) -> GatewayError | None:
        try:
            await self.finish(status)
        except GatewayError as exc:
            return exc
        return None

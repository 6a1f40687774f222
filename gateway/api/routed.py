"""A routed call, whatever API the client speaks (chat completions, the Responses API): the
endpoint, admission (`gateway.api.admission`), the trip upstream (the deadline, the client going
away, fallbacks) and the book-keeping (`gateway.calls`) however it ends.

What differs between the APIs is the endpoint's `Dialect`: what each model of the chain is sent
(its API and body), and how its answer, or its stream, goes back to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson
from starlette.types import Receive, Scope, Send

from gateway import fields
from gateway.api.admission import Ask, admit, refused
from gateway.asgi import Headers, header_value, read_body, send_bytes, send_stream, until_disconnect
from gateway.attempts import Attempt
from gateway.calls import account, answered, open_record
from gateway.catalogue import ModelSpec
from gateway.context import RequestState, request_state
from gateway.domain import CallRecord
from gateway.errors import ClientDisconnected, GatewayError, UpstreamError, UpstreamTimeout
from gateway.providers import CHAT, Api, ProviderError
from gateway.routing import Decision, RouteContext
from gateway.schemas import parse_json_object, require_model
from gateway.services import Services, services_of
from gateway.upstreams import OpenStream
from gateway.wire import Completion

T = TypeVar("T")

SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def within_deadline(services: Services, state: RequestState, work: Awaitable[T]) -> T:
    """`work`, within what is left of the call's REQUEST_TIMEOUT_S (counted from its arrival)."""
    limit = services.settings.request_timeout_s
    try:
        async with asyncio.timeout(limit - state.elapsed_ms() / 1000):
            return await work
    except TimeoutError:
        error = UpstreamTimeout(
            f"no answer within the request deadline ({limit:g} s; REQUEST_TIMEOUT_S sets it)",
            code="deadline_exceeded",
        )
        error.upstream_ms = state.elapsed_ms()
        raise error from None


class StreamCodec(Protocol):
    """How an upstream stream goes back to the client, and what it said (for the record)."""

    def add(self, event: dict[str, Any]) -> bytes | None: ...

    def end(self, ok: bool) -> bytes:
        """What closes the stream (`ok`: the upstream's stream ended well; otherwise after an
        error event), sent once the call's record is kept: the last bytes of the stream."""
        ...

    def error(self, exc: GatewayError) -> bytes: ...

    def said(self) -> Completion: ...


class Dialect(Protocol):
    """The API a client speaks: what each model is sent, and how its answer goes back."""

    def plan(self, spec: ModelSpec) -> tuple[Api, dict[str, Any]]: ...

    def answer(
        self, api: Api, spec: ModelSpec, data: dict[str, Any]
    ) -> tuple[dict[str, Any], Completion]: ...

    def codec(self, api: Api, spec: ModelSpec) -> StreamCodec: ...


@dataclass(frozen=True)
class Admitted:
    """What an endpoint reads from a request: what the router sees, the dialect of the answer,
    the chat body a duel may resend (None: no duel), and whether the answer streams."""

    ask: Ask
    dialect: Dialect
    duel_body: dict[str, Any] | None
    stream: bool


class RoutedEndpoint:
    """The ASGI endpoint of a routed API (raw ASGI, to keep the hot path short): the body is read
    and turned into an `Admitted` by `read` (the API's own validation), its fields checked against
    what `api` may carry (`gateway.fields`), admitted, and called."""

    def __init__(self, read: Callable[[dict[str, Any], RequestState], Admitted], api: Api = CHAT) -> None:
        self.read = read
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = services_of(scope)
        state = request_state(scope)
        if services.tracing.enabled:
            state.trace = services.tracing.begin(scope["headers"])
        try:
            data = parse_json_object(await read_body(receive), services.settings.max_json_elements)
            require_model(data)
            admitted = self.read(data, state)
            fields.check(data, services.settings.models, self.api)
            ctx, decision = await admit(services, state, scope, admitted.ask)
        except GatewayError as exc:
            refused(services, state, exc)
            raise
        ask = admitted.ask
        call = RoutedCall(
            services,
            state,
            receive,
            send,
            ctx,
            decision,
            admitted.dialect,
            admitted.duel_body,
            services.calls.opened(
                open_record(state, ask.messages, ask.model, decision, stream=admitted.stream), decision
            ),
        )
        if admitted.stream:
            await call.stream()
        else:
            await call.complete()


@dataclass
class RoutedCall:
    """One routed call on its way upstream and back (what uvicorn's cycle object is to a request):
    everything `complete` and `stream` share. `duel_body` is the chat body a duel may resend
    (None: no duel)."""

    services: Services
    state: RequestState
    receive: Receive
    send: Send
    ctx: RouteContext
    decision: Decision
    dialect: Dialect
    duel_body: dict[str, Any] | None
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
        return await within_deadline(self.services, self.state, work)

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
        if self.record.status == "ok" and self.duel_body is not None:
            self.services.duels.maybe_start(self.record, self.decision, self.duel_body)

    async def complete(self) -> None:
        services, record = self.services, self.record
        result = await self._upstream(services.upstreams.answer(self.decision.chain, self.dialect.plan))
        try:
            spec = result.spec
            data, answer = self.dialect.answer(result.api, spec, result.data)
            upstream_model = answer.upstream_model or spec.upstream_id
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

    async def stream(self) -> None:
        opened: OpenStream = await self._upstream(
            self.services.upstreams.open(self.decision.chain, self.dialect.plan)
        )
        relay = StreamRelay(self, opened, self.dialect.codec(opened.api, opened.spec))
        outcome = "cancelled"
        try:
            head = relay.codec.add(opened.first)
            upstream_model = relay.codec.said().upstream_model or opened.spec.upstream_id
            answered(self.record, opened.spec, upstream_model, opened.attempts)
            self.record.ttft_ms = opened.ttft_ms
            self.state.mark_overhead(opened.upstream_ms)
            headers = self._headers(upstream_model, opened.attempts) + SSE_HEADERS
            await send_stream(self.receive, self.send, headers, relay.events(head))
        except Exception:
            outcome = "error"
            raise
        finally:
            with contextlib.suppress(GatewayError):  # logged; the client has its error already
                await relay.finish(outcome)  # when the stream never started; otherwise already done


class StreamRelay:
    """Relays an open upstream stream to the client, event by event (through the dialect's codec),
    and records the call exactly once however the stream ends (done, deadline, upstream broke off,
    client gone)."""

    def __init__(self, call: RoutedCall, opened: OpenStream, codec: StreamCodec) -> None:
        self.call = call
        self.opened = opened
        self.codec = codec
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
        said = self.codec.said()
        record.response = said.text
        record.synthetic = said.synthetic
        account(record, opened.spec, said.usage, call.ctx.prompt_tokens)
        try:
            await call._finish()  # recorded before closing: a cancellation cannot lose it
        finally:
            await opened.aclose()

    async def events(self, head: bytes | None) -> AsyncGenerator[bytes, None]:
        """The client's stream: `head` (the first event, encoded), then the rest as it comes."""
        call, record, opened = self.call, self.call.record, self.opened
        settings = call.services.settings
        status = "cancelled"
        try:
            if head:
                yield head
            loop = asyncio.get_running_loop()
            deadline = loop.time() + settings.request_timeout_s - call.state.elapsed_ms() / 1000
            rest = aiter(opened.rest)
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await anext(rest)
                except StopAsyncIteration:
                    break
                chunk = self.codec.add(event)
                if chunk:
                    yield chunk
            status = "ok"
        except TimeoutError:  # the deadline, not the model's fault: no breaker failure
            status = "interrupted"
            record.error = f"the stream exceeded the request deadline ({settings.request_timeout_s:g} s)"
            yield self.codec.error(
                UpstreamTimeout(record.error + "; REQUEST_TIMEOUT_S sets it", code="deadline_exceeded")
            )
        except Exception as exc:  # the upstream broke off (or sent what we cannot read)
            broken = (
                exc if isinstance(exc, ProviderError) else ProviderError("stream", f"{type(exc).__name__}")
            )
            status = "interrupted"
            call.services.upstreams.stream_failed(opened.spec.name, broken)
            record.error = broken.message
            yield self.codec.error(
                UpstreamError(f"the upstream stream broke off: {broken.message}", code="stream_interrupted")
            )
        finally:
            refusal = await self._kept(status)  # on disk before the stream's last bytes
        tail = self.codec.end(status == "ok") if refusal is None else self.codec.error(refusal)
        if tail:
            yield tail

    async def _kept(self, status: str) -> GatewayError | None:
        try:
            await self.finish(status)
        except GatewayError as exc:
            return exc
        return None

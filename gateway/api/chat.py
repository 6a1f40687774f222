"""POST /v1/chat/completions (and /chat/completions): validate, route, proxy, record.

The body the client sent goes upstream unchanged except `model` (and our `router` extension,
removed). The upstream's answer comes back unchanged except `model`, which names the catalogue
model that answered; the upstream's own model string is in the `x-router-upstream-model` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import Receive, Scope, Send

from gateway.config import ModelSpec, RouterConstraints
from gateway.errors import ClientDisconnected, GatewayError, InvalidRequest, NotFound, UpstreamTimeout
from gateway.providers import ProviderError
from gateway.routing import Decision, RouteContext
from gateway.schemas import ChatRequest, parse_json_object, validate
from gateway.store import CallRecord, text_of
from gateway.upstreams import Attempt, OpenStream

if TYPE_CHECKING:
    from gateway.app import Gateway

_HEADER_CONSTRAINTS = {
    b"x-router-strategy": "strategy",
    b"x-router-policy": "policy",
    b"x-router-max-cost-usd": "max_cost_usd",
    b"x-router-max-latency-ms": "max_latency_ms",
    b"x-router-min-quality": "min_quality",
    b"x-router-capability": "capability",
    b"x-router-models": "models",
}


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def estimate_tokens(messages: list[dict[str, Any]]) -> int:
    return _tokens([len(text_of(m.get("content"))) for m in messages])


def _tokens(lengths: list[int]) -> int:
    """About 4 characters a token, plus a few per message: enough for eligibility and budgets."""
    return sum(n // 4 + 4 for n in lengths)


def needs_of(data: dict[str, Any], messages: list[dict[str, Any]]) -> frozenset[str]:
    needs = set()
    if data.get("tools") or data.get("functions"):
        needs.add("tools")
    fmt = data.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        needs.add("json")
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") in ("image_url", "input_image") for p in content
        ):
            needs.add("vision")
            break
    if data.get("stream"):
        needs.add("streaming")
    return frozenset(needs)


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


def response_text(message: dict[str, Any]) -> str | None:
    content = message.get("content")
    text = text_of(content) if content is not None else None
    if message.get("tool_calls"):
        calls = orjson.dumps(message["tool_calls"]).decode()
        return calls if not text else f"{text}\n{calls}"
    return text


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


class StreamAccumulator:
    """Assembles what a stream said (first choice), for the call record."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.upstream_model: str | None = None

    def add(self, event: dict[str, Any]) -> None:
        if self.upstream_model is None and isinstance(event.get("model"), str):
            self.upstream_model = event["model"]
        if event.get("usage"):
            self.usage = event["usage"]
        for choice in event.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.parts.append(delta["content"])
            for tc in delta.get("tool_calls") or ():
                slot = self.tool_calls.setdefault(
                    tc.get("index", 0),
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                )
                slot["id"] = tc.get("id") or slot["id"]
                fn = tc.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""

    def text(self) -> str | None:
        message: dict[str, Any] = {"content": "".join(self.parts)}
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return response_text(message)


async def until_disconnect(receive: Receive, work: Awaitable[Any]) -> Any:
    """Runs `work`; if the client disconnects first, cancels it (which cancels the upstream call)
    and raises ClientDisconnected."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # we are cancelled (a shutdown): the work unwinds first, so
        task.cancel()  # that what it holds (the upstream stream) is closed by its own hands
        await asyncio.wait((task,))
        if not task.cancelled():
            task.exception()  # retrieved: it is the cancellation that matters here
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        raise ClientDisconnected() from None


class ChatCompletions:
    """The ASGI endpoint (raw ASGI, to keep the hot path short)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw: Gateway = scope["app"].state.gw
        state = scope["state"]
        t0: float = state["t0"]
        try:
            data = parse_json_object(await read_body(receive))
            req: ChatRequest = validate(ChatRequest, data)
            messages: list[dict[str, Any]] = data["messages"]
            prompt_tokens = self._measure(gw, messages)
            constraints = self._constraints(gw, scope, req)
            if "limit_id" in state:
                gw.limits.take_tokens(state["limit_id"], prompt_tokens)
                state["tokens_reserved"] = prompt_tokens
            ctx = RouteContext(
                request_id=state["request_id"],
                requested_model=req.model,
                messages=messages,
                constraints=constraints,
                needs=needs_of(data, messages),
                prompt_tokens=prompt_tokens,
                max_tokens=req.max_completion_tokens or req.max_tokens,
            )
            decision = await gw.router.decide(ctx)
        except GatewayError as exc:  # refused before any model was chosen: count it all the same
            gw.metrics.requests.labels("none", "none", "none", str(exc.status)).inc()
            if "tokens_reserved" in state:  # a refused call uses no tokens
                gw.limits.charge_tokens(state["limit_id"], -state.pop("tokens_reserved"))
            raise
        state["log"] = log_fields = {"model": decision.model, "layer": decision.layer, "stream": req.stream}
        if decision.strategy:
            log_fields["strategy"] = decision.strategy
        body = {k: v for k, v in data.items() if k != "router"}
        record = CallRecord(
            id=state["request_id"],
            messages=messages,
            requested_model=req.model,
            model=decision.model,
            status="error",
            http_status=500,
            embedding=decision.embedding,
            layer=decision.layer,
            strategy=decision.strategy,
            policy=decision.policy,
            propensity=decision.propensity,
            decision=decision_dict(decision),
            stream=req.stream,
            caller=state.get("caller"),
        )
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            await self._stream(gw, scope, receive, send, ctx, decision, body, record, include_usage, t0)
        else:
            await self._complete(gw, scope, receive, send, ctx, decision, body, record, t0)

    def _measure(self, gw: Gateway, messages: list[dict[str, Any]]) -> int:
        """Refuses what MAX_MESSAGES and MAX_INPUT_CHARS do not allow; returns the prompt's
        estimated tokens."""
        limit = gw.settings.max_messages
        if len(messages) > limit:
            raise InvalidRequest(
                f"too many messages: {len(messages)}, at most {limit}",
                param="messages",
                code="too_many_messages",
            )
        lengths = [len(text_of(m.get("content"))) for m in messages]
        chars = sum(lengths)
        if chars > gw.settings.max_input_chars:
            raise InvalidRequest(
                f"the messages hold {chars} characters, at most {gw.settings.max_input_chars}",
                param="messages",
                code="input_too_long",
            )
        return _tokens(lengths)

    def _constraints(self, gw: Gateway, scope: Scope, req: ChatRequest) -> RouterConstraints:
        model = req.model
        if model != "auto" and model not in gw.settings.virtual_models and gw.settings.model(model) is None:
            raise NotFound(
                f"The model '{model}' does not exist; GET /v1/models lists the models and virtual models",
                param="model",
                code="model_not_found",
            )
        constraints = gw.settings.virtual_models.get(model) or RouterConstraints()
        if req.router is not None:
            constraints = constraints.merged(req.router)
        from_headers = header_constraints(scope)
        if from_headers is not None:
            constraints = constraints.merged(from_headers)
        return constraints

    async def _complete(
        self,
        gw: Gateway,
        scope: Scope,
        receive: Receive,
        send: Send,
        ctx: RouteContext,
        decision: Decision,
        body: dict[str, Any],
        record: CallRecord,
        t0: float,
    ) -> None:
        state = scope["state"]
        try:
            result = await until_disconnect(
                receive, within_deadline(gw, t0, gw.upstreams.chat(decision.chain, body))
            )
        except ClientDisconnected:
            record.status, record.http_status, record.error = "cancelled", 499, "client disconnected"
            gw.finish(record, state)
            raise
        except Exception as exc:
            self._failed(gw, record, exc, t0, state)
            raise
        spec, data = result.spec, result.data
        upstream_model = data.get("model") if isinstance(data.get("model"), str) else spec.upstream_id
        data["model"] = spec.name
        choices = data.get("choices") or []
        message = choices[0].get("message") or {} if choices else {}
        record.response = response_text(message)
        usage = data.get("usage") or {}
        account(record, spec, usage, ctx.prompt_tokens)
        record.model, record.upstream_model = spec.name, upstream_model
        record.synthetic = bool((data.get("x_replay") or {}).get("placeholder"))
        record.status, record.http_status = "ok", 200
        record.upstream_ms = result.attempts[-1].ms  # the answering model's own time (fallbacks aside)
        record.attempts = [a.as_dict() for a in result.attempts]
        payload = orjson.dumps(data)
        state["overhead_ms"] = (time.perf_counter() - t0) * 1000 - result.upstream_ms
        headers = self._headers(spec.name, upstream_model, decision, result.attempts, record)
        headers.append((b"content-type", b"application/json"))
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        gw.finish(record, state)
        gw.start_duel(record, decision, body)

    async def _stream(
        self,
        gw: Gateway,
        scope: Scope,
        receive: Receive,
        send: Send,
        ctx: RouteContext,
        decision: Decision,
        body: dict[str, Any],
        record: CallRecord,
        include_usage: bool,
        t0: float,
    ) -> None:
        state = scope["state"]
        try:
            opened: OpenStream = await until_disconnect(
                receive, within_deadline(gw, t0, gw.upstreams.open_stream(decision.chain, body))
            )
        except ClientDisconnected:
            record.status, record.http_status, record.error = "cancelled", 499, "client disconnected"
            gw.finish(record, state)
            raise
        except Exception as exc:
            self._failed(gw, record, exc, t0, state)
            raise
        spec = opened.spec
        name = spec.name
        acc = StreamAccumulator()
        t_stream = time.perf_counter()
        finished = False

        async def finish(status: str) -> None:
            """Close the upstream and record the call, exactly once, however the stream ends."""
            nonlocal finished
            if finished:
                return
            finished = True
            record.status = status
            record.http_status = {"cancelled": 499, "error": 502}.get(status, 200)
            if status == "cancelled" and record.error is None:
                record.error = "client disconnected"
            record.upstream_ms = opened.ttft_ms + (time.perf_counter() - t_stream) * 1000
            record.response = acc.text()
            account(record, spec, acc.usage or {}, ctx.prompt_tokens)
            gw.finish(record, state)  # recorded before closing: a cancellation cannot lose it
            await opened.aclose()
            if status == "ok":
                gw.start_duel(record, decision, body)

        def encode(event: dict[str, Any]) -> bytes | None:
            if not include_usage:
                if not event.get("choices") and event.get("usage"):
                    return None  # the usage-only chunk we asked for, not the client
                event.pop("usage", None)
            event["model"] = name
            return b"data: " + orjson.dumps(event) + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            status = "cancelled"
            try:
                first = encode(opened.first)
                if first is not None:
                    yield first
                loop = asyncio.get_running_loop()
                deadline = loop.time() + gw.settings.request_timeout_s - (time.perf_counter() - t0)
                rest = aiter(opened.rest)
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            event = await anext(rest)
                    except StopAsyncIteration:
                        break
                    acc.add(event)
                    chunk = encode(event)
                    if chunk is not None:
                        yield chunk
                status = "ok"
            except TimeoutError:  # the deadline, not the model's fault: no breaker failure
                status = "interrupted"
                record.error = (
                    f"the stream exceeded the request deadline ({gw.settings.request_timeout_s:g} s)"
                )
                error = {
                    "message": record.error + "; REQUEST_TIMEOUT_S sets it",
                    "type": "timeout",
                    "param": None,
                    "code": "deadline_exceeded",
                }
                yield b"data: " + orjson.dumps({"error": error}) + b"\n\n"
            except Exception as exc:  # the upstream broke off (or sent what we cannot read)
                broken = (
                    exc
                    if isinstance(exc, ProviderError)
                    else ProviderError("stream", f"{type(exc).__name__}")
                )
                status = "interrupted"
                gw.upstreams.stream_failed(name, broken)
                record.error = broken.message
                error = {
                    "message": f"the upstream stream broke off: {broken.message}",
                    "type": "upstream_error",
                    "param": None,
                    "code": "stream_interrupted",
                }
                yield b"data: " + orjson.dumps({"error": error}) + b"\n\n"
            finally:
                await finish(status)
            yield b"data: [DONE]\n\n"

        outcome = "cancelled"
        try:
            acc.add(opened.first)
            record.synthetic = bool((opened.first.get("x_replay") or {}).get("placeholder"))
            upstream_model = acc.upstream_model or spec.upstream_id
            record.model, record.upstream_model = spec.name, upstream_model
            record.attempts = [a.as_dict() for a in opened.attempts]
            record.ttft_ms = opened.ttft_ms
            state["overhead_ms"] = (time.perf_counter() - t0) * 1000 - opened.upstream_ms
            headers = self._headers(spec.name, upstream_model, decision, opened.attempts, record)
            headers += [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
            ]
            await send_stream(receive, send, headers, events())
        except Exception:
            outcome = "error"
            raise
        finally:
            await finish(outcome)  # when the stream never started; otherwise already done

    def _headers(
        self, name: str, upstream_model: str, decision: Decision, attempts: list[Attempt], record: CallRecord
    ) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"x-router-model", name.encode()),
            (b"x-router-upstream-model", upstream_model.encode("utf-8", "replace")),
            (b"x-router-layer", decision.layer.encode()),
            (b"x-router-attempts", str(len(attempts)).encode()),
        ]
        if decision.strategy:
            headers.append((b"x-router-strategy", decision.strategy.encode()))
        if record.cost_usd is not None:
            headers.append((b"x-router-cost-usd", f"{record.cost_usd:.8f}".encode()))
        return headers

    def _failed(
        self, gw: Gateway, record: CallRecord, exc: Exception, t0: float, state: dict[str, Any]
    ) -> None:
        record.status = "error"
        record.http_status = getattr(exc, "status", 500)
        record.error = str(exc)
        record.upstream_ms = getattr(exc, "upstream_ms", None)
        state["overhead_ms"] = (time.perf_counter() - t0) * 1000 - (record.upstream_ms or 0.0)
        gw.finish(record, state)


async def within_deadline(gw: Gateway, t0: float, work: Awaitable[Any]) -> Any:
    """`work`, within what is left of the call's REQUEST_TIMEOUT_S (counted from its arrival)."""
    limit = gw.settings.request_timeout_s
    try:
        async with asyncio.timeout(limit - (time.perf_counter() - t0)):
            return await work
    except TimeoutError:
        error = UpstreamTimeout(
            f"no answer within the request deadline ({limit:g} s; REQUEST_TIMEOUT_S sets it)",
            code="deadline_exceeded",
        )
        error.upstream_ms = (time.perf_counter() - t0) * 1000  # type: ignore[attr-defined]
        raise error from None


def decision_dict(decision: Decision) -> dict[str, Any]:
    out: dict[str, Any] = {"fallbacks": decision.fallbacks}
    if decision.rule:
        out["rule"] = decision.rule
    if decision.candidates:
        out["candidates"] = decision.candidates
    if decision.timings:
        out["timings_ms"] = {k: round(v, 3) for k, v in decision.timings.items()}
    return out


async def send_stream(
    receive: Receive, send: Send, headers: list[tuple[bytes, bytes]], body: AsyncIterator[bytes]
) -> None:
    """Sends an SSE body chunk by chunk; a client disconnect cancels it and closes `body`."""

    async def pump() -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async for chunk in body:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    try:
        await until_disconnect(receive, pump())
    except (ClientDisconnected, OSError):
        pass  # the client went away; nothing more to send
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()

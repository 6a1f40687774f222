"""The one pure-ASGI middleware: request id, auth, rate limits, body limit, timing, the log line.

It is the outermost layer of the app, so every response (errors and 404s included) carries
`x-request-id` and `x-router-overhead-ms`, and no exception ever reaches the client as a trace.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.asgi import send_error
from gateway.auth import KEY_HEADERS, PROTECTED, Caller, Keys, presented
from gateway.auth_failures import AuthFailures
from gateway.context import STATE_KEY, RequestState, admit
from gateway.errors import (
    AuthenticationError,
    ClientDisconnected,
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
)
from gateway.limits import headers as quota_headers
from gateway.services import services_of

log = logging.getLogger("gateway.access")

REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")  # fullmatch (`$` would pass a "\n")
# Admitted by their endpoints once the body is read, with its tokens (one operation).
ADMITTED_WITH_TOKENS = frozenset(
    f"{v}/{api}" for v in ("", "/v1") for api in ("chat/completions", "responses", "embeddings")
)
_QUIET = ("/live", "/ready", "/health", "/metrics")  # probes and scrapes: no line each when fine


class RequestContext:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        redact: Callable[[str], str] = str,
        in_flight: Any = None,
        log_prompts: bool = False,
        auth_failures: AuthFailures | None = None,
    ) -> None:
        self.app = app
        self.auth_failures = auth_failures
        self.redact = redact
        self.in_flight = in_flight
        self.max_body_bytes = max_body_bytes
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        request_id: str | None = None
        content_length: int | None = None
        auth: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    content_length = None
            elif name in KEY_HEADERS:
                auth.setdefault(name, value)
        state = RequestState(t0)
        scope.setdefault("state", {})[STATE_KEY] = state
        if self.in_flight is not None:
            self.in_flight.inc()
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *self._headers(state)]
            await send(message)

        try:
            if request_id is None:
                state.request_id = uuid.uuid4().hex
            elif REQUEST_ID.fullmatch(request_id):
                state.request_id = request_id
            else:
                state.request_id = uuid.uuid4().hex
                raise InvalidRequest(
                    "X-Request-ID must be 1-128 characters of letters, digits, '.', '_', ':' or '-', "
                    "starting with a letter or digit",
                    param="X-Request-ID",
                    code="invalid_request_id",
                )
            services = services_of(scope)
            caller = await self._caller(scope, services.keys, presented(auth))
            if caller is not None:
                state.caller, state.key, state.tenant = caller.id, caller.key, caller.tenant
            if scope["path"].startswith(PROTECTED):
                policy = services.limits.policy(state.key)
                if policy.limited:
                    # By key; without a checked key, by address (a made-up bearer token must not
                    # reset a limit).
                    client = scope.get("client") or ("unknown", 0)
                    verified = caller is not None and caller.verified
                    state.limit_id = caller.id if caller and verified else f"ip:{client[0]}"
                    state.policy = policy
                    if not (scope["method"] == "POST" and scope["path"] in ADMITTED_WITH_TOKENS):
                        await admit(services.limits, state)  # the others: with their tokens, once read
            if content_length is not None and content_length > self.max_body_bytes:
                raise PayloadTooLarge(f"the request body is larger than {self.max_body_bytes} bytes")
            await self.app(scope, self._limited(receive), send_wrapper)
        except ClientDisconnected:
            status = 499
        except GatewayError as exc:
            if started:
                log.warning("request failed after its response started: %s", exc.message)
                return
            status = exc.status
            if state.policy is not None and not state.admitted:  # refused before the chat counted it
                with contextlib.suppress(GatewayError):
                    await admit(services_of(scope).limits, state)
            await send_error(send_wrapper, exc, redact=self.redact)
        except Exception:
            if started:
                log.exception("request failed after its response started")
                return
            log.exception("unhandled error")
            status = 500
            await send_error(
                send_wrapper, GatewayError("the gateway failed to handle this request; see its logs")
            )
        finally:
            if self.in_flight is not None:
                self.in_flight.dec()
            self._log(scope, state, status)

    async def _caller(self, scope: Scope, keys: Keys, given: list[bytes]) -> Caller | None:
        """The caller (of the keys `given`); failed authentications, virtual keys' included, are
        counted per address (and limited)."""
        if self.auth_failures is None or not scope["path"].startswith(PROTECTED):
            return await keys.caller(scope["path"], given)
        address = (scope.get("client") or ("unknown", 0))[0]
        self.auth_failures.check(address)
        try:
            return await keys.caller(scope["path"], given)
        except AuthenticationError:
            self.auth_failures.failed(address)
            raise

    def _headers(self, state: RequestState) -> list[tuple[bytes, bytes]]:
        out = []
        if state.request_id:
            out.append((b"x-request-id", state.request_id.encode()))
        out.append((b"x-router-overhead-ms", f"{state.overhead():.3f}".encode()))
        if state.quotas:
            out += quota_headers(state.quotas)
        return out

    def _log(self, scope: Scope, state: RequestState, status: int) -> None:
        path = scope.get("path", "")
        rec = state.record
        if rec is None and path in _QUIET and status < 400:
            return
        extra: dict[str, Any] = {
            "request_id": state.request_id or None,
            "method": scope.get("method"),
            "path": path,
            "status": status,
            "duration_ms": round(state.elapsed_ms(), 3),
            "overhead_ms": None if state.overhead_ms is None else round(state.overhead_ms, 3),
        }
        if rec is not None:
            extra.update(model=rec.model, layer=rec.layer, stream=rec.stream)
            if rec.trace_id:
                extra["trace_id"] = rec.trace_id
            if rec.strategy:
                extra["strategy"] = rec.strategy
            extra.update(
                outcome=rec.status,
                upstream_ms=None if rec.upstream_ms is None else round(rec.upstream_ms, 3),
                ttft_ms=None if rec.ttft_ms is None else round(rec.ttft_ms, 3),
                prompt_tokens=rec.prompt_tokens,
                completion_tokens=rec.completion_tokens,
                cost_usd=rec.cost_usd,
            )
            if rec.error:
                extra["error"] = rec.error
            if self.log_prompts:
                extra["messages"] = rec.messages
        log.info("%s %s %d", scope.get("method"), path, status, extra=extra)

    def _limited(self, receive: Receive) -> Receive:
        limit = self.max_body_bytes
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
            return message

        return limited

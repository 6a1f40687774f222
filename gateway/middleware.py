"""The one pure-ASGI middleware: request id, auth, body limit, timing, the per-request log line.

It is the outermost layer of the app, so every response (errors and 404s included) carries
`x-request-id` and `x-router-overhead-ms`, and no exception ever reaches the client as a trace.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import (
    AuthenticationError,
    ClientDisconnected,
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
)

log = logging.getLogger("gateway.access")

REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")  # fullmatch (`$` would pass a "\n")
# Paths that need a client key when GATEWAY_API_KEYS is set (health and metrics stay open for probes).
_PROTECTED = ("/v1/", "/chat/", "/models", "/feedback", "/requests/", "/metrics/")


def key_id(key: str) -> str:
    """A stable, non-reversible id of an API key, safe to store and log."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:12]


async def send_error(
    send: Send,
    exc: GatewayError,
    extra_headers: list[tuple[bytes, bytes]],
    redact: Callable[[str], str] = str,
) -> None:
    exc.message = redact(exc.message)
    body = exc.json()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra_headers,
        *((k.encode(), v.encode()) for k, v in exc.headers.items()),
    ]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestContext:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        api_keys: list[str],
        on_finish: Callable[[Scope, int, float], None] | None = None,
        redact: Callable[[str], str] = str,
        in_flight: Any = None,
    ) -> None:
        self.app = app
        self.redact = redact
        self.in_flight = in_flight
        self.max_body_bytes = max_body_bytes
        self.api_keys = [k.encode() for k in api_keys]
        self.on_finish = on_finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        request_id: str | None = None
        content_length: int | None = None
        auth: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    content_length = None
            elif name == b"authorization":
                auth = value
        state: dict[str, Any] = scope.setdefault("state", {})
        state["t0"] = t0
        if self.in_flight is not None:
            self.in_flight.inc()
        status = 500
        started = False

        def headers_for(message_headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
            out = list(message_headers)
            if state.get("request_id"):
                out.append((b"x-request-id", state["request_id"].encode()))
            if "overhead_ms" not in state:
                state["overhead_ms"] = (time.perf_counter() - t0) * 1000
            out.append((b"x-router-overhead-ms", f"{state['overhead_ms']:.3f}".encode()))
            return out

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = headers_for(list(message.get("headers", [])))
            await send(message)

        try:
            if request_id is None:
                state["request_id"] = uuid.uuid4().hex
            elif REQUEST_ID.fullmatch(request_id):
                state["request_id"] = request_id
            else:
                state["request_id"] = uuid.uuid4().hex
                raise InvalidRequest(
                    "X-Request-ID must be 1-128 characters of letters, digits, '.', '_', ':' or '-', "
                    "starting with a letter or digit",
                    param="X-Request-ID",
                    code="invalid_request_id",
                )
            if self.api_keys:
                state["caller"] = self._authenticate(scope["path"], auth)
            elif auth and auth.startswith(b"Bearer "):
                state["caller"] = key_id(auth[7:].decode("latin-1"))
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
            await send_error(send_wrapper, exc, [], self.redact)
        except Exception:
            if started:
                log.exception("request failed after its response started")
                return
            log.exception("unhandled error")
            status = 500
            await send_error(
                send_wrapper, GatewayError("the gateway failed to handle this request; see its logs"), []
            )
        finally:
            if self.in_flight is not None:
                self.in_flight.dec()
            if self.on_finish is not None:
                self.on_finish(scope, status, (time.perf_counter() - t0) * 1000)

    def _authenticate(self, path: str, auth: bytes | None) -> str | None:
        if not path.startswith(_PROTECTED):
            return None
        if auth is None or not auth.startswith(b"Bearer "):
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        given = auth[7:]
        for key in self.api_keys:
            if hmac.compare_digest(given, key):
                return key_id(given.decode("latin-1"))
        raise AuthenticationError("invalid API key")

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

"""The one pure-ASGI middleware: request id, auth, rate limits, body limit, timing, the log line.

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
    RateLimited,
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


class RateLimits:
    """Per-caller token buckets for RATE_LIMIT_RPM and RATE_LIMIT_TPM, refilled continuously.

    A request takes one request token when it arrives. A chat call must find its estimated prompt
    tokens available before it goes upstream; when it ends, the bucket is charged what the call
    really used (prompt and completion), so a long answer leaves a debt the caller's next calls
    wait out. Limits are per replica (in memory), like the circuit breakers.
    """

    def __init__(self, rpm: int, tpm: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.clock = clock
        self.buckets: dict[str, list[float]] = {}  # caller -> [requests, tokens, last refill]

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def _bucket(self, caller: str) -> list[float]:
        now = self.clock()
        bucket = self.buckets.get(caller)
        if bucket is None:
            if len(self.buckets) >= 100_000:
                self._prune(now)
            bucket = self.buckets[caller] = [float(self.rpm), float(self.tpm), now]
        else:
            elapsed = now - bucket[2]
            bucket[0] = min(float(self.rpm), bucket[0] + elapsed * self.rpm / 60)
            bucket[1] = min(float(self.tpm), bucket[1] + elapsed * self.tpm / 60)
            bucket[2] = now
        return bucket

    def _prune(self, now: float) -> None:
        """Forget callers idle for a minute (their buckets are full again anyway); if that is not
        enough, the idlest half (so that the next prune is 50,000 new callers away)."""
        self.buckets = {k: b for k, b in self.buckets.items() if now - b[2] < 60}
        if len(self.buckets) >= 50_000:
            recent = sorted(self.buckets.items(), key=lambda kb: kb[1][2])[len(self.buckets) // 2 :]
            self.buckets = dict(recent)

    def take_request(self, caller: str) -> None:
        if not self.rpm:
            return
        bucket = self._bucket(caller)
        if bucket[0] < 1:
            wait = (1 - bucket[0]) * 60 / self.rpm
            raise RateLimited(
                f"rate limit reached: {self.rpm} requests per minute; try again in {wait:.1f} s",
                "requests",
                wait,
            )
        bucket[0] -= 1

    def take_tokens(self, caller: str, tokens: int) -> None:
        """Admits a call estimated at `tokens` prompt tokens, and reserves them."""
        if not self.tpm:
            return
        if tokens > self.tpm:
            raise RateLimited(
                f"this request (about {tokens} tokens) is larger than the limit of {self.tpm} tokens "
                "per minute",
                "tokens",
                None,
            )
        bucket = self._bucket(caller)
        if bucket[1] < tokens:
            wait = (tokens - bucket[1]) * 60 / self.tpm
            raise RateLimited(
                f"rate limit reached: {self.tpm} tokens per minute; try again in {wait:.1f} s",
                "tokens",
                wait,
            )
        bucket[1] -= tokens

    def charge_tokens(self, caller: str, tokens: int) -> None:
        """Settles a call: `tokens` more (or, negative, fewer) than were reserved."""
        if self.tpm:
            self._bucket(caller)[1] -= tokens

    def headers(self, caller: str) -> list[tuple[bytes, bytes]]:
        """OpenAI's x-ratelimit-* headers."""
        bucket = self._bucket(caller)
        out = []
        if self.rpm:
            out += [
                (b"x-ratelimit-limit-requests", str(self.rpm).encode()),
                (b"x-ratelimit-remaining-requests", str(max(0, int(bucket[0]))).encode()),
            ]
        if self.tpm:
            out += [
                (b"x-ratelimit-limit-tokens", str(self.tpm).encode()),
                (b"x-ratelimit-remaining-tokens", str(max(0, int(bucket[1]))).encode()),
            ]
        return out


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
        limits: RateLimits | None = None,
    ) -> None:
        self.app = app
        self.limits = limits if limits is not None and limits.enabled else None
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
            if self.limits is not None and "limit_id" in state:
                out += self.limits.headers(state["limit_id"])
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
            if self.limits is not None and scope["path"].startswith(_PROTECTED):
                # By key; without keys, by address (a made-up bearer token must not reset a limit).
                client = scope.get("client") or ("unknown", 0)
                state["limit_id"] = state.get("caller") if self.api_keys else f"ip:{client[0]}"
                self.limits.take_request(state["limit_id"])
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
        # Compared with every key, in constant time each: the time says nothing about which
        # key (or how much of one) matched.
        matched = False
        for key in self.api_keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise AuthenticationError("invalid API key")
        return key_id(given.decode("latin-1"))

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

"""The HTTP server: uvicorn with uvloop and httptools, with the limits a hostile client meets.

uvicorn offers `limit_concurrency` (answered with a plain-text 503), `timeout_keep_alive` and,
for its h11 parser only, `h11_max_incomplete_event_size`; for httptools (several times faster on
this hot path) it has no bound on the size of a request's head, and neither parser has a time
limit on receiving a request: a 64 MiB header was read whole, and idle or half-sent connections
stayed open for as long as the client liked. `GuardedHttpTools` adds, on uvicorn's httptools
protocol:

- MAX_HEADER_BYTES: a request line and headers larger than this get 431 and the connection closes
  (counted as the bytes that arrive before the head is complete);
- HEADER_TIMEOUT_S: from a connection's first byte (or its opening) to the end of the head, else
  the connection closes (an idle connection too: uvicorn's keep-alive timer starts only after a
  response);
- BODY_TIMEOUT_S: from the end of the head to the end of the body, else the connection closes
  (the endpoint sees a disconnect);
- MAX_CONNECTIONS: connections or requests at once; beyond, an OpenAI-shaped 503 with
  Retry-After (uvicorn's own answer would be plain text);
- KEEP_ALIVE_S: uvicorn's keep-alive timeout.

`freeze_heap` tunes the garbage collector for serving, once the app is up (see there).
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.config import Settings
from gateway.errors import ServiceUnavailable

_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)
_HEAD_ERROR = (
    b'{"error":{"message":"the request line and headers are larger than MAX_HEADER_BYTES",'
    b'"type":"invalid_request_error","param":null,"code":"headers_too_large"}}'
)


class Limits:
    """What `GuardedHttpTools` enforces (set from Settings by `uvicorn_config`)."""

    max_header_bytes = 32768
    header_timeout_s = 10.0
    body_timeout_s = 60.0
    max_connections = 1000


async def _overloaded(scope: Any, receive: Any, send: Any) -> None:
    error = ServiceUnavailable(
        "the gateway is at MAX_CONNECTIONS; try again shortly",
        code="overloaded",
        headers={"retry-after": "1"},
    )
    body = error.json()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
        (b"x-request-id", uuid.uuid4().hex.encode()),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardedHttpTools(HttpToolsProtocol):
    limits: type[Limits] = Limits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self._timer: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()  # connection_lost tells a running request it is gone

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and self.parser is not None and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self.transport.write(_HEAD_TOO_LARGE % (len(_HEAD_ERROR), _HEAD_ERROR))
                self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0
        if self._timer is None:
            self._arm(self.limits.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._arm(self.limits.body_timeout_s)
        limit = self.limits.max_connections
        if len(self.connections) > limit or len(self.tasks) >= limit:
            app, self.app = self.app, _overloaded
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


def freeze_heap() -> None:
    """Once the gateway is up: what it has built (modules, the embedder, the router's state) goes
    out of the garbage collector's sight (`gc.freeze`), so that a full collection scans only what
    came since; and a young collection waits for 10,000 new objects instead of 700, so that a
    request's objects (alive across its awaits, 32 requests at a time) mostly die young instead of
    being promoted, which is what made full collections come every few hundred requests. Measured
    with `auto` at c=32 (a loaded 2-core machine): full collections 15 in 20 s, 17-60 ms each with
    the event loop stopped, 1.6 s of collection in all; with both, none in the 20 s after the start."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def uvicorn_config(app: Any, settings: Settings, **kw: Any) -> uvicorn.Config:
    """The server's configuration, for `llm-router serve` and the tests alike."""

    class Bound(Limits):
        max_header_bytes = settings.max_header_bytes
        header_timeout_s = settings.header_timeout_s
        body_timeout_s = settings.body_timeout_s
        max_connections = settings.max_connections

    class Protocol(GuardedHttpTools):
        limits = Bound

    return uvicorn.Config(
        app,
        http=Protocol,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        access_log=False,
        log_config=None,
        lifespan="on",
        server_header=False,
        **kw,
    )

"""Raw ASGI helpers for the hot path: reading a body, sending JSON, errors and streams, and giving
up on work when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import orjson
from starlette.types import Receive, Send

from gateway.errors import ClientDisconnected, GatewayError

Headers = list[tuple[bytes, bytes]]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def header_value(text: str, limit: int = 256) -> bytes:
    """A header value from text we do not control (an upstream's model string): control
    characters (CR, LF, NUL...) removed, since one would break the response head, and cut short."""
    return _CONTROL.sub("", text)[:limit].encode("utf-8", "replace")


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_bytes(send: Send, status: int, body: bytes, headers: Headers) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def dump_json(body: Any) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


async def send_error(
    send: Send, exc: GatewayError, headers: Headers | None = None, redact: Callable[[str], str] = str
) -> None:
    """The one way an error reaches a client before its response started: OpenAI's error shape,
    with the error's own headers (Retry-After...), its message redacted."""
    exc.message = redact(exc.message)
    await send_bytes(
        send,
        exc.status,
        exc.json(),
        [
            (b"content-type", b"application/json"),
            *(headers or ()),
            *((k.encode(), v.encode()) for k, v in exc.headers.items()),
        ],
    )


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


async def send_stream(
    receive: Receive, send: Send, headers: Headers, body: AsyncGenerator[bytes, None]
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
        with contextlib.suppress(Exception):
            await body.aclose()

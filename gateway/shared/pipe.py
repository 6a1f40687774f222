"""One pipelined connection to a Redis-protocol server, for the limiter's one hot command.

redis-py spends about 100 us of CPU on every command on the 2-core dev machine (its pool, lock and
command machinery), as much as the loopback round trip itself; the shared limiter sends one
command per request, so that overhead was most of what it added. Here a command is packed by
hiredis (`pack_command`), written to the transport, and its reply parsed by hiredis's `Reader` in
`data_received`: the server answers a connection's commands in order, so each reply resolves the
oldest waiting future. About 40 us of CPU and 50 us of latency less per call (measured with
`bench/limits.py` and a bare loop of EVALSHA against Valkey).

Failures are prompt: a connection the server closed fails its waiting commands at once
(`Lost`, which the caller may retry once on a fresh connection); a server that stops answering
fails them after `timeout_s` (one timer per connection, re-armed for the oldest waiting command,
not one per command), and the connection is dropped (its stream can no longer be trusted).
Connecting honours REDIS_URL as redis-py parses it: host and port or a unix socket, `rediss://`
(TLS), user name and password (AUTH), database (SELECT).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url


class Lost(ConnectionError):
    """The connection closed under the command (it may or may not have run)."""


class ReplyError(Exception):
    """The server answered with an error."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                done = self.waiting.popleft()[0]
                if not done.done():
                    done.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.fail(Lost(f"protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_waiting(Lost(f"connection closed: {exc}" if exc else "connection closed by the server"))

    def fail(self, exc: Exception) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._fail_waiting(exc)

    def _fail_waiting(self, exc: Exception) -> None:
        while self.waiting:
            done = self.waiting.popleft()[0]
            if not done.done():
                done.set_exception(exc)


class Pipe:
    def __init__(self, url: str, timeout_s: float) -> None:
        self.options: dict[str, Any] = dict(parse_url(url))
        self.timeout_s = timeout_s
        self.conn: _Protocol | None = None
        self.opening: asyncio.Lock | None = None
        self.watch: asyncio.TimerHandle | None = None

    async def call(self, *args: str | bytes | int) -> Any:
        """The command's reply (an error reply raised as `ReplyError`); `Lost` if the connection
        closed under it, `TimeoutError` if the server did not answer within `timeout_s`."""
        conn = self.conn
        if conn is None or conn.closed:
            conn = await self._open()
        return await self._send(conn, args)

    async def _send(self, conn: _Protocol, args: tuple[str | bytes | int, ...]) -> Any:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        conn.waiting.append((done, loop.time()))
        conn.transport.write(hiredis.pack_command(args))  # type: ignore[union-attr,arg-type]
        if self.watch is None:
            self.watch = loop.call_at(loop.time() + self.timeout_s, self._check)
        reply = await done
        if isinstance(reply, hiredis.ReplyError):
            raise ReplyError(str(reply))
        return reply

    def _check(self) -> None:
        """The watchdog: fails the connection if its oldest command is overdue, else re-arms for
        that command's deadline (idle connections are not watched)."""
        self.watch = None
        conn = self.conn
        if conn is None or conn.closed or not conn.waiting:
            return
        loop = asyncio.get_running_loop()
        deadline = conn.waiting[0][1] + self.timeout_s
        if loop.time() >= deadline:
            conn.fail(TimeoutError(f"no answer within {self.timeout_s} s"))
        else:
            self.watch = loop.call_at(deadline, self._check)

    async def _open(self) -> _Protocol:
        if self.opening is None:
            self.opening = asyncio.Lock()
        async with self.opening:
            if self.conn is not None and not self.conn.closed:
                return self.conn  # another caller opened it meanwhile
            o = self.options
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.timeout_s):
                if "path" in o:
                    _, conn = await loop.create_unix_connection(_Protocol, o["path"])
                else:
                    tls = _tls(o) if "connection_class" in o else None
                    host = o.get("host", "localhost")
                    _, conn = await loop.create_connection(
                        _Protocol, host, o.get("port", 6379), ssl=tls, server_hostname=host if tls else None
                    )
            self.conn = conn
            try:
                if o.get("password"):
                    auth = (
                        ("AUTH", o["username"], o["password"])
                        if o.get("username")
                        else ("AUTH", o["password"])
                    )
                    await self._send(conn, auth)
                if o.get("db"):
                    await self._send(conn, ("SELECT", int(o["db"])))
            except BaseException:
                conn.fail(Lost("handshake failed"))
                raise
            return conn

    def close(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        if self.conn is not None:
            self.conn.fail(Lost("closed by the client"))
            self.conn = None


def _tls(options: dict[str, Any]) -> ssl.SSLContext:
    """`rediss://`: verified against the system's CAs (or `ssl_ca_certs`), as redis-py does;
    `?ssl_cert_reqs=none` turns verification off."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if str(options.get("ssl_cert_reqs", "required")).lower() in ("none", "cert_none"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context

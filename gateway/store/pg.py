"""What the Postgres store's parts share: the engine, the hot-path asyncpg pool, and the one place
where database errors are mapped (connection failures become `StoreUnavailable`; a read on a
connection that died with a database restart is retried once on a fresh one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import orjson
from pgvector.asyncpg import register_vector
from sqlalchemy import literal_column, select
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from gateway.errors import NotFound, StoreUnavailable

T = TypeVar("T")


def json_dumps(obj: Any) -> str:
    return orjson.dumps(
        obj, default=str, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    ).decode()


SERVER_SETTINGS = {
    # pgvector >= 0.8: keep scanning the HNSW graph when the WHERE clause filters results out.
    "hnsw.iterative_scan": "relaxed_order",
    "hnsw.ef_search": "100",
    "application_name": "llm-router",
}


# The hot pool runs the neighbour search only, whose order (ORDER BY distance LIMIT k) must come from
# the HNSW index: its filters (tenant, embedder, time) are correlated with the partial index's
# predicate in ways the planner cannot see, and once it underestimates the rows it prefers another
# index and a sort (measured with four tenants: a bitmap scan on calls_caller_created_at_idx, the
# whole tenant's calls sorted). No sort leaves it the index; pgvector's iterative scan filters.
HOT_SETTINGS = {"enable_sort": "off"}


def server_settings(timeout_s: float) -> dict[str, str]:
    # The server gives up on a statement after STORE_TIMEOUT_S; asyncpg's command_timeout is the
    # client's side of it (a hung server answers nothing, not even a cancellation).
    return {**SERVER_SETTINGS, "statement_timeout": str(int(timeout_s * 1000))}


def make_engine(
    dsn: str, *, ssl: str | None = None, pool_size: int = 10, timeout_s: float = 5.0
) -> AsyncEngine:
    connect_args: dict[str, Any] = {
        "server_settings": server_settings(timeout_s),
        "timeout": timeout_s,
        "command_timeout": timeout_s,
    }
    if ssl:
        connect_args["ssl"] = ssl
    return create_async_engine(
        dsn,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=timeout_s,  # waiting for a pooled connection
        pool_recycle=1800,
        json_serializer=json_dumps,
        json_deserializer=orjson.loads,
        connect_args=connect_args,
        hide_parameters=True,  # error texts would otherwise quote prompts and responses into logs
    )


def is_timeout(exc: BaseException) -> bool:
    """The database did not answer within STORE_TIMEOUT_S (hung, or overloaded)."""
    if isinstance(exc, TimeoutError | asyncpg.QueryCanceledError | SATimeoutError):
        return True
    cause = exc.__cause__ or getattr(exc, "orig", None)
    return cause is not None and cause is not exc and is_timeout(cause)


def is_unavailable(exc: BaseException) -> bool:
    if is_timeout(exc):
        return True
    if isinstance(
        exc, OSError | ConnectionError | asyncpg.PostgresConnectionError | asyncpg.CannotConnectNowError
    ):
        return True
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.AdminShutdownError):
        return True
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    cause = exc.__cause__ or getattr(exc, "orig", None)
    return cause is not None and cause is not exc and is_unavailable(cause)


def unreachable(exc: BaseException) -> str:
    """The message of StoreUnavailable: the error's kind only, never its text (which can hold SQL
    parameters: other callers' prompts)."""
    cause = getattr(exc, "orig", None) or exc.__cause__ or exc
    if is_timeout(exc):
        return f"the database did not answer in time ({type(cause).__name__})"
    return f"the database is unreachable ({type(cause).__name__})"


def clean(value: Any) -> Any:
    """PostgreSQL text and jsonb cannot hold NUL characters, which JSON (and OpenAI) allow."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, dict):
        return {clean(k): clean(v) for k, v in value.items()}
    return value


async def retrying(work: Callable[[], Awaitable[T]]) -> T:
    """`work`, and once more if the database was unreachable (a pooled connection that died with a
    restart is replaced on the second try); StoreUnavailable if it still is."""
    for attempt in (0, 1):
        try:
            return await work()
        except NotFound:
            raise
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            if attempt == 1 or is_timeout(exc):  # a hung database: one bound is enough
                raise StoreUnavailable(unreachable(exc)) from exc
    raise AssertionError("unreachable")  # pragma: no cover


class PgBase:
    """The engine (SQLAlchemy Core, for most queries) and a plain asyncpg pool (for the hot path)."""

    def __init__(self, engine: AsyncEngine, *, ssl: str | None = None, timeout_s: float = 5.0) -> None:
        self.engine = engine
        self.ssl = ssl
        self.timeout_s = timeout_s
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        await self.engine.dispose()

    async def _run(self, fn: Callable[[AsyncConnection], Awaitable[T]], *, write: bool = False) -> T:
        """`fn` on a pooled SQLAlchemy connection (in a transaction with `write`)."""

        async def once() -> T:
            if write:
                async with self.engine.begin() as conn:
                    return await fn(conn)
            async with self.engine.connect() as conn:
                return await fn(conn)

        return await retrying(once)

    async def ping(self) -> bool:
        async def q(conn: AsyncConnection) -> bool:
            return (await conn.execute(select(literal_column("1")))).scalar() == 1

        return await self._run(q)

    async def _hot(self) -> asyncpg.Pool:
        """A plain asyncpg pool for the hot-path neighbour search: a prepared statement and a binary
        vector codec, without the ORM layers (measured: 3.5 ms through SQLAlchemy, 0.3 ms here).
        Opened with the store (`postgres_store`); reopened here after a failure."""
        async with self._pool_lock:
            if self._pool is None:
                url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
                self._pool = await asyncpg.create_pool(
                    url,
                    min_size=1,
                    max_size=8,
                    init=register_vector,
                    ssl=self.ssl,
                    server_settings={**server_settings(self.timeout_s), **HOT_SETTINGS},
                    timeout=self.timeout_s,
                    command_timeout=self.timeout_s,
                )
            return self._pool

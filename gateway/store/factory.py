"""Choosing and opening the store, and running migrations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from gateway.config import Settings
from gateway.store import Store

log = logging.getLogger("gateway.store")


def migrations_dir() -> Path:
    """`migrations/` beside the package (a checkout), or the copy inside an installed wheel."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("the migrations directory was not found")


def _alembic_config(dsn: str, connect_args: dict[str, object] | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["url"] = dsn
    cfg.attributes["connect_args"] = connect_args or {}
    return cfg


async def migrate(
    dsn: str, revision: str = "head", *, ssl: str | None = None, downgrade: bool = False
) -> None:
    """Run Alembic (in a thread: its env.py runs its own event loop)."""
    from alembic import command

    cfg = _alembic_config(dsn, {"ssl": ssl} if ssl else None)
    fn = command.downgrade if downgrade else command.upgrade
    await asyncio.to_thread(fn, cfg, revision)


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[str]:
    """The DSN of the configured database; starts (and later stops) the embedded one if none is set."""
    dsn = settings.database_dsn()
    if dsn is not None:
        yield dsn
        return
    from gateway.store.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(settings.data_dir)
    dsn = await embedded.start()
    try:
        yield dsn
    finally:
        await embedded.stop()


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    if not settings.enable_persistence:
        from gateway.store.memory import MemoryStore

        log.info(
            "persistence is off: calls and feedback live in memory (at most %d calls)",
            settings.memory_store_max_calls,
        )
        yield MemoryStore(settings.memory_store_max_calls)
        return
    from gateway.store.postgres import postgres_store

    async with database(settings) as dsn:
        if settings.run_migrations:
            await migrate(dsn, ssl=settings.database_ssl_mode)
        async with postgres_store(
            dsn, ssl=settings.database_ssl_mode, timeout_s=settings.store_timeout_s
        ) as store:
            yield store

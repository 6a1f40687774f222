"""The Postgres store's virtual keys and spend: `api_keys` (a hash of each secret, never the
secret) and a key's spend read from `calls` by `key_id` (the ledger budgets are seeded from)."""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.domain import SpendRow, VirtualKey
from gateway.store.pg import PgBase
from gateway.store.schema import api_keys, calls

_KEY_FIELDS = tuple(f.name for f in fields(VirtualKey))


def _key(row: Any) -> VirtualKey:
    values = {name: row[name] for name in _KEY_FIELDS}
    values["models"] = tuple(values["models"]) if values["models"] is not None else None
    return VirtualKey(**values)


class KeyQueries(PgBase):
    async def save_key(self, key: VirtualKey) -> None:
        row = {name: getattr(key, name) for name in _KEY_FIELDS}
        row["models"] = list(key.models) if key.models is not None else None
        stmt = pg_insert(api_keys).values(**row)
        stmt = stmt.on_conflict_do_update(
            index_elements=[api_keys.c.id],
            set_={
                **{k: stmt.excluded[k] for k in row if k not in ("id", "created_at")},
                "updated_at": func.now(),
            },
        )

        async def tx(conn: AsyncConnection) -> None:
            await conn.execute(stmt)

        await self._run(tx, write=True)

    async def find_key(self, *, key_id: str | None = None, key_hash: str | None = None) -> VirtualKey | None:
        where = api_keys.c.id == key_id if key_id is not None else api_keys.c.key_hash == key_hash

        async def q(conn: AsyncConnection) -> VirtualKey | None:
            row = (await conn.execute(select(api_keys).where(where))).mappings().first()
            return None if row is None else _key(row)

        return await self._run(q)

    async def list_keys(self, owner: str | None = None) -> list[VirtualKey]:
        stmt = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        if owner is not None:
            stmt = stmt.where(api_keys.c.owner == owner)

        async def q(conn: AsyncConnection) -> list[VirtualKey]:
            return [_key(r) for r in (await conn.execute(stmt)).mappings()]

        return await self._run(q)

    async def spent(self, key_id: str, since: datetime) -> float:
        stmt = select(func.coalesce(func.sum(calls.c.cost_usd), 0.0)).where(
            calls.c.key_id == key_id, calls.c.created_at >= since, calls.c.kind == "call"
        )

        async def q(conn: AsyncConnection) -> float:
            return float((await conn.execute(stmt)).scalar() or 0.0)

        return await self._run(q)

    async def spend_by_day(self, key_id: str, since: datetime) -> list[SpendRow]:
        day = func.to_char(func.timezone("UTC", calls.c.created_at), "YYYY-MM-DD").label("day")
        stmt = (
            select(
                day,
                calls.c.model,
                func.count().label("requests"),
                func.coalesce(func.sum(calls.c.cost_usd), 0.0).label("cost_usd"),
                func.coalesce(func.sum(calls.c.prompt_tokens), 0).label("prompt_tokens"),
                func.coalesce(func.sum(calls.c.completion_tokens), 0).label("completion_tokens"),
            )
            .where(calls.c.key_id == key_id, calls.c.created_at >= since, calls.c.kind == "call")
            .group_by(day, calls.c.model)
            .order_by(day, calls.c.model)
        )

        async def q(conn: AsyncConnection) -> list[SpendRow]:
            return [
                SpendRow(
                    r["day"],
                    r["model"],
                    int(r["requests"]),
                    float(r["cost_usd"]),
                    int(r["prompt_tokens"]),
                    int(r["completion_tokens"]),
                )
                for r in (await conn.execute(stmt)).mappings()
            ]

        return await self._run(q)

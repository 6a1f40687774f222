"""The Postgres store's read of the call log for off-policy evaluation: a window of calls with
their ratings, oldest first, one tenant's or every tenant's, in keyset pages (created_at, caller,
id) that ride `calls_created_at_idx` (and `calls_caller_created_at_idx` for one tenant)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import fields as dataclass_fields
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.domain import CallRecord, FeedbackEntry, StoredCall
from gateway.store.pg import PgBase
from gateway.store.schema import calls, feedback

# A call record's fields are the `calls` table's columns (the table has the score besides).
RECORD_FIELDS = tuple(f.name for f in dataclass_fields(CallRecord))


def stored_call(row: Any, ratings: list[FeedbackEntry]) -> StoredCall:
    """A `calls` row (a mapping) and its ratings as the store hands them out."""
    fields = {name: row[name] for name in RECORD_FIELDS}
    if fields["embedding"] is not None:
        fields["embedding"] = np.asarray(fields["embedding"], dtype=np.float32)
    return StoredCall(CallRecord(**fields), row["score"], row["score_source"], row["score_at"], ratings)


class LogQueries(PgBase):
    async def iter_calls(
        self, since: datetime, until: datetime, caller: str | None = None, page: int = 1000
    ) -> AsyncIterator[StoredCall]:
        after: tuple[datetime, str, str] | None = None
        while True:
            stmt = select(calls).where(calls.c.created_at >= since, calls.c.created_at < until)
            if caller is not None:
                stmt = stmt.where(calls.c.caller == caller)
            if after is not None:
                stmt = stmt.where(tuple_(calls.c.created_at, calls.c.caller, calls.c.id) > tuple_(*after))
            stmt = stmt.order_by(calls.c.created_at, calls.c.caller, calls.c.id).limit(page)

            async def q(conn: AsyncConnection, stmt: Any = stmt) -> list[StoredCall]:
                rows = (await conn.execute(stmt)).mappings().all()
                ratings: dict[tuple[str, str], list[FeedbackEntry]] = {}
                if rows:
                    fb = await conn.execute(
                        select(
                            feedback.c.caller,
                            feedback.c.request_id,
                            feedback.c.score,
                            feedback.c.feedback_text,
                            feedback.c.source,
                            feedback.c.created_at,
                        )
                        .where(
                            tuple_(feedback.c.request_id, feedback.c.caller).in_(
                                [(r["id"], r["caller"]) for r in rows]
                            )
                        )
                        .order_by(feedback.c.created_at, feedback.c.id)
                    )
                    for r in fb.all():
                        ratings.setdefault((r[0], r[1]), []).append(FeedbackEntry(*r[2:]))
                return [stored_call(r, ratings.get((r["caller"], r["id"]), [])) for r in rows]

            batch = await self._run(q)
            for stored in batch:
                yield stored
            if len(batch) < page:
                return
            last = batch[-1].record
            after = (last.created_at, last.caller, last.id)

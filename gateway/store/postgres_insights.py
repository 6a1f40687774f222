"""The Postgres store's read side for the dashboard: the calls list and the aggregates over time.

Each query rides an index: the list walks `calls_created_at_idx` backwards (or
`calls_model_created_at_idx` / `calls_caller_created_at_idx` for a model or a key) and stops at its
LIMIT; the aggregates read the time range through `calls_created_at_idx`; a call's pairs are found
through `dpo_pairs_calls_key` and `dpo_pairs_call_b_idx`; pair counts through
`dpo_pairs_created_at_idx`. Text search has no index of its own: it filters the rows the time
range (and the other filters) leave, newest first, until the page is full.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Select, and_, bindparam, func, literal_column, or_, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.domain import DPOPair
from gateway.insights import (
    PREVIEW_CHARS,
    BucketRow,
    CallQuery,
    CallRow,
    LatencySummary,
    PairBucket,
    Window,
)
from gateway.store.pg import PgBase
from gateway.store.postgres_pairs import pair_of
from gateway.store.schema import calls, dpo_pairs

# `preview_of` in SQL: the last message's text, or its first text part.
_PREVIEW: ColumnElement[str] = (
    literal_column(f"""left(coalesce(CASE jsonb_typeof(calls.messages->-1->'content')
    WHEN 'string' THEN calls.messages->-1->>'content'
    WHEN 'array' THEN (
        SELECT part->>'text' FROM jsonb_array_elements(calls.messages->-1->'content')
            WITH ORDINALITY AS parts(part, n)
        WHERE part->>'type' = 'text' ORDER BY n LIMIT 1)
    END, ''), {PREVIEW_CHARS})""")
)

# `prompt_matches` in SQL: any message's text (its text parts joined by newlines), ILIKE.
_SEARCH = text("""EXISTS (
    SELECT 1 FROM jsonb_array_elements(calls.messages) AS msgs(msg)
    WHERE CASE jsonb_typeof(msg->'content')
        WHEN 'string' THEN msg->>'content'
        WHEN 'array' THEN (
            SELECT string_agg(part->>'text', E'\\n' ORDER BY n)
            FROM jsonb_array_elements(msg->'content') WITH ORDINALITY AS parts(part, n)
            WHERE part->>'type' = 'text')
    END ILIKE :pattern ESCAPE '\\')""")

_ROW_COLS = (
    calls.c.id,
    calls.c.created_at,
    calls.c.kind,
    calls.c.caller,
    calls.c.requested_model,
    calls.c.model,
    calls.c.layer,
    calls.c.status,
    calls.c.http_status,
    calls.c.stream,
    calls.c.overhead_ms,
    calls.c.upstream_ms,
    calls.c.cost_usd,
    calls.c.prompt_tokens,
    calls.c.completion_tokens,
    calls.c.score,
    calls.c.trace_id,
    _PREVIEW.label("preview"),
)


def _like(needle: str) -> str:
    escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _where(q: CallQuery) -> list[ColumnElement[bool]]:
    c = calls.c
    where: list[ColumnElement[bool]] = []
    for column, value in (
        (c.caller, q.caller),
        (c.model, q.model),
        (c.layer, q.layer),
        (c.status, q.status),
        (c.kind, q.kind),
    ):
        if value is not None:
            where.append(column == value)
    if q.since is not None:
        where.append(c.created_at >= q.since)
    if q.until is not None:
        where.append(c.created_at < q.until)
    if q.rated is not None:
        where.append(c.score.is_not(None) if q.rated else c.score.is_(None))
    if q.id is not None:
        where.append(or_(c.id == q.id, c.trace_id == q.id))
    if q.before is not None:
        where.append(tuple_(c.created_at, c.id) < tuple_(*q.before))
    if q.text:
        where.append(_SEARCH.bindparams(bindparam("pattern", _like(q.text))))  # type: ignore[arg-type]
    return where


def _window(window: Window, column: Any) -> list[ColumnElement[bool]]:
    where = [column >= window.since, column < window.until]
    if window.caller is not None:
        where.append(calls.c.caller == window.caller)
    return where


def list_statement(query: CallQuery) -> Select[Any]:
    return (
        select(*_ROW_COLS)
        .where(*_where(query))
        .order_by(calls.c.created_at.desc(), calls.c.id.desc())
        .limit(query.limit)
    )


def buckets_statement(window: Window) -> Select[Any]:
    c = calls.c
    client = c.kind == "call"
    routed = and_(client, c.layer.is_not(None), c.layer != "explicit")
    bucket = func.date_trunc(window.bucket, c.created_at, "UTC").label("bucket")
    return (
        select(
            bucket,
            c.model,
            func.count().filter(client).label("requests"),
            func.count().filter(and_(client, c.status != "ok")).label("errors"),
            func.count().filter(routed).label("routed"),
            func.count()
            .filter(and_(routed, c.decision["explored"].as_boolean().is_(True)))
            .label("explored"),
            func.count(c.score).filter(client).label("rated"),
            func.coalesce(func.sum(c.score).filter(client), 0.0).label("score_sum"),
            func.coalesce(func.sum(c.cost_usd).filter(client), 0.0).label("cost_usd"),
            func.coalesce(func.sum(c.cost_usd).filter(c.kind != "call"), 0.0).label("side_cost_usd"),
        )
        .where(*_window(window, c.created_at))
        .group_by(bucket, c.model)
        .order_by(bucket, c.model)
    )


class InsightQueries(PgBase):
    async def list_calls(self, query: CallQuery) -> list[CallRow]:
        stmt = list_statement(query)

        async def q(conn: AsyncConnection) -> list[CallRow]:
            return [CallRow(**r) for r in (await conn.execute(stmt)).mappings()]

        return await self._run(q)

    async def call_buckets(self, window: Window) -> list[BucketRow]:
        stmt = buckets_statement(window)

        async def q(conn: AsyncConnection) -> list[BucketRow]:
            return [BucketRow(**r) for r in (await conn.execute(stmt)).mappings()]

        return await self._run(q)

    async def latency(self, window: Window) -> LatencySummary:
        c = calls.c
        total = c.overhead_ms + c.upstream_ms

        def pct(p: float, column: Any) -> Any:
            return func.percentile_cont(p).within_group(column)

        stmt = select(
            func.count().label("answered"),
            pct(0.5, total).label("latency_p50_ms"),
            pct(0.99, total).label("latency_p99_ms"),
            pct(0.5, c.overhead_ms).label("overhead_p50_ms"),
            pct(0.99, c.overhead_ms).label("overhead_p99_ms"),
        ).where(
            *_window(window, c.created_at),
            c.kind == "call",
            c.status == "ok",
            c.overhead_ms.is_not(None),
            c.upstream_ms.is_not(None),
        )

        async def q(conn: AsyncConnection) -> LatencySummary:
            row = (await conn.execute(stmt)).mappings().one()
            return LatencySummary(**row)

        return await self._run(q)

    async def pair_buckets(self, window: Window) -> list[PairBucket]:
        p = dpo_pairs.c
        bucket = func.date_trunc(window.bucket, p.created_at, "UTC").label("bucket")
        stmt = (
            select(bucket, func.count().label("pairs"))
            .where(p.created_at >= window.since, p.created_at < window.until)
            .group_by(bucket)
            .order_by(bucket)
        )

        async def q(conn: AsyncConnection) -> list[PairBucket]:
            return [PairBucket(**r) for r in (await conn.execute(stmt)).mappings()]

        return await self._run(q)

    async def pairs_of(self, caller: str, request_id: str) -> list[DPOPair]:
        p = dpo_pairs.c
        stmt = (
            select(dpo_pairs)
            .where(p.caller == caller, or_(p.call_a == request_id, p.call_b == request_id))
            .order_by(p.updated_at, p.id)
        )

        async def q(conn: AsyncConnection) -> list[DPOPair]:
            return [pair_of(r) for r in (await conn.execute(stmt)).mappings()]

        return await self._run(q)

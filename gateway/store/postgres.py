"""The Postgres + pgvector store (SQLAlchemy 2 Core, async, on asyncpg).

Connection failures are mapped once, here, to `StoreUnavailable`; a read on a connection that died
with a database restart is retried once on a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import numpy as np
import orjson
from pgvector.asyncpg import register_vector
from sqlalchemy import and_, delete, func, insert, literal_column, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from gateway.errors import NotFound, StoreUnavailable
from gateway.store import (
    ArmStats,
    CallRecord,
    Comparison,
    DPOPair,
    Feedback,
    FeedbackOutcome,
    Neighbour,
    RatedCall,
    Rating,
)
from gateway.store.schema import arm_stats, calls, dpo_pairs, feedback

T = TypeVar("T")


def _json(obj: Any) -> str:
    return orjson.dumps(
        obj, default=str, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    ).decode()


SERVER_SETTINGS = {
    # pgvector >= 0.8: keep scanning the HNSW graph when the WHERE clause filters results out.
    "hnsw.iterative_scan": "relaxed_order",
    "hnsw.ef_search": "100",
    "application_name": "llm-router",
}

# Rated calls nearest to $1: ORDER BY distance LIMIT k, so that the HNSW index serves it. Only the
# partial index's own predicate and the time window: more IS NOT NULL filters make the planner
# underestimate the rows and prefer a sequential scan.
NEIGHBOURS_SQL = """
SELECT id, model, score, 1 - (embedding <=> $1) AS similarity, created_at
FROM calls
WHERE score IS NOT NULL AND created_at >= $2
ORDER BY embedding <=> $1
LIMIT $3
"""


# The same, k nearest per model: one HNSW scan per arm (the filter on model rides pgvector's
# iterative scan), so that the arms a policy favours do not crowd the others' evidence out.
NEIGHBOURS_PER_MODEL_SQL = """
SELECT n.id, n.model, n.score, n.similarity, n.created_at
FROM unnest($4::text[]) AS arm(model)
CROSS JOIN LATERAL (
    SELECT id, model, score, 1 - (embedding <=> $1) AS similarity, created_at
    FROM calls
    WHERE score IS NOT NULL AND created_at >= $2 AND model = arm.model
    ORDER BY embedding <=> $1
    LIMIT $3
) AS n
"""


def make_engine(dsn: str, *, ssl: str | None = None, pool_size: int = 10) -> AsyncEngine:
    connect_args: dict[str, Any] = {"server_settings": SERVER_SETTINGS, "timeout": 5}
    if ssl:
        connect_args["ssl"] = ssl
    return create_async_engine(
        dsn,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        json_serializer=_json,
        json_deserializer=orjson.loads,
        connect_args=connect_args,
        hide_parameters=True,  # error texts would otherwise quote prompts and responses into logs
    )


def _is_unavailable(exc: BaseException) -> bool:
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
    return cause is not None and cause is not exc and _is_unavailable(cause)


def _unreachable(exc: BaseException) -> str:
    """The message of StoreUnavailable: the error's kind only, never its text (which can hold SQL
    parameters: other callers' prompts)."""
    cause = getattr(exc, "orig", None) or exc.__cause__ or exc
    return f"the database is unreachable ({type(cause).__name__})"


def _clean(value: Any) -> Any:
    """PostgreSQL text and jsonb cannot hold NUL characters, which JSON (and OpenAI) allow."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


async def _retrying(work: Callable[[], Awaitable[T]]) -> T:
    """`work`, and once more if the database was unreachable (a pooled connection that died with a
    restart is replaced on the second try); StoreUnavailable if it still is."""
    for attempt in (0, 1):
        try:
            return await work()
        except NotFound:
            raise
        except Exception as exc:
            if not _is_unavailable(exc):
                raise
            if attempt == 1:
                raise StoreUnavailable(_unreachable(exc)) from exc
    raise AssertionError("unreachable")  # pragma: no cover


class PostgresStore:
    def __init__(self, engine: AsyncEngine, *, ssl: str | None = None) -> None:
        self.engine = engine
        self.ssl = ssl
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

        return await _retrying(once)

    async def ping(self) -> bool:
        async def q(conn: AsyncConnection) -> bool:
            return (await conn.execute(select(literal_column("1")))).scalar() == 1

        return await self._run(q)

    # --- calls
    @staticmethod
    def _row(rec: CallRecord) -> dict[str, Any]:
        return _clean(
            {
                "id": rec.id,
                "created_at": rec.created_at,
                "kind": rec.kind,
                "duel_of": rec.duel_of,
                "caller": rec.caller,
                "requested_model": rec.requested_model,
                "model": rec.model,
                "upstream_model": rec.upstream_model,
                "messages": rec.messages,
                "prompt_hash": rec.prompt_hash,
                "embedding": rec.embedding,
                "layer": rec.layer,
                "strategy": rec.strategy,
                "policy": rec.policy,
                "propensity": rec.propensity,
                "decision": rec.decision,
                "attempts": rec.attempts,
                "status": rec.status,
                "http_status": rec.http_status,
                "error": rec.error,
                "stream": rec.stream,
                "overhead_ms": rec.overhead_ms,
                "upstream_ms": rec.upstream_ms,
                "ttft_ms": rec.ttft_ms,
                "prompt_tokens": rec.prompt_tokens,
                "completion_tokens": rec.completion_tokens,
                "cost_usd": rec.cost_usd,
                "response": rec.response,
                "synthetic": rec.synthetic,
            }
        )

    async def write_calls(self, records: Sequence[CallRecord]) -> None:
        if not records:
            return
        by_id: dict[str, CallRecord] = {}
        for r in records:
            by_id.setdefault(r.id, r)  # a reused request id keeps its first record
        rows = [self._row(r) for r in by_id.values()]

        async def tx(conn: AsyncConnection) -> None:
            stmt = pg_insert(calls).on_conflict_do_nothing(index_elements=[calls.c.id]).returning(calls.c.id)
            inserted = (await conn.execute(stmt, rows)).scalars().all()
            sums: dict[str, dict[str, Any]] = defaultdict(
                lambda: {
                    "calls": 0,
                    "ok_calls": 0,
                    "latency_ms_sum": 0.0,
                    "cost_usd_sum": 0.0,
                    "completion_tokens_sum": 0,
                }
            )
            for rid in inserted:
                rec = by_id[rid]
                if (
                    rec.model is None or rec.kind == "judge"
                ):  # a judge's short verdicts say nothing of the model
                    continue
                s = sums[rec.model]
                s["calls"] += 1
                if rec.status == "ok":
                    s["ok_calls"] += 1
                    s["latency_ms_sum"] += rec.upstream_ms or 0.0
                    s["cost_usd_sum"] += rec.cost_usd or 0.0
                    s["completion_tokens_sum"] += rec.completion_tokens or 0
            if sums:
                await self._bump_arms(conn, [{"model": m, **s} for m, s in sorted(sums.items())])

        await self._run(tx, write=True)

    @staticmethod
    async def _bump_arms(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
        cols = [k for k in rows[0] if k != "model"]
        stmt = pg_insert(arm_stats)
        stmt = stmt.on_conflict_do_update(
            index_elements=[arm_stats.c.model],
            set_={
                **{c: arm_stats.c[c] + stmt.excluded[c] for c in cols},
                "updated_at": func.now(),
            },
        )
        for row in rows:  # one statement per model: few models per batch
            await conn.execute(stmt.values(**row))

    async def get_call(self, request_id: str) -> dict[str, Any] | None:
        async def q(conn: AsyncConnection) -> dict[str, Any] | None:
            row = (await conn.execute(select(calls).where(calls.c.id == request_id))).mappings().first()
            if row is None:
                return None
            out = dict(row)
            if out["embedding"] is not None:
                out["embedding"] = np.asarray(out["embedding"]).tolist()
            fb = await conn.execute(
                select(feedback.c.score, feedback.c.feedback_text, feedback.c.source, feedback.c.created_at)
                .where(feedback.c.request_id == request_id)
                .order_by(feedback.c.created_at, feedback.c.id)
            )
            out["feedback"] = [dict(r) for r in fb.mappings()]
            return out

        return await self._run(q)

    async def add_feedback(self, fb: Feedback) -> FeedbackOutcome:
        async def tx(conn: AsyncConnection) -> FeedbackOutcome:
            row = (
                await conn.execute(
                    select(calls.c.model, calls.c.score, calls.c.score_source)
                    .where(calls.c.id == fb.request_id)
                    .with_for_update()
                )
            ).first()
            if row is None:
                raise NotFound(
                    f"no request with id {fb.request_id!r}", param="request_id", code="request_not_found"
                )
            model, previous, previous_source = row
            await conn.execute(
                insert(feedback).values(
                    request_id=fb.request_id,
                    score=fb.score,
                    feedback_text=_clean(fb.text),
                    source=fb.source,
                    created_at=fb.created_at,
                )
            )
            applies = fb.source != "judge" or previous_source in (None, "judge")
            if not applies:
                return FeedbackOutcome(fb.request_id, model, previous, previous, False)
            await conn.execute(
                update(calls)
                .where(calls.c.id == fb.request_id)
                .values(score=fb.score, score_source=fb.source, score_at=fb.created_at)
            )
            if model is not None:
                await self._bump_arms(
                    conn,
                    [
                        {
                            "model": model,
                            "rated": 1 if previous is None else 0,
                            "score_sum": fb.score - (previous or 0.0),
                        }
                    ],
                )
            return FeedbackOutcome(fb.request_id, model, previous, fb.score, True)

        return await self._run(tx, write=True)

    async def set_embedding(self, request_id: str, embedding: np.ndarray) -> None:
        async def tx(conn: AsyncConnection) -> None:
            await conn.execute(
                update(calls)
                .where(and_(calls.c.id == request_id, calls.c.embedding.is_(None)))
                .values(embedding=embedding)
            )

        await self._run(tx, write=True)

    # --- routing
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
                    server_settings=SERVER_SETTINGS,
                    timeout=5,
                )
            return self._pool

    async def neighbours(
        self,
        embedding: np.ndarray,
        k: int,
        since: datetime,
        threshold: float,
        per_model: list[str] | None = None,
    ) -> list[Neighbour]:

        async def fetch() -> list[asyncpg.Record]:
            pool = await self._hot()
            if per_model:
                return await pool.fetch(NEIGHBOURS_PER_MODEL_SQL, embedding, since, k, per_model)
            return await pool.fetch(NEIGHBOURS_SQL, embedding, since, k)

        rows = await _retrying(fetch)
        out = [
            Neighbour(r[0], r[1], float(r[2]), float(r[3]), r[4])
            for r in rows
            if r[3] is not None and r[1] is not None and r[3] >= threshold
        ]
        out.sort(key=lambda n: -n.similarity)  # relaxed_order scans may return slightly out of order
        return out

    async def rated_since(self, since: datetime, limit: int) -> list[Rating]:
        stmt = (
            select(calls.c.id, calls.c.model, calls.c.score, calls.c.score_at)
            .where(calls.c.score_at > since, calls.c.score.is_not(None), calls.c.model.is_not(None))
            .order_by(calls.c.score_at)
            .limit(limit)
        )

        async def q(conn: AsyncConnection) -> list[Rating]:
            return [Rating(r[0], r[1], float(r[2]), r[3]) for r in (await conn.execute(stmt)).all()]

        return await self._run(q)

    async def embeddings_of(self, request_ids: Sequence[str]) -> dict[str, np.ndarray]:
        if not request_ids:
            return {}
        stmt = select(calls.c.id, calls.c.embedding).where(
            calls.c.id.in_(list(request_ids)), calls.c.embedding.is_not(None)
        )

        async def q(conn: AsyncConnection) -> dict[str, np.ndarray]:
            return {r[0]: np.asarray(r[1], dtype=np.float32) for r in (await conn.execute(stmt)).all()}

        return await self._run(q)

    async def arm_stats(self) -> dict[str, ArmStats]:
        async def q(conn: AsyncConnection) -> dict[str, ArmStats]:
            rows = (await conn.execute(select(arm_stats))).mappings().all()
            return {
                r["model"]: ArmStats(
                    model=r["model"],
                    calls=r["calls"],
                    ok_calls=r["ok_calls"],
                    rated=r["rated"],
                    score_sum=r["score_sum"],
                    latency_ms_sum=r["latency_ms_sum"],
                    cost_usd_sum=r["cost_usd_sum"],
                    completion_tokens_sum=r["completion_tokens_sum"],
                )
                for r in rows
            }

        return await self._run(q)

    async def usage_stats(self, since: datetime) -> list[dict[str, Any]]:
        ok = calls.c.status == "ok"
        stmt = (
            select(
                calls.c.model,
                func.count().label("requests"),
                func.count().filter(calls.c.status != "ok").label("errors"),
                func.avg(calls.c.upstream_ms).filter(ok).label("latency_ms_avg"),
                func.coalesce(func.sum(calls.c.cost_usd), 0.0).label("cost_usd"),
                func.count(calls.c.score).label("feedback_count"),
                func.avg(calls.c.score).label("feedback_avg"),
            )
            .where(calls.c.created_at >= since, calls.c.model.is_not(None), calls.c.kind == "call")
            .group_by(calls.c.model)
            .order_by(calls.c.model)
        )

        async def q(conn: AsyncConnection) -> list[dict[str, Any]]:
            return [dict(r) for r in (await conn.execute(stmt)).mappings()]

        return await self._run(q)

    # --- DPO
    _RATED = (
        calls.c.score.is_not(None),
        calls.c.status == "ok",
        calls.c.synthetic.is_(False),
        calls.c.model.is_not(None),
        func.coalesce(calls.c.response, "") != "",
    )
    _RATED_COLS = (
        calls.c.id,
        calls.c.model,
        calls.c.messages,
        calls.c.prompt_hash,
        calls.c.response,
        calls.c.score,
    )

    async def pair_candidates(
        self, request_id: str, similarity: float, limit: int = 50
    ) -> tuple[RatedCall | None, list[RatedCall]]:
        async def q(conn: AsyncConnection) -> tuple[RatedCall | None, list[RatedCall]]:
            row = (
                await conn.execute(
                    select(*self._RATED_COLS, calls.c.embedding).where(calls.c.id == request_id, *self._RATED)
                )
            ).first()
            if row is None:
                return None, []
            me = RatedCall(row[0], row[1], row[2], row[3], row[4], float(row[5]))
            found: dict[str, RatedCall] = {}
            same = await conn.execute(
                select(*self._RATED_COLS)
                .where(
                    calls.c.prompt_hash == me.prompt_hash,
                    calls.c.id != me.id,
                    calls.c.model != me.model,
                    *self._RATED,
                )
                .order_by(calls.c.created_at.desc())
                .limit(limit)
            )
            for r in same:
                found[r[0]] = RatedCall(r[0], r[1], r[2], r[3], r[4], float(r[5]))
            if row[6] is not None:
                distance = calls.c.embedding.cosine_distance(row[6])
                near = await conn.execute(
                    select(*self._RATED_COLS, (1 - distance).label("similarity"))
                    .where(calls.c.score.is_not(None))  # the HNSW index's predicate
                    .order_by(distance)
                    .limit(limit)
                )
                for n in near:
                    sim = float(n[6]) if n[6] is not None else -1.0
                    if n[0] == me.id or n[1] == me.model or n[0] in found or sim < similarity:
                        continue
                    found[n[0]] = RatedCall(n[0], n[1], n[2], n[3], n[4], float(n[5]), sim)
            # the near query does not apply the response checks (to keep to the index): do it here
            ok = {
                r[0]
                for r in (
                    await conn.execute(select(calls.c.id).where(calls.c.id.in_(list(found)), *self._RATED))
                )
            }
            candidates = [c for c in found.values() if c.id in ok][:limit]
            # and every call this one is paired with now, however old: a re-rating must revisit them
            paired = await conn.execute(
                select(dpo_pairs.c.call_a, dpo_pairs.c.call_b, dpo_pairs.c.similarity).where(
                    (dpo_pairs.c.call_a == me.id) | (dpo_pairs.c.call_b == me.id)
                )
            )
            partners = {(a if b == me.id else b): float(sim) for a, b, sim in paired}
            missing = [p for p in partners if p not in {c.id for c in candidates}]
            if missing:
                rows = await conn.execute(
                    select(*self._RATED_COLS).where(calls.c.id.in_(missing), *self._RATED)
                )
                candidates += [
                    RatedCall(r[0], r[1], r[2], r[3], r[4], float(r[5]), partners[r[0]]) for r in rows
                ]
            return me, candidates

        return await self._run(q)

    async def save_pair(self, pair: DPOPair) -> bool:
        a, b = pair.key
        values = {
            "call_a": a,
            "call_b": b,
            "prompt_hash": pair.prompt_hash,
            "messages": pair.messages,
            "chosen_id": pair.chosen_id,
            "chosen_model": pair.chosen_model,
            "chosen": pair.chosen,
            "chosen_score": pair.chosen_score,
            "rejected_id": pair.rejected_id,
            "rejected_model": pair.rejected_model,
            "rejected": pair.rejected,
            "rejected_score": pair.rejected_score,
            "margin": pair.margin,
            "similarity": pair.similarity,
        }
        insert_stmt = pg_insert(dpo_pairs).values(**values)
        changing = (
            "chosen_id",
            "chosen_model",
            "chosen",
            "chosen_score",
            "rejected_id",
            "rejected_model",
            "rejected",
            "rejected_score",
            "margin",
            "similarity",
            "messages",
            "prompt_hash",
        )
        excluded = insert_stmt.excluded
        stmt = insert_stmt.on_conflict_do_update(
            constraint="dpo_pairs_calls_key",
            set_={**{c: excluded[c] for c in changing}, "updated_at": func.now()},
            where=tuple_(
                dpo_pairs.c.chosen_id,
                dpo_pairs.c.chosen_score,
                dpo_pairs.c.rejected_score,
                dpo_pairs.c.chosen,
                dpo_pairs.c.rejected,
            ).is_distinct_from(
                tuple_(
                    excluded.chosen_id,
                    excluded.chosen_score,
                    excluded.rejected_score,
                    excluded.chosen,
                    excluded.rejected,
                )
            ),
        ).returning(dpo_pairs.c.id)

        async def tx(conn: AsyncConnection) -> bool:
            return (await conn.execute(stmt)).first() is not None

        return await self._run(tx, write=True)

    async def delete_pair(self, a: str, b: str) -> bool:
        a, b = sorted((a, b))

        async def tx(conn: AsyncConnection) -> bool:
            stmt = (
                delete(dpo_pairs)
                .where(dpo_pairs.c.call_a == a, dpo_pairs.c.call_b == b)
                .returning(dpo_pairs.c.id)
            )
            return (await conn.execute(stmt)).first() is not None

        return await self._run(tx, write=True)

    async def iter_pairs(
        self,
        since: datetime | None,
        min_margin: float,
        after: tuple[datetime, int] | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[DPOPair]:
        stmt = select(dpo_pairs).where(dpo_pairs.c.margin >= min_margin)
        if since is not None:
            stmt = stmt.where(dpo_pairs.c.updated_at >= since)
        if after is not None:
            stmt = stmt.where(tuple_(dpo_pairs.c.updated_at, dpo_pairs.c.id) > tuple_(*after))
        stmt = stmt.order_by(dpo_pairs.c.updated_at, dpo_pairs.c.id)
        if limit is not None:
            stmt = stmt.limit(limit)
        try:
            async with self.engine.connect() as conn:
                result = await conn.stream(stmt.execution_options(yield_per=500))
                async for r in result.mappings():
                    yield DPOPair(
                        prompt_hash=r["prompt_hash"],
                        messages=r["messages"],
                        chosen_id=r["chosen_id"],
                        chosen_model=r["chosen_model"],
                        chosen=r["chosen"],
                        chosen_score=r["chosen_score"],
                        rejected_id=r["rejected_id"],
                        rejected_model=r["rejected_model"],
                        rejected=r["rejected"],
                        rejected_score=r["rejected_score"],
                        similarity=r["similarity"],
                        created_at=r["created_at"],
                        updated_at=r["updated_at"],
                        id=r["id"],
                    )
        except Exception as exc:
            if _is_unavailable(exc):
                raise StoreUnavailable(_unreachable(exc)) from exc
            raise

    async def iter_comparisons(self, since: datetime | None) -> AsyncIterator[Comparison]:
        where = "score IS NOT NULL AND status = 'ok' AND model IS NOT NULL"
        if since is not None:
            where += " AND created_at >= :since"
        sql = text(f"""
            WITH per_model AS (
                SELECT prompt_hash, model, avg(score) AS score,
                       (array_agg(messages ORDER BY created_at))[1] AS messages
                FROM calls WHERE {where} GROUP BY prompt_hash, model
            )
            SELECT a.messages, a.model, a.score, b.model, b.score
            FROM per_model a JOIN per_model b ON a.prompt_hash = b.prompt_hash AND a.model < b.model
            ORDER BY a.prompt_hash, a.model, b.model
        """)
        params = {"since": since} if since is not None else {}
        async with self.engine.connect() as conn:
            result = await conn.stream(sql.execution_options(yield_per=500), params)
            async for r in result:
                messages = r[0] if not isinstance(r[0], str) else orjson.loads(r[0])
                yield Comparison(messages, r[1], float(r[2]), r[3], float(r[4]))


@contextlib.asynccontextmanager
async def postgres_store(dsn: str, *, ssl: str | None = None) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(make_engine(dsn, ssl=ssl), ssl=ssl)
    try:
        await store._hot()  # open the hot-path pool now, not under a request's 250 ms budget
        yield store
    finally:
        await store.aclose()

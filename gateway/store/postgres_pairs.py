"""The Postgres store's DPO side: candidates for pairs, pairs saved once each, and the exports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import orjson
from sqlalchemy import RowMapping, delete, func, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.domain import Comparison, DPOPair, RatedCall
from gateway.errors import StoreUnavailable
from gateway.store.pg import PgBase, is_unavailable, unreachable
from gateway.store.schema import calls, dpo_pairs


def pair_of(r: RowMapping) -> DPOPair:
    """A `dpo_pairs` row as a DPOPair."""
    return DPOPair(
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
        caller=r["caller"],
    )


class PairQueries(PgBase):
    # RatedCall.of's rule, in SQL: rated, ok, a real response by a known model.
    _PAIRABLE = (
        calls.c.score.is_not(None),
        calls.c.status == "ok",
        calls.c.synthetic.is_(False),
        calls.c.model.is_not(None),
        func.coalesce(calls.c.response, "") != "",
    )
    _PAIR_COLS = (
        calls.c.id,
        calls.c.model,
        calls.c.messages,
        calls.c.prompt_hash,
        calls.c.response,
        calls.c.score,
    )

    async def pair_candidates(
        self, caller: str, request_id: str, similarity: float, limit: int = 50, *, embedder: str | None
    ) -> tuple[RatedCall | None, list[RatedCall]]:
        mine = calls.c.caller == caller  # pairs are mined within one tenant's calls

        async def q(conn: AsyncConnection) -> tuple[RatedCall | None, list[RatedCall]]:
            row = (
                await conn.execute(
                    select(*self._PAIR_COLS, calls.c.embedding, calls.c.embedder).where(
                        calls.c.id == request_id, mine, *self._PAIRABLE
                    )
                )
            ).first()
            if row is None:
                return None, []
            me = RatedCall(row[0], row[1], row[2], row[3], row[4], float(row[5]))
            found: dict[str, RatedCall] = {}
            same = await conn.execute(
                select(*self._PAIR_COLS)
                .where(
                    calls.c.prompt_hash == me.prompt_hash,
                    mine,
                    calls.c.id != me.id,
                    calls.c.model != me.model,
                    *self._PAIRABLE,
                )
                .order_by(calls.c.created_at.desc())
                .limit(limit)
            )
            for r in same:
                found[r[0]] = RatedCall(r[0], r[1], r[2], r[3], r[4], float(r[5]))
            if row[6] is not None and embedder is not None and row[7] == embedder:
                distance = calls.c.embedding.cosine_distance(row[6])
                near = await conn.execute(
                    select(*self._PAIR_COLS, (1 - distance).label("similarity"))
                    # the HNSW index's predicate, the tenant, the same embedder's vectors only
                    .where(calls.c.score.is_not(None), mine, calls.c.embedder == embedder)
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
                    await conn.execute(
                        select(calls.c.id).where(calls.c.id.in_(list(found)), mine, *self._PAIRABLE)
                    )
                )
            }
            candidates = [c for c in found.values() if c.id in ok][:limit]
            # and every call this one is paired with now, however old: a re-rating must revisit them
            paired = await conn.execute(
                select(dpo_pairs.c.call_a, dpo_pairs.c.call_b, dpo_pairs.c.similarity).where(
                    (dpo_pairs.c.call_a == me.id) | (dpo_pairs.c.call_b == me.id),
                    dpo_pairs.c.caller == caller,
                )
            )
            partners = {(a if b == me.id else b): float(sim) for a, b, sim in paired}
            missing = [p for p in partners if p not in {c.id for c in candidates}]
            if missing:
                rows = await conn.execute(
                    select(*self._PAIR_COLS).where(calls.c.id.in_(missing), mine, *self._PAIRABLE)
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
            "caller": pair.caller,
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

    async def delete_pair(self, caller: str, a: str, b: str) -> bool:
        a, b = sorted((a, b))

        async def tx(conn: AsyncConnection) -> bool:
            stmt = (
                delete(dpo_pairs)
                .where(dpo_pairs.c.call_a == a, dpo_pairs.c.call_b == b, dpo_pairs.c.caller == caller)
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
        caller: str | None = None,
    ) -> AsyncIterator[DPOPair]:
        stmt = select(dpo_pairs).where(dpo_pairs.c.margin >= min_margin)
        if caller is not None:
            stmt = stmt.where(dpo_pairs.c.caller == caller)
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
                    yield pair_of(r)
        except Exception as exc:
            if is_unavailable(exc):
                raise StoreUnavailable(unreachable(exc)) from exc
            raise

    async def iter_comparisons(
        self, since: datetime | None, caller: str | None = None
    ) -> AsyncIterator[Comparison]:
        where = "score IS NOT NULL AND status = 'ok' AND model IS NOT NULL"
        params: dict[str, object] = {}
        if since is not None:
            where += " AND created_at >= :since"
            params["since"] = since
        if caller is not None:
            where += " AND caller = :caller"
            params["caller"] = caller
        # Within one tenant: two tenants' answers to one prompt are not compared.
        sql = text(f"""
            WITH per_model AS (
                SELECT caller, prompt_hash, model, avg(score) AS score,
                       (array_agg(messages ORDER BY created_at))[1] AS messages
                FROM calls WHERE {where} GROUP BY caller, prompt_hash, model
            )
            SELECT a.messages, a.model, a.score, b.model, b.score
            FROM per_model a JOIN per_model b
              ON a.caller = b.caller AND a.prompt_hash = b.prompt_hash AND a.model < b.model
            ORDER BY a.caller, a.prompt_hash, a.model, b.model
        """)
        async with self.engine.connect() as conn:
            result = await conn.stream(sql.execution_options(yield_per=500), params)
            async for r in result:
                messages = r[0] if not isinstance(r[0], str) else orjson.loads(r[0])
                yield Comparison(messages, r[1], float(r[2]), r[3], float(r[4]))

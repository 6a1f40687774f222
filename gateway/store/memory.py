"""A bounded in-memory store (ENABLE_PERSISTENCE=false): same contract, nothing survives a restart.

The oldest calls are evicted beyond `max_calls`; their feedback goes with them, the arm statistics
they contributed stay. A call keeps its last MAX_RATINGS ratings (the effective score is the
latest's anyway).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import numpy as np

from gateway.domain import (
    ArmStats,
    CallRecord,
    Comparison,
    DPOPair,
    Feedback,
    FeedbackEntry,
    FeedbackOutcome,
    Neighbour,
    RatedCall,
    Rating,
    StoredCall,
    ToEmbed,
    UsageRow,
    feedback_applies,
    utcnow,
)
from gateway.errors import NotFound
from gateway.store import Key
from gateway.store.memory_index import VectorIndex
from gateway.store.memory_insights import InsightQueries
from gateway.store.memory_keys import MemoryKeys

MAX_RATINGS = 100  # ratings kept per call: a client re-rating one call forever cannot grow memory


class _Call:
    __slots__ = ("feedback", "record", "score", "score_at", "score_source")

    def __init__(self, record: CallRecord) -> None:
        self.record = record
        self.feedback: deque[Feedback] = deque(maxlen=MAX_RATINGS)
        self.score: float | None = None
        self.score_source: str | None = None
        self.score_at: datetime | None = None

    def stored(self) -> StoredCall:
        ratings = [FeedbackEntry(f.score, f.text, f.source, f.created_at) for f in self.feedback]
        return StoredCall(replace(self.record), self.score, self.score_source, self.score_at, ratings)


class MemoryStore(InsightQueries, MemoryKeys):
    def __init__(self, max_calls: int = 100_000) -> None:
        super().__init__()
        self.max_calls = max_calls
        self.calls: OrderedDict[Key, _Call] = OrderedDict()
        self.arms: dict[str, ArmStats] = {}
        self.ratings: dict[str, dict[str, tuple[int, float]]] = {}  # model -> caller -> sums
        self.pairs: dict[tuple[str, str, str], DPOPair] = {}
        self._pair_ids = 0
        self.index = VectorIndex()

    async def aclose(self) -> None:
        pass

    def _records(self) -> Iterator[CallRecord]:
        return (c.record for c in self.calls.values())

    async def ping(self) -> bool:
        return True

    def _arm(self, model: str) -> ArmStats:
        arm = self.arms.get(model)
        if arm is None:
            arm = self.arms[model] = ArmStats(model)
        return arm

    async def write_calls(self, records: Sequence[CallRecord]) -> int:
        new = 0
        for rec in records:
            if (rec.caller, rec.id) in self.calls:
                continue  # a reused request id keeps its first record (as in Postgres)
            new += 1
            self.calls[(rec.caller, rec.id)] = _Call(rec)
            if rec.counts_for_arm:
                assert rec.model is not None
                self._arm(rec.model).add_call(rec)
        while len(self.calls) > self.max_calls:
            cid, _ = self.calls.popitem(last=False)
            self.index.remove(cid)
        if len(self.index.gone) > max(1000, len(self.index.ids) // 4):  # compact now and then
            index = VectorIndex()
            for c in self.calls.values():
                if c.score is not None:
                    index.add(c.record)
            self.index = index
        return new

    def _find(self, caller: str | None, request_id: str) -> _Call | None:
        if caller is not None:
            return self.calls.get((caller, request_id))
        found = [c for (_, rid), c in self.calls.items() if rid == request_id]
        return max(found, key=lambda c: c.record.created_at) if found else None

    async def get_call(self, caller: str | None, request_id: str) -> StoredCall | None:
        call = self._find(caller, request_id)
        return None if call is None else call.stored()

    async def add_feedback(self, feedback: Feedback) -> FeedbackOutcome:
        call = self.calls.get((feedback.caller, feedback.request_id))
        if call is None:
            raise NotFound(
                f"no request with id {feedback.request_id!r}", param="request_id", code="request_not_found"
            )
        call.feedback.append(feedback)
        previous = call.score
        applies = feedback_applies(feedback.source, call.score_source)
        if applies:
            call.score, call.score_source, call.score_at = (
                feedback.score,
                feedback.source,
                feedback.created_at,
            )
            model = call.record.model
            if model is not None:
                self._arm(model).add_rating(feedback.score, previous)
                rated, total = self.ratings.setdefault(model, {}).get(feedback.caller, (0, 0.0))
                self.ratings[model][feedback.caller] = (
                    rated + (previous is None),
                    total + feedback.score - (previous or 0.0),
                )
            self.index.add(call.record)
        return FeedbackOutcome(feedback.request_id, call.record.model, previous, call.score, applies)

    async def set_embedding(self, caller: str, request_id: str, embedding: np.ndarray, embedder: str) -> None:
        call = self.calls.get((caller, request_id))
        if call is None or (call.record.embedding is not None and call.record.embedder == embedder):
            return
        call.record.embedding, call.record.embedder = embedding, embedder
        if call.score is not None:
            self.index.remove((caller, request_id))  # its row held the old vector, if any
            self.index.add(call.record)

    async def set_embeddings(self, embedder: str, items: Sequence[tuple[Key, np.ndarray]]) -> None:
        for (caller, request_id), embedding in items:
            await self.set_embedding(caller, request_id, embedding, embedder)

    async def to_reembed(self, embedder: str, after: Key | None, limit: int) -> list[ToEmbed]:
        keys = sorted(
            (rid, caller)
            for (caller, rid), c in self.calls.items()
            if c.score is not None and (c.record.embedding is None or c.record.embedder != embedder)
        )
        if after is not None:
            keys = [k for k in keys if k > (after[1], after[0])]
        return [
            ToEmbed(caller, rid, self.calls[(caller, rid)].record.messages) for rid, caller in keys[:limit]
        ]

    async def neighbours(
        self,
        embedding: np.ndarray,
        k: int,
        since: datetime,
        threshold: float,
        per_model: list[str] | None = None,
        caller: str = "",
        *,
        embedder: str,
    ) -> list[Neighbour]:
        index = self.index
        n = len(index.ids)
        if not n:
            return []
        sims = index.matrix[:n] @ embedding.astype(np.float32)
        live = np.ones(n, dtype=bool)
        live[list(index.gone)] = False
        recent = live & (index.times[:n] >= since.timestamp()) & (index.callers[:n] == caller)
        recent &= index.embedders[:n] == embedder
        groups = [recent & (index.models[:n] == m) for m in per_model] if per_model else [recent]
        chosen: list[int] = []
        for mask in groups:
            idx = np.flatnonzero(mask)
            chosen.extend(idx[np.argsort(-sims[idx], kind="stable")[:k]].tolist())
        out = []
        for i in sorted(chosen, key=lambda i: -sims[i]):
            if sims[i] < threshold:
                continue
            call = self.calls[index.ids[i]]
            out.append(
                Neighbour(
                    call.record.id,
                    call.record.model or "",
                    call.score or 0.0,
                    float(sims[i]),
                    call.record.created_at,
                )
            )
        return out

    async def rated_since(self, since: datetime, limit: int) -> list[Rating]:
        out = [
            Rating(c.record.id, c.record.model, c.score, c.score_at, c.record.caller)
            for c in self.calls.values()
            if c.score is not None
            and c.score_at is not None
            and c.score_at > since
            and c.record.model is not None
        ]
        out.sort(key=lambda r: r.at)
        return out[:limit]

    async def embeddings_of(self, keys: Sequence[Key], embedder: str) -> dict[Key, np.ndarray]:
        out = {}
        for key in keys:
            call = self.calls.get(key)
            if call is not None and call.record.embedding is not None and call.record.embedder == embedder:
                out[key] = call.record.embedding
        return out

    async def arm_stats(self) -> dict[str, ArmStats]:
        return {name: replace(arm) for name, arm in self.arms.items()}

    async def tenant_ratings(self) -> dict[str, dict[str, tuple[int, float]]]:
        return {model: dict(by_caller) for model, by_caller in self.ratings.items()}

    async def usage_stats(self, since: datetime) -> list[UsageRow]:
        rows: dict[str, dict[str, Any]] = {}
        for call in self.calls.values():
            rec = call.record
            if rec.created_at < since or rec.model is None or rec.kind != "call":
                continue
            row = rows.setdefault(
                rec.model,
                {"model": rec.model, "requests": 0, "errors": 0, "latency": [], "cost": 0.0, "scores": []},
            )
            row["requests"] += 1
            row["errors"] += rec.status != "ok"
            if rec.status == "ok" and rec.upstream_ms is not None:
                row["latency"].append(rec.upstream_ms)
            row["cost"] += rec.cost_usd or 0.0
            if call.score is not None:
                row["scores"].append(call.score)
        return [
            UsageRow(
                model=r["model"],
                requests=r["requests"],
                errors=r["errors"],
                latency_ms_avg=float(np.mean(r["latency"])) if r["latency"] else None,
                cost_usd=r["cost"],
                feedback_count=len(r["scores"]),
                feedback_avg=float(np.mean(r["scores"])) if r["scores"] else None,
            )
            for r in rows.values()
        ]

    async def iter_calls(
        self, since: datetime, until: datetime, caller: str | None = None, page: int = 1000
    ) -> AsyncIterator[StoredCall]:
        found = [
            c
            for (who, _), c in self.calls.items()
            if since <= c.record.created_at < until and caller in (None, who)
        ]
        found.sort(key=lambda c: (c.record.created_at, c.record.caller, c.record.id))
        for call in found:
            yield call.stored()

    # --- DPO
    def _rated_call(self, call: _Call, similarity: float = 1.0) -> RatedCall | None:
        return RatedCall.of(call.record, call.score, similarity)

    async def pair_candidates(
        self, caller: str, request_id: str, similarity: float, limit: int = 50, *, embedder: str | None
    ) -> tuple[RatedCall | None, list[RatedCall]]:
        call = self.calls.get((caller, request_id))
        me = self._rated_call(call) if call is not None else None
        if call is None or me is None:
            return None, []
        emb = call.record.embedding if embedder is not None and call.record.embedder == embedder else None
        found: list[RatedCall] = []
        for other in self.calls.values():
            if other is call or other.record.model == me.model or other.record.caller != caller:
                continue
            sim = 1.0
            if other.record.prompt_hash != me.prompt_hash:
                if emb is None or other.record.embedding is None or other.record.embedder != embedder:
                    continue
                sim = float(np.dot(emb, other.record.embedding))
                if sim < similarity:
                    continue
            rated = self._rated_call(other, sim)
            if rated is not None:
                found.append(rated)
        found.sort(key=lambda r: -r.similarity)
        found = found[:limit]
        # and every call this one is paired with now, however old: a re-rating must revisit them
        have = {r.id for r in found}
        for (owner, a, b), pair in self.pairs.items():
            if owner == caller and request_id in (a, b):
                partner_call = self.calls.get((caller, b if a == request_id else a))
                partner = (
                    self._rated_call(partner_call, pair.similarity) if partner_call is not None else None
                )
                if partner is not None and partner.id not in have:
                    found.append(partner)
        return me, found

    async def save_pair(self, pair: DPOPair) -> bool:
        key = (pair.caller, *pair.key)
        existing = self.pairs.get(key)
        if existing is not None:
            if existing.same_preference(pair):
                return False
            pair.id, pair.created_at = existing.id, existing.created_at
        else:
            self._pair_ids += 1
            pair.id = self._pair_ids
        pair.updated_at = utcnow()
        self.pairs[key] = pair
        return True

    async def delete_pair(self, caller: str, a: str, b: str) -> bool:
        key = (caller, a, b) if a < b else (caller, b, a)
        return self.pairs.pop(key, None) is not None

    async def iter_pairs(
        self,
        since: datetime | None,
        min_margin: float,
        after: tuple[datetime, int] | None = None,
        limit: int | None = None,
        caller: str | None = None,
    ) -> AsyncIterator[DPOPair]:
        n = 0
        for pair in sorted(self.pairs.values(), key=lambda p: (p.updated_at, p.id)):
            if caller is not None and pair.caller != caller:
                continue
            if since is not None and pair.updated_at < since:
                continue
            if after is not None and (pair.updated_at, pair.id) <= after:
                continue
            if pair.margin < min_margin:
                continue
            yield pair
            n += 1
            if limit is not None and n >= limit:
                return

    async def iter_comparisons(
        self, since: datetime | None, caller: str | None = None
    ) -> AsyncIterator[Comparison]:
        groups: dict[tuple[str, str], dict[str, list[float]]] = {}
        prompts: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for call in self.calls.values():
            rec = call.record
            if call.score is None or rec.model is None or rec.status != "ok":
                continue
            if (since is not None and rec.created_at < since) or (
                caller is not None and rec.caller != caller
            ):
                continue
            h = (rec.caller, rec.prompt_hash)  # within one tenant
            groups.setdefault(h, {}).setdefault(rec.model, []).append(call.score)
            prompts.setdefault(h, rec.messages)
        for h, by_model in groups.items():
            models = sorted(by_model)
            for i, a in enumerate(models):
                for b in models[i + 1 :]:
                    yield Comparison(
                        prompts[h], a, float(np.mean(by_model[a])), b, float(np.mean(by_model[b]))
                    )

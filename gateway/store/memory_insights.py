"""The in-memory store's read side for the dashboard: the calls list and the aggregates over time,
computed from the calls it holds (the same results as the Postgres store's SQL)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Protocol

import numpy as np

from gateway.domain import CallRecord, DPOPair
from gateway.insights import (
    BucketRow,
    CallQuery,
    CallRow,
    LatencySummary,
    PairBucket,
    Window,
    floor_time,
    preview_of,
    prompt_matches,
)


class _Held(Protocol):
    """A call as the memory store holds it."""

    @property
    def record(self) -> CallRecord: ...

    @property
    def score(self) -> float | None: ...


def _matches(held: _Held, q: CallQuery) -> bool:
    rec = held.record
    checks = (
        q.since is None or rec.created_at >= q.since,
        q.until is None or rec.created_at < q.until,
        q.caller is None or rec.caller == q.caller,
        q.model is None or rec.model == q.model,
        q.layer is None or rec.layer == q.layer,
        q.status is None or rec.status == q.status,
        q.kind is None or rec.kind == q.kind,
        q.rated is None or (held.score is not None) == q.rated,
        q.id is None or q.id in (rec.id, rec.trace_id),
        q.before is None or (rec.created_at, rec.id) < q.before,
    )
    return all(checks) and (not q.text or prompt_matches(rec.messages, q.text))


def _row(held: _Held) -> CallRow:
    rec = held.record
    return CallRow(
        id=rec.id,
        created_at=rec.created_at,
        kind=rec.kind,
        caller=rec.caller,
        requested_model=rec.requested_model,
        model=rec.model,
        layer=rec.layer,
        status=rec.status,
        http_status=rec.http_status,
        stream=rec.stream,
        overhead_ms=rec.overhead_ms,
        upstream_ms=rec.upstream_ms,
        cost_usd=rec.cost_usd,
        prompt_tokens=rec.prompt_tokens,
        completion_tokens=rec.completion_tokens,
        score=held.score,
        trace_id=rec.trace_id,
        preview=preview_of(rec.messages),
    )


def _in(window: Window, rec: CallRecord) -> bool:
    return window.since <= rec.created_at < window.until and (
        window.caller is None or rec.caller == window.caller
    )


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class InsightQueries:
    """Mixed into MemoryStore, whose calls (oldest first) and pairs it reads."""

    calls: Mapping[tuple[str, str], _Held]  # by (caller, id)
    pairs: Mapping[tuple[str, str, str], DPOPair]  # by (caller, call a, call b)

    async def list_calls(self, query: CallQuery) -> list[CallRow]:
        found: list[_Held] = [held for held in self.calls.values() if _matches(held, query)]
        found.sort(key=lambda h: (h.record.created_at, h.record.id), reverse=True)
        return [_row(h) for h in found[: query.limit]]

    async def call_buckets(self, window: Window) -> list[BucketRow]:
        sums: dict[tuple[datetime, str | None], list[float]] = {}
        for held in self.calls.values():
            rec = held.record
            if not _in(window, rec):
                continue
            row = sums.setdefault((floor_time(rec.created_at, window.bucket), rec.model), [0.0] * 8)
            if rec.kind != "call":
                row[7] += rec.cost_usd or 0.0
                continue
            routed = rec.layer is not None and rec.layer != "explicit"
            for i, add in enumerate(
                (
                    1,
                    rec.status != "ok",
                    routed,
                    routed and bool(rec.decision.get("explored")),
                    held.score is not None,
                    held.score or 0.0,
                    rec.cost_usd or 0.0,
                )
            ):
                row[i] += float(add)
        return [
            BucketRow(b, m, int(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), r[5], r[6], r[7])
            for (b, m), r in sorted(sums.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
        ]

    async def latency(self, window: Window) -> LatencySummary:
        total: list[float] = []
        overhead: list[float] = []
        for held in self.calls.values():
            rec = held.record
            if (
                _in(window, rec)
                and rec.kind == "call"
                and rec.status == "ok"
                and rec.overhead_ms is not None
                and rec.upstream_ms is not None
            ):
                total.append(rec.overhead_ms + rec.upstream_ms)
                overhead.append(rec.overhead_ms)
        return LatencySummary(
            len(total), _pct(total, 50), _pct(total, 99), _pct(overhead, 50), _pct(overhead, 99)
        )

    async def pair_buckets(self, window: Window) -> list[PairBucket]:
        counts: dict[datetime, int] = {}
        for pair in self.pairs.values():
            if window.since <= pair.created_at < window.until:
                b = floor_time(pair.created_at, window.bucket)
                counts[b] = counts.get(b, 0) + 1
        return [PairBucket(b, n) for b, n in sorted(counts.items())]

    async def pairs_of(self, caller: str, request_id: str) -> list[DPOPair]:
        found: Iterable[DPOPair] = (
            p for (c, a, b), p in self.pairs.items() if c == caller and request_id in (a, b)
        )
        return sorted(found, key=lambda p: (p.updated_at, p.id))

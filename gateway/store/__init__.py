"""The store seam, in small protocols: calls, feedback, ratings, neighbours, statistics, DPO pairs.
Each consumer asks for the smallest one it needs; `Store` is all of them (what an implementation
provides).

Two implementations pass one contract suite (tests/test_store_contract.py): Postgres + pgvector
(`gateway.store.postgres`, production and embedded) and a bounded in-memory store
(`gateway.store.memory`, for ENABLE_PERSISTENCE=false). The types they exchange and the rules both
follow are in `gateway.domain`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Protocol

import numpy as np

from gateway.domain import (
    ArmStats,
    CallRecord,
    Comparison,
    DPOPair,
    Feedback,
    FeedbackOutcome,
    Neighbour,
    RatedCall,
    Rating,
    StoredCall,
    UsageRow,
)


class CallStore(Protocol):
    async def write_calls(self, records: Sequence[CallRecord]) -> None:
        """Idempotent: a call id already stored keeps its first record."""
        ...

    async def get_call(self, request_id: str) -> StoredCall | None: ...

    async def set_embedding(self, request_id: str, embedding: np.ndarray) -> None: ...


class FeedbackStore(Protocol):
    async def add_feedback(self, feedback: Feedback) -> FeedbackOutcome: ...


class RatingStore(Protocol):
    async def rated_since(self, since: datetime, limit: int) -> list[Rating]: ...

    async def embeddings_of(self, request_ids: Sequence[str]) -> dict[str, np.ndarray]: ...


class NeighbourStore(Protocol):
    async def neighbours(
        self,
        embedding: np.ndarray,
        k: int,
        since: datetime,
        threshold: float,
        per_model: list[str] | None = None,
    ) -> list[Neighbour]:
        """Rated calls nearest to `embedding` since `since`: the k nearest (or, with `per_model`,
        the k nearest of each of those models), then those at or above `threshold`, nearest first."""
        ...


class StatsStore(Protocol):
    async def arm_stats(self) -> dict[str, ArmStats]: ...

    async def usage_stats(self, since: datetime) -> list[UsageRow]: ...


class PairStore(Protocol):
    async def pair_candidates(
        self, request_id: str, similarity: float, limit: int = 50
    ) -> tuple[RatedCall | None, list[RatedCall]]: ...

    async def save_pair(self, pair: DPOPair) -> bool: ...

    async def delete_pair(self, a: str, b: str) -> bool: ...


class LogStore(Protocol):
    def iter_calls(self, since: datetime, until: datetime, page: int = 1000) -> AsyncIterator[StoredCall]:
        """Every call created in [since, until), oldest first (ties by id), each with its ratings:
        what off-policy evaluation reads (the calls to evaluate, and the state learned before)."""
        ...


class ExportStore(Protocol):
    def iter_pairs(
        self,
        since: datetime | None,
        min_margin: float,
        after: tuple[datetime, int] | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[DPOPair]: ...

    def iter_comparisons(self, since: datetime | None) -> AsyncIterator[Comparison]: ...


class Store(
    CallStore,
    FeedbackStore,
    RatingStore,
    NeighbourStore,
    StatsStore,
    PairStore,
    ExportStore,
    LogStore,
    Protocol,
):
    async def aclose(self) -> None: ...

    async def ping(self) -> bool: ...

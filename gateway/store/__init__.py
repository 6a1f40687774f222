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
    SpendRow,
    StoredCall,
    ToEmbed,
    UsageRow,
    VirtualKey,
)
from gateway.insights import BucketRow, CallQuery, CallRow, LatencySummary, PairBucket, Window

Key = tuple[str, str]  # a call's key: (caller, request id)


class CallStore(Protocol):
    async def write_calls(self, records: Sequence[CallRecord]) -> int:
        """Idempotent: a call (caller, id) already stored keeps its first record. Returns how many
        records were new."""
        ...

    async def get_call(self, caller: str | None, request_id: str) -> StoredCall | None:
        """That tenant's call (`caller=None`: any tenant's, the newest: for the admin)."""
        ...

    async def set_embedding(self, caller: str, request_id: str, embedding: np.ndarray, embedder: str) -> None:
        """Give the call this embedding (of embedder `embedder`) unless it has one of that id."""
        ...


class FeedbackStore(Protocol):
    async def add_feedback(self, feedback: Feedback) -> FeedbackOutcome: ...


class RatingStore(Protocol):
    async def rated_since(self, since: datetime, limit: int) -> list[Rating]: ...

    async def embeddings_of(self, keys: Sequence[Key], embedder: str) -> dict[Key, np.ndarray]:
        """Those calls' embeddings made by `embedder` (a call with another's has none here)."""
        ...


class NeighbourStore(Protocol):
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
        """That tenant's rated calls nearest to `embedding` since `since`: the k nearest (or, with
        `per_model`, the k nearest of each of those models), then those at or above `threshold`,
        nearest first. Only calls whose embedding `embedder` made (the query's own embedder)."""
        ...


class ReembedStore(Protocol):
    """`llm-router reembed`: rated calls whose embedding is missing or another embedder's."""

    async def to_reembed(self, embedder: str, after: Key | None, limit: int) -> list[ToEmbed]:
        """Up to `limit` such calls past `after`, in key order."""
        ...

    async def set_embeddings(self, embedder: str, items: Sequence[tuple[Key, np.ndarray]]) -> None:
        """set_embedding for many calls at once."""
        ...


class StatsStore(Protocol):
    async def arm_stats(self) -> dict[str, ArmStats]:
        """Every tenant's calls and ratings together, per model."""
        ...

    async def tenant_ratings(self) -> dict[str, dict[str, tuple[int, float]]]:
        """model -> caller -> (rated, score_sum)."""
        ...

    async def usage_stats(self, since: datetime) -> list[UsageRow]: ...


class PairStore(Protocol):
    async def pair_candidates(
        self, caller: str, request_id: str, similarity: float, limit: int = 50, *, embedder: str | None
    ) -> tuple[RatedCall | None, list[RatedCall]]:
        """That call and its candidates for a pair: calls of the same tenant only. Near-identical
        prompts (cosine >= `similarity`) only where both embeddings are `embedder`'s (None: none)."""
        ...

    async def save_pair(self, pair: DPOPair) -> bool: ...

    async def delete_pair(self, caller: str, a: str, b: str) -> bool: ...


class LogStore(Protocol):
    def iter_calls(
        self, since: datetime, until: datetime, caller: str | None = None, page: int = 1000
    ) -> AsyncIterator[StoredCall]:
        """The calls created in [since, until), that tenant's (`caller=None`: every tenant's),
        oldest first (ties by caller, then id), each with its ratings: what off-policy evaluation
        reads (the calls to evaluate, and the state learned before)."""
        ...


class ExportStore(Protocol):
    def iter_pairs(
        self,
        since: datetime | None,
        min_margin: float,
        after: tuple[datetime, int] | None = None,
        limit: int | None = None,
        caller: str | None = None,
    ) -> AsyncIterator[DPOPair]:
        """Pairs of that tenant (`caller=None`: every tenant's)."""
        ...

    def iter_comparisons(
        self, since: datetime | None, caller: str | None = None
    ) -> AsyncIterator[Comparison]: ...


class CallInsights(Protocol):
    """The dashboard's reads of calls (gateway/ui): a filtered page, and aggregates over time."""

    async def list_calls(self, query: CallQuery) -> list[CallRow]:
        """Newest first (created_at, then id, descending), at most `query.limit`."""
        ...

    async def call_buckets(self, window: Window) -> list[BucketRow]:
        """One row per (bucket, model) that has calls, in time order."""
        ...

    async def latency(self, window: Window) -> LatencySummary: ...


class PairInsights(Protocol):
    async def pair_buckets(self, window: Window) -> list[PairBucket]: ...

    async def pairs_of(self, caller: str, request_id: str) -> list[DPOPair]:
        """The DPO pairs a call is in (as chosen or rejected), oldest update first."""
        ...


class KeyStore(Protocol):
    """Virtual keys (issue, rotate, revoke: each a save of the key's new record)."""

    async def save_key(self, key: VirtualKey) -> None:
        """Inserts the key, or replaces the record of the same id."""
        ...

    async def find_key(
        self, *, key_id: str | None = None, key_hash: str | None = None
    ) -> VirtualKey | None: ...

    async def list_keys(self, owner: str | None = None) -> list[VirtualKey]: ...


class SpendStore(Protocol):
    """What a virtual key's calls cost (by `CallRecord.key_id`, whatever tenant they are in; kind
    "call": duels and the judge are the gateway's own spend)."""

    async def spent(self, key_id: str, since: datetime) -> float: ...

    async def spend_by_day(self, key_id: str, since: datetime) -> list[SpendRow]: ...


class Store(
    CallStore,
    FeedbackStore,
    RatingStore,
    NeighbourStore,
    ReembedStore,
    StatsStore,
    PairStore,
    ExportStore,
    LogStore,
    CallInsights,
    PairInsights,
    KeyStore,
    SpendStore,
    Protocol,
):
    async def aclose(self) -> None: ...

    async def ping(self) -> bool: ...

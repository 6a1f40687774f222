"""The store seam: calls, feedback, arm statistics, neighbours, DPO pairs.

Two implementations pass one contract suite (tests/test_store_contract.py): Postgres + pgvector
(`gateway.store.postgres`, production and embedded) and a bounded in-memory store
(`gateway.store.memory`, for ENABLE_PERSISTENCE=false).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import orjson


def utcnow() -> datetime:
    return datetime.now(UTC)


_SPACE = re.compile(r"\s+")


def text_of(content: Any) -> str:
    """The text of a message's content (a string, or the text parts of a content list)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def prompt_hash(messages: Sequence[dict[str, Any]]) -> str:
    """Hash of the normalised conversation: roles and texts, whitespace collapsed, case kept.

    Two calls with the same hash asked the same thing; the DPO miner pairs their answers.
    """
    norm = [(str(m.get("role")), _SPACE.sub(" ", text_of(m.get("content"))).strip()) for m in messages]
    return hashlib.sha256(orjson.dumps(norm)).hexdigest()


@dataclass
class CallRecord:
    id: str
    messages: list[dict[str, Any]]
    requested_model: str
    model: str | None
    status: str  # ok | error | interrupted | cancelled
    http_status: int
    created_at: datetime = field(default_factory=utcnow)
    prompt_hash: str = ""
    embedding: np.ndarray | None = None
    layer: str | None = None
    strategy: str | None = None
    policy: str | None = None
    propensity: float | None = None
    decision: dict[str, Any] = field(default_factory=dict)  # candidates, fallbacks, rule, timings
    attempts: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    stream: bool = False
    overhead_ms: float | None = None
    upstream_ms: float | None = None
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    response: str | None = None
    upstream_model: str | None = None
    caller: str | None = None
    kind: str = "call"  # call | duel | judge
    duel_of: str | None = None
    synthetic: bool = False  # the response is a placeholder no model wrote (replay data without text)

    def __post_init__(self) -> None:
        if not self.prompt_hash:
            self.prompt_hash = prompt_hash(self.messages)


@dataclass(frozen=True)
class Feedback:
    request_id: str
    score: float
    text: str | None = None
    source: str = "user"  # user | app | judge
    created_at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class FeedbackOutcome:
    request_id: str
    model: str | None
    previous: float | None  # the call's effective score before this feedback
    score: float | None  # after (a judge never overrides a human score)
    applied: bool


@dataclass(frozen=True)
class Neighbour:
    request_id: str
    model: str
    score: float
    similarity: float
    created_at: datetime


@dataclass(frozen=True)
class Rating:
    """A call's effective score as of `at` (the linear policy fetches the embeddings it lacks)."""

    request_id: str
    model: str
    score: float
    at: datetime


@dataclass
class ArmStats:
    model: str
    calls: int = 0
    ok_calls: int = 0
    rated: int = 0
    score_sum: float = 0.0
    latency_ms_sum: float = 0.0
    cost_usd_sum: float = 0.0
    completion_tokens_sum: int = 0

    @property
    def mean_score(self) -> float | None:
        return self.score_sum / self.rated if self.rated else None

    @property
    def latency_ms_avg(self) -> float | None:
        return self.latency_ms_sum / self.ok_calls if self.ok_calls else None

    @property
    def completion_tokens_avg(self) -> float | None:
        return self.completion_tokens_sum / self.ok_calls if self.ok_calls else None


@dataclass
class DPOPair:
    """Two real responses to the same (or a near-identical) prompt, by different models, rated apart."""

    prompt_hash: str
    messages: list[dict[str, Any]]
    chosen_id: str
    chosen_model: str
    chosen: str
    chosen_score: float
    rejected_id: str
    rejected_model: str
    rejected: str
    rejected_score: float
    similarity: float = 1.0
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    id: int = 0

    @property
    def margin(self) -> float:
        return self.chosen_score - self.rejected_score

    @property
    def key(self) -> tuple[str, str]:
        a, b = sorted((self.chosen_id, self.rejected_id))
        return a, b


@dataclass(frozen=True)
class RatedCall:
    """A rated call with a real response: what the DPO miner pairs."""

    id: str
    model: str
    messages: list[dict[str, Any]]
    prompt_hash: str
    response: str
    score: float
    similarity: float = 1.0


@dataclass(frozen=True)
class Comparison:
    """Two models' mean scores on one prompt: the raw material of routing labels."""

    messages: list[dict[str, Any]]
    model_a: str
    score_a: float
    model_b: str
    score_b: float


class Store(Protocol):
    async def aclose(self) -> None: ...

    async def ping(self) -> bool: ...

    async def write_calls(self, records: Sequence[CallRecord]) -> None: ...

    async def get_call(self, request_id: str) -> dict[str, Any] | None: ...

    async def add_feedback(self, feedback: Feedback) -> FeedbackOutcome: ...

    async def set_embedding(self, request_id: str, embedding: np.ndarray) -> None: ...

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

    async def rated_since(self, since: datetime, limit: int) -> list[Rating]: ...

    async def embeddings_of(self, request_ids: Sequence[str]) -> dict[str, np.ndarray]: ...

    async def arm_stats(self) -> dict[str, ArmStats]: ...

    async def usage_stats(self, since: datetime) -> list[dict[str, Any]]: ...

    async def pair_candidates(
        self, request_id: str, similarity: float, limit: int = 50
    ) -> tuple[RatedCall | None, list[RatedCall]]: ...

    async def save_pair(self, pair: DPOPair) -> bool: ...

    async def delete_pair(self, a: str, b: str) -> bool: ...

    def iter_pairs(
        self,
        since: datetime | None,
        min_margin: float,
        after: tuple[datetime, int] | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[DPOPair]: ...

    def iter_comparisons(self, since: datetime | None) -> AsyncIterator[Comparison]: ...

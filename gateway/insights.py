"""The read side of the store, for the dashboard: which calls to list, one listed call, and the
aggregates over time both stores compute alike (tests/test_store_contract.py holds them to it).

Like `gateway.domain`, it imports nothing of ours but the domain, so either store may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from gateway.domain import text_of

Bucket = Literal["hour", "day"]
PREVIEW_CHARS = 200  # of a listed call's last message


def floor_time(moment: datetime, bucket: Bucket) -> datetime:
    """The start of the UTC hour or day `moment` falls in (PostgreSQL's date_trunc(..., 'UTC'))."""
    moment = moment.astimezone(UTC)
    if bucket == "day":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return moment.replace(minute=0, second=0, microsecond=0)


def bucket_width(bucket: Bucket) -> timedelta:
    return timedelta(days=1) if bucket == "day" else timedelta(hours=1)


def preview_of(messages: list[dict[str, Any]]) -> str:
    """What a list shows of a call's prompt: the last message's text (its first text part when the
    content is a list), cut to PREVIEW_CHARS. (The Postgres store computes the same in SQL.)"""
    if not messages or not isinstance(messages[-1], dict):
        return ""
    content = messages[-1].get("content")
    if isinstance(content, list):
        first = next((p for p in content if isinstance(p, dict) and p.get("type") == "text"), None)
        content = "" if first is None else str(first.get("text", ""))
    return text_of(content)[:PREVIEW_CHARS]


def prompt_matches(messages: list[dict[str, Any]], needle: str) -> bool:
    """The text search of the calls list: case-insensitive, anywhere in the messages' text."""
    needle = needle.lower()
    return any(needle in text_of(m.get("content")).lower() for m in messages if isinstance(m, dict))


@dataclass(frozen=True)
class Window:
    """A time range, cut into hour or day buckets, optionally of one caller's calls only."""

    since: datetime
    until: datetime
    bucket: Bucket = "hour"
    caller: str | None = None


@dataclass(frozen=True)
class CallQuery:
    """Which calls to list (every field narrows; None leaves it open), newest first."""

    since: datetime | None = None
    until: datetime | None = None
    caller: str | None = None
    model: str | None = None
    layer: str | None = None
    status: str | None = None
    kind: str | None = None
    rated: bool | None = None
    text: str | None = None  # in the prompt, case-insensitive
    id: str | None = None  # a request id, or a trace id
    before: tuple[datetime, str] | None = None  # the page after this (created_at, id), from a cursor
    limit: int = 50


@dataclass(frozen=True)
class CallRow:
    """One line of the calls list."""

    id: str
    created_at: datetime
    kind: str
    caller: str | None
    requested_model: str
    model: str | None
    layer: str | None
    status: str
    http_status: int
    stream: bool
    overhead_ms: float | None
    upstream_ms: float | None
    cost_usd: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    score: float | None
    trace_id: str | None
    preview: str

    @property
    def cursor(self) -> tuple[datetime, str]:
        return self.created_at, self.id


@dataclass(frozen=True)
class BucketRow:
    """One model's calls in one time bucket. Requests, errors, ratings and the routing counts are
    of client calls (kind "call"); `side_cost_usd` is what duels and judge calls spent besides."""

    bucket: datetime
    model: str | None
    requests: int
    errors: int
    routed: int  # chosen by the router (any layer but "explicit")
    explored: int  # of those, uniform EXPLORATION_RATE picks
    rated: int
    score_sum: float
    cost_usd: float
    side_cost_usd: float


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles (linear interpolation, as percentile_cont) over the answered client calls:
    latency is the gateway's time plus the upstream's, overhead the gateway's alone."""

    answered: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    overhead_p50_ms: float | None
    overhead_p99_ms: float | None


@dataclass(frozen=True)
class PairBucket:
    bucket: datetime
    pairs: int  # DPO pairs created in the bucket

"""The domain: what a call, a rating, an arm's statistics and a DPO pair are, and the pure rules
every store and the router share. It imports nothing of ours, so anything may import it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson


def utcnow() -> datetime:
    return datetime.now(UTC)


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
    # " ".join(t.split()) collapses whitespace as re "\s+" and strips (str.isspace is re's \s): 3x cheaper
    norm = [(str(m.get("role")), " ".join(text_of(m.get("content")).split())) for m in messages]
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
    # The tenant (gateway.auth.Caller.tenant): a virtual key's owner, an environment client key's
    # id on a gateway that requires keys, "" on an open one. A call's key is (caller, id): each
    # tenant has its own request ids, ratings and DPO pairs.
    caller: str = ""
    kind: str = "call"  # call | duel | judge
    duel_of: str | None = None
    synthetic: bool = False  # the response is a placeholder no model wrote (replay data without text)
    trace_id: str | None = None  # the OpenTelemetry trace of the call (32 hex digits), when traced
    key_id: str | None = None  # the virtual key the call was made with: its budgets' ledger
    # The id of the embedder that made `embedding`: only embeddings of the current embedder's id
    # are ever compared with new ones (gateway/embedders).
    embedder: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt_hash:
            self.prompt_hash = prompt_hash(self.messages)

    @property
    def counts_for_arm(self) -> bool:
        """Whether the call moves its model's statistics: a judge's short verdicts say nothing of
        the model that wrote them."""
        return self.model is not None and self.kind != "judge"


_FIELDS = frozenset(CallRecord.__dataclass_fields__)


def encode_record(rec: CallRecord) -> tuple[bytes, bytes | None]:
    """A record as bytes for the spool: JSON, and the embedding's float32 bytes beside it."""
    data = {name: getattr(rec, name) for name in _FIELDS if name != "embedding"}
    data["created_at"] = rec.created_at.isoformat()
    body = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    emb = None if rec.embedding is None else np.asarray(rec.embedding, dtype=np.float32).tobytes()
    return body, emb


def decode_record(body: bytes, emb: bytes | None) -> CallRecord:
    data = {k: v for k, v in orjson.loads(body).items() if k in _FIELDS}
    data["created_at"] = datetime.fromisoformat(data["created_at"])
    data["embedding"] = None if emb is None else np.frombuffer(emb, dtype=np.float32).copy()
    return CallRecord(**data)


@dataclass(frozen=True)
class Feedback:
    request_id: str
    score: float
    text: str | None = None
    source: str = "user"  # user | app | judge
    created_at: datetime = field(default_factory=utcnow)
    caller: str = ""  # the tenant whose call this rates


def feedback_applies(source: str, previous_source: str | None) -> bool:
    """A rating becomes the call's score unless a judge would override a human's."""
    return source != "judge" or previous_source in (None, "judge")


@dataclass(frozen=True)
class FeedbackOutcome:
    request_id: str
    model: str | None
    previous: float | None  # the call's effective score before this feedback
    score: float | None  # after (a judge never overrides a human score)
    applied: bool


@dataclass(frozen=True)
class FeedbackEntry:
    score: float
    feedback_text: str | None
    source: str
    created_at: datetime


@dataclass
class StoredCall:
    """A call as a store keeps it: the record, its effective score, and every rating it got."""

    record: CallRecord
    score: float | None = None
    score_source: str | None = None
    score_at: datetime | None = None
    feedback: list[FeedbackEntry] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        rec = self.record
        out = {name: getattr(rec, name) for name in rec.__dataclass_fields__}
        out["embedding"] = None if rec.embedding is None else np.asarray(rec.embedding).tolist()
        out.update(score=self.score, score_source=self.score_source, score_at=self.score_at)
        out["feedback"] = [vars(f) for f in self.feedback]
        return out


@dataclass(frozen=True)
class ToEmbed:
    """A rated call to embed again (`llm-router reembed`): its key and its conversation."""

    caller: str
    request_id: str
    messages: list[dict[str, Any]]

    @property
    def key(self) -> tuple[str, str]:
        return self.caller, self.request_id


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
    caller: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return self.caller, self.request_id


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

    def add_call(self, rec: CallRecord) -> None:
        """A call of this arm (see `CallRecord.counts_for_arm`)."""
        self.calls += 1
        if rec.status == "ok":
            self.ok_calls += 1
            self.latency_ms_sum += rec.upstream_ms or 0.0
            self.cost_usd_sum += rec.cost_usd or 0.0
            self.completion_tokens_sum += rec.completion_tokens or 0

    def add_rating(self, score: float, previous: float | None) -> None:
        """A call of this arm got `score`; a re-rating (`previous` set) moves the sum only."""
        rated, moved = rating_delta(score, previous)
        self.rated += rated
        self.score_sum += moved


def rating_delta(score: float, previous: float | None) -> tuple[int, float]:
    """What a rating adds to an arm's (rated, score_sum)."""
    return (1 if previous is None else 0), score - (previous or 0.0)


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
    caller: str = ""  # pairs are mined within one tenant's calls

    @property
    def margin(self) -> float:
        return self.chosen_score - self.rejected_score

    @property
    def key(self) -> tuple[str, str]:
        a, b = sorted((self.chosen_id, self.rejected_id))
        return a, b

    def same_preference(self, other: DPOPair) -> bool:
        """Saving `other` over this pair would change nothing a trainer reads."""
        return (
            self.chosen_id,
            self.chosen_score,
            self.rejected_score,
            self.chosen,
            self.rejected,
        ) == (other.chosen_id, other.chosen_score, other.rejected_score, other.chosen, other.rejected)


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

    @classmethod
    def of(cls, rec: CallRecord, score: float | None, similarity: float = 1.0) -> RatedCall | None:
        """The call as pair material, or None if it cannot be in a pair: unrated, failed, without
        a model or a response, or a placeholder no model wrote. (PostgresStore's `_PAIRABLE` is the
        same rule in SQL.)"""
        if score is None or rec.model is None or not rec.response or rec.status != "ok" or rec.synthetic:
            return None
        return cls(rec.id, rec.model, rec.messages, rec.prompt_hash, rec.response, score, similarity)


@dataclass(frozen=True)
class Comparison:
    """Two models' mean scores on one prompt: the raw material of routing labels."""

    messages: list[dict[str, Any]]
    model_a: str
    score_a: float
    model_b: str
    score_b: float


@dataclass(frozen=True)
class UsageRow:
    """One model's traffic over a window (/v1/stats)."""

    model: str
    requests: int
    errors: int
    latency_ms_avg: float | None
    cost_usd: float
    feedback_count: int
    feedback_avg: float | None


@dataclass(frozen=True)
class VirtualKey:
    """A client key issued by the gateway (`llm-router keys`, `/v1/keys`). Only a hash of its secret
    is stored; calls made with it are recorded under its `id`, which survives rotation."""

    id: str  # vk_<hex>, public
    owner: str  # the tenant it belongs to
    key_hash: str  # sha256 of the secret
    prefix: str  # the secret's first characters, to recognise it in a list
    name: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    models: tuple[str, ...] | None = None  # catalogue and virtual models it may use (None: all)
    rpm: int | None = None  # None: the gateway's RATE_LIMIT_RPM; 0: none
    tpm: int | None = None
    budget_day_usd: float | None = None
    budget_month_usd: float | None = None
    budget_total_usd: float | None = None

    def status(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def public(self, now: datetime) -> dict[str, Any]:
        """What the admin API and the CLI show: everything but the hash."""
        out = {k: v for k, v in self.__dict__.items() if k != "key_hash"}
        out["models"] = list(self.models) if self.models is not None else None
        out["status"] = self.status(now)
        return out


@dataclass(frozen=True)
class SpendRow:
    """One caller's calls on one UTC day with one model."""

    day: str  # YYYY-MM-DD
    model: str | None
    requests: int
    cost_usd: float
    prompt_tokens: int
    completion_tokens: int

"""The gateway's evaluation part, behind `POST /v1/evaluate`: what a request may ask, and one
evaluation at a time, its logs read on the event loop and its deciding and estimating (CPU work)
on a worker thread with an event loop of its own."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.config import Settings
from gateway.domain import utcnow
from gateway.embedder import Embedder
from gateway.errors import ServiceUnavailable
from gateway.evaluation.candidate import candidate
from gateway.evaluation.run import Question, Report, compute, load, vectors
from gateway.store import LogStore

MAX_CANDIDATES = 20


class CandidateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, max_length=200)
    settings: dict[str, Any] = Field(default_factory=dict, max_length=50)


class EvaluateBody(BaseModel):
    """POST /v1/evaluate. Times are ISO 8601 (UTC unless they say otherwise)."""

    model_config = ConfigDict(extra="forbid")
    since: datetime
    until: datetime | None = None
    caller: str | None = Field(default=None, max_length=64)
    train_since: datetime | None = None
    candidates: list[CandidateBody] = Field(default_factory=list, max_length=MAX_CANDIDATES)
    confidence: float = Field(default=0.9, gt=0.5, lt=1)
    interval: Literal["clt", "bootstrap"] = "clt"
    min_propensity: float = Field(default=0.01, gt=0, lt=1)
    include_current: bool = True
    max_calls: int = Field(default=100_000, ge=2, le=1_000_000)

    @field_validator("since", "until", "train_since")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)

    def question(self) -> Question:
        return Question(
            since=self.since,
            until=self.until or utcnow(),
            candidates=[candidate(c.name, c.settings) for c in self.candidates],
            caller=self.caller,
            train_since=self.train_since,
            confidence=self.confidence,
            interval=self.interval,
            min_propensity=self.min_propensity,
            max_calls=self.max_calls,
            include_current=self.include_current,
        )


class Evaluator:
    def __init__(self, settings: Settings, store: LogStore, embedder: Embedder | None) -> None:
        self.settings = settings
        self.store = store
        self.embedder = embedder
        self.lock = asyncio.Lock()

    async def evaluate(self, question: Question) -> Report:
        if self.lock.locked():
            raise ServiceUnavailable(
                "an evaluation is already running; try again when it is done",
                code="evaluation_running",
                headers={"retry-after": "10"},
            )
        async with self.lock:
            loaded = await load(self.store, self.settings, question)
            vecs = await vectors(loaded, self.settings, question, self.embedder)
            return await asyncio.to_thread(
                lambda: asyncio.run(compute(loaded, self.settings, question, vecs))
            )

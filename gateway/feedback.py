"""The learning loop: a rating, durable first, then what it teaches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gateway import dpo
from gateway.config import Settings
from gateway.domain import Feedback
from gateway.embedder import Embedder, routing_text
from gateway.store import CallStore, FeedbackStore, PairStore


class FeedbackMeter(Protocol):
    def rated(self, model: str | None, source: str, score: float, pairs: int) -> None: ...


class Queue(Protocol):
    def has(self, caller: str, request_id: str) -> bool: ...

    async def wait_written(self, caller: str, request_id: str, timeout: float) -> None: ...  # noqa: ASYNC109


class Observer(Protocol):
    def observe_feedback(
        self,
        caller: str,
        request_id: str,
        model: str,
        score: float,
        previous: float | None,
        embedding: np.ndarray | None,
    ) -> None: ...


class LearnerStore(CallStore, FeedbackStore, PairStore, Protocol):
    """What learning reads and writes."""


@dataclass(frozen=True)
class Learned:
    """What a rating did (the body of POST /feedback)."""

    status: str
    request_id: str
    model: str | None
    score: float | None
    previous_score: float | None
    applied: bool  # False: a judge's verdict where a human had rated
    pairs: int  # DPO pairs created or updated


class Learner:
    def __init__(
        self,
        settings: Settings,
        store: LearnerStore,
        recorder: Queue,
        router: Observer,
        metrics: FeedbackMeter,
        embedder: Embedder | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.recorder = recorder
        self.router = router
        self.metrics = metrics
        self.embedder = embedder

    async def learn(self, feedback: Feedback) -> Learned:
        """Feedback, durable first; then what it teaches: the arm's global statistics (at once),
        the call's embedding for future neighbour searches (computed now if routing did not), and
        DPO pairs with other answers to the same prompt."""
        caller = feedback.caller
        if self.recorder.has(caller, feedback.request_id):
            # The call is still on its way to the database: wait for it (503 if it does not come).
            await self.recorder.wait_written(caller, feedback.request_id, self.settings.store_timeout_s)
        outcome = await self.store.add_feedback(feedback)
        pairs = 0
        if outcome.applied and outcome.model is not None and outcome.score is not None:
            embedding = await self._embedding_of(caller, outcome.request_id)
            self.router.observe_feedback(
                caller, outcome.request_id, outcome.model, outcome.score, outcome.previous, embedding
            )
            pairs = await dpo.mine(
                self.store,
                caller,
                outcome.request_id,
                similarity=self.settings.dpo_similarity,
                min_margin=self.settings.dpo_min_margin,
                embedder=self.embedder.id if self.embedder is not None else None,
            )
        self.metrics.rated(outcome.model, feedback.source, feedback.score, pairs)
        return Learned(
            "ok", outcome.request_id, outcome.model, outcome.score, outcome.previous, outcome.applied, pairs
        )

    async def _embedding_of(self, caller: str, request_id: str) -> np.ndarray | None:
        """The call's embedding by the current embedder: the stored one if that embedder made it;
        else (none stored, or another embedder's) computed now and stored in its place."""
        if self.embedder is None:
            return None
        stored = await self.store.get_call(caller, request_id)
        if stored is None:
            return None
        record = stored.record
        if record.embedding is not None and record.embedder == self.embedder.id:
            return np.asarray(record.embedding, dtype=np.float32)
        text = routing_text(record.messages, self.settings.embedding_max_chars)
        if not text:
            return None
        embedding = (await self.embedder.embed([text]))[0]
        await self.store.set_embedding(caller, request_id, embedding, self.embedder.id)
        return embedding

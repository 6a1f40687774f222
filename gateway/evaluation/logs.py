"""The logs an evaluation reads: the window's rated calls, decided again by each candidate, and
the state learned before the window (a snapshot of the calls and ratings as they stood then, in
an in-memory store that the candidate's router reads as it would read the real one)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from gateway.domain import Feedback, StoredCall
from gateway.routing import RouteContext
from gateway.store.memory import MemoryStore
from gateway.wire import tokens_of


@dataclass(frozen=True)
class LoggedCall:
    """One rated call of the window, as an off-policy estimator sees it."""

    id: str
    created_at: datetime
    context: RouteContext
    embedding: np.ndarray | None
    embedder: str | None  # the id of the embedder that made `embedding`
    arm: str  # the logging policy's pick (the record's `model` is who answered, after fallbacks)
    propensities: dict[str, float]  # the logging policy's, for every arm it could pick
    propensity_error: float
    unavailable: frozenset[str]
    score: float
    cost_usd: float
    prompt_tokens: int  # as the upstream counted them (else the gateway's estimate)
    completion_tokens: int | None
    layer: str | None


@dataclass
class Window:
    """The calls an evaluation is about, and why others were left out."""

    calls: list[LoggedCall]
    skipped: dict[str, int]


def logged_call(stored: StoredCall) -> LoggedCall | str:
    """The call as evaluation reads it, or why it cannot be evaluated."""
    rec = stored.record
    if stored.score is None:
        return "unrated"
    decision = rec.decision or {}
    props = decision.get("propensities")
    arm = decision.get("arm")
    if not props or arm is None:
        return "no propensities (recorded before they were, or by a policy that gives none)"
    if props.get(arm, 0.0) <= 0:
        return "logged pick without a propensity"
    context = decision.get("context") or {
        "prompt_tokens": tokens_of([len(str(m.get("content", ""))) for m in rec.messages])
    }
    ctx = RouteContext.from_logged(rec.id, rec.requested_model, rec.messages, context, tenant=rec.caller)
    return LoggedCall(
        id=rec.id,
        created_at=rec.created_at,
        context=ctx,
        embedding=None if rec.embedding is None else np.asarray(rec.embedding, dtype=np.float32),
        embedder=rec.embedder,
        arm=arm,
        propensities={str(k): float(v) for k, v in props.items()},
        propensity_error=float(decision.get("propensity_error", 0.0)),
        unavailable=frozenset(decision.get("unavailable", ())),
        score=float(stored.score),
        cost_usd=float(rec.cost_usd or 0.0),
        prompt_tokens=int(rec.prompt_tokens or ctx.prompt_tokens),
        completion_tokens=rec.completion_tokens,
        layer=rec.layer,
    )


async def split(
    calls: AsyncIterator[StoredCall], since: datetime, caller: str | None
) -> tuple[Window, list[StoredCall]]:
    """The window (calls from `since` on, of `caller` if given; every kind but the duels' and
    the judge's) and everything before it (every caller, every kind: what the gateway learned)."""
    window: list[LoggedCall] = []
    skipped: dict[str, int] = {}
    before: list[StoredCall] = []
    async for stored in calls:
        rec = stored.record
        if rec.created_at < since:
            before.append(stored)
            continue
        if rec.kind != "call" or (caller is not None and rec.caller != caller):
            continue
        found = logged_call(stored)
        if isinstance(found, str):
            skipped[found] = skipped.get(found, 0) + 1
        else:
            window.append(found)
    return Window(window, skipped), before


async def snapshot(calls: Iterable[StoredCall], at: datetime) -> MemoryStore:
    """The calls created before `at`, with the ratings given before `at` (replayed in order, so
    that the effective score and the arm statistics are as the store had them then)."""
    calls = [c for c in calls if c.record.created_at < at]
    store = MemoryStore(max_calls=max(1, len(calls)))
    await store.write_calls([c.record for c in calls])
    ratings = sorted(
        (
            (f.created_at, c.record.caller, c.record.id, f)
            for c in calls
            for f in c.feedback
            if f.created_at < at
        ),
        key=lambda r: (r[0], r[1], r[2]),
    )
    for _, caller, request_id, f in ratings:  # each rating is its tenant's (its call's caller)
        await store.add_feedback(
            Feedback(request_id, f.score, f.feedback_text, f.source, f.created_at, caller=caller)
        )
    return store

"""`llm-router reembed`: after a change of EMBEDDER, embed the stored rated calls again with the
current embedder, so that the policies learn from them at once (without it they only learn from
calls rated after the switch: no search ever compares vectors of two embedders).

It reads rated calls whose embedding is missing or another embedder's, in key order, a batch at a
time, embeds their routing text (as routing does) off the event loop, and writes vector and id
together. Safe to stop and run again (it resumes with what is still stale), and beside a running
gateway (a gateway absorbs re-embedded ratings at its next start).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gateway.embedder import Encoder, routing_text
from gateway.store import Key, ReembedStore


@dataclass(frozen=True)
class Reembedded:
    embedded: int  # calls that now carry the current embedder's vector
    skipped: int  # calls without a user text to embed (they keep what they had)


async def reembed(
    store: ReembedStore,
    encoder: Encoder,
    max_chars: int,
    *,
    batch: int = 256,
    progress: Callable[[int], object] | None = None,
) -> Reembedded:
    after: Key | None = None
    embedded = skipped = 0
    while True:
        calls = await store.to_reembed(encoder.id, after, batch)
        if not calls:
            return Reembedded(embedded, skipped)
        after = calls[-1].key
        texts = [routing_text(c.messages, max_chars) for c in calls]
        todo = [(c.key, t) for c, t in zip(calls, texts, strict=True) if t]
        skipped += len(calls) - len(todo)
        if todo:
            vectors: np.ndarray = await asyncio.to_thread(encoder.encode, [t for _, t in todo])
            await store.set_embeddings(
                encoder.id, [(key, v) for (key, _), v in zip(todo, vectors, strict=True)]
            )
            embedded += len(todo)
        if progress is not None:
            progress(len(calls))

"""The embedder seam: what routing embeds (`routing_text`), and what an embedder is (`Embedder`).

Implementations live in `gateway.embedders` (chosen by EMBEDDER, by name): a static embedder
distilled from the packaged all-MiniLM-L6-v2 (the default: a lookup-and-sum, run inline), and
all-MiniLM-L6-v2 itself on ONNX Runtime (on a batching worker thread).

Every embedder has an `id`; every stored embedding carries the id of the embedder that made it, and
nothing compares embeddings of different ids (two embedders' vectors live in different spaces).

What is embedded (`routing_text`): the text of the conversation's user messages, oldest first,
joined by newlines; system, assistant and tool messages are left out (a system prompt is the same
for every request of an app and would drown the signal). Text parts of multi-part contents count;
images do not. Longer than EMBEDDING_MAX_CHARS (default 1000, about MiniLM's 256-token window),
the text is cut from the start, so the newest words are kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gateway.domain import text_of

DIM = 384


def routing_text(messages: Sequence[dict[str, Any]], max_chars: int = 1000) -> str:
    text = "\n".join(
        t for m in messages if m.get("role") == "user" and (t := text_of(m.get("content")).strip())
    )
    return text[-max_chars:] if len(text) > max_chars else text


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class VectorCache:
    """The embedders' LRU cache of vectors by text, with its hit and miss counters (size 0: off)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, text: str) -> np.ndarray | None:
        vector = self.vectors.get(text)
        if vector is None:
            self.misses += 1
            return None
        self.hits += 1
        self.vectors.move_to_end(text)
        return vector

    def put(self, text: str, vector: np.ndarray) -> None:
        if self.size <= 0:
            return
        self.vectors[text] = vector
        self.vectors.move_to_end(text)
        while len(self.vectors) > self.size:
            self.vectors.popitem(last=False)

    def prime(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Known embeddings (the lab precomputes a data set's in one batch)."""
        for text, vector in zip(texts, vectors, strict=True):
            self.put(text, vector)

    def stats(self) -> CacheStats:
        return CacheStats(self.hits, self.misses)


class Embedder(Protocol):
    @property
    def id(self) -> str:
        """Which embedder made a vector (stored with it): vectors of different ids never meet."""
        ...

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), DIM) float32, each row L2-normalised; deterministic per text."""
        ...

    def cache_stats(self) -> CacheStats | None:
        """The cache's counters, for /metrics (None: no cache)."""
        ...

    async def aclose(self) -> None: ...


class Encoder(Protocol):
    """An embedder's model, synchronous (the lab and `llm-router reembed` encode many texts at once)."""

    id: str

    def encode(self, texts: list[str]) -> np.ndarray: ...

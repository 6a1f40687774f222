"""The memory store's neighbour index: rated calls' embeddings in one growable matrix."""

from __future__ import annotations

import numpy as np

from gateway.domain import CallRecord
from gateway.store import Key


class VectorIndex:
    """Rated calls' embeddings in one growable matrix, with their models, tenants, embedders and
    times: a neighbour search is a few numpy operations, and a new rating appends a row (amortised
    O(1))."""

    def __init__(self) -> None:
        self.ids: list[Key] = []
        self.rows: dict[Key, int] = {}
        self.matrix = np.zeros((0, 384), dtype=np.float32)
        self.models = np.zeros(0, dtype=object)
        self.callers = np.zeros(0, dtype=object)
        self.embedders = np.zeros(0, dtype=object)
        self.times = np.zeros(0, dtype=np.float64)
        self.gone: set[int] = set()

    def add(self, rec: CallRecord) -> None:
        key = (rec.caller, rec.id)
        if key in self.rows or rec.embedding is None or rec.model is None:
            return
        n = len(self.ids)
        if n == len(self.matrix):
            size = max(64, 2 * n)
            matrix = np.zeros((size, len(rec.embedding)), dtype=np.float32)
            matrix[:n] = self.matrix[:n]
            models = np.zeros(size, dtype=object)
            models[:n] = self.models[:n]
            callers = np.zeros(size, dtype=object)
            callers[:n] = self.callers[:n]
            embedders = np.zeros(size, dtype=object)
            embedders[:n] = self.embedders[:n]
            times = np.zeros(size, dtype=np.float64)
            times[:n] = self.times[:n]
            self.matrix, self.models, self.callers, self.times = matrix, models, callers, times
            self.embedders = embedders
        self.matrix[n] = rec.embedding
        self.models[n] = rec.model
        self.callers[n] = rec.caller
        self.embedders[n] = rec.embedder
        self.times[n] = rec.created_at.timestamp()
        self.rows[key] = n
        self.ids.append(key)

    def remove(self, key: Key) -> None:
        row = self.rows.pop(key, None)
        if row is not None:
            self.gone.add(row)

"""Layer 1 (keyword rules, microseconds) and semantic routes (one matrix product on the embedding)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from gateway.catalogue import Rule, SemanticRoute
from gateway.embedder import Embedder


class KeywordRules:
    """Ordered rules; the first whose pattern (or one of whose whole-word keywords) matches wins."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        # The pattern is compiled on its own (it may carry inline flags such as (?s)), the keywords
        # as one alternation of whole words.
        self.rules: list[tuple[Rule, list[re.Pattern[str]]]] = []
        for rule in rules:
            patterns = []
            if rule.pattern:
                patterns.append(re.compile(rule.pattern, re.IGNORECASE))
            if rule.keywords:
                words = "|".join(re.escape(k) for k in rule.keywords)
                patterns.append(re.compile(r"\b(?:" + words + r")\b", re.IGNORECASE))
            self.rules.append((rule, patterns))

    def match(self, text: str) -> Rule | None:
        for rule, patterns in self.rules:
            if any(p.search(text) for p in patterns):
                return rule
        return None


class SemanticRoutes:
    """Named routes with example utterances, embedded once at start."""

    def __init__(self, routes: Sequence[SemanticRoute], matrix: np.ndarray, owners: np.ndarray) -> None:
        self.routes = list(routes)
        self.matrix = matrix  # (utterances, 384), normalised
        self.owners = owners  # route index of each utterance

    @classmethod
    async def build(cls, routes: Sequence[SemanticRoute], embedder: Embedder) -> SemanticRoutes:
        texts = [u for r in routes for u in r.utterances]
        owners = np.array([i for i, r in enumerate(routes) for _ in r.utterances], dtype=np.int64)
        matrix = await embedder.embed(texts) if texts else np.zeros((0, 384), dtype=np.float32)
        return cls(routes, matrix, owners)

    def match(self, embedding: np.ndarray) -> tuple[SemanticRoute, float] | None:
        """The route with the best similarity among those whose threshold it passes."""
        if not self.routes:
            return None
        sims = self.matrix @ embedding
        best = np.full(len(self.routes), -np.inf)
        np.maximum.at(best, self.owners, sims)
        passing = [(float(best[i]), i) for i, r in enumerate(self.routes) if best[i] >= r.threshold]
        if not passing:
            return None
        sim, i = max(passing)
        return self.routes[i], sim

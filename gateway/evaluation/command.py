"""`llm-router evaluate`: the evaluation on the gateway's own database, from the command line: a
progress bar, the table on the terminal, report.json and evaluation.png in --out."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gateway.config import Settings
from gateway.domain import utcnow
from gateway.embedder import CacheStats, Embedder
from gateway.embedders import ServedEmbedder, embedder_id, load_embedder
from gateway.errors import GatewayError, InvalidRequest
from gateway.evaluation.candidate import Candidate, candidate
from gateway.evaluation.estimators import Method
from gateway.evaluation.report import plot, table
from gateway.evaluation.run import Question, Report, candidates_of, compute, load, vectors


def parse_time(value: str, what: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidRequest(f"{what} must be an ISO 8601 time, got {value!r}", param=what) from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_candidate(spec: str) -> Candidate:
    """`[NAME:] KEY=VALUE [KEY=VALUE ...]`, e.g. `cheap: COST_WEIGHT=-0.8 EXPLORATION_RATE=0`
    (values are JSON when they parse as JSON: numbers, true/false; otherwise text)."""
    name: str | None = None
    head, sep, rest = spec.partition(":")
    if sep and "=" not in head:
        name, spec = head.strip() or None, rest
    overrides: dict[str, Any] = {}
    for item in shlex.split(spec):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise InvalidRequest(f"a candidate is [NAME:] KEY=VALUE ..., got {item!r}", param="candidate")
        overrides[key] = _value(value)
    return candidate(name, overrides)


def load_candidates(path: str) -> list[Candidate]:
    """A JSON or YAML list of {name, settings}, as the admin endpoint takes them."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, list):
        raise InvalidRequest(f"{path}: expected a list of {{name, settings}}", param="candidates")
    out = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("settings", {}), dict):
            raise InvalidRequest(f"{path}: each candidate is {{name, settings}}", param="candidates")
        out.append(candidate(item.get("name"), item.get("settings", {})))
    return out


class LazyEmbedder:
    """The embedding model, loaded only if the logs lack an embedding a candidate needs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.id = embedder_id(settings)
        self.model: ServedEmbedder | None = None

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.model is None:
            self.model = await load_embedder(self.settings)  # the configured EMBEDDER
        return await self.model.embed(texts)

    def cache_stats(self) -> CacheStats | None:
        return None

    async def aclose(self) -> None:
        if self.model is not None:
            await self.model.aclose()


async def evaluate_store(settings: Settings, question: Question, *, show_progress: bool = True) -> Report:
    from tqdm import tqdm

    from gateway.store.factory import open_store

    async with open_store(settings) as store:
        loaded = await load(store, settings, question)
    embedder: Embedder = LazyEmbedder(settings)
    try:
        vecs = await vectors(loaded, settings, question, embedder)
    finally:
        await embedder.aclose()
    total = len(loaded.window.calls) * len(candidates_of(question))
    with tqdm(total=total, desc="deciding", unit=" calls", disable=not show_progress, leave=False) as bar:
        return await compute(loaded, settings, question, vecs, lambda n: bar.update())


def run(settings: Settings, args: Any) -> int:
    try:
        candidates = [parse_candidate(c) for c in args.candidate]
        if args.candidates:
            candidates += load_candidates(args.candidates)
        method: Method = args.interval
        question = Question(
            since=parse_time(args.since, "since"),
            until=parse_time(args.until, "until") if args.until else utcnow(),
            candidates=candidates,
            caller=args.caller,
            train_since=parse_time(args.train_since, "train_since") if args.train_since else None,
            confidence=args.confidence,
            interval=method,
            min_propensity=args.min_propensity,
            include_current=not args.no_current,
        )
        report = asyncio.run(evaluate_store(settings, question))
    except GatewayError as exc:
        print(f"llm-router evaluate: {exc.message}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("out") / f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report.as_dict(), indent=2, default=str))
    figure = plot(report, out / "evaluation.png")
    print(table(report))
    print(f"\nreport: {out / 'report.json'}  plot: {figure}")
    return 0

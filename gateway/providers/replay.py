"""The `replay` provider: an upstream that answers from a replay file, and the file's loader.

Replay files hold per-prompt x per-model outcomes of real evaluations, in one JSONL format:

    {"id": str, "task": str, "messages": [...],
     "outcomes": {MODEL: {"score": 0..1, "cost_usd": float|null, "response": str|null,
                          "prompt_tokens": int|null, "completion_tokens": int|null}}}

beside it, optionally, NAME.models.json (`{"models": [{"name", "input_usd_per_mtok",
"output_usd_per_mtok"}]}`). Any file in this format works, not only the shipped ones.

A request is matched to its record by `metadata.replay_id` when the caller gives it (the lab does),
else by the prompt (the normalised conversation hash). The answer is the model's recorded response,
or a placeholder marked as such (`x_replay.placeholder`, and the call record's `synthetic` flag)
when the data set has none; usage comes from the recorded token counts, so the gateway prices the
call from its catalogue as it does for any upstream. It answers at once: replay data has no latency.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from gateway.catalogue import ModelSpec
from gateway.domain import prompt_hash, text_of
from gateway.providers import ProviderError


class ReplayFileError(ValueError):
    """A replay file that cannot be read: missing, not JSONL, or not in the format above."""


@dataclass(frozen=True)
class Outcome:
    score: float
    cost_usd: float | None
    response: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass(frozen=True)
class Record:
    id: str
    task: str
    messages: list[dict[str, Any]]
    outcomes: dict[str, Outcome]

    @property
    def prompt_hash(self) -> str:
        return prompt_hash(self.messages)


@dataclass
class ReplayData:
    path: Path
    records: list[Record]
    models: list[str]
    prices: dict[str, tuple[float, float]] = field(default_factory=dict)  # $/Mtok in, out

    def __post_init__(self) -> None:
        self.by_id = {r.id: r for r in self.records}
        self.by_prompt: dict[str, Record] = {}
        for r in self.records:
            self.by_prompt.setdefault(r.prompt_hash, r)  # a prompt that occurs twice answers as its first

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(".jsonl")

    def scores(self) -> np.ndarray:
        """(records, models) matrix of scores."""
        return np.array([[r.outcomes[m].score for m in self.models] for r in self.records], dtype=np.float64)

    def costs(self) -> np.ndarray:
        """(records, models) matrix of USD costs (from the data; priced from the catalogue if missing)."""
        return np.array([[self.cost(r, m) for m in self.models] for r in self.records], dtype=np.float64)

    def cost(self, record: Record, model: str) -> float:
        o = record.outcomes[model]
        if o.cost_usd is not None:
            return o.cost_usd
        p_in, p_out = self.prices.get(model, (0.0, 0.0))
        return ((o.prompt_tokens or 0) * p_in + (o.completion_tokens or 0) * p_out) / 1e6

    def context_window(self) -> int:
        """A window that holds the file's longest prompt (as the gateway estimates it) and an
        answer: the data set says nothing of the real models' windows, and a replay answers only
        the file's prompts."""
        longest = max(sum(len(text_of(m.get("content"))) // 4 + 4 for m in r.messages) for r in self.records)
        return max(8192, longest + 4096)

    def catalogue(self, replay_file: str | None = None) -> list[ModelSpec]:
        """One `replay` model per model of the file, priced as the file says, with what a replay
        can honestly do: chat and streaming (the data holds text answers only: no tool calls, no
        JSON mode, no images)."""
        window = self.context_window()
        specs = []
        for m in self.models:
            p_in, p_out = self.prices.get(m, (0.0, 0.0))
            specs.append(
                ModelSpec(
                    name=m,
                    provider="replay",
                    replay_file=replay_file or str(self.path),
                    input_usd_per_mtok=p_in,
                    output_usd_per_mtok=p_out,
                    context_window=window,
                    capabilities=frozenset({"chat", "streaming"}),
                )
            )
        return specs


def _iter_lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ReplayFileError(f"{path}:{n}: not JSON ({exc})") from exc


def load(path: str | Path) -> ReplayData:
    path = Path(path)
    if not path.is_file():
        raise ReplayFileError(f"replay file {str(path)!r} does not exist (or is not a file)")
    records: list[Record] = []
    models: list[str] = []
    for n, raw in enumerate(_iter_lines(path), 1):
        try:
            outcomes = {
                m: Outcome(
                    float(o["score"]),
                    o.get("cost_usd"),
                    o.get("response"),
                    o.get("prompt_tokens"),
                    o.get("completion_tokens"),
                )
                for m, o in raw["outcomes"].items()
            }
            record = Record(str(raw["id"]), str(raw.get("task", "")), list(raw["messages"]), outcomes)
        except (KeyError, TypeError, ValueError) as exc:
            raise ReplayFileError(f"{path}:{n}: not a replay record ({type(exc).__name__}: {exc})") from exc
        if not models:
            models = list(outcomes)
        missing = set(models) - set(outcomes)
        if missing:
            raise ReplayFileError(f"{path}:{n}: record {record.id} has no outcome for {sorted(missing)}")
        records.append(record)
    if not records:
        raise ReplayFileError(f"{path}: no records")
    prices: dict[str, tuple[float, float]] = {}
    meta = path.with_name(path.name.removesuffix(".jsonl") + ".models.json")
    if meta.is_file():
        try:
            for m in orjson.loads(meta.read_bytes()).get("models", []):
                prices[m["name"]] = (
                    float(m.get("input_usd_per_mtok") or 0.0),
                    float(m.get("output_usd_per_mtok") or 0.0),
                )
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ReplayFileError(f"{meta}: not a price list ({type(exc).__name__}: {exc})") from exc
    return ReplayData(path, records, models, prices)


PLACEHOLDER = "[replay: the data set has no response text from {model}]"
_ids = itertools.count(1)


class ReplayProvider:
    def __init__(self, spec: ModelSpec, data: ReplayData) -> None:
        self.spec = spec
        self.model = spec.upstream_id
        self.data = data
        if self.model not in data.models:
            raise ValueError(f"model {spec.name!r}: {self.model!r} is not a model of {data.path}")

    async def aclose(self) -> None:
        pass

    def _lookup(self, payload: dict[str, Any]) -> tuple[Record, Outcome]:
        metadata = payload.get("metadata")
        replay_id = metadata.get("replay_id") if isinstance(metadata, dict) else None
        if replay_id is not None:
            record = self.data.by_id.get(str(replay_id))
        else:
            record = self.data.by_prompt.get(prompt_hash(payload.get("messages") or []))
        if record is None:
            message = (
                f"this prompt is not in the replay file {self.data.path.name}: a replay gateway answers "
                f"only the file's prompts (send one of its records' messages, or run `llm-router demo "
                f"{self.data.path}`)"
            )
            raise ProviderError(
                "status", message, status=400, body={"message": message, "code": "replay_unknown_prompt"}
            )
        return record, record.outcomes[self.model]

    def _answer(self, record: Record, outcome: Outcome) -> tuple[str, dict[str, Any], dict[str, int]]:
        placeholder = not outcome.response
        text = outcome.response or PLACEHOLDER.format(model=self.model)
        prompt = outcome.prompt_tokens
        if prompt is None:
            prompt = sum(len(str(m.get("content", ""))) for m in record.messages) // 4
        completion = outcome.completion_tokens or 0
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        meta = {"record_id": record.id, "score": outcome.score, "placeholder": placeholder}
        return text, meta, usage

    async def chat(self, payload: dict[str, Any]) -> dict[str, Any]:
        record, outcome = self._lookup(payload)
        text, meta, usage = self._answer(record, outcome)
        return {
            "id": f"chatcmpl-replay{next(_ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": usage,
            "x_replay": meta,
        }

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        record, outcome = self._lookup(payload)
        text, meta, usage = self._answer(record, outcome)
        base = {
            "id": f"chatcmpl-replay{next(_ids)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
        }
        yield {
            **base,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
            "x_replay": meta,
        }
        step = max(1, len(text) // 4)
        for i in range(0, len(text), step):
            yield {
                **base,
                "choices": [{"index": 0, "delta": {"content": text[i : i + step]}, "finish_reason": None}],
            }
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield {**base, "choices": [], "usage": usage}

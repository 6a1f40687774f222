"""The `replay` provider: an upstream that answers from a replay file (see `gateway.lab.data`).

A request is matched to its record by `metadata.replay_id` when the caller gives it (the lab does),
else by the prompt (the normalised conversation hash). The answer is the model's recorded response,
or a placeholder marked as such (`x_replay.placeholder`, and the call record's `synthetic` flag)
when the data set has none; usage comes from the recorded token counts, so the gateway prices the
call from its catalogue as it does for any upstream. It answers at once: replay data has no latency.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

from gateway.config import ModelSpec
from gateway.lab.data import Outcome, Record, ReplayData
from gateway.providers import ProviderError
from gateway.store import prompt_hash

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
            raise ProviderError(
                "status",
                f"this prompt is not in the replay file {self.data.path.name}",
                status=400,
                body={
                    "message": f"this prompt is not in the replay file {self.data.path.name}",
                    "code": "replay_unknown_prompt",
                },
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

"""OpenAI's wire shapes, read once: what a request needs and weighs, what an upstream's answer
says (a completion, or a stream's chunks), and how an event goes back out as SSE."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.domain import text_of


def estimate_tokens(messages: Sequence[dict[str, Any]]) -> int:
    return tokens_of([len(text_of(m.get("content"))) for m in messages])


def tokens_of(lengths: Sequence[int]) -> int:
    """About 4 characters a token, plus a few per message: enough for eligibility and budgets."""
    return sum(n // 4 + 4 for n in lengths)


def needs_of(data: dict[str, Any], messages: list[dict[str, Any]]) -> frozenset[str]:
    """The capabilities a chat request needs of a model."""
    needs = set()
    if data.get("tools") or data.get("functions"):
        needs.add("tools")
    fmt = data.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        needs.add("json")
    for m in messages:
        content = m.get("content")
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") in ("image_url", "input_image") for p in content
        ):
            needs.add("vision")
            break
    if data.get("stream"):
        needs.add("streaming")
    return frozenset(needs)


def response_text(message: dict[str, Any]) -> str | None:
    """What an assistant message said, as one text: its content, then its tool calls as JSON."""
    content = message.get("content")
    text = text_of(content) if content is not None else None
    if message.get("tool_calls"):
        calls = orjson.dumps(message["tool_calls"]).decode()
        return calls if not text else f"{text}\n{calls}"
    return text


def _placeholder(data: dict[str, Any]) -> bool:
    """The replay provider marks answers no model wrote (a data set without response text)."""
    return bool((data.get("x_replay") or {}).get("placeholder"))


@dataclass(frozen=True)
class Completion:
    """What a (non-streamed) chat completion said, for the call record."""

    text: str | None
    usage: dict[str, Any]
    upstream_model: str | None
    synthetic: bool

    @classmethod
    def of(cls, data: dict[str, Any]) -> Completion:
        choices = data.get("choices") or []
        message = (choices[0].get("message") or {}) if choices else {}
        model = data.get("model")
        return cls(
            text=response_text(message),
            usage=data.get("usage") or {},
            upstream_model=model if isinstance(model, str) else None,
            synthetic=_placeholder(data),
        )


@dataclass
class StreamAccumulator:
    """Assembles what a stream said (first choice), for the call record."""

    parts: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    upstream_model: str | None = None
    synthetic: bool = False

    def add(self, event: dict[str, Any]) -> None:
        if self.upstream_model is None and isinstance(event.get("model"), str):
            self.upstream_model = event["model"]
        self.synthetic = self.synthetic or _placeholder(event)
        if event.get("usage"):
            self.usage = event["usage"]
        for choice in event.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.parts.append(delta["content"])
            for tc in delta.get("tool_calls") or ():
                slot = self.tool_calls.setdefault(
                    tc.get("index", 0),
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                )
                slot["id"] = tc.get("id") or slot["id"]
                fn = tc.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""

    def text(self) -> str | None:
        message: dict[str, Any] = {"content": "".join(self.parts)}
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return response_text(message)


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"

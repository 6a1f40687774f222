"""Streams of the Responses API: chat completion chunks translated into its events (for a model
that does not speak it), or its own events relayed (for one that does). Both are stream codecs of
`gateway.api.routed`: they encode what goes to the client and keep what the stream said.

A translated stream goes: response.created, response.in_progress, then per output item
response.output_item.added and its deltas (response.content_part.added and
response.output_text.delta for text; response.function_call_arguments.delta for a tool call), and
at the end each item's done events, then response.completed (response.incomplete when the model
stopped at max_output_tokens) with the whole Response, usage included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import GatewayError
from gateway.providers import RESPONSES
from gateway.responses_wire import call_item, finished, message_item, said_of, shell
from gateway.wire import Completion, StreamAccumulator


def sse_event(event: dict[str, Any]) -> bytes:
    """An event as the Responses API sends it: its type as the SSE event name, then its data."""
    kind = event.get("type")
    head = b"event: " + kind.encode() + b"\n" if isinstance(kind, str) else b""
    return head + b"data: " + orjson.dumps(event) + b"\n\n"


def error_event(exc: GatewayError, sequence_number: int) -> bytes:
    return sse_event(
        {
            "type": "error",
            "code": exc.code,
            "message": exc.message,
            "param": exc.param,
            "sequence_number": sequence_number,
        }
    )


@dataclass
class TranslatedStream:
    """Chat completion chunks in, Responses API events out."""

    request: dict[str, Any]
    response_id: str
    model: str
    created_at: int
    acc: StreamAccumulator = field(default_factory=StreamAccumulator)
    seq: int = 0
    items: list[dict[str, Any]] = field(default_factory=list)  # output items, in order
    text_at: int | None = None  # the output index of the message item
    calls: dict[int, int] = field(default_factory=dict)  # chat tool call index -> output index
    finish_reason: str | None = None

    def _event(self, kind: str, **fields: Any) -> bytes:
        self.seq += 1
        return sse_event({"type": kind, "sequence_number": self.seq - 1, **fields})

    def _response(self) -> dict[str, Any]:
        return shell(self.request, response_id=self.response_id, model=self.model, created_at=self.created_at)

    def add(self, event: dict[str, Any]) -> bytes | None:
        self.acc.add(event)
        out: list[bytes] = []
        if self.seq == 0:
            out += [
                self._event("response.created", response=self._response()),
                self._event("response.in_progress", response=self._response()),
            ]
        for choice in event.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._text(delta["content"])
            for call in delta.get("tool_calls") or ():
                out += self._call(call)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return b"".join(out) or None

    def _text(self, delta: str) -> list[bytes]:
        out = []
        if self.text_at is None:
            self.text_at = len(self.items)
            item = message_item(f"msg_{self.response_id}", "", "in_progress")
            self.items.append(item)
            added = {**item, "content": []}  # its part comes next, with its own event
            out.append(self._event("response.output_item.added", output_index=self.text_at, item=added))
            out.append(self._part("response.content_part.added", ""))
        item = self.items[self.text_at]
        item["content"][0]["text"] += delta
        out.append(self._on("response.output_text.delta", self.text_at, delta=delta, logprobs=[]))
        return out

    def _on(self, kind: str, at: int, **fields: Any) -> bytes:
        """An event about output item `at` (of its text part, for a message)."""
        item = self.items[at]
        if item["type"] == "message":
            fields["content_index"] = 0
        return self._event(kind, item_id=item["id"], output_index=at, **fields)

    def _part(self, kind: str, text: str) -> bytes:
        assert self.text_at is not None
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return self._on(kind, self.text_at, part=part)

    def _call(self, delta: dict[str, Any]) -> list[bytes]:
        out = []
        index = delta.get("index", 0)
        fn = delta.get("function") or {}
        at = self.calls.get(index)
        if at is None:
            at = self.calls[index] = len(self.items)
            item = call_item(f"fc_{self.response_id}_{index}", {"id": delta.get("id")}, "in_progress")
            self.items.append(item)
            item["name"] = fn.get("name") or ""
            out.append(self._event("response.output_item.added", output_index=at, item=dict(item)))
        elif fn.get("name"):
            self.items[at]["name"] += fn["name"]
        item = self.items[at]
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            out.append(self._on("response.function_call_arguments.delta", at, delta=fn["arguments"]))
        return out

    def end(self, ok: bool) -> bytes:
        if not ok:
            return b""
        out = []
        for at, item in enumerate(self.items):
            item["status"] = "completed"
            if item["type"] == "message":
                text = item["content"][0]["text"]
                out.append(self._on("response.output_text.done", at, text=text, logprobs=[]))
                out.append(self._part("response.content_part.done", text))
            else:
                args = item["arguments"]
                out.append(
                    self._on("response.function_call_arguments.done", at, name=item["name"], arguments=args)
                )
            out.append(self._event("response.output_item.done", output_index=at, item=item))
        response = self._response()
        response["output"] = self.items
        finished(response, self.finish_reason, self.acc.usage)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        out.append(self._event(kind, response=response))
        return b"".join(out)

    def error(self, exc: GatewayError) -> bytes:
        self.seq += 1
        return error_event(exc, self.seq - 1)

    def said(self) -> Completion:
        acc = self.acc
        return Completion(acc.text(), acc.usage or {}, acc.upstream_model, acc.synthetic)


@dataclass
class NativeStream:
    """A Responses API stream relayed as it comes, `model` renamed to the catalogue's name; its
    terminal event (response.completed...) is held back and sent by `end`, once the call's record
    is kept (a record that cannot be kept turns it into an error event)."""

    model: str
    parts: list[str] = field(default_factory=list)
    final: dict[str, Any] | None = None  # the Response of the terminal event
    upstream_model: str | None = None
    seq: int = 0
    held: bytes = b""  # the terminal event, encoded

    def add(self, event: dict[str, Any]) -> bytes | None:
        response = event.get("response")
        if isinstance(response, dict):
            if self.upstream_model is None and isinstance(response.get("model"), str):
                self.upstream_model = response["model"]
            response["model"] = self.model
            if event.get("type") in RESPONSES.terminal:
                self.final = response
        elif event.get("type") == "response.output_text.delta":
            self.parts.append(str(event.get("delta") or ""))
        if isinstance(event.get("sequence_number"), int):
            self.seq = event["sequence_number"] + 1
        if event.get("type") in RESPONSES.terminal:
            self.held = sse_event(event)
            return None
        out, self.held = self.held + sse_event(event), b""  # (nothing should follow a terminal event)
        return out

    def end(self, ok: bool) -> bytes:
        return self.held if ok else b""

    def error(self, exc: GatewayError) -> bytes:
        return error_event(exc, self.seq)

    def said(self) -> Completion:
        if self.final is not None:
            said = said_of(self.final)
            return Completion(said.text, said.usage, self.upstream_model, False)
        return Completion("".join(self.parts), {}, self.upstream_model, False)

"""POST /v1/chat/completions (and /chat/completions): validate, route, proxy, record.

The body the client sent goes upstream unchanged except `model` (and our `router` extension,
removed). The upstream's answer comes back unchanged except `model`, which names the catalogue
model that answered; the upstream's own model string is in the `x-router-upstream-model` header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.api.admission import Ask
from gateway.api.routed import Admitted
from gateway.catalogue import ModelSpec
from gateway.context import RequestState
from gateway.errors import GatewayError
from gateway.providers import CHAT, Api
from gateway.schemas import ChatRequest, validate
from gateway.wire import SSE_DONE, Completion, StreamAccumulator, needs_of, sse


def read(data: dict[str, Any], state: RequestState) -> Admitted:
    req: ChatRequest = validate(ChatRequest, data)
    messages: list[dict[str, Any]] = data["messages"]
    max_tokens = req.max_completion_tokens or req.max_tokens
    ask = Ask(req.model, req.router, messages, needs_of(data, messages), max_tokens, req.n or 1)
    body = {k: v for k, v in data.items() if k != "router"}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Admitted(ask, ChatDialect(body, include_usage), duel_body=body, stream=req.stream)


@dataclass
class ChatDialect:
    """Chat completions: every model is sent the client's body; answers go back as they came,
    `model` aside."""

    body: dict[str, Any]
    include_usage: bool

    def plan(self, spec: ModelSpec) -> tuple[Api, dict[str, Any]]:
        return CHAT, self.body

    def answer(self, api: Api, spec: ModelSpec, data: dict[str, Any]) -> tuple[dict[str, Any], Completion]:
        answer = Completion.of(data)
        data["model"] = spec.name
        return data, answer

    def codec(self, api: Api, spec: ModelSpec) -> ChatCodec:
        return ChatCodec(spec.name, self.include_usage)


@dataclass
class ChatCodec:
    """A chat stream, relayed chunk by chunk (`model` renamed, the usage chunk the gateway asked
    for kept from a client that did not), and assembled for the record."""

    model: str
    include_usage: bool
    acc: StreamAccumulator = field(default_factory=StreamAccumulator)

    def add(self, event: dict[str, Any]) -> bytes | None:
        self.acc.add(event)
        if not self.include_usage:
            if not event.get("choices") and event.get("usage"):
                return None  # the usage-only chunk we asked for, not the client
            event.pop("usage", None)
        event["model"] = self.model
        return sse(event)

    def end(self, ok: bool) -> bytes:
        return SSE_DONE

    def error(self, exc: GatewayError) -> bytes:
        return exc.sse()

    def said(self) -> Completion:
        acc = self.acc
        return Completion(acc.text(), acc.usage or {}, acc.upstream_model, acc.synthetic)

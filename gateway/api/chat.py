"""POST /v1/chat/completions (and /chat/completions): validate, route, proxy, record.

The body the client sent goes upstream unchanged except `model` (and our `router` extension,
removed). The upstream's answer comes back unchanged except `model`, which names the catalogue
model that answered; the upstream's own model string is in the `x-router-upstream-model` header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.types import Receive, Scope, Send

from gateway.api.routed import Ask, RoutedCall, admit, refused
from gateway.asgi import read_body
from gateway.calls import open_record
from gateway.catalogue import ModelSpec
from gateway.context import request_state
from gateway.errors import GatewayError
from gateway.providers import CHAT, Api
from gateway.schemas import ChatRequest, parse_json_object, require_model, validate
from gateway.services import services_of
from gateway.wire import SSE_DONE, Completion, StreamAccumulator, needs_of, sse


class ChatCompletions:
    """The ASGI endpoint (raw ASGI, to keep the hot path short)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = services_of(scope)
        state = request_state(scope)
        try:
            data = parse_json_object(await read_body(receive))
            require_model(data)
            req: ChatRequest = validate(ChatRequest, data)
            messages: list[dict[str, Any]] = data["messages"]
            ask = Ask(
                req.model,
                req.router,
                messages,
                needs_of(data, messages),
                req.max_completion_tokens or req.max_tokens,
            )
            ctx, decision = await admit(services, state, scope, ask)
        except GatewayError as exc:
            refused(services, state, exc)
            raise
        body = {k: v for k, v in data.items() if k != "router"}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        call = RoutedCall(
            services,
            state,
            receive,
            send,
            ctx,
            decision,
            ChatDialect(body, include_usage),
            duel_body=body,
            record=open_record(state, messages, req.model, decision, stream=req.stream),
        )
        if req.stream:
            await call.stream()
        else:
            await call.complete()


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

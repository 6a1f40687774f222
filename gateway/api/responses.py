"""POST /v1/responses (and /responses): OpenAI's Responses API, routed like chat (`model="auto"`
included), passed through to models that speak it (the `responses` capability) and translated to
chat completions for the others (`gateway.responses_wire`, `gateway.responses_stream`).

The gateway is stateless: it stores no response, so `store: true`, `previous_response_id`,
`conversation` and `background` are refused with a 400 that says so (send the conversation as
`input` items instead), and a native upstream is sent `store: false`. The call is recorded like a
chat call (its request id in `x-request-id`, for /feedback), rate-limited and costed alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from gateway.api.admission import Ask
from gateway.api.routed import Admitted, StreamCodec
from gateway.catalogue import ModelSpec
from gateway.context import RequestState
from gateway.errors import InvalidRequest
from gateway.providers import CHAT, RESPONSES, Api
from gateway.responses_stream import NativeStream, TranslatedStream
from gateway.responses_wire import Translated, said_of, to_chat, to_response
from gateway.schemas import ResponsesRequest, validate
from gateway.wire import Completion, needs_of

_STATEFUL = {
    "previous_response_id": "previous_response_id",
    "conversation": "conversation",
    "background": "background mode",
}


def stateless(data: dict[str, Any], req: ResponsesRequest) -> None:
    """A 400 for what needs a stored response: this gateway keeps none."""
    if req.store:
        raise InvalidRequest(
            "this gateway does not store responses: send store=false (or leave it out), and the "
            "conversation so far as input items",
            param="store",
            code="store_not_supported",
        )
    for name, what in _STATEFUL.items():
        if data.get(name):
            raise InvalidRequest(
                f"this gateway does not store responses, so {what} is not supported: send the "
                "conversation so far as input items",
                param=name,
                code="unsupported_parameter",
            )


def read(data: dict[str, Any], state: RequestState) -> Admitted:
    req: ResponsesRequest = validate(ResponsesRequest, data)
    stateless(data, req)
    request = {k: v for k, v in data.items() if k != "router"}
    chat = to_chat(request)
    # What chat completions cannot express needs a model that speaks the Responses API.
    needs = needs_of(chat.body, chat.messages) | ({"responses"} if chat.problems else set())
    ask = Ask(req.model, req.router, chat.messages, needs, req.max_output_tokens)
    dialect = ResponsesDialect(request, chat, f"resp_{state.request_id}", int(time.time()))
    return Admitted(ask, dialect, duel_body=None if chat.problems else chat.body, stream=req.stream)


@dataclass
class ResponsesDialect:
    request: dict[str, Any]  # the client's body, `router` removed
    chat: Translated  # its translation to chat completions
    response_id: str
    created_at: int

    def plan(self, spec: ModelSpec) -> tuple[Api, dict[str, Any]]:
        if "responses" in spec.capabilities:
            return RESPONSES, {**self.request, "store": False}
        if self.chat.problems:
            raise InvalidRequest(
                f"the model '{spec.name}' does not speak the Responses API (its catalogue entry "
                f"lacks the `responses` capability), and chat completions cannot express "
                f"{', '.join(self.chat.problems)}",
                param="model",
                code="unsupported_by_model",
            )
        return CHAT, self.chat.body

    def answer(self, api: Api, spec: ModelSpec, data: dict[str, Any]) -> tuple[dict[str, Any], Completion]:
        if api is CHAT:
            response = to_response(
                data, self.request, response_id=self.response_id, model=spec.name, created_at=self.created_at
            )
            return response, Completion.of(data)
        said = said_of(data)
        data["model"] = spec.name
        return data, said

    def codec(self, api: Api, spec: ModelSpec) -> StreamCodec:
        if api is CHAT:
            return TranslatedStream(self.request, self.response_id, spec.name, self.created_at)
        return NativeStream(spec.name)

"""Validation of what clients send. The request body itself is forwarded as the client sent it
(only `model` is replaced and `router` removed), so these models only check; they never rebuild it."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.catalogue import RouterConstraints
from gateway.errors import InvalidRequest, PayloadTooLarge

# The id of a call record: a request id (at most 128 characters, see the middleware) or the id of
# a duel's second answer, `{request id}:duel`.
CALL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,139}")
# JSON nested deeper than this is refused: nothing in the OpenAI API needs it, and the encoder that
# forwards and records a body stops at 254 levels.
MAX_DEPTH = 128
# Inputs in one embeddings request (OpenAI's own limit).
MAX_EMBEDDING_INPUTS = 2048


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _content(self) -> Message:
        if self.role in ("system", "developer", "user") and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        return self


class StreamOptions(_Open):
    include_usage: StrictBool = False


ModelName = Annotated[str, Field(min_length=1, max_length=256)]


class ChatRequest(_Open):
    model: ModelName
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    router: RouterConstraints | None = None


class ResponsesRequest(_Open):
    """POST /v1/responses. The gateway is stateless: `store`, `previous_response_id`,
    `conversation` and `background` are refused (see gateway.api.responses)."""

    model: ModelName
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    stream: StrictBool = False
    store: StrictBool | None = None
    previous_response_id: str | None = None
    background: StrictBool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    router: RouterConstraints | None = None


class EmbeddingsRequest(_Open):
    model: ModelName
    # A text, texts, a token array, or token arrays (as OpenAI's API takes them).
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)

    @field_validator("input")
    @classmethod
    def _input(cls, value: str | list[Any]) -> str | list[Any]:
        if not value or (isinstance(value, list) and any(item in ("", []) for item in value)):
            raise ValueError("input must not be empty, nor hold an empty item")
        if isinstance(value, list) and len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs in one request")
        return value


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(pattern=f"^{CALL_ID.pattern}$")
    score: float = Field(ge=0, le=1, allow_inf_nan=False)
    feedback_text: str | None = Field(default=None, max_length=10_000)
    source: Literal["user", "app"] = "user"


# A JSON string (the unrolled form: runs of plain characters, then one escape at a time).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def _elements(raw: bytes) -> int:
    """At least how many values the body holds: its commas and brackets outside strings. Counting
    bytes is a few ms for 8 MiB; only when that count is over the budget are strings taken out."""
    return raw.count(b",") + raw.count(b"{") + raw.count(b"[")


def parse_json_object(raw: bytes, max_elements: int = 100_000) -> dict[str, Any]:
    """The body as a JSON object. Refused before parsing when it holds more than `max_elements`
    values (8 MiB of `{}` took orjson 0.7 s of the event loop to build and free)."""
    if not raw:
        raise InvalidRequest("the request body is empty; expected a JSON object", code="invalid_json")
    if _elements(raw) > max_elements and _elements(_STRING.sub(b'""', raw)) > max_elements:
        raise PayloadTooLarge(
            f"the request body holds more than {max_elements} JSON values (MAX_JSON_ELEMENTS)",
            code="too_many_json_values",
        )
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _too_deep(data):
        raise InvalidRequest(f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json")
    return data


def _too_deep(data: Any) -> bool:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, dict | list))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, dict | list))
    return False


def require_model(data: dict[str, Any]) -> None:
    """A request must name its model, as OpenAI's API requires: `auto` is one word away, and a
    request without `model` (or with a misspelt `modle`) is more likely a mistake than a wish to
    be routed, which may choose a paid model the caller never meant."""
    if "model" not in data:
        raise InvalidRequest(
            "you must provide a model parameter: a model or virtual model of GET /v1/models, "
            'or "auto" to let the gateway choose',
            param="model",
            code="missing_model",
        )


def validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """Validate, or raise a 400 that names the first offending field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or None
        where = f" at '{loc}'" if loc else ""
        raise InvalidRequest(
            f"invalid request{where}: {first['msg']}", param=loc, code="invalid_value"
        ) from exc

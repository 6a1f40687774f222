"""The Responses API's wire shapes, and their translation to and from chat completions for models
whose upstream does not speak it (catalogue models without the `responses` capability).

Requests: `instructions` and `input` (a text, or items: messages, function calls and their outputs)
become chat messages; function tools, `tool_choice`, `text.format`, `max_output_tokens` and
`reasoning.effort` their chat equivalents; fields chat completions do not know (metadata, include,
truncation...) are dropped, and fields the Responses API does not know pass through (as provider
extensions do on chat). What chat completions cannot express (built-in tools, file inputs, stored
prompts) is listed in `Translated.problems`: such a request needs a model that speaks the Responses
API natively. Answers: a chat completion becomes a Response object (`to_response`); see
`gateway.responses_stream` for streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.domain import text_of
from gateway.errors import InvalidRequest
from gateway.wire import Completion, response_text

# Fields of a Responses request that the translation reads or deliberately drops; any other field
# passes through to the chat body.
_DROPPED = frozenset(
    {
        "model", "input", "instructions", "store", "previous_response_id", "background",
        "conversation", "max_output_tokens", "tools", "tool_choice", "text", "reasoning", "metadata",
        "truncation", "include", "top_logprobs", "prompt_cache_key", "prompt_cache_retention",
        "safety_identifier", "stream_options", "max_tool_calls", "prompt", "router",
    }
)  # fmt: skip
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


@dataclass
class Translated:
    body: dict[str, Any]  # the chat completions body (without `model`)
    problems: list[str] = field(default_factory=list)  # what chat completions cannot express

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.body["messages"]
        return messages


def to_chat(request: dict[str, Any]) -> Translated:
    """A Responses request as a chat completions request. Malformed input is a 400."""
    out = Translated({k: v for k, v in request.items() if k not in _DROPPED})
    messages: list[dict[str, Any]] = []
    if request.get("instructions"):
        messages.append({"role": "system", "content": request["instructions"]})
    given = request["input"]
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    else:
        for n, item in enumerate(given):
            _item(messages, item, f"input.{n}", out.problems)
    if not messages:
        raise InvalidRequest("input holds no message", param="input", code="invalid_value")
    out.body["messages"] = messages
    if request.get("tools"):
        out.body["tools"] = [_tool(t, f"tools.{n}", out.problems) for n, t in enumerate(request["tools"])]
    if request.get("tool_choice") is not None:
        out.body["tool_choice"] = _tool_choice(request["tool_choice"], out.problems)
    if request.get("max_output_tokens") is not None:
        out.body["max_tokens"] = request["max_output_tokens"]
    fmt = (request.get("text") or {}).get("format") or {}
    if not isinstance(fmt, dict):
        raise InvalidRequest("text.format must be an object", param="text.format", code="invalid_value")
    if fmt.get("type") == "json_object":
        out.body["response_format"] = {"type": "json_object"}
    elif fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "description", "strict") if k in fmt}
        out.body["response_format"] = {"type": "json_schema", "json_schema": schema}
    effort = (request.get("reasoning") or {}).get("effort")
    if effort:
        out.body["reasoning_effort"] = effort
    if request.get("prompt"):
        out.problems.append("a stored prompt ('prompt')")
    return out


def _item(messages: list[dict[str, Any]], item: Any, where: str, problems: list[str]) -> None:
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where} must be an object", param=where, code="invalid_value")
    kind = item.get("type", "message")
    if kind == "message":
        given = item.get("role")
        role = _ROLES.get(given) if isinstance(given, str) else None
        if role is None:
            raise InvalidRequest(
                f"{where}.role must be one of {', '.join(_ROLES)}",
                param=f"{where}.role",
                code="invalid_value",
            )
        messages.append({"role": role, "content": _content(item.get("content"), where, problems)})
    elif kind == "function_call":
        call = {
            "id": item.get("call_id"),
            "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""},
        }
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":  # the same turn: text, then calls
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else text_of(_parts(output, where, problems))
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
    elif kind != "reasoning":  # reasoning items are the model's own notes: chat has no place for them
        problems.append(f"input items of type {kind!r}")


def _content(content: Any, where: str, problems: list[str]) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(
            f"{where}.content must be a text or a list", param=f"{where}.content", code="invalid_value"
        )
    parts = _parts(content, where, problems)
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _parts(content: Any, where: str, problems: list[str]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": str(part.get("text") or "")})
        elif kind == "refusal":
            parts.append({"type": "text", "text": str(part.get("refusal") or "")})
        elif kind == "input_image" and part.get("image_url"):
            image = {"url": part["image_url"], **({"detail": part["detail"]} if part.get("detail") else {})}
            parts.append({"type": "image_url", "image_url": image})
        else:
            problems.append(f"content parts of type {kind!r} in {where}")
    return parts


def _tool(tool: Any, where: str, problems: list[str]) -> dict[str, Any]:
    if isinstance(tool, dict) and tool.get("type") == "function":
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise InvalidRequest(
                f"{where}.name: a function tool needs a name", param=f"{where}.name", code="invalid_value"
            )
        keys = ("name", "description", "parameters", "strict")
        return {"type": "function", "function": {k: tool[k] for k in keys if tool.get(k) is not None}}
    problems.append(f"tools of type {tool.get('type') if isinstance(tool, dict) else tool!r}")
    return {}


def _tool_choice(choice: Any, problems: list[str]) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    problems.append(f"tool_choice {choice!r}")
    return "auto"


# --- answers


def shell(request: dict[str, Any], *, response_id: str, model: str, created_at: int) -> dict[str, Any]:
    """A Response object without output, echoing what the request set (as OpenAI's does)."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "metadata": request.get("metadata") or {},
        "model": model,
        "output": [],
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": request.get("reasoning"),
        "store": False,
        "temperature": request.get("temperature"),
        "text": request.get("text") or {"format": {"type": "text"}},
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": request.get("tools") or [],
        "top_p": request.get("top_p"),
        "truncation": request.get("truncation") or "disabled",
        "usage": None,
        "user": request.get("user"),
    }


def finished(response: dict[str, Any], finish_reason: str | None, usage: dict[str, Any] | None) -> None:
    """Completes `response` (its output already in) from a chat completion's end."""
    reason = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish_reason or "")
    response["status"] = "incomplete" if reason else "completed"
    response["incomplete_details"] = {"reason": reason} if reason else None
    response["usage"] = usage_of(usage)


def message_item(item_id: str, text: str, status: str, refusal: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text or not refusal:
        content.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def call_item(item_id: str, call: dict[str, Any], status: str) -> dict[str, Any]:
    fn = call.get("function") or {}
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call.get("id") or item_id,
        "name": fn.get("name") or "",
        "arguments": fn.get("arguments") or "",
    }


def to_response(
    completion: dict[str, Any], request: dict[str, Any], *, response_id: str, model: str, created_at: int
) -> dict[str, Any]:
    """A chat completion (first choice) as a Response object."""
    choices = completion.get("choices") or [{}]
    message = choices[0].get("message") or {}
    text = text_of(message.get("content")) if message.get("content") is not None else ""
    calls = message.get("tool_calls") or []
    response = shell(request, response_id=response_id, model=model, created_at=created_at)
    if text or message.get("refusal") or not calls:
        response["output"].append(
            message_item(f"msg_{response_id}", text, "completed", message.get("refusal"))
        )
    for n, call in enumerate(calls):
        response["output"].append(call_item(f"fc_{response_id}_{n}", call, "completed"))
    finished(response, choices[0].get("finish_reason"), completion.get("usage"))
    return response


def usage_of(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """A chat completion's usage in the Responses API's shape."""
    if not usage:
        return None
    pt, ct = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": pt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": ct,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": usage.get("total_tokens") or pt + ct,
    }


def said_of(response: dict[str, Any]) -> Completion:
    """What a Response object said, as the record keeps any answer: its text, then its function
    calls as chat tool calls (so that answers from either API compare), and its usage."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in response.get("output") or ():
        if item.get("type") == "message":
            texts += [str(p.get("text") or p.get("refusal") or "") for p in item.get("content") or ()]
        elif item.get("type") == "function_call":
            fn = {"name": item.get("name"), "arguments": item.get("arguments")}
            calls.append({"id": item.get("call_id"), "type": "function", "function": fn})
    usage = response.get("usage") or {}
    model = response.get("model")
    return Completion(
        text=response_text({"content": "".join(texts), "tool_calls": calls}),
        usage={"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens")},
        upstream_model=model if isinstance(model, str) else None,
        synthetic=False,
    )

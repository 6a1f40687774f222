"""Which request body fields go upstream, per provider kind: an allowlist.

A chat request may carry OpenAI's chat completion fields and the sampling extras the
OpenAI-compatible servers understand; anything else is refused with 400 `unsupported_field`
(naming it), because the gateway prices a call as the catalogue model and an upstream may act on
fields we do not know (OpenRouter's `models`, `provider`, `route`, `plugins`, `transforms` change
which model answers and what it costs; OpenAI's `service_tier`, `web_search_options`, `audio` and
`modalities` change the price). Each model then receives the fields its kind accepts (and those
its catalogue entry adds with `extra_body_fields`); an extra meant for another kind (vLLM's
`guided_json` on a call that ends up at OpenAI) is left out rather than failing the call.

Each API has its own list: a Responses request (`RESPONSES_FIELDS`: its fields but `service_tier`,
plus the same sampling extras) and an embeddings request (`EMBEDDINGS_FIELDS`: no extras but the
catalogue's). A Responses request translated to chat completions is checked as a Responses request,
and its translation is then sent as chat (what a model's kind accepts of it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.catalogue import ModelSpec
from gateway.errors import InvalidRequest
from gateway.providers import CHAT, EMBEDDINGS, RESPONSES, Api

# OpenAI's chat completion request (without what changes the price), and our `router`.
OPENAI: frozenset[str] = frozenset(
    {
        "model",
        "messages",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "metadata",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "stop",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
    }
)
# OpenAI's Responses API request (without `service_tier`, which changes the price). What needs a
# stored response (`store`, `previous_response_id`, `conversation`, `background`) is listed so that
# gateway.api.responses can say why it refuses it.
RESPONSES_FIELDS: frozenset[str] = frozenset(
    {
        "model",
        "input",
        "instructions",
        "background",
        "conversation",
        "include",
        "max_output_tokens",
        "max_tool_calls",
        "metadata",
        "parallel_tool_calls",
        "previous_response_id",
        "prompt",
        "prompt_cache_key",
        "prompt_cache_retention",
        "reasoning",
        "safety_identifier",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "text",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "truncation",
        "user",
    }
)
# OpenAI's embeddings request (OpenRouter's `provider` would change which model answers).
EMBEDDINGS_FIELDS: frozenset[str] = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
_SAMPLING = frozenset({"top_k", "min_p", "repetition_penalty"})
# Per provider kind, beyond OPENAI.
EXTRAS: dict[str, frozenset[str]] = {
    "openai": frozenset(),
    "openrouter": _SAMPLING | {"top_a", "reasoning", "include_reasoning"},
    "vllm": _SAMPLING
    | {
        "min_tokens",
        "ignore_eos",
        "stop_token_ids",
        "skip_special_tokens",
        "include_stop_str_in_output",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "chat_template_kwargs",
    },
    "ollama": _SAMPLING | {"keep_alive"},
    "openai_compatible": _SAMPLING,
    "replay": frozenset(),
}
_EXTRAS = frozenset().union(*EXTRAS.values())
_BASE: dict[Api, frozenset[str]] = {CHAT: OPENAI, RESPONSES: RESPONSES_FIELDS, EMBEDDINGS: EMBEDDINGS_FIELDS}
# What a request to each API may carry (our `router` included; an embeddings request's is ignored).
KNOWN: dict[Api, frozenset[str]] = {
    CHAT: OPENAI | _EXTRAS | {"router"},
    RESPONSES: RESPONSES_FIELDS | _EXTRAS | {"router"},
    EMBEDDINGS: EMBEDDINGS_FIELDS | {"router"},
}


def allowed(spec: ModelSpec, api: Api = CHAT) -> frozenset[str]:
    extras = frozenset() if api is EMBEDDINGS else EXTRAS.get(spec.provider, frozenset())
    return _BASE[api] | extras | frozenset(spec.extra_body_fields)


def check(body: dict[str, Any], models: Iterable[ModelSpec], api: Api = CHAT) -> None:
    """400 for a field no model of the catalogue may receive in `api`."""
    known = KNOWN[api]
    extra: set[str] = set()
    for spec in models:
        extra.update(spec.extra_body_fields)
    for key in body:
        if key not in known and key not in extra:
            raise InvalidRequest(
                f"the field '{key}' is not supported by this gateway (README: Security and limits)",
                param=key,
                code="unsupported_field",
            )


def for_model(spec: ModelSpec, body: dict[str, Any], api: Api = CHAT) -> dict[str, Any]:
    """The body as that model may receive it in `api`."""
    keep = allowed(spec, api)
    if all(key in keep for key in body):
        return dict(body)
    return {k: v for k, v in body.items() if k in keep}

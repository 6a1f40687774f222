"""Which request body fields go upstream, per provider kind: an allowlist.

A chat request may carry OpenAI's chat completion fields and the sampling extras the
OpenAI-compatible servers understand; anything else is refused with 400 `unsupported_field`
(naming it), because the gateway prices a call as the catalogue model and an upstream may act on
fields we do not know (OpenRouter's `models`, `provider`, `route`, `plugins`, `transforms` change
which model answers and what it costs; OpenAI's `service_tier`, `web_search_options`, `audio` and
`modalities` change the price). Each model then receives the fields its kind accepts (and those
its catalogue entry adds with `extra_body_fields`); an extra meant for another kind (vLLM's
`guided_json` on a call that ends up at OpenAI) is left out rather than failing the call.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.catalogue import ModelSpec
from gateway.errors import InvalidRequest

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
KNOWN: frozenset[str] = OPENAI.union(*EXTRAS.values()) | {"router"}


def allowed(spec: ModelSpec) -> frozenset[str]:
    return OPENAI | EXTRAS.get(spec.provider, frozenset()) | frozenset(spec.extra_body_fields)


def check(body: dict[str, Any], models: Iterable[ModelSpec]) -> None:
    """400 for a field no model of the catalogue may receive."""
    extra: set[str] = set()
    for spec in models:
        extra.update(spec.extra_body_fields)
    for key in body:
        if key not in KNOWN and key not in extra:
            raise InvalidRequest(
                f"the field '{key}' is not supported by this gateway (README: Security and limits)",
                param=key,
                code="unsupported_field",
            )


def for_model(spec: ModelSpec, body: dict[str, Any]) -> dict[str, Any]:
    """The body as that model may receive it."""
    keep = allowed(spec)
    if all(key in keep for key in body):
        return dict(body)
    return {k: v for k, v in body.items() if k in keep}

"""The model catalogue and the routing vocabulary of the YAML file: models (provider, base URL,
prices, context window, capabilities), keyword rules, semantic routes, named policies (sets of
arms) and per-request constraints (also virtual models)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from gateway.spelling import unknown

DIAL_MODES = ("quality", "budget", "usd", "fixed")
QUALITY_TARGET_MAX = 1.5  # a quality target is a share of the best model's quality
# A dial mode without a target (ROUTER_DIAL_MODE alone, a request's or a candidate's dial_mode
# alone): that mode's default target. `budget` 0.35 is the gateway's default dial (README: The dial).
DIAL_DEFAULTS = {"quality": 0.95, "budget": 0.35, "usd": 0.001, "fixed": 0.05}
ProviderKind = Literal["openai", "openrouter", "ollama", "vllm", "openai_compatible", "replay"]
STRATEGIES = (
    "bandit",
    "cost_optimized",
    "latency_optimized",
    "quality_optimized",
    "balanced",
    "round_robin",
    "least_loaded",
)
# What a request can need of a model (gateway.wire.needs_of) and what the profiles name; a
# catalogue may add its own (`code`), which `router.capability` then accepts too.
CAPABILITIES = ("chat", "streaming", "tools", "json", "vision", "embeddings")


def _known_strategy(value: Any) -> Any:
    if isinstance(value, str) and value not in STRATEGIES:
        raise ValueError(unknown("strategy", value, STRATEGIES))
    return value


def _known_dial_mode(value: Any) -> Any:
    if isinstance(value, str) and value not in DIAL_MODES:
        raise ValueError(unknown("dial mode", value, DIAL_MODES))
    return value


DialMode = Annotated[Literal["quality", "budget", "usd", "fixed"], BeforeValidator(_known_dial_mode)]
Strategy = Annotated[
    Literal[
        "bandit",
        "cost_optimized",
        "latency_optimized",
        "quality_optimized",
        "balanced",
        "round_robin",
        "least_loaded",
    ],
    BeforeValidator(_known_strategy),
]

DEFAULT_BASE_URLS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "openrouter": "https://openrouter.ai/api/v1",
    "ollama": "http://127.0.0.1:11434/v1",
    "vllm": "http://127.0.0.1:8000/v1",
}
_DEFAULT_KEY_ENVS: dict[str, str] = {"openai": "OPENAI_API_KEY", "openrouter": "OPENROUTER_API_KEY"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        """A misspelt key is an error that names the closest field (pydantic would only say
        "extra inputs are not permitted")."""
        if isinstance(data, dict):
            for key in data:
                if isinstance(key, str) and key not in cls.model_fields:
                    raise ValueError(unknown("field", key, cls.model_fields))
        return data


class ModelSpec(_Strict):
    """One entry of the model catalogue."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+\-]{0,127}$")
    provider: ProviderKind = "openai_compatible"
    base_url: str | None = None
    api_key_env: str | None = None
    upstream_model: str | None = None
    input_usd_per_mtok: float = Field(default=0.0, ge=0)
    output_usd_per_mtok: float = Field(default=0.0, ge=0)
    context_window: int = Field(default=8192, gt=0)
    # What the model can do: chat, streaming, tools, json, vision, code (routing reads them), and
    # what its upstream speaks besides chat completions: `embeddings` (POST /v1/embeddings may
    # name it), `responses` (it speaks the Responses API natively: /v1/responses is passed
    # through; without it, /v1/responses is translated to chat completions for it).
    capabilities: frozenset[str] = frozenset({"chat", "streaming"})
    # At most this many calls at once; up to `max_queue` more wait up to `queue_timeout_s` for a
    # slot, then the call falls back to the next model (or gets 503 when none is left).
    max_concurrency: int | None = Field(default=None, gt=0)
    max_queue: int = Field(default=32, ge=0)
    queue_timeout_s: float = Field(default=2.0, ge=0)
    # Caps what a call may ask of this model: a larger max_tokens / max_completion_tokens is cut
    # down to it, and a request without one gets it.
    max_output_tokens: int | None = Field(default=None, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=120.0, gt=0)
    fallbacks: tuple[str, ...] = ()
    # A prior guess of quality in [0, 1] (for the quality_optimized strategy before any feedback).
    quality: float | None = Field(default=None, ge=0, le=1)
    # Replay provider: the replay file and the model's name inside it (default: upstream_model).
    replay_file: str | None = None
    extra_headers: dict[str, str] = Field(default_factory=dict)
    # Request body fields this model may receive beyond its provider kind's (gateway/fields.py).
    extra_body_fields: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _defaults(self) -> ModelSpec:
        updates: dict[str, Any] = {}
        if self.base_url is None and self.provider in DEFAULT_BASE_URLS:
            updates["base_url"] = DEFAULT_BASE_URLS[self.provider]
        if self.api_key_env is None and self.provider in _DEFAULT_KEY_ENVS:
            updates["api_key_env"] = _DEFAULT_KEY_ENVS[self.provider]
        if self.upstream_model is None:
            updates["upstream_model"] = self.name
        if self.provider == "replay" and not self.replay_file:
            raise ValueError(f"model {self.name!r}: provider 'replay' needs replay_file")
        if self.provider == "replay" and self.capabilities & {"embeddings", "responses"}:
            raise ValueError(f"model {self.name!r}: replay models speak chat completions only")
        if self.provider != "replay" and not (self.base_url or updates.get("base_url")):
            raise ValueError(f"model {self.name!r}: provider {self.provider!r} needs base_url")
        for key, value in updates.items():
            object.__setattr__(self, key, value)
        return self

    @property
    def upstream_id(self) -> str:
        return self.upstream_model or self.name

    @property
    def is_local(self) -> bool:
        """A server on this machine or beside it (Ollama, vLLM, anything on loopback): one that
        refuses connections is not running, and no retry will start it."""
        if self.provider in ("ollama", "vllm"):
            return True
        host = urlsplit(self.base_url or "").hostname or ""
        return host in ("localhost", "::1") or host.startswith("127.")

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_usd_per_mtok + completion_tokens * self.output_usd_per_mtok) / 1e6


class Rule(_Strict):
    """Keyword fast path: the first rule whose pattern matches the user text decides."""

    name: str
    pattern: str | None = None  # a regular expression (case-insensitive)
    keywords: tuple[str, ...] = ()  # whole-word, case-insensitive
    model: str | None = None
    policy: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Rule:
        if not self.pattern and not self.keywords:
            raise ValueError(f"rule {self.name!r}: needs a pattern or keywords")
        if (self.model is None) == (self.policy is None):
            raise ValueError(f"rule {self.name!r}: give exactly one of model or policy")
        if self.pattern:
            try:
                re.compile(self.pattern, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"rule {self.name!r}: invalid pattern: {exc}") from exc
        return self


class SemanticRoute(_Strict):
    name: str
    utterances: tuple[str, ...] = Field(min_length=1)
    threshold: float = Field(default=0.75, ge=-1, le=1)
    model: str | None = None
    policy: str | None = None

    @model_validator(mode="after")
    def _check(self) -> SemanticRoute:
        if (self.model is None) == (self.policy is None):
            raise ValueError(f"route {self.name!r}: give exactly one of model or policy")
        return self


class Policy(_Strict):
    """A named set of arms; the bandit (or `strategy`) picks among them."""

    models: tuple[str, ...] = Field(min_length=1)
    strategy: Strategy | None = None


class RouterConstraints(_Strict):
    """Per-request routing constraints (`extra_body={"router": {...}}`, `X-Router-*` headers,
    or a virtual model)."""

    strategy: Strategy | None = None
    policy: str | None = None
    max_cost_usd: float | None = Field(default=None, ge=0)
    max_latency_ms: float | None = Field(default=None, gt=0)
    min_quality: float | None = Field(default=None, ge=0, le=1)
    capability: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    # The dial (ROUTER_POLICY=hcts): what `auto` aims for on average (ROUTER_DIAL_MODE/_TARGET).
    dial_mode: DialMode | None = None
    dial_target: float | None = Field(default=None, gt=0, le=1000)

    @field_validator("capability", "models", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    def merged(self, other: RouterConstraints) -> RouterConstraints:
        """`other` wins field by field where it sets something."""
        data = self.model_dump()
        for key, value in other.model_dump().items():
            if value not in (None, ()):
                data[key] = value
        return RouterConstraints(**data)

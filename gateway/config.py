"""One `Settings` object: environment variables, `.env`, and a YAML file (`CONFIG_FILE` / `--config`).

Precedence, highest first: values given in code or on the command line, environment variables,
`.env`, the YAML file, the defaults below. The YAML file holds what environment variables express
badly (the model catalogue, keyword rules, semantic routes, policies, virtual models) and may also
set any scalar knob by its field name (`exploration_rate: 0.3`, case-insensitive).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.catalogue import (
    CAPABILITIES,
    DEFAULT_BASE_URLS,
    DIAL_DEFAULTS,
    QUALITY_TARGET_MAX,
    DialMode,
    ModelSpec,
    Policy,
    RouterConstraints,
    Rule,
    SemanticRoute,
)
from gateway.config_errors import ConfigError, describe
from gateway.config_sources import YamlSource, comma_list, environ, normalise_dsn, origin
from gateway.profiles import DATA_ROOT, profile_name
from gateway.spelling import closest, unknown

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    # An empty variable (`DEFAULT_MODEL=` in .env) means unset, not "the empty string".
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", case_sensitive=False, env_ignore_empty=True
    )

    # --- server
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    config_file: str | None = None
    cors_origins: CommaList = Field(default_factory=list)
    log_level: str = "info"
    log_format: Literal["json", "text", "auto"] = "auto"
    log_prompts: bool = False
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    max_messages: int = Field(default=1000, ge=1)
    max_input_chars: int = Field(default=1_000_000, ge=1)  # all message text of one request
    # One call's deadline (routing, retries, fallbacks and, for a stream, its whole body).
    request_timeout_s: float = Field(default=600.0, gt=0)
    # On SIGTERM: stop accepting, give in-flight calls (streams too) this long, then flush and close.
    shutdown_timeout_s: int = Field(default=30, ge=0)
    # Client keys: when set, /v1/*, /feedback and the call lookups need `Authorization: Bearer <key>`.
    gateway_api_keys: CommaList = Field(default_factory=list)
    # Refuse to start without GATEWAY_API_KEYS (the prod profile sets it).
    require_api_keys: bool = False
    # Admin key: needed for admin endpoints (/v1/dpo/pairs; /v1/stats and every caller's calls when
    # client keys are set); without it those are disabled.
    admin_api_key: SecretStr | None = None
    # Per client key (per address when the gateway runs without keys), per replica; 0 = no limit.
    rate_limit_rpm: int = Field(default=0, ge=0)  # requests a minute (chat, feedback, lookups)
    rate_limit_tpm: int = Field(default=0, ge=0)  # tokens a minute (prompt + completion)

    # --- upstreams
    openrouter_api_key: SecretStr | None = None
    openrouter_base_url: str = DEFAULT_BASE_URLS["openrouter"]
    app_name: str = "LLM Router"
    referer_url: str = "https://github.com/llm-router/llm-router"
    llm_models: CommaList = Field(default_factory=list)
    default_model: str | None = None
    models: list[ModelSpec] = Field(default_factory=list)
    upstream_retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_ms: float = Field(default=100.0, ge=0)
    max_fallbacks: int = Field(default=2, ge=0, le=10)
    circuit_breaker_failure_threshold: int = Field(default=5, ge=1)
    circuit_breaker_cooldown_s: float = Field(default=30.0, gt=0)
    # Local upstreams (Ollama, vLLM, loopback) are probed (GET {base_url}/models) at start and then
    # every this many seconds, so that one that is not running is known to be down before a call
    # fails on it, and one that starts is routed to again. At least 1 s: a probe is a request.
    local_probe_interval_s: float = Field(default=10.0, ge=1)

    # --- routing (names as the original proxy documented them)
    # hcts (default, issue 12): cluster Thompson sampling with a dial; lin_ts: linear TS on the
    # embedding; knn_ts: TS on similar past requests (pgvector); default: `auto` -> DEFAULT_MODEL.
    router_policy: Literal["hcts", "knn_ts", "lin_ts", "default"] = "hcts"
    feedback_weight: float = 0.6
    latency_weight: float = 0.2
    cost_weight: float = -0.2  # applied to normalised cost: negative favours cheaper models
    exploration_rate: float = Field(default=0.02, ge=0, le=1)  # the original's 0.1 wasted calls in the lab
    similarity_threshold: float = Field(default=0.7, ge=-1, le=1)
    max_similar_requests: int = Field(default=50, ge=1, le=1000)
    # knn_ts: when > 0, the nearest rated calls are fetched per eligible arm (this many each)
    # rather than MAX_SIMILAR_REQUESTS overall, so that a favoured arm cannot crowd the others'
    # evidence out of the neighbourhood (the lab measured the difference).
    neighbours_per_arm: int = Field(default=30, ge=0, le=1000)
    recency_days: int = Field(default=30, ge=1)
    min_similar_requests: int = Field(default=5, ge=0)
    min_confidence_score: float = Field(default=0.1, ge=0, le=1)
    optimistic_prior: float = Field(default=0.8, ge=0, le=1)
    exploration_bonus: float = Field(default=0.1, ge=0)
    min_requests_for_global: int = Field(default=10, ge=0)
    prior_strength: float = Field(default=2.0, gt=0)
    # Linear Thompson sampling (ROUTER_POLICY=lin_ts): ridge penalty and the posterior's noise scale.
    lin_ridge: float = Field(default=1.0, gt=0)
    lin_noise: float = Field(default=0.05, gt=0)
    # --- the dial (hcts): what `auto` aims for on average (quality: share of the best model's score; budget:
    # of its cost; usd: USD per call; fixed: the multiplier). README: The dial; a mode alone: DIAL_DEFAULTS.
    router_dial_mode: DialMode = "budget"
    router_dial_target: float = Field(default=DIAL_DEFAULTS["budget"], gt=0)
    router_state_path: Path | None = None  # `llm-router fit`'s (default DATA_DIR/router_state.npz)
    router_state_keep: bool = True  # what the gateway learnt, saved beside it (.live.npz) as it stops
    stats_refresh_s: float = Field(default=2.0, ge=0)
    neighbour_timeout_s: float = Field(default=0.25, gt=0)
    rules: list[Rule] = Field(default_factory=list)
    routes: list[SemanticRoute] = Field(default_factory=list)
    policies: dict[str, Policy] = Field(default_factory=dict)
    virtual_models: dict[str, RouterConstraints] = Field(default_factory=dict)
    embedding_cache_size: int = Field(default=10_000, ge=0)
    embedding_max_batch: int = Field(default=32, ge=1)
    embedding_max_chars: int = Field(default=1000, ge=64)
    embedding_backend: Literal["onnx", "torch"] = "onnx"
    embedding_threads: int = Field(default=1, ge=1, le=64)
    # Where MiniLM's ONNX export and the static embedder are made, once (default: DATA_DIR/models
    # when DATA_DIR is set, else ./data/models); the Docker image bakes both in at build time.
    models_dir: Path | None = None
    # The routing embedder (gateway/embedders; README "The routing embedder"): static (distilled
    # from MiniLM, inline) or minilm. Only the current one's stored embeddings are compared.
    embedder: Literal["static", "minilm"] = "static"

    # --- persistence
    enable_persistence: bool = True
    database_url: SecretStr | None = None
    database_host: str | None = None
    database_port: int = 5432
    database_user: str = "llm_router"
    database_password: SecretStr | None = None
    database_name: str = "llm_router"
    database_ssl_mode: str | None = None
    # This gateway's own state (the embedded PostgreSQL): by default ./data/<profile>, so that
    # gateways started from one checkout with different profiles or replay files never share
    # learning or exports (see `profile_name`); set DATA_DIR to choose (./data is where every
    # gateway kept its state before).
    data_dir: Path = DATA_ROOT
    run_migrations: bool = True
    recorder_batch_size: int = Field(default=500, ge=1)
    memory_store_max_calls: int = Field(default=100_000, ge=1)

    # --- durability, timeouts and hostile input (issue 15)
    # The recorder's spool: every call record is on local disk before its client gets the last
    # byte, until the database has it (default DATA_DIR/spool; one gateway per directory).
    spool_dir: Path | None = None
    spool_max_bytes: int = Field(default=1 << 30, gt=0)  # full: new calls get 503 until it drains
    spool_fsync: Literal["interval", "always"] = "interval"  # always: fsync before the last byte
    spool_fsync_interval_ms: float = Field(default=5.0, gt=0, le=1000)  # interval: the group commit
    recorder_queue_bytes: int = Field(default=64 << 20, gt=0)  # records also kept in memory
    recorder_batch_bytes: int = Field(default=8 << 20, gt=0)  # one write to the database at most
    recorder_stall_s: float = Field(default=10.0, gt=0)  # "failing" once a record waits this long
    # Every database statement (statement_timeout, asyncpg's command_timeout) and every wait of a
    # request on the database: past it, 503 with Retry-After.
    store_timeout_s: float = Field(default=5.0, gt=0, le=600)
    # The HTTP server (uvicorn with httptools, see gateway/server.py).
    max_header_bytes: int = Field(default=32768, ge=1024)  # request line and headers: 431 beyond
    header_timeout_s: float = Field(default=10.0, gt=0)  # to receive a request's headers
    body_timeout_s: float = Field(default=60.0, gt=0)  # to receive its body
    keep_alive_s: int = Field(default=5, ge=1)  # an idle keep-alive connection is closed after it
    max_connections: int = Field(default=1000, ge=1)  # connections or requests at once: 503 beyond
    upstream_pool_size: int = Field(default=256, ge=1)  # connections to upstreams at once
    max_json_elements: int = Field(default=100_000, ge=100)  # objects and arrays in one request body
    max_n: int = Field(default=8, ge=1, le=128)  # choices a chat request may ask for (`n`)
    # Output tokens: a request asking for more is cut to this, one asking for none gets it (a
    # model's own `max_output_tokens` wins); token reservations count n x this. 0: no cap.
    max_output_tokens: int = Field(default=4096, ge=0)
    auth_failures_per_minute: int = Field(default=20, ge=0)  # per client address; 0: no limit
    # One tenant's ratings count for at most this many in another tenant's view of an arm (and
    # the largest other tenant not at all); in lin_ts, a tenant's ratings beyond it weigh less.
    tenant_rating_cap: int = Field(default=1000, ge=1)
    health_cache_s: float = Field(default=1.0, ge=0)  # /health and /ready answer from a cache this old

    # --- shared state, virtual keys and budgets (issue 16)
    # A Redis-protocol server (Redis or Valkey) shared by every replica: rate limits, budgets and key
    # revocations then hold across replicas. Unset: in-process (one replica).
    redis_url: SecretStr | None = None
    redis_timeout_s: float = Field(default=0.2, gt=0)  # per operation; then the server counts as down
    # Server unreachable: false = go on with per-replica limits (fail-open); true = 503.
    redis_fail_closed: bool = False
    redis_prefix: str = "llm-router:"  # every key and channel of this gateway starts with it
    # How long a replica trusts its cached copy of a virtual key when no revocation notice arrives.
    key_cache_ttl_s: float = Field(default=5.0, ge=0)

    # --- DPO flywheel
    duel_rate: float = Field(default=0.0, ge=0, le=1)
    judge_model: str | None = None
    dpo_min_margin: float = Field(default=0.2, ge=0, le=1)
    dpo_similarity: float = Field(default=0.97, ge=0, le=1)

    _parse_lists = field_validator("cors_origins", "gateway_api_keys", "llm_models", mode="before")(
        classmethod(lambda cls, v: comma_list(v))
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        given = getattr(init_settings, "init_kwargs", {})
        path = given.get("config_file") or os.environ.get("CONFIG_FILE")
        if path is None:
            path = dotenv_settings().get("config_file")
        return init_settings, env_settings, dotenv_settings, YamlSource(settings_cls, path, frozenset(given))

    @model_validator(mode="after")
    def _catalogue(self) -> Settings:
        models = list(self.models)
        if self.llm_models:
            # LLM_MODELS (as in the original proxy) narrows the catalogue; a name it does not know
            # becomes an OpenRouter model with unknown prices.
            known = {m.name: m for m in models}
            models = [known.get(n) or ModelSpec(name=n, provider="openrouter") for n in self.llm_models]
        # OPENROUTER_BASE_URL applies to OpenRouter models that did not set their own base URL.
        models = [
            m.model_copy(update={"base_url": self.openrouter_base_url})
            if m.provider == "openrouter" and m.base_url == DEFAULT_BASE_URLS["openrouter"]
            else m
            for m in models
        ]
        if "router_dial_target" not in self.model_fields_set:
            self.router_dial_target = DIAL_DEFAULTS[self.router_dial_mode]
        if self.router_dial_mode == "quality" and self.router_dial_target > QUALITY_TARGET_MAX:
            raise ValueError(f"ROUTER_DIAL_TARGET: a quality target is at most {QUALITY_TARGET_MAX}")
        names = [m.name for m in models]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"duplicate model names in the catalogue: {sorted(duplicates)}")
        self.models = models
        chosen = "data_dir" in self.model_fields_set  # DATA_DIR given: used as it is
        if not chosen:
            self.data_dir = DATA_ROOT / profile_name(self.config_file, models)
        if self.models_dir is None:
            self.models_dir = (self.data_dir if chosen else DATA_ROOT) / "models"
        known_names = set(names)
        if self.default_model is None and models:
            self.default_model = models[0].name
        if self.default_model is not None and models and self.default_model not in known_names:
            raise ValueError(f"DEFAULT_MODEL {self.default_model!r} is not in the model catalogue")
        for m in models:
            for f in m.fallbacks:
                if f not in known_names:
                    raise ValueError(f"model {m.name!r}: fallback {f!r} is not in the catalogue")
        for where, targets in self._model_references():
            for name in targets:
                if name not in known_names:
                    guess = closest(name, known_names)
                    hint = f"; did you mean {guess!r}?" if guess else ""
                    raise ValueError(f"{where}: model {name!r} is not in the catalogue{hint}")
        for where, policy in self._policy_references():
            if policy not in self.policies:
                raise ValueError(f"{where}: {unknown('policy', policy, self.policies)} (see 'policies')")
        known_capabilities = set(CAPABILITIES).union(*(m.capabilities for m in models))
        for vname, vm in self.virtual_models.items():
            if vname in known_names:
                raise ValueError(f"virtual model {vname!r} has the name of a catalogue model")
            for capability in vm.capability:
                if capability not in known_capabilities:
                    raise ValueError(
                        f"virtual model {vname!r}: {unknown('capability', capability, known_capabilities)}"
                    )
        for m in models:
            self._check_key_destination(m)
        if self.require_api_keys and not self.gateway_api_keys and not self.admin_api_key:
            raise ValueError(
                "REQUIRE_API_KEYS is set (the prod profile does) but GATEWAY_API_KEYS is empty and "
                "there is no ADMIN_API_KEY to issue virtual keys with: refusing to start a gateway "
                "nobody can use; set GATEWAY_API_KEYS=key1,key2 (or ADMIN_API_KEY)"
            )
        return self

    def _check_key_destination(self, m: ModelSpec) -> None:
        """OpenRouter's and OpenAI's keys go to their own hosts only (OPENROUTER_BASE_URL's for
        OpenRouter), never to a base URL someone pointed a model at."""
        homes = {
            "OPENROUTER_API_KEY": self.openrouter_base_url,
            "OPENAI_API_KEY": DEFAULT_BASE_URLS["openai"],
        }
        home = homes.get(m.api_key_env or "")
        if home is None or m.base_url is None:
            return
        if origin(m.base_url) != origin(home):
            raise ValueError(
                f"model {m.name!r} would send {m.api_key_env} to {origin(m.base_url)}, but that key "
                f"only goes to {origin(home)}; give the model its own api_key_env"
            )

    def _model_references(self) -> list[tuple[str, tuple[str, ...]]]:
        refs: list[tuple[str, tuple[str, ...]]] = []
        refs += [(f"rule {r.name!r}", (r.model,)) for r in self.rules if r.model]
        refs += [(f"route {r.name!r}", (r.model,)) for r in self.routes if r.model]
        refs += [(f"policy {n!r}", p.models) for n, p in self.policies.items()]
        refs += [(f"virtual model {n!r}", v.models) for n, v in self.virtual_models.items()]
        return refs

    def _policy_references(self) -> list[tuple[str, str]]:
        refs = [(f"rule {r.name!r}", r.policy) for r in self.rules if r.policy]
        refs += [(f"route {r.name!r}", r.policy) for r in self.routes if r.policy]
        refs += [(f"virtual model {n!r}", v.policy) for n, v in self.virtual_models.items() if v.policy]
        return refs

    @property
    def keys_required(self) -> bool:
        """Whether protected paths need a key (GATEWAY_API_KEYS, or REQUIRE_API_KEYS with virtual
        keys only)."""
        return bool(self.gateway_api_keys) or self.require_api_keys

    def model(self, name: str) -> ModelSpec | None:
        for m in self.models:
            if m.name == name:
                return m
        return None

    @property
    def virtual_model_names(self) -> list[str]:
        return ["auto", *(n for n in self.virtual_models if n != "auto")]

    def api_key_for(self, spec: ModelSpec) -> str | None:
        """The API key of a model: its env var, with OPENROUTER_API_KEY also read from settings."""
        if not spec.api_key_env:
            return None
        if spec.api_key_env == "OPENROUTER_API_KEY" and self.openrouter_api_key is not None:
            return self.openrouter_api_key.get_secret_value() or None
        return environ().get(spec.api_key_env) or None

    @property
    def spool_path(self) -> Path:
        return self.spool_dir or self.data_dir / "spool"

    def database_dsn(self) -> str | None:
        """The SQLAlchemy URL of an external database, or None for the embedded one."""
        if self.database_url is not None and self.database_url.get_secret_value():
            url = self.database_url.get_secret_value()
        elif self.database_host:
            password = self.database_password.get_secret_value() if self.database_password else ""
            auth = quote(self.database_user, safe="") + (":" + quote(password, safe="") if password else "")
            url = f"postgresql://{auth}@{self.database_host}:{self.database_port}/{self.database_name}"
        else:
            return None
        return normalise_dsn(url)

    def secrets(self) -> list[str]:
        """Every secret value this process knows, so that logs can be checked against them."""
        values = [
            self.openrouter_api_key,
            self.admin_api_key,
            self.database_password,
            self.database_url,
            self.redis_url,
        ]
        out = [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]
        out += [k for k in self.gateway_api_keys if k]
        for m in self.models:
            key = self.api_key_for(m)
            if key:
                out.append(key)
        return out


def load_settings(config_file: str | None = None, **overrides: Any) -> Settings:
    """Build Settings; `overrides` (command-line flags) beat every other source. What is wrong
    with them is a ConfigError, one line (pydantic's own rendering is several lines a problem)."""
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    if config_file:
        kwargs["config_file"] = config_file
    try:
        return Settings(**kwargs)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from exc


def config_values(path: str) -> dict[str, Any]:
    """The YAML file's values, keys lower-cased (an unknown key is a ConfigError)."""
    return YamlSource(Settings, path)()


def setting_key(key: str, option: str) -> str:
    """A setting's field name from `KEY` or `key` (`--set`, `--grid`); an unknown one is a
    ConfigError that names the closest setting."""
    name = key.strip().lower()
    if name not in Settings.model_fields:
        shown = [f.upper() if key.strip().isupper() else f for f in Settings.model_fields]
        raise ConfigError(f"{option}: {unknown('setting', key.strip(), shown)}")
    return name

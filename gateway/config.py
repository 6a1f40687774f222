"""One `Settings` object: environment variables, `.env`, and a YAML file (`CONFIG_FILE` / `--config`).

Precedence, highest first: values given in code or on the command line, environment variables,
`.env`, the YAML file, the defaults below. The YAML file holds what environment variables express
badly (the model catalogue, keyword rules, semantic routes, policies, virtual models) and may also
set any scalar knob by its field name (`exploration_rate: 0.3`, case-insensitive).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

import yaml
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.catalogue import DEFAULT_BASE_URLS, ModelSpec, Policy, RouterConstraints, Rule, SemanticRoute


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


CommaList = Annotated[list[str], NoDecode]


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def environ() -> dict[str, str]:
    """The process environment over `.env` (in the working directory), as Settings reads them:
    for what Settings does not hold itself (API-key variables named in the catalogue, ${VAR})."""
    from dotenv import dotenv_values

    values = {k: v for k, v in dotenv_values(".env").items() if v} if os.path.isfile(".env") else {}
    return {**values, **os.environ}


def expand_env(text: str) -> str:
    """`${VAR}` and `${VAR:-default}` in the YAML file take values from the environment (or .env)."""
    env = environ()
    return _ENV_REF.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], path: str | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns everything at once

    def __call__(self) -> dict[str, Any]:
        if not self.path:
            return {}
        path = Path(self.path)
        if not path.is_file():
            raise ValueError(f"config file {self.path!r} does not exist")
        data = yaml.safe_load(expand_env(path.read_text())) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {self.path!r}: expected a mapping at the top level")
        return {str(k).lower(): v for k, v in data.items()}


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

    # --- routing (names as the original proxy documented them)
    # lin_ts: linear Thompson sampling on the embedding (the default: best in the lab, see README);
    # knn_ts: Thompson sampling on similar past requests from pgvector; default: `auto` goes to
    # DEFAULT_MODEL (rules, routes and strategies still apply).
    router_policy: Literal["knn_ts", "lin_ts", "default"] = "lin_ts"
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
    # Where the embedding models live (default DATA_DIR/models): MiniLM's ONNX export and the
    # static embedder, made there once; the Docker image bakes both in at build time.
    models_dir: Path | None = None
    # --- the routing embedder (issue 13; gateway/embedders). static: a static embedding distilled
    # from all-MiniLM-L6-v2 once into MODELS_DIR (about 0.1 ms a long prompt, inline); minilm: the
    # model itself (about 30 ms a long prompt, on a worker thread). Stored embeddings carry their
    # embedder's id and only the current one's are compared: after a switch, `llm-router reembed`.
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
    data_dir: Path = Path("./data")
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

    # --- DPO flywheel
    duel_rate: float = Field(default=0.0, ge=0, le=1)
    judge_model: str | None = None
    dpo_min_margin: float = Field(default=0.2, ge=0, le=1)
    dpo_similarity: float = Field(default=0.97, ge=0, le=1)

    _parse_lists = field_validator("cors_origins", "gateway_api_keys", "llm_models", mode="before")(
        classmethod(lambda cls, v: _comma_list(v))
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
        path = getattr(init_settings, "init_kwargs", {}).get("config_file") or os.environ.get("CONFIG_FILE")
        if path is None:
            path = dotenv_settings().get("config_file")
        return init_settings, env_settings, dotenv_settings, _YamlSource(settings_cls, path)

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
        names = [m.name for m in models]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"duplicate model names in the catalogue: {sorted(duplicates)}")
        self.models = models
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
                    raise ValueError(f"{where}: model {name!r} is not in the catalogue")
        for where, policy in self._policy_references():
            if policy not in self.policies:
                raise ValueError(f"{where}: policy {policy!r} is not defined under 'policies'")
        for vname in self.virtual_models:
            if vname in known_names:
                raise ValueError(f"virtual model {vname!r} has the name of a catalogue model")
        for m in models:
            self._check_key_destination(m)
        if self.require_api_keys and not self.gateway_api_keys:
            raise ValueError(
                "REQUIRE_API_KEYS is set (the prod profile does) but GATEWAY_API_KEYS is empty: "
                "refusing to start a gateway anyone can use; set GATEWAY_API_KEYS=key1,key2"
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
        if _origin(m.base_url) != _origin(home):
            raise ValueError(
                f"model {m.name!r} would send {m.api_key_env} to {_origin(m.base_url)}, but that key "
                f"only goes to {_origin(home)}; give the model its own api_key_env"
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
        values = [self.openrouter_api_key, self.admin_api_key, self.database_password, self.database_url]
        out = [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]
        out += [k for k in self.gateway_api_keys if k]
        for m in self.models:
            key = self.api_key_for(m)
            if key:
                out.append(key)
        return out


def _origin(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{parts.hostname}:{port}"


def normalise_dsn(url: str) -> str:
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


def load_settings(config_file: str | None = None, **overrides: Any) -> Settings:
    """Build Settings; `overrides` (command-line flags) beat every other source."""
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    if config_file:
        kwargs["config_file"] = config_file
    return Settings(**kwargs)

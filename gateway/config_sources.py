"""Where Settings come from besides the environment: `.env` and the environment as one mapping,
`${VAR}` in the YAML file, and the YAML file itself, whose keys must be settings (a misspelt one is
a ConfigError that names the closest)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from gateway.config_errors import ConfigError
from gateway.spelling import unknown

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


class YamlSource(PydanticBaseSettingsSource):
    """The YAML file (CONFIG_FILE / --config) as a settings source, keys lower-cased."""

    def __init__(
        self, settings_cls: type[BaseSettings], path: str | None, given: frozenset[str] = frozenset()
    ) -> None:
        super().__init__(settings_cls)
        self.path = path
        self.given = given  # set in code or on the command line: replaces the file's (no deep merge)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns everything at once

    def __call__(self) -> dict[str, Any]:
        if not self.path:
            return {}
        path = Path(self.path)
        if not path.is_file():
            raise ConfigError(f"config file {self.path!r} does not exist")
        data = yaml.safe_load(expand_env(path.read_text())) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {self.path!r}: expected a mapping at the top level")
        fields = self.settings_cls.model_fields
        for key in data:
            if str(key).lower() not in fields:
                raise ConfigError(f"config file {self.path}: {unknown('setting', str(key), fields)}")
        return {str(k).lower(): v for k, v in data.items() if str(k).lower() not in self.given}


def origin(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{parts.hostname}:{port}"


def normalise_dsn(url: str) -> str:
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


def comma_list(value: Any) -> Any:
    """`a, b,c` (an environment variable) as a list; a list (YAML) as it is."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value

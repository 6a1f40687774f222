"""Who is calling: client keys (GATEWAY_API_KEYS) and the admin key (ADMIN_API_KEY), compared in
constant time, and only ever stored or logged as a non-reversible id."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from gateway.config import Settings
from gateway.errors import AuthenticationError, PermissionDenied

# Paths that need a client key when GATEWAY_API_KEYS is set (health and metrics stay open for probes).
PROTECTED = ("/v1/", "/chat/", "/models", "/feedback", "/requests/", "/metrics/")


def key_id(key: str) -> str:
    """A stable, non-reversible id of an API key, safe to store and log."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def bearer(authorization: bytes | None) -> bytes | None:
    if authorization is None or not authorization.startswith(b"Bearer "):
        return None
    return authorization[7:]


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

    def caller(self, path: str, authorization: bytes | None) -> str | None:
        """The caller's key id (None for an open gateway without a bearer key, or an open path)."""
        given = bearer(authorization)
        if not self.keys:
            return key_id(given.decode("latin-1")) if given is not None else None
        if not path.startswith(PROTECTED):
            return None
        if given is None:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        # Compared with every key, in constant time each: the time says nothing about which key
        # (or how much of one) matched.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise AuthenticationError("invalid API key")
        return key_id(given.decode("latin-1"))


def is_admin(settings: Settings, caller: str | None) -> bool:
    admin = settings.admin_api_key
    return admin is not None and caller == key_id(admin.get_secret_value())


def require_admin(settings: Settings, authorization: str, *, open_without_keys: bool = False) -> None:
    """Admin endpoints need `Authorization: Bearer <ADMIN_API_KEY>` (compared in constant time);
    without ADMIN_API_KEY they are disabled. With `open_without_keys`, a gateway that runs
    without GATEWAY_API_KEYS (open, as in development) lets anyone in."""
    if open_without_keys and not settings.gateway_api_keys:
        return
    key = settings.admin_api_key.get_secret_value() if settings.admin_api_key else ""
    if not key:
        raise PermissionDenied("admin endpoints are disabled: set ADMIN_API_KEY", code="admin_disabled")
    if not hmac.compare_digest(authorization.encode(), f"Bearer {key}".encode()):
        raise AuthenticationError("this endpoint needs 'Authorization: Bearer <ADMIN_API_KEY>'")

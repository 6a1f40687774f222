"""Who is calling: client keys (GATEWAY_API_KEYS), the admin key (ADMIN_API_KEY) and virtual keys
(issued by the admin, checked through `gateway.keys.KeyDirectory`), compared in constant time, and
only ever stored or logged as a non-reversible id."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.config import Settings
from gateway.domain import VirtualKey, utcnow
from gateway.errors import AuthenticationError, PermissionDenied
from gateway.keys import PREFIX, KeyDirectory

# Paths that need a client key when keys are required (health and metrics stay open for probes).
PROTECTED = ("/v1/", "/chat/", "/models", "/feedback", "/requests/", "/metrics/")


def key_id(key: str) -> str:
    """A stable, non-reversible id of an API key, safe to store and log."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def bearer(authorization: bytes | None) -> bytes | None:
    if authorization is None or not authorization.startswith(b"Bearer "):
        return None
    return authorization[7:]


@dataclass(frozen=True, slots=True)
class Caller:
    id: str  # key_<hash> (an environment key), vk_<hex> (a virtual key)
    key: VirtualKey | None = None  # a virtual key's record: owner, models, limits, budgets
    verified: bool = True  # False: a bearer an open gateway did not check (it may be made up)


class Keys:
    """The keys a gateway accepts on protected paths. Without required keys the gateway is open,
    but a virtual key sent to it is still checked (and its limits and budgets apply)."""

    def __init__(
        self, keys: Iterable[str], *, required: bool | None = None, directory: KeyDirectory | None = None
    ) -> None:
        self.keys = [k.encode() for k in keys]
        self.required = bool(self.keys) if required is None else required
        self.directory = directory

    @classmethod
    def of(cls, settings: Settings, directory: KeyDirectory | None = None) -> Keys:
        """Client keys, and the admin key beside them once keys are required."""
        keys = list(settings.gateway_api_keys)
        if settings.keys_required and settings.admin_api_key:
            keys.append(settings.admin_api_key.get_secret_value())
        return cls(keys, required=settings.keys_required, directory=directory)

    async def caller(self, path: str, authorization: bytes | None) -> Caller | None:
        """The caller (None for an open gateway without a bearer key, or an open path)."""
        given = bearer(authorization)
        if not path.startswith(PROTECTED):
            return (
                None
                if self.required or given is None
                else Caller(key_id(given.decode("latin-1")), verified=False)
            )
        if given is None:
            if self.required:
                raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
            return None
        if self.directory is not None and given.startswith(PREFIX.encode()):
            return await self._virtual(given.decode("latin-1"))
        # Compared with every key, in constant time each: the time says nothing about which key
        # (or how much of one) matched.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(given, key)
        if matched:
            return Caller(key_id(given.decode("latin-1")))
        if self.required:
            raise AuthenticationError("invalid API key")
        return Caller(key_id(given.decode("latin-1")), verified=False)

    async def _virtual(self, secret: str) -> Caller:
        assert self.directory is not None
        key = await self.directory.lookup(secret)
        if key is None:
            raise AuthenticationError("invalid API key")
        status = key.status(utcnow())
        if status != "active":
            raise AuthenticationError(f"this API key is {status}", code=f"key_{status}")
        return Caller(key.id, key)


def is_admin(settings: Settings, caller: str | None) -> bool:
    admin = settings.admin_api_key
    return admin is not None and caller == key_id(admin.get_secret_value())


def require_admin(settings: Settings, authorization: str, *, open_without_keys: bool = False) -> None:
    """Admin endpoints need `Authorization: Bearer <ADMIN_API_KEY>` (compared in constant time);
    without ADMIN_API_KEY they are disabled. With `open_without_keys`, a gateway that requires no
    keys (open, as in development) lets anyone in."""
    if open_without_keys and not settings.keys_required:
        return
    key = settings.admin_api_key.get_secret_value() if settings.admin_api_key else ""
    if not key:
        raise PermissionDenied("admin endpoints are disabled: set ADMIN_API_KEY", code="admin_disabled")
    if not hmac.compare_digest(authorization.encode(), f"Bearer {key}".encode()):
        raise AuthenticationError("this endpoint needs 'Authorization: Bearer <ADMIN_API_KEY>'")

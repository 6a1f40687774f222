"""Who is calling: client keys (GATEWAY_API_KEYS), the admin key (ADMIN_API_KEY) and virtual keys
(issued by the admin, checked through `gateway.keys.KeyDirectory`), compared in constant time, and
only ever stored or logged as a non-reversible id.

A key may come as `Authorization: Bearer <key>` (OpenAI's SDKs), `x-api-key: <key>` (Anthropic's
style, many tools) or `api-key: <key>` (Azure OpenAI's SDKs); virtual keys too."""

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


@dataclass(frozen=True, slots=True)
class Caller:
    id: str  # key_<hash> (an environment key), vk_<hex> (a virtual key)
    key: VirtualKey | None = None  # a virtual key's record: owner, models, limits, budgets
    verified: bool = True  # False: a bearer an open gateway did not check (it may be made up)

    @property
    def tenant(self) -> str:
        """Whose calls, ratings, pairs and arm statistics these are (`RequestState.tenant`): a
        virtual key's owner (all of an owner's keys are one tenant; each key keeps its own limits,
        budgets and spend, by `id`); a checked environment key's id; "" for a key nobody checked
        (an open gateway: one tenant)."""
        if self.key is not None:
            return self.key.owner
        return self.id if self.verified else ""


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

    async def caller(self, path: str, given: list[bytes]) -> Caller | None:
        """The caller (None for an open path, or an open gateway without a key). Of the keys
        `given` (see `presented`), the first that matches wins; a virtual key is checked on an open
        gateway too (a bad one is refused)."""
        if not path.startswith(PROTECTED):
            if self.required or not given:
                return None
            return Caller(key_id(given[0].decode("latin-1")), verified=False)
        if not given:
            if self.required:
                raise AuthenticationError(_MISSING)
            return None
        refusal: AuthenticationError | None = None
        for candidate in given:
            if self.directory is not None and candidate.startswith(PREFIX.encode()):
                try:
                    return await self._virtual(candidate.decode("latin-1"))
                except AuthenticationError as exc:
                    refusal = refusal or exc
            elif self.matches(candidate):
                return Caller(key_id(candidate.decode("latin-1")))
        if refusal is not None:
            raise refusal
        if self.required:
            raise AuthenticationError("invalid API key")
        return Caller(key_id(given[0].decode("latin-1")), verified=False)

    async def _virtual(self, secret: str) -> Caller:
        assert self.directory is not None
        key = await self.directory.lookup(secret)
        if key is None:
            raise AuthenticationError("invalid API key")
        status = key.status(utcnow())
        if status != "active":
            raise AuthenticationError(f"this API key is {status}", code=f"key_{status}")
        return Caller(key.id, key)

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
    without ADMIN_API_KEY they are disabled. With `open_without_keys`, a gateway that requires no
    keys (open, as in development) lets anyone in."""
    if open_without_keys and not settings.keys_required:
        return
    key = settings.admin_api_key.get_secret_value() if settings.admin_api_key else ""
    if not key:
        raise PermissionDenied("admin endpoints are disabled: set ADMIN_API_KEY", code="admin_disabled")
    admin = Keys([key])
    if not any(admin.matches(g) for g in given):
        raise AuthenticationError("this endpoint needs 'Authorization: Bearer <ADMIN_API_KEY>'")

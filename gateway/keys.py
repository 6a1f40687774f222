"""Virtual keys: issued, rotated and revoked by the admin (`llm-router keys`, `/v1/keys`), stored
as a hash only, each with its owner, expiry, models, limits and budgets.

A replica keeps the keys it has seen in a small cache (`KeyDirectory`) for KEY_CACHE_TTL_S. A
revocation or rotation is published on the shared state's `keys` channel, and every replica drops
its copy at once (Redis pub/sub: milliseconds); the cache's time to live bounds the delay when a
notice is lost (no REDIS_URL with several replicas, or the server unreachable: replicas that
subscribe again drop their whole cache). Unknown secrets are cached too (as unknown), so a stream
of bad keys costs the database one query per key per KEY_CACHE_TTL_S.

The secret is 32 random bytes (256 bits), so a plain SHA-256 is as safe to store as a slow password
hash would be, and costs microseconds on a cache miss instead of tens of milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from gateway.catalogue import RouterConstraints
from gateway.domain import VirtualKey, utcnow
from gateway.errors import PermissionDenied, StoreUnavailable
from gateway.shared import RESYNC, SharedState, SharedStateDown
from gateway.store import KeyStore

log = logging.getLogger("gateway.keys")

PREFIX = "sk-lr-"  # what a virtual key's secret starts with
CHANNEL = "keys"  # where revocations and rotations are announced


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyRequest(BaseModel):
    """What `POST /v1/keys` and `llm-router keys create` take."""

    model_config = ConfigDict(extra="forbid")

    owner: str = Field(min_length=1, max_length=200)
    name: str | None = Field(default=None, max_length=200)
    expires_at: datetime | None = None
    expires_in_days: float | None = Field(default=None, gt=0)
    models: list[str] | None = None
    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    budget_day_usd: float | None = Field(default=None, gt=0)
    budget_month_usd: float | None = Field(default=None, gt=0)
    budget_total_usd: float | None = Field(default=None, gt=0)


def issue(req: KeyRequest, now: datetime | None = None) -> tuple[VirtualKey, str]:
    """A new key and its secret (shown once, never stored)."""
    now = now or utcnow()
    secret = new_secret()
    expires = req.expires_at
    if expires is None and req.expires_in_days is not None:
        expires = now + timedelta(days=req.expires_in_days)
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=now.tzinfo)
    key = VirtualKey(
        id="vk_" + secrets.token_hex(8),
        owner=req.owner,
        key_hash=hash_secret(secret),
        prefix=secret[: len(PREFIX) + 4],
        name=req.name,
        created_at=now,
        expires_at=expires,
        models=tuple(req.models) if req.models is not None else None,
        rpm=req.rpm,
        tpm=req.tpm,
        budget_day_usd=req.budget_day_usd,
        budget_month_usd=req.budget_month_usd,
        budget_total_usd=req.budget_total_usd,
    )
    return key, secret


def rotated(key: VirtualKey) -> tuple[VirtualKey, str]:
    """The same key (id, limits, budgets, spend) with a new secret; the old one stops working."""
    secret = new_secret()
    return replace(key, key_hash=hash_secret(secret), prefix=secret[: len(PREFIX) + 4]), secret


def revoked(key: VirtualKey, now: datetime | None = None) -> VirtualKey:
    return key if key.revoked_at is not None else replace(key, revoked_at=now or utcnow())


def _refusal(key: VirtualKey, requested: str) -> PermissionDenied:
    return PermissionDenied(
        f"this API key may not use the model {requested!r}; "
        f"it may use: {', '.join(sorted(key.models or ())) or 'none'}",
        param="model",
        code="model_not_allowed",
    )


def allow(key: VirtualKey | None, model: str) -> None:
    """A model named outright (a catalogue model; embeddings are not routed): 403 unless listed."""
    if key is not None and key.models is not None and model not in key.models:
        raise _refusal(key, model)


def narrow(
    key: VirtualKey | None, requested: str, constraints: RouterConstraints, catalogue: set[str]
) -> RouterConstraints:
    """What a key with a list of models may ask for: a catalogue model only if listed; a virtual
    model (`auto` too) if listed, or if catalogue models are listed, and then answered by those
    only (whatever the request's own `router.models` say)."""
    if key is None or key.models is None:
        return constraints
    if requested in catalogue:
        allow(key, requested)
        return constraints
    mine = set(key.models) & catalogue
    if requested not in key.models and not mine:
        raise _refusal(key, requested)
    if not mine:
        return constraints
    chosen = tuple(m for m in (constraints.models or sorted(mine)) if m in mine)
    if not chosen:
        raise _refusal(key, requested)
    return constraints.model_copy(update={"models": chosen})


def fallbacks_for(key: VirtualKey | None, fallbacks: list[str], catalogue: set[str]) -> list[str]:
    """The fallbacks a key may end on: those it lists, when it lists catalogue models (a key that
    lists only virtual models takes what they route to, fallbacks included)."""
    mine = set(key.models or ()) & catalogue if key is not None else set()
    return [f for f in fallbacks if f in mine] if mine else fallbacks


async def announce(shared: SharedState, key_id: str) -> None:
    """Tells every replica that a key changed (they drop their cached copy)."""
    try:
        await shared.publish(CHANNEL, key_id)
    except SharedStateDown as exc:
        log.warning(
            "could not announce key %s to the other replicas (%s): they see it within KEY_CACHE_TTL_S",
            key_id,
            exc,
        )


class KeyDirectory:
    def __init__(
        self,
        store: KeyStore,
        shared: SharedState,
        *,
        ttl_s: float = 5.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.shared = shared
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self.cache: OrderedDict[str, tuple[VirtualKey | None, float]] = OrderedDict()
        self.task: asyncio.Task[None] | None = None

    async def lookup(self, secret: str) -> VirtualKey | None:
        """The key of `secret` (None: no such key), from the cache while it is fresh. While the
        database is unreachable, a key seen before keeps working (revocations still arrive)."""
        h = hash_secret(secret)
        hit = self.cache.get(h)
        now = self.clock()
        if hit is not None and now - hit[1] < self.ttl_s:
            return hit[0]
        try:
            key = await self.store.find_key(key_hash=h)
        except StoreUnavailable:
            if hit is not None and hit[0] is not None:
                return hit[0]
            raise
        self.cache[h] = (key, now)
        self.cache.move_to_end(h)
        while len(self.cache) > self.max_entries:
            self.cache.popitem(last=False)
        return key

    def forget(self, key_id: str) -> None:
        for h in [h for h, (k, _) in self.cache.items() if k is not None and k.id == key_id]:
            del self.cache[h]

    async def changed(self, key_id: str) -> None:
        """A key was rotated or revoked here: this replica forgets it now, the others on notice."""
        self.forget(key_id)
        await announce(self.shared, key_id)

    async def _listen(self) -> None:
        async for notice in self.shared.listen(CHANNEL):
            if notice == RESYNC:
                self.cache.clear()
            else:
                self.forget(notice)

    async def __aenter__(self) -> KeyDirectory:
        self.task = asyncio.create_task(self._listen())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

"""`llm-router keys create|list|revoke|rotate`: virtual keys, straight in the database (and, with
REDIS_URL, announced to every running replica at once). The secret is printed once, at creation
and rotation; only its hash is stored. Keys need persistence: the in-memory store lives inside one
gateway process, which the CLI cannot reach (use that gateway's /v1/keys API instead)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from gateway.config import Settings
from gateway.domain import VirtualKey, utcnow
from gateway.keys import KeyRequest, announce, issue, revoked, rotated
from gateway.store import Store

Run = Callable[[Store, Callable[[str], Awaitable[None]]], Awaitable[int]]


def _models(value: str | None) -> list[str] | None:
    return None if value is None else [m.strip() for m in value.split(",") if m.strip()]


def _show(key: VirtualKey, secret: str | None = None) -> None:
    body: dict[str, Any] = key.public(utcnow())
    if secret is not None:
        body["key"] = secret
    print(orjson.dumps(body, default=str, option=orjson.OPT_INDENT_2).decode())
    if secret is not None:
        print("The key above is shown once: store it now; only its hash is kept.", file=sys.stderr)


def _within(store_run: Run, settings: Settings) -> int:
    from gateway.shared.factory import open_shared
    from gateway.store.factory import open_store

    async def go() -> int:
        async with open_store(settings) as store, open_shared(settings) as shared:

            async def changed(key_id: str) -> None:
                await announce(shared, key_id)

            return await store_run(store, changed)

    return asyncio.run(go())


def keys_cmd(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.enable_persistence:
        print(
            "llm-router: ENABLE_PERSISTENCE is false: keys live inside the gateway process; "
            "use its /v1/keys API",
            file=sys.stderr,
        )
        return 1
    verb: str = args.verb

    async def run(store: Store, changed: Callable[[str], Awaitable[None]]) -> int:
        if verb == "create":
            try:
                req = KeyRequest(
                    owner=args.owner,
                    name=args.name,
                    expires_at=datetime.fromisoformat(args.expires) if args.expires else None,
                    expires_in_days=args.expires_in_days,
                    models=_models(args.models),
                    rpm=args.rpm,
                    tpm=args.tpm,
                    budget_day_usd=args.budget_day,
                    budget_month_usd=args.budget_month,
                    budget_total_usd=args.budget_total,
                )
            except (ValidationError, ValueError) as exc:
                print(f"llm-router: {exc}", file=sys.stderr)
                return 2
            known = {m.name for m in settings.models} | set(settings.virtual_model_names)
            unknown = sorted(set(req.models or ()) - known)
            if unknown and settings.models:
                print(f"llm-router: unknown models {unknown}", file=sys.stderr)
                return 2
            key, secret = issue(req)
            await store.save_key(key)
            _show(key, secret)
            return 0
        if verb == "list":
            now = utcnow()
            for key in await store.list_keys(args.owner):
                if args.all or key.status(now) == "active":
                    print(orjson.dumps(key.public(now), default=str).decode())
            return 0
        found = await store.find_key(key_id=args.id)
        if found is None:
            print(f"llm-router: no key with id {args.id!r}", file=sys.stderr)
            return 1
        if verb == "revoke":
            key = revoked(found)
            await store.save_key(key)
            await changed(key.id)
            _show(key)
            return 0
        if found.revoked_at is not None:
            print("llm-router: a revoked key cannot be rotated; create a new one", file=sys.stderr)
            return 1
        key, secret = rotated(found)
        await store.save_key(key)
        await changed(key.id)
        _show(key, secret)
        return 0

    return _within(run, settings)


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser("keys", help="virtual keys: create, list, revoke, rotate")
    verbs = p.add_subparsers(dest="verb", required=True)
    c = verbs.add_parser("create", help="issue a key (its secret is printed once)")
    common(c)
    c.add_argument("--owner", required=True, help="the tenant the key belongs to")
    c.add_argument("--name", help="a label")
    c.add_argument("--models", help="comma-separated catalogue or virtual models it may use (default all)")
    c.add_argument("--rpm", type=int, help="its own requests a minute (default RATE_LIMIT_RPM; 0 none)")
    c.add_argument("--tpm", type=int, help="its own tokens a minute (default RATE_LIMIT_TPM; 0 none)")
    c.add_argument("--budget-day", type=float, metavar="USD", help="USD a UTC day")
    c.add_argument("--budget-month", type=float, metavar="USD", help="USD a UTC month")
    c.add_argument("--budget-total", type=float, metavar="USD", help="USD in total")
    c.add_argument("--expires", help="ISO 8601 time it stops working")
    c.add_argument("--expires-in-days", type=float, help="or: days from now")
    lst = verbs.add_parser("list", help="keys (never their secrets), one JSON object a line")
    common(lst)
    lst.add_argument("--owner")
    lst.add_argument("--all", action="store_true", help="revoked and expired keys too")
    for verb, text in (("revoke", "stop a key now, on every replica"), ("rotate", "a new secret, same key")):
        v = verbs.add_parser(verb, help=text)
        common(v)
        v.add_argument("id", help="the key's id (vk_...)")
    return p

"""The dashboard API's query parameters, read once into typed filters: a bad one is a 400 that
names it, in OpenAI's error shape."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import cast

from gateway.domain import utcnow
from gateway.errors import InvalidRequest
from gateway.insights import Bucket, CallQuery, Window

MAX_BUCKETS = 750  # a month of hours, two years of days
MAX_PAGE = 200
_RANGE = re.compile(r"^(\d{1,4})([hd])$")
_STATUSES = ("ok", "error", "interrupted", "cancelled")
_KINDS = ("call", "duel", "judge")


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


def checked(q: Mapping[str, str]) -> Mapping[str, str]:
    """The parameters, refused whole if one holds a NUL (no column can, and PostgreSQL refuses it)."""
    for name, value in q.items():
        if "\x00" in value or "\x00" in name:
            raise _bad(name.replace("\x00", ""), f"{name!r} must not contain NUL characters")
    return q


def moment(q: Mapping[str, str], param: str) -> datetime | None:
    value = q.get(param)
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise _bad(param, f"{param} must be an ISO 8601 time, such as 2026-11-27T10:00:00Z") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def span(q: Mapping[str, str], default: str = "24h") -> tuple[datetime, datetime]:
    """`since`/`until` (ISO 8601), or `range` back from now (`24h`, `7d`); until defaults to now."""
    until = moment(q, "until") or utcnow()
    since = moment(q, "since")
    if since is None:
        match = _RANGE.match(q.get("range", default))
        if match is None or int(match.group(1)) == 0:
            raise _bad("range", "range must look like 24h or 7d (hours or days)")
        amount = int(match.group(1))
        since = until - (timedelta(hours=amount) if match.group(2) == "h" else timedelta(days=amount))
    if since >= until:
        raise _bad("since", "since must be before until")
    return since, until


def window(q: Mapping[str, str], default: str = "24h") -> Window:
    since, until = span(q, default)
    bucket = q.get("bucket") or ("hour" if until - since <= timedelta(days=2) else "day")
    if bucket not in ("hour", "day"):
        raise _bad("bucket", "bucket must be hour or day")
    width = timedelta(hours=1) if bucket == "hour" else timedelta(days=1)
    if (until - since) / width > MAX_BUCKETS:
        raise _bad("bucket", f"at most {MAX_BUCKETS} buckets: use day buckets or a shorter range")
    return Window(since, until, cast(Bucket, bucket), q.get("caller") or None)


def _choice(q: Mapping[str, str], param: str, allowed: tuple[str, ...]) -> str | None:
    value = q.get(param) or None
    if value is not None and value not in allowed:
        raise _bad(param, f"{param} must be one of {', '.join(allowed)}")
    return value


def cursor_of(value: str) -> tuple[datetime, str]:
    """A page cursor, as `next_cursor` gave it: `<created_at ISO 8601>|<request id>`."""
    stamp, sep, request_id = value.rpartition("|")
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        when = None
    if not sep or not request_id or when is None or when.tzinfo is None:
        raise _bad("cursor", "cursor must be as next_cursor gave it")
    return when, request_id


def cursor_text(created_at: datetime, request_id: str) -> str:
    return f"{created_at.isoformat()}|{request_id}"


def call_query(q: Mapping[str, str]) -> CallQuery:
    rated_text = q.get("rated") or None
    if rated_text not in (None, "true", "false"):
        raise _bad("rated", "rated must be true or false")
    try:
        limit = int(q.get("limit", "50"))
    except ValueError as exc:
        raise _bad("limit", "limit must be a whole number") from exc
    if not 1 <= limit <= MAX_PAGE:
        raise _bad("limit", f"limit must be between 1 and {MAX_PAGE}")
    text = q.get("q") or None
    if text is not None and len(text) > 500:
        raise _bad("q", "q is at most 500 characters")
    return CallQuery(
        since=moment(q, "since"),
        until=moment(q, "until"),
        caller=q.get("caller") or None,
        model=q.get("model") or None,
        layer=q.get("layer") or None,
        status=_choice(q, "status", _STATUSES),
        kind=_choice(q, "kind", _KINDS),
        rated=None if rated_text is None else rated_text == "true",
        text=text,
        id=q.get("id") or None,
        before=cursor_of(q["cursor"]) if q.get("cursor") else None,
        limit=limit,
    )

"""The in-memory store's virtual keys and spend (ENABLE_PERSISTENCE=false). Keys work, through the
admin API of that one process, and vanish with it: the CLI (another process) cannot reach them, so
it needs persistence. Spend is read from the calls the store still holds (MEMORY_STORE_MAX_CALLS)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from gateway.domain import CallRecord, SpendRow, VirtualKey


class MemoryKeys:
    def __init__(self) -> None:
        self.keys: dict[str, VirtualKey] = {}

    def _records(self) -> Iterable[CallRecord]:
        raise NotImplementedError

    async def save_key(self, key: VirtualKey) -> None:
        for other in self.keys.values():
            if other.key_hash == key.key_hash and other.id != key.id:
                raise ValueError("a key with this hash exists")  # as Postgres' unique index would
        self.keys[key.id] = key

    async def find_key(self, *, key_id: str | None = None, key_hash: str | None = None) -> VirtualKey | None:
        if key_id is not None:
            return self.keys.get(key_id)
        return next((k for k in self.keys.values() if k.key_hash == key_hash), None)

    async def list_keys(self, owner: str | None = None) -> list[VirtualKey]:
        found = [k for k in self.keys.values() if owner is None or k.owner == owner]
        return sorted(found, key=lambda k: (k.created_at, k.id))

    def _spending(self, key_id: str, since: datetime) -> Iterable[CallRecord]:
        return (
            r for r in self._records() if r.key_id == key_id and r.kind == "call" and r.created_at >= since
        )

    async def spent(self, key_id: str, since: datetime) -> float:
        return sum(r.cost_usd or 0.0 for r in self._spending(key_id, since))

    async def spend_by_day(self, key_id: str, since: datetime) -> list[SpendRow]:
        rows: dict[tuple[str, str | None], list[float]] = {}
        for r in self._spending(key_id, since):
            acc = rows.setdefault((r.created_at.strftime("%Y-%m-%d"), r.model), [0, 0.0, 0, 0])
            acc[0] += 1
            acc[1] += r.cost_usd or 0.0
            acc[2] += r.prompt_tokens or 0
            acc[3] += r.completion_tokens or 0
        return [
            SpendRow(day, model, int(a[0]), a[1], int(a[2]), int(a[3]))
            for (day, model), a in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
        ]

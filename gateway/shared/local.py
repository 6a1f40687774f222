"""The in-process shared state: one replica's cells in a dict (the default, and the fallback
while a Redis-protocol server is unreachable). `apply` never awaits, so it is atomic on the event
loop; notices go to this process's own listeners."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace

from gateway.shared import RESYNC, Cell, Op, Outcome, Rate, SharedStatus, Sum, gcra, ttl_ms

# Expired cells are swept when the table grows past this many (and then at twice what is left).
_SWEEP_AT = 100_000


class LocalState:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.cells: dict[str, tuple[float, float]] = {}  # key -> (value, expires at; inf: never)
        self.sweep_at = _SWEEP_AT
        self.listeners: dict[str, list[asyncio.Queue[str]]] = {}

    def _get(self, key: str, now: float) -> tuple[float, float] | None:
        found = self.cells.get(key)
        return None if found is None or found[1] <= now else found

    async def apply(self, ops: Sequence[Op]) -> Outcome:
        now = self.clock()
        cells: list[Cell] = []
        stands: list[Cell] = []  # each cell as it stands, if the operation is refused
        writes: list[tuple[str, float, float]] = []
        applied = True
        for op in ops:
            found = self._get(op.key, now)
            if isinstance(op, Rate):
                tat = found[0] if found else 0.0
                cell, new = gcra(tat, now, op)
                if cell.ok:
                    writes.append((op.key, new, now + ttl_ms(new, now) / 1000))
                    stands.append(gcra(tat, now, replace(op, cost=0, check=False))[0])
                else:
                    stands.append(cell)
                applied &= cell.ok
            else:
                cell, write = _sum(op, found, now)
                if write is not None:
                    writes.append((op.key, *write))
                stands.append(replace(cell, value=cell.value - op.amount) if cell.ok else cell)
                applied &= cell.ok
            cells.append(cell)
        if not applied:
            return Outcome(False, tuple(stands))
        for key, value, expires in writes:
            self.cells[key] = (value, expires)
        if len(self.cells) >= self.sweep_at:
            self._sweep(now)
        return Outcome(True, tuple(cells))

    def _sweep(self, now: float) -> None:
        self.cells = {k: v for k, v in self.cells.items() if v[1] > now}
        self.sweep_at = max(_SWEEP_AT, 2 * len(self.cells))

    async def publish(self, channel: str, message: str) -> None:
        for queue in self.listeners.get(channel, []):
            queue.put_nowait(message)

    async def listen(self, channel: str) -> AsyncIterator[str]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        self.listeners.setdefault(channel, []).append(queue)
        try:
            yield RESYNC
            while True:
                yield await queue.get()
        finally:
            self.listeners[channel].remove(queue)

    async def ping(self) -> bool:
        return True

    def status(self) -> SharedStatus:
        return SharedStatus("local", True, "per-replica (in-process)")

    async def aclose(self) -> None:
        return None


def _sum(op: Sum, found: tuple[float, float] | None, now: float) -> tuple[Cell, tuple[float, float] | None]:
    """A counter op: its cell, and what to write (value, expiry) when the operation is applied."""
    if found is None:
        if op.seed is None:
            return Cell(op.amount == 0, 0.0, missing=True), None
        found = (float(op.seed), now + op.ttl_s if op.ttl_s is not None else float("inf"))
    elif op.amount == 0:
        return Cell(True, found[0]), None
    total = found[0] + op.amount
    if op.cap is not None and op.amount > 0 and total > op.cap:
        return Cell(False, found[0]), None
    return Cell(True, total), (total, found[1])

"""Write-behind recording: the response never waits for the database.

`record()` appends to a bounded in-process queue and returns at once; one background task writes
batches. While the database is down, records wait in the queue (the writer retries with backoff)
and are written when it returns. A full queue drops the newest record, counts it and warns.
On shutdown the queue is flushed (within a timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass

from gateway.domain import CallRecord
from gateway.errors import StoreUnavailable
from gateway.store import CallStore

log = logging.getLogger("gateway.recorder")


@dataclass(frozen=True)
class RecorderState:
    queue_depth: int
    written: int
    dropped: int
    failing: bool


class Recorder:
    def __init__(
        self,
        store: CallStore,
        *,
        max_queue: int = 100_000,
        batch_size: int = 500,
    ) -> None:
        self.store = store
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.queue: deque[CallRecord] = deque()
        self.pending: dict[str, CallRecord] = {}
        self.dropped = 0
        self.written = 0
        self.failing_since: float | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._last_full_warning = 0.0

    @property
    def depth(self) -> int:
        return len(self.queue)

    def state(self) -> RecorderState:
        return RecorderState(len(self.queue), self.written, self.dropped, self.failing_since is not None)

    def has(self, request_id: str) -> bool:
        return request_id in self.pending

    def record(self, rec: CallRecord) -> None:
        if len(self.queue) >= self.max_queue:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_full_warning > 10:
                self._last_full_warning = now
                log.warning(
                    "recorder queue full (%d records waiting): dropping new call records (%d so far)",
                    len(self.queue),
                    self.dropped,
                )
            return
        self.queue.append(rec)
        self.pending.setdefault(rec.id, rec)  # a reused request id keeps its first record
        if len(self.queue) >= self.batch_size or len(self.queue) == 1:
            self._wake.set()

    async def __aenter__(self) -> Recorder:
        self._task = asyncio.create_task(self._run(), name="recorder")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a shutdown bound
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except (TimeoutError, Exception) as exc:
            if self.queue:
                log.error(
                    "recorder: %d call records could not be written at shutdown (%s)", len(self.queue), exc
                )

    async def flush(self) -> None:
        """Write everything queued now; raises if the store fails (records stay queued)."""
        while self.queue:
            await self._write_batch()

    async def _write_batch(self) -> None:
        async with self._lock:
            batch = [self.queue[i] for i in range(min(self.batch_size, len(self.queue)))]
            if not batch:
                return
            written = len(batch)
            try:
                await self.store.write_calls(batch)
            except StoreUnavailable:
                raise  # the records wait for the database
            except Exception:
                # The database refuses something in this batch (not a connection problem): write
                # the records one by one, and drop (and count) only those it refuses, so that one
                # bad record cannot hold back every other. Writing a record twice is harmless.
                written = 0
                for rec in batch:
                    try:
                        await self.store.write_calls([rec])
                        written += 1
                    except StoreUnavailable:
                        raise
                    except Exception as exc:
                        self.dropped += 1
                        log.error(
                            "recorder: the store refuses call record %s (%s); dropped",
                            rec.id,
                            type(exc).__name__,
                        )
            for _ in batch:
                rec = self.queue.popleft()
                if self.pending.get(rec.id) is rec:
                    del self.pending[rec.id]
            self.written += written
        if self.failing_since is not None:
            log.warning(
                "recorder: the store is back after %.1f s; writing the backlog",
                time.monotonic() - self.failing_since,
            )
            self.failing_since = None

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if not self.queue:
                self._wake.clear()
                # asyncio.timeout, not wait_for: on Python 3.11, wait_for swallows a cancellation
                # that arrives as the wake-up does (a record written during shutdown), and the
                # recorder then never stops.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._wake.wait()
                continue
            # Let a burst gather into one batch.
            if len(self.queue) < self.batch_size:
                await asyncio.sleep(0.01)
            try:
                await self._write_batch()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    log.warning("recorder: cannot write call records (%s); %d waiting", exc, len(self.queue))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

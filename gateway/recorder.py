"""Recording: a call's record is durable before its client gets the last byte, and reaches the
database behind the response.

`keep()` appends the record to the spool (gateway.spool: local disk, about 30 us) and, with
SPOOL_FSYNC=always, waits for its group fsync; it also stays in memory, within
RECORDER_QUEUE_BYTES, so that the writer needs not read it back. One background task writes
batches (at most RECORDER_BATCH_SIZE records and RECORDER_BATCH_BYTES) to the store and only then
truncates the spool. While the database is down or hung the records wait on disk; past the
memory budget, new records live only in the spool ("spilled") and the writer reads them back in
order when it catches up. A spool at SPOOL_MAX_BYTES refuses new calls (`admit`: 503 with
Retry-After) rather than answering and losing a record. On start, what a previous run left in the
spool is written first (idempotently: a call already stored keeps its row). Without a spool
(ENABLE_PERSISTENCE=false: the store is memory anyway), the queue is in memory only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass

from gateway.domain import CallRecord, decode_record, encode_record
from gateway.errors import ServiceUnavailable, StoreUnavailable
from gateway.spool import Spool, SpoolError, SpoolState
from gateway.store import CallStore

log = logging.getLogger("gateway.recorder")

Key = tuple[str, str]  # (caller, request id)

# How long the writer lets records gather before it writes a batch: a write (a transaction, the
# statement, the arm statistics) costs about as much CPU for one record as for fifty.
LINGER_S = 0.05


class RecorderUnavailable(ServiceUnavailable):
    """The call's record cannot be kept (the spool is full, or the disk refuses it): the call is
    refused, or its answer withheld, rather than answered and lost."""

    code = "recorder_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"retry-after": "5"})


@dataclass(frozen=True)
class RecorderState:
    queue_depth: int  # records not yet in the store (memory and spool)
    queue_bytes: int  # of them, held in memory
    written: int
    dropped: int  # refused by the store (invalid), never by lack of room
    duplicates: int  # already stored: a reused request id, or a replay after a crash
    failing: bool  # the oldest waiting record is older than RECORDER_STALL_S
    oldest_s: float  # its age
    spool: SpoolState | None


class Recorder:
    def __init__(
        self,
        store: CallStore,
        spool: Spool | None = None,
        *,
        queue_bytes: int = 64 << 20,
        batch_size: int = 500,
        batch_bytes: int = 8 << 20,
        stall_s: float = 10.0,
        write_timeout_s: float = 10.0,
    ) -> None:
        self.store = store
        self.spool = spool
        self.queue_bytes = queue_bytes
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.stall_s = stall_s
        self.write_timeout_s = write_timeout_s
        self.queue: deque[tuple[int, CallRecord, int]] = deque()  # (seq, record, size)
        self.held = 0  # bytes in `queue`
        self.pending: dict[Key, int] = {}  # what is not in the store yet -> its seq
        self.spilled = spool is not None and spool.state().records > 0  # the spool has more than `queue`
        self.seq = 0  # memory-only sequence (no spool)
        self.written_seq = 0  # every record up to here is in the store
        self.failing_since: float | None = None
        self.marks: deque[tuple[int, float]] = deque()  # (first seq, monotonic time): one a second
        self.written = 0
        self.dropped = 0
        self.duplicates = 0
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_full_warning = 0.0
        if spool is not None:  # what a previous run left is written first
            state = spool.state()
            self.written_seq = state.first_seq - 1 if state.records else state.last_seq
            if state.records:
                self.marks.append((state.first_seq, time.monotonic()))

    # --- what the endpoints use
    @property
    def depth(self) -> int:
        return self._last_seq - self.written_seq

    @property
    def _last_seq(self) -> int:
        return self.spool.last_seq if self.spool is not None else self.seq

    def oldest_s(self) -> float:
        """How long the oldest record not yet in the store has waited."""
        first = self.written_seq + 1
        if first > self._last_seq:
            return 0.0
        at = None
        for seq, t in self.marks:
            if seq > first:
                break
            at = t
        if at is None and self.marks:
            at = self.marks[0][1]
        return 0.0 if at is None else time.monotonic() - at

    def state(self) -> RecorderState:
        oldest = self.oldest_s()
        return RecorderState(
            self.depth,
            self.held,
            self.written,
            self.dropped,
            self.duplicates,
            oldest > self.stall_s,
            round(oldest, 3),
            self.spool.state() if self.spool is not None else None,
        )

    def has(self, caller: str, request_id: str) -> bool:
        return (caller, request_id) in self.pending

    def admit(self) -> None:
        """Raises RecorderUnavailable when a new call's record could not be kept."""
        full = not self.spool.has_room() if self.spool is not None else self.held >= self.queue_bytes
        if full:
            now = time.monotonic()
            if now - self._last_full_warning > 10:
                self._last_full_warning = now
                log.warning(
                    "recorder: %d records wait for the store and there is no room for more", self.depth
                )
            where = "spool (SPOOL_MAX_BYTES)" if self.spool is not None else "queue (RECORDER_QUEUE_BYTES)"
            raise RecorderUnavailable(
                f"the gateway cannot record more calls until its database catches up: its {where} is full"
            )

    def record(self, rec: CallRecord) -> int:
        """Keeps `rec` (on disk when there is a spool); returns its sequence number. Raises
        RecorderUnavailable when it cannot be kept."""
        body, emb = encode_record(rec)
        size = len(body) + (len(emb) if emb else 0)
        if self.spool is not None:
            try:
                seq = self.spool.append(body, emb)
            except SpoolError as exc:
                log.error("recorder: call record %s cannot be spooled: %s", rec.id, exc)
                raise RecorderUnavailable("the gateway cannot record this call; see its logs") from exc
        else:
            if self.held + size > self.queue_bytes and self.queue:
                raise RecorderUnavailable("the gateway's record queue (RECORDER_QUEUE_BYTES) is full")
            self.seq += 1
            seq = self.seq
        now = time.monotonic()
        if not self.marks or now - self.marks[-1][1] >= 1.0:
            self.marks.append((seq, now))
        if not self.spilled and (self.spool is None or self.held + size <= self.queue_bytes):
            self.queue.append((seq, rec, size))
            self.held += size
        else:
            self.spilled = True  # the writer reads it back from the spool
        self.pending[(rec.caller, rec.id)] = seq
        if len(self.queue) >= self.batch_size or self.depth == 1:
            self._wake.set()
        return seq

    async def keep(self, rec: CallRecord) -> None:
        """`record`, then (SPOOL_FSYNC=always) its fsync: what must happen before the last byte."""
        seq = self.record(rec)
        if self.spool is not None:
            await self.spool.durable(seq)

    async def wait_written(self, caller: str, request_id: str, timeout: float) -> None:  # noqa: ASYNC109
        """Waits (at most `timeout`) until that call's record is in the store; StoreUnavailable
        (503, Retry-After) if it is not by then."""
        try:
            async with asyncio.timeout(timeout):
                while (caller, request_id) in self.pending:
                    if self.failing_since is not None:
                        raise TimeoutError  # the store is down: no point waiting
                    self._wake.set()
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            raise StoreUnavailable(
                f"the call is not in the database yet (its record has waited {self.oldest_s():.0f} s); "
                "try again shortly"
            ) from None

    async def flush(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Waits until everything recorded (also while it waits) is in the store."""
        async with asyncio.timeout(timeout):
            while self.written_seq < self._last_seq:
                self._wake.set()
                self._progress.clear()
                await self._progress.wait()

    # --- lifecycle
    async def __aenter__(self) -> Recorder:
        self._task = asyncio.create_task(self._run(), name="recorder")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a shutdown bound
        # With a spool nothing waiting is lost: no point waiting for a database that is down.
        if self.spool is None or self.failing_since is None:
            with contextlib.suppress(Exception):
                await self.flush(timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.depth:
            if self.spool is not None:
                log.warning(
                    "recorder: %d call records are not in the database yet; they stay in the spool "
                    "(%s) and are written at the next start",
                    self.depth,
                    self.spool.dir,
                )
            else:
                log.error("recorder: %d call records could not be written at shutdown", self.depth)

    # --- the writer
    async def _batch(self) -> list[tuple[int, CallRecord]]:
        """The next records to write, oldest first."""
        if self.queue:
            out: list[tuple[int, CallRecord]] = []
            size = 0
            for seq, rec, n in self.queue:
                if out and (len(out) >= self.batch_size or size + n > self.batch_bytes):
                    break
                out.append((seq, rec))
                size += n
            return out
        if not self.spilled or self.spool is None:
            return []
        spool, after = self.spool, self.written_seq
        rows = await asyncio.to_thread(spool.read, after, self.batch_size, self.batch_bytes)
        batch = [(seq, decode_record(body, emb)) for seq, body, emb in rows]
        if not batch or batch[-1][0] >= spool.last_seq:
            self.spilled = False  # caught up: new records go to memory again
        return batch

    async def _write(self, batch: list[tuple[int, CallRecord]]) -> None:
        records = [rec for _, rec in batch]
        try:
            async with asyncio.timeout(self.write_timeout_s):
                inserted = await self.store.write_calls(records)
        except (StoreUnavailable, TimeoutError):
            raise  # the records wait for the database
        except Exception:
            # The database refuses something in this batch (not a connection problem): write the
            # records one by one, and drop (and count) only those it refuses, so that one bad
            # record cannot hold back every other. Writing a record twice is harmless.
            inserted = 0
            for rec in records:
                try:
                    async with asyncio.timeout(self.write_timeout_s):
                        inserted += await self.store.write_calls([rec])
                except (StoreUnavailable, TimeoutError):
                    raise
                except Exception as exc:
                    self.dropped += 1
                    log.error(
                        "recorder: the store refuses call record %s (%s); dropped", rec.id, type(exc).__name__
                    )
        self.written += inserted
        self.duplicates += len(records) - inserted
        self._done(batch)

    def _done(self, batch: list[tuple[int, CallRecord]]) -> None:
        last = batch[-1][0]
        while self.queue and self.queue[0][0] <= last:
            _, _, n = self.queue.popleft()
            self.held -= n
        for seq, rec in batch:
            key = (rec.caller, rec.id)
            if self.pending.get(key) == seq:
                del self.pending[key]
        self.written_seq = max(self.written_seq, last)
        while len(self.marks) > 1 and self.marks[1][0] <= self.written_seq + 1:
            self.marks.popleft()
        if self.spool is not None:
            gone = self.spool.truncate(self.written_seq)
            if gone:  # closing a segment checkpoints its WAL: not on the loop

                def remove() -> None:
                    for seg in gone:
                        seg.remove()

                asyncio.get_running_loop().run_in_executor(None, remove)
        self._progress.set()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            if self.depth == 0:
                self._wake.clear()
                # asyncio.timeout, not wait_for: on Python 3.11, wait_for swallows a cancellation
                # that arrives as the wake-up does (a record written during shutdown), and the
                # recorder then never stops.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._wake.wait()
                continue
            if len(self.queue) < self.batch_size and not self.spilled:
                await asyncio.sleep(LINGER_S)  # let records gather into one batch
            try:
                batch = await self._batch()
                if batch:
                    await self._write(batch)
                backoff = 0.05
                if self.failing_since is not None:
                    log.warning(
                        "recorder: the store is back after %.1f s; writing the backlog (%d records)",
                        time.monotonic() - self.failing_since,
                        self.depth,
                    )
                    self.failing_since = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    log.warning(
                        "recorder: cannot write call records (%s); %d waiting", type(exc).__name__, self.depth
                    )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

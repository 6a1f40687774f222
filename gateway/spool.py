"""The recorder's durable spool: every call record is on local disk (SPOOL_DIR, default
DATA_DIR/spool) before its client gets the last byte, until PostgreSQL has it.

SQLite in WAL mode (the standard library's `sqlite3`), in segments: each segment is a small SQLite
database of records `(seq, at, body, emb)`. `append` is one INSERT on the event loop (about 30 us:
SQLite writes the WAL frame with write(2), so the record is in the operating system's hands when
it returns and a SIGKILL of the gateway cannot lose it). A thread makes it durable against a power
loss: `fsync="interval"` (the default) fsyncs the segment every SPOOL_FSYNC_INTERVAL_MS when
something was appended (group commit: a power loss costs at most that window);
`fsync="always"` makes `durable(seq)` wait for the fsync that covers the record (still grouped:
one fsync serves every record appended meanwhile). Truncation is `unlink` of whole segments once
every record in them is in PostgreSQL: measured, a DELETE of 2,500 small rows stalls the loop
about 30 ms, an unlink costs nothing. A crash between a segment's write to PostgreSQL and its
unlink re-sends at most one segment at the next start (the writes are idempotent).

One spool belongs to one process: an exclusive `flock` on the directory refuses a second gateway
(or a second app in the same process) that would replay the same records.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("gateway.spool")

_ROW_OVERHEAD = 64  # bytes of SQLite bookkeeping counted per record, beside its body


class SpoolError(Exception):
    """The spool cannot take a record (a full disk, an I/O error) or cannot be opened."""


@dataclass(frozen=True)
class SpoolState:
    bytes: int
    max_bytes: int
    records: int
    segments: int
    first_seq: int  # the oldest record still on disk (0: none)
    last_seq: int
    synced_seq: int  # every record up to here has been fsynced


class _Segment:
    """One SQLite file of the spool; files are numbered in the order they were made."""

    def __init__(self, path: Path, first_seq: int) -> None:
        self.path = path
        self.first_seq = first_seq
        self.last_seq = first_seq - 1
        self.bytes = 0
        self.records = 0
        self.conn: sqlite3.Connection | None = None
        self.reader: sqlite3.Connection | None = None

    @staticmethod
    def connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # No fsync per commit (the spool's thread fsyncs), and no checkpoint on the hot path: a
        # segment's WAL holds all of it until the segment is deleted.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS records "
            "(seq INTEGER PRIMARY KEY, at REAL NOT NULL, body BLOB NOT NULL, emb BLOB)"
        )
        return conn

    def files(self) -> list[Path]:
        return [self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")]

    def close(self) -> None:
        for conn in (self.conn, self.reader):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        self.conn = self.reader = None

    def remove(self) -> None:
        self.close()
        for f in self.files():
            with contextlib.suppress(FileNotFoundError):
                f.unlink()


def _number_of(path: Path) -> int:
    try:
        return int(path.stem)
    except ValueError:
        return 0


class Spool:
    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 4 << 20,
        fsync: str = "interval",
        fsync_interval_ms: float = 5.0,
    ) -> None:
        if fsync not in ("interval", "always"):
            raise ValueError("fsync must be 'interval' or 'always'")
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync_policy = fsync
        self.fsync_interval = fsync_interval_ms / 1000
        self.segments: list[_Segment] = []  # oldest first; the last one takes appends
        self.last_seq = 0
        self.synced_seq = 0
        self.bytes = 0
        self._lock_fd: int | None = None
        self._mutex = threading.Lock()  # segments list vs the fsync thread
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._standby: _Segment | None = None
        self._number = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle
    def open(self) -> None:
        """Takes the directory (exclusively), finds the records a previous run left, starts a fresh
        segment and the fsync thread. Raises SpoolError when another process holds the spool."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise SpoolError(
                f"the spool in {self.dir} is in use by another gateway; give each gateway its own "
                "DATA_DIR (or SPOOL_DIR)"
            ) from exc
        self._lock_fd = fd
        for path in sorted(self.dir.glob("*.db")):
            self._number = max(self._number, _number_of(path))
            seg = self._scan(path)
            if seg is not None:
                self.segments.append(seg)
        self.segments.sort(key=lambda seg: seg.first_seq)
        if self.segments:
            self.last_seq = self.segments[-1].last_seq
            log.warning(
                "spool: %d call records (%d bytes) from a previous run in %s; writing them to the store",
                sum(s.records for s in self.segments),
                self.bytes,
                self.dir,
            )
        self.synced_seq = self.last_seq
        self._roll()
        self._thread = threading.Thread(target=self._run, name="spool-fsync", daemon=True)
        self._thread.start()

    def _scan(self, path: Path) -> _Segment | None:
        seg = _Segment(path, 0)
        try:
            conn = _Segment.connect(path)
            count, lo, hi, size = conn.execute(
                "SELECT count(*), min(seq), max(seq), "
                "coalesce(sum(length(body) + coalesce(length(emb), 0)), 0) FROM records"
            ).fetchone()
            conn.close()
        except sqlite3.Error as exc:
            log.error("spool: segment %s cannot be read (%s); it is left in place", path.name, exc)
            return None
        if not count:
            seg.remove()
            return None
        seg.first_seq, seg.last_seq, seg.records = lo, hi, count
        seg.bytes = size + count * _ROW_OVERHEAD
        self.bytes += seg.bytes
        return seg

    def _make(self) -> _Segment:
        """A new, empty segment file (about 20 ms: SQLite syncs a new file's header; the thread
        makes the next one ahead of time, so the loop only swaps)."""
        with self._mutex:
            self._number += 1
            path = self.dir / f"{self._number:010d}.db"
        seg = _Segment(path, 0)
        try:
            seg.conn = _Segment.connect(seg.path)
        except sqlite3.Error as exc:
            raise SpoolError(f"the spool cannot create a segment in {self.dir} ({exc})") from exc
        return seg

    def _roll(self) -> None:
        """A new segment takes the appends (the previous one is fsynced by the thread)."""
        with self._mutex:
            seg, self._standby = self._standby, None
        if seg is None:
            seg = self._make()
        seg.first_seq, seg.last_seq = self.last_seq + 1, self.last_seq
        with self._mutex:
            self.segments.append(seg)
        self._wake.set()  # the thread makes the next standby

    def close(self) -> None:
        """Stops the thread (after a last fsync); segments whose records were all written are gone
        already, the others stay for the next start."""
        if self._thread is not None:
            self._stop = True
            self._wake.set()
            self._thread.join(timeout=10)
            self._thread = None
        for seg in self.segments:
            if seg.records == 0:
                seg.remove()
            else:
                seg.close()
        self.segments = []
        if self._standby is not None:
            self._standby.remove()
            self._standby = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- the hot path
    def has_room(self) -> bool:
        return self.bytes < self.max_bytes

    def append(self, body: bytes, emb: bytes | None = None) -> int:
        """Writes one record; returns its sequence number. On return the record survives the
        process (not yet a power loss: see `durable`). Raises SpoolError if it cannot be written."""
        seg = self.segments[-1]
        if seg.bytes >= self.segment_bytes:
            self._roll()
            seg = self.segments[-1]
        seq = self.last_seq + 1
        assert seg.conn is not None
        try:
            seg.conn.execute("INSERT INTO records VALUES (?, ?, ?, ?)", (seq, time.time(), body, emb))
        except sqlite3.Error as exc:
            raise SpoolError(f"the spool cannot write ({exc})") from exc
        size = len(body) + (len(emb) if emb else 0) + _ROW_OVERHEAD
        seg.last_seq, seg.records, seg.bytes = seq, seg.records + 1, seg.bytes + size
        self.last_seq = seq
        self.bytes += size
        return seq

    async def durable(self, seq: int) -> None:
        """With fsync="always", waits until `seq` has been fsynced (one fsync serves many)."""
        if self.fsync_policy != "always" or self.synced_seq >= seq:
            return
        loop = asyncio.get_running_loop()
        self._loop = loop
        future: asyncio.Future[None] = loop.create_future()
        self._waiters.append((seq, future))
        self._wake.set()
        await future

    # --- the writer's side
    def read(self, after: int, max_records: int, max_bytes: int) -> list[tuple[int, bytes, bytes | None]]:
        """Records after `after`, oldest first, within the limits (at least one). Safe to call from
        a worker thread while the loop appends (each segment has its own reading connection)."""
        out: list[tuple[int, bytes, bytes | None]] = []
        size = 0
        with self._mutex:
            segments = [s for s in self.segments if s.last_seq > after]
        for seg in segments:
            if seg.reader is None:
                seg.reader = sqlite3.connect(seg.path, isolation_level=None, check_same_thread=False)
            rows = seg.reader.execute(
                "SELECT seq, body, emb FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, max_records - len(out)),
            ).fetchall()
            for seq, body, emb in rows:
                if out and size + len(body) > max_bytes:
                    return out
                out.append((seq, body, emb))
                size += len(body)
                after = seq
            if len(out) >= max_records:
                break
        return out

    def truncate(self, upto: int) -> list[_Segment]:
        """Every record up to `upto` is in the store: the segments that hold only such records are
        taken out of the spool and returned, for the caller to `remove` off the loop."""
        gone = []
        with self._mutex:
            keep = []
            for i, seg in enumerate(self.segments):
                active = i == len(self.segments) - 1
                if seg.last_seq <= upto and seg.records and not active:
                    gone.append(seg)
                else:
                    keep.append(seg)
            self.segments = keep
        for seg in gone:
            self.bytes -= seg.bytes
            seg.records = 0
        current = self.segments[-1]
        if current.records and current.last_seq <= upto and current.bytes >= self.segment_bytes // 4:
            # Mostly written and big enough to be worth a fresh file: roll, so that it can go.
            self._roll()
            return gone + self.truncate(upto)
        return gone

    def state(self) -> SpoolState:
        segments = self.segments
        first = next((s.first_seq for s in segments if s.records), 0)
        records = sum(s.records for s in segments)
        return SpoolState(
            self.bytes, self.max_bytes, records, len(segments), first, self.last_seq, self.synced_seq
        )

    # --- the fsync thread
    def _run(self) -> None:
        while True:
            self._wake.wait(self.fsync_interval)
            self._wake.clear()
            stop = self._stop
            if self._standby is None and not stop:
                try:
                    standby = self._make()
                except SpoolError as exc:
                    log.error("%s", exc)
                else:
                    with self._mutex:
                        self._standby = standby
            target = self.last_seq
            if target > self.synced_seq:
                with self._mutex:
                    dirty = [s for s in self.segments if s.last_seq > self.synced_seq]
                for seg in dirty:
                    self._fsync(seg)
                self.synced_seq = target
            if self._waiters and self._loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    self._loop.call_soon_threadsafe(self._release, target)
            if stop:
                return

    @staticmethod
    def _fsync(seg: _Segment) -> None:
        for f in seg.files()[:2]:
            try:
                fd = os.open(f, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            except OSError as exc:
                log.error("spool: fsync of %s failed (%s)", f.name, exc)
            finally:
                os.close(fd)

    def _release(self, synced: int) -> None:
        waiting = []
        for seq, future in self._waiters:
            if seq <= synced:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((seq, future))
        self._waiters = waiting
        if waiting:
            self._wake.set()

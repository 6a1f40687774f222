"""The recorder and its spool: records on disk before the answer, batches to the store, waits while
the store is down, replays what a previous run left, refuses calls when there is no room, isolates
what the store refuses."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from gateway.domain import CallRecord, decode_record, encode_record
from gateway.errors import StoreUnavailable
from gateway.recorder import Recorder, RecorderUnavailable
from gateway.spool import Spool, SpoolError
from gateway.store.memory import MemoryStore
from tests.conftest import make_settings, model


def rec(rid: str, caller: str = "", text: str = "hi") -> CallRecord:
    return CallRecord(
        id=rid,
        messages=[{"role": "user", "content": text}],
        requested_model="auto",
        model="m",
        status="ok",
        http_status=200,
        caller=caller,
    )


class Picky(MemoryStore):
    """Refuses record `bad` (as Postgres refuses what it cannot store), or everything while `down`."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.writes = 0

    async def write_calls(self, records):
        if self.down:
            raise StoreUnavailable("the database is unreachable (ConnectionRefusedError)")
        if any(r.id == "bad" for r in records):
            raise ValueError("invalid byte sequence")
        self.writes += 1
        return await super().write_calls(records)


def test_a_record_survives_the_codec():
    r = rec("x", "key_a")
    r.embedding = np.arange(384, dtype=np.float32) / 384
    r.decision = {"candidates": [{"model": "m", "score": 0.5}]}
    back = decode_record(*encode_record(r))
    assert back.id == "x" and back.caller == "key_a" and back.created_at == r.created_at
    assert back.decision == r.decision and back.prompt_hash == r.prompt_hash
    assert np.array_equal(back.embedding, r.embedding)


def test_the_spool_keeps_records_across_a_restart_and_is_one_process_s(tmp_path):
    spool = Spool(tmp_path, segment_bytes=4096)
    spool.open()
    with pytest.raises(SpoolError, match="in use by another gateway"):
        Spool(tmp_path).open()
    seqs = [spool.append(f"record {i}".encode() * 50) for i in range(40)]
    assert seqs == list(range(1, 41)) and spool.state().segments > 2
    for seg in spool.truncate(20):
        seg.remove()
    left = spool.state()
    assert left.first_seq <= 21 and left.records < 40
    spool.close()  # what is not written stays for the next start
    again = Spool(tmp_path)
    again.open()
    rows = again.read(20, 1000, 1 << 20)
    assert [seq for seq, _, _ in rows] == list(range(21, 41))
    assert rows[0][1] == b"record 20" * 50
    assert again.append(b"next") == 41  # numbering goes on
    again.close()


async def test_records_wait_in_the_spool_and_a_restart_writes_them_once(tmp_path):
    store = Picky()
    store.down = True
    spool = Spool(tmp_path)
    await asyncio.to_thread(spool.open)
    async with Recorder(store, spool, batch_size=10, stall_s=0.1) as recorder:
        for i in range(25):
            await recorder.keep(rec(f"r{i}", caller="key_a" if i % 2 else ""))
        await asyncio.sleep(0.3)
        state = recorder.state()
        assert state.queue_depth == 25 and state.failing and state.oldest_s >= 0.1
        assert recorder.has("key_a", "r1") and not recorder.has("", "r1")
        with pytest.raises(StoreUnavailable):
            await recorder.wait_written("key_a", "r1", 0.2)
    spool.close()  # the gateway stops (or is killed) with the database still down
    store.down = False
    spool = Spool(tmp_path)
    await asyncio.to_thread(spool.open)
    async with Recorder(store, spool, batch_size=10) as recorder:
        assert recorder.depth == 25  # replayed from disk
        await recorder.flush(5)
        assert recorder.depth == 0 and recorder.written == 25
    spool.close()
    assert len(store.calls) == 25 and ("key_a", "r1") in store.calls and ("", "r0") in store.calls
    assert list(tmp_path.glob("*.db")) == []  # all written: the spool is empty on disk


async def test_past_the_memory_budget_records_are_read_back_from_the_spool_in_order(tmp_path):
    store = Picky()
    store.down = True
    spool = Spool(tmp_path)
    await asyncio.to_thread(spool.open)
    async with Recorder(store, spool, queue_bytes=2000, batch_size=7) as recorder:
        for i in range(30):
            await recorder.keep(rec(f"r{i}", text="x" * 100))
        assert recorder.spilled and recorder.held <= 2000
        store.down = False
        await recorder.flush(5)
        assert not recorder.spilled and recorder.written == 30 and recorder.duplicates == 0
        await recorder.keep(rec("after"))
        await recorder.flush(5)
    spool.close()
    assert [rid for _, rid in store.calls] == [f"r{i}" for i in range(30)] + ["after"]


async def test_a_full_spool_refuses_new_calls(tmp_path):
    spool = Spool(tmp_path, max_bytes=3000)
    await asyncio.to_thread(spool.open)
    store = Picky()
    store.down = True
    async with Recorder(store, spool) as recorder:
        recorder.admit()
        for i in range(10):
            recorder.record(rec(f"r{i}", text="x" * 500))
        with pytest.raises(RecorderUnavailable) as refused:
            recorder.admit()
        assert refused.value.status == 503 and refused.value.headers["retry-after"]
    spool.close()


async def test_fsync_always_waits_for_the_group_fsync(tmp_path):
    spool = Spool(tmp_path, fsync="always", fsync_interval_ms=1000)
    await asyncio.to_thread(spool.open)
    async with Recorder(MemoryStore(), spool) as recorder:
        await asyncio.gather(*(recorder.keep(rec(f"r{i}")) for i in range(20)))
        assert spool.synced_seq >= 20  # not a second later: the waiters woke the thread
    spool.close()


async def test_one_refused_record_does_not_hold_back_the_others():
    store = Picky()
    recorder = Recorder(store, batch_size=10)
    async with recorder:
        for rid in ("a", "bad", "b"):
            recorder.record(rec(rid))
        await recorder.flush(5)
    assert recorder.depth == 0 and recorder.dropped == 1 and recorder.written == 2
    assert await store.get_call("", "a") is not None and await store.get_call("", "b") is not None
    assert await store.get_call("", "bad") is None


async def test_a_reused_id_keeps_its_first_record_and_is_counted():
    store = Picky()
    async with Recorder(store, batch_size=10) as recorder:
        first = rec("x")
        recorder.record(first)
        recorder.record(rec("x"))
        recorder.record(rec("x", caller="key_b"))  # another tenant's "x" is another call
        await recorder.flush(5)
    assert recorder.written == 2 and recorder.duplicates == 1
    assert store.calls[("", "x")].record is first and ("key_b", "x") in store.calls


def test_nul_characters_are_stored(fake, gateway, dsn, tmp_path):
    # JSON (and so OpenAI) allows \u0000; PostgreSQL text and jsonb do not
    settings = make_settings(
        [model("m", fake.url())], enable_persistence=True, database_url=dsn, data_dir=tmp_path
    )
    gw = gateway(settings)
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "a\u0000b"}]},
    )
    assert resp.status_code == 200
    rid = resp.headers["x-request-id"]
    record = httpx.get(f"{gw.url}/requests/{rid}").json()
    assert record["messages"][0]["content"] == "a\ufffdb"
    assert (
        httpx.post(
            gw.url + "/feedback", json={"request_id": rid, "score": 1, "feedback_text": "\u0000"}
        ).status_code
        == 200
    )
    assert gw.services.recorder.dropped == 0


async def test_the_recorder_stops_when_cancelled_as_a_record_wakes_it():
    """A record written during shutdown wakes the recorder just as the lifespan cancels it: the
    cancellation must not be lost (on Python 3.11, asyncio.wait_for lost it, and the gateway
    never finished shutting down). Every interleaving of the two in the first loop turns."""
    for turns in range(6):
        recorder = Recorder(MemoryStore(), batch_size=10)
        await recorder.__aenter__()
        await asyncio.sleep(0.01)  # the recorder waits for work
        recorder.record(rec(f"r{turns}"))
        for _ in range(turns):
            await asyncio.sleep(0)
        task = recorder._task
        assert task is not None
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=3)
        assert done, f"the recorder ignored its cancellation ({turns} turns after the record)"
        await recorder.aclose()

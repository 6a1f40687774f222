"""The write-behind recorder: batches, waits while the store is down, isolates what it refuses."""

from __future__ import annotations

import asyncio

import httpx

from gateway.domain import CallRecord
from gateway.errors import StoreUnavailable
from gateway.recorder import Recorder
from gateway.store.memory import MemoryStore
from tests.conftest import make_settings, model


def rec(rid: str) -> CallRecord:
    return CallRecord(id=rid, messages=[], requested_model="auto", model="m", status="ok", http_status=200)


class Picky(MemoryStore):
    """Refuses record `bad` (as Postgres refuses what it cannot store), or everything while `down`."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def write_calls(self, records):
        if self.down:
            raise StoreUnavailable("the database is unreachable (ConnectionRefusedError)")
        if any(r.id == "bad" for r in records):
            raise ValueError("invalid byte sequence")
        await super().write_calls(records)


async def test_one_refused_record_does_not_hold_back_the_others():
    store = Picky()
    recorder = Recorder(store, batch_size=10)
    for rid in ("a", "bad", "b"):
        recorder.record(rec(rid))
    await recorder.flush()
    assert recorder.depth == 0 and recorder.dropped == 1 and recorder.written == 2
    assert await store.get_call("a") is not None and await store.get_call("b") is not None
    assert await store.get_call("bad") is None


async def test_records_wait_while_the_store_is_down_and_a_reused_id_keeps_its_first():
    store = Picky()
    store.down = True
    async with Recorder(store, batch_size=10) as recorder:
        first = rec("x")
        recorder.record(first)
        recorder.record(rec("x"))
        recorder.record(rec("y"))
        await asyncio.sleep(0.2)
        assert recorder.depth == 3 and recorder.failing_since is not None and recorder.dropped == 0
        assert recorder.pending["x"] is first
        store.down = False
        for _ in range(100):
            if recorder.depth == 0:
                break
            await asyncio.sleep(0.05)
    assert recorder.depth == 0 and recorder.failing_since is None
    assert set(store.calls) == {"x", "y"}


def test_nul_characters_are_stored(fake, gateway, dsn):
    # JSON (and so OpenAI) allows \u0000; PostgreSQL text and jsonb do not
    gw = gateway(make_settings([model("m", fake.url())], enable_persistence=True, database_url=dsn))
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

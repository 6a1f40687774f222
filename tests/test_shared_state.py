"""The shared-state seam: one contract for the in-process state and a real Valkey server (GCRA
cells, counters, both-or-neither, notices), what only a server can show (several clients at once,
a restart that loses the script), the guard's fail-open and fail-closed, and the limits built on
top (budgets seeded from the ledger, OpenAI's headers)."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.domain import CallRecord, VirtualKey
from gateway.errors import ServiceUnavailable
from gateway.limits import NANO, RateLimits, duration, headers, period_bounds
from gateway.shared import RESYNC, Rate, SharedStateDown, Sum
from gateway.shared.guarded import Guarded
from gateway.shared.local import LocalState
from gateway.shared.redis import RedisState
from gateway.store.memory import MemoryStore
from tests.valkey import Valkey


@pytest.fixture(params=["local", "redis"])
async def shared(request, valkey_server) -> AsyncIterator[LocalState | RedisState]:
    if request.param == "local":
        yield LocalState()
        return
    request.getfixturevalue("valkey")  # running and empty
    state = RedisState(valkey_server.url)
    yield state
    await state.aclose()


async def test_a_rate_cell_admits_its_limit_then_says_when(shared):
    results = [await shared.apply([Rate("a", 1, 3)]) for _ in range(4)]
    assert [r.applied for r in results] == [True, True, True, False]
    assert [int(r.cells[0].value) for r in results[:3]] == [2, 1, 0]
    refused = results[3].cells[0]
    assert refused.retry_s is not None and 19 < refused.retry_s <= 20  # one request every 20 s
    assert 59 < refused.reset_s <= 60
    too_big = await shared.apply([Rate("b", 4, 3)])
    assert not too_big.applied and too_big.cells[0].retry_s is None  # never: larger than the limit


async def test_debts_and_refunds(shared):
    assert (await shared.apply([Rate("t", 100, 600)])).applied
    forced = await shared.apply([Rate("t", 1000, 600, check=False)])  # used far more than held
    assert forced.applied and forced.cells[0].value == 0
    refused = await shared.apply([Rate("t", 1, 600)])
    assert not refused.applied and 50 < refused.cells[0].retry_s <= 51  # 1,100 taken: 500 over + 1
    await shared.apply([Rate("t", -5000, 600, check=False)])  # a refund fills the bucket, no more
    peek = await shared.apply([Rate("t", 0, 600, check=False)])
    assert peek.cells[0].value == pytest.approx(600, abs=0.5)


async def test_both_or_neither(shared):
    ops = [Rate("r", 1, 10), Sum("s", 5, cap=4, seed=0)]
    refused = await shared.apply(ops)
    assert not refused.applied and refused.cells[0].ok and not refused.cells[1].ok
    peek = await shared.apply([Rate("r", 0, 10, check=False), Sum("s", 0)])
    assert peek.cells[0].value == pytest.approx(10, abs=0.01)  # the request was not taken
    assert peek.cells[1].missing  # nor the counter created


async def test_counters_are_seeded_capped_and_reported_missing(shared):
    missing = await shared.apply([Rate("x", 1, 10), Sum("c", 7, cap=100)])
    assert not missing.applied and missing.cells[1].missing
    assert (await shared.apply([Sum("c", 0)])).applied  # a peek is no refusal
    seeded = await shared.apply([Sum("c", 7, cap=100, seed=90, ttl_s=60)])
    assert seeded.applied and seeded.cells[0].value == 97
    assert not (await shared.apply([Sum("c", 4, cap=100)])).applied
    assert (await shared.apply([Sum("c", -10, cap=100)])).cells[0].value == 87  # settling down
    big = 3 * 10**15  # nano-USD: three million dollars stays exact
    assert (await shared.apply([Sum("big", 1, seed=big)])).cells[0].value == big + 1


async def test_notices_reach_listeners(shared):
    heard: list[str] = []
    subscribed = asyncio.Event()
    listener = shared.listen("keys")

    async def read() -> None:
        async for notice in listener:
            heard.append(notice)
            subscribed.set()
            if notice == "vk_1":
                return

    task = asyncio.create_task(read())
    await asyncio.wait_for(subscribed.wait(), 5)
    assert heard == [RESYNC]
    await shared.publish("keys", "vk_1")
    await asyncio.wait_for(task, 5)
    assert heard == [RESYNC, "vk_1"]


async def test_replicas_share_one_limit_exactly(valkey):
    """Three clients (three replicas) hammer one limit of 30 at once: exactly 30 get through."""
    replicas = [RedisState(valkey.url, timeout_s=5) for _ in range(3)]  # atomicity, not speed
    try:
        results = await asyncio.gather(*(r.apply([Rate("k", 1, 30)]) for r in replicas for _ in range(40)))
        assert sum(r.applied for r in results) == 30
    finally:
        for r in replicas:
            await r.aclose()


async def test_a_restarted_server_gets_the_script_again(valkey):
    state = RedisState(valkey.url)
    try:
        assert (await state.apply([Rate("k", 1, 5)])).applied
        valkey.restart()  # the script cache (and every cell) is gone
        outcome = await state.apply([Rate("k", 1, 5)])
        assert outcome.applied and int(outcome.cells[0].value) == 4
    finally:
        await state.aclose()


async def test_the_url_says_where_and_as_whom(tmp_path):
    """REDIS_URL's password, user, database and unix socket reach the limiter's own connection."""
    sock = Path(tempfile.mkdtemp(prefix="vk", dir="/tmp")) / "s"  # a unix socket path is short
    server = Valkey(tmp_path / "v", extra=["--requirepass", "s3cret", "--unixsocket", str(sock)]).start()
    tcp = f"127.0.0.1:{server.port}"
    urls = [f"redis://:s3cret@{tcp}/3", f"redis://default:s3cret@{tcp}/3", f"unix://:s3cret@{sock}?db=3"]
    try:
        left = []
        for url in urls:
            state = RedisState(url)
            try:
                left.append(int((await state.apply([Rate("k", 1, 5)])).cells[0].value))
            finally:
                await state.aclose()
        assert left == [4, 3, 2]  # one cell, in database 3, whichever way the server was reached
        other_db = RedisState(f"redis://:s3cret@{tcp}/0")
        try:
            assert int((await other_db.apply([Rate("k", 1, 5)])).cells[0].value) == 4
        finally:
            await other_db.aclose()
        wrong = RedisState(f"redis://:wrong@{tcp}/3")
        try:
            with pytest.raises(SharedStateDown, match=r"WRONGPASS|invalid"):
                await wrong.apply([Rate("k", 1, 5)])
        finally:
            await wrong.aclose()
    finally:
        server.stop()


async def test_rediss_speaks_tls_and_checks_the_certificate(valkey, tmp_path):
    """rediss://: the limiter's connection speaks TLS, trusts the CA that ssl_ca_certs names and
    refuses a server its CAs do not vouch for (a TLS front, certificates from trustme, before the
    test's Valkey, whose build has no TLS)."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    backend = int(valkey.url.rsplit(":", 1)[1].split("/")[0])

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", backend)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
            dst.close()

        await asyncio.gather(pump(reader, up_w), pump(up_r, writer))

    front = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=server_ctx)
    port = front.sockets[0].getsockname()[1]
    trusted = RedisState(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'ca.pem'}", timeout_s=5)
    untrusted = RedisState(f"rediss://127.0.0.1:{port}/0", timeout_s=5)  # the system's CAs only
    try:
        assert [round((await trusted.apply([Rate("k", 1, 5)])).cells[0].value) for _ in range(2)] == [4, 3]
        with pytest.raises(SharedStateDown, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.apply([Rate("k", 1, 5)])
    finally:
        await trusted.aclose()
        await untrusted.aclose()
        front.close()


async def test_pipelined_answers_reach_their_own_callers(valkey):
    """Many operations in flight on the one connection at once, each on its own cell: every
    caller gets its own cell's answer (replies are matched to commands in order)."""
    state = RedisState(valkey.url)
    try:
        await state.apply([Rate("warm", 1, 10)])
        outcomes = await asyncio.gather(*(state.apply([Rate(f"k{i}", i + 1, 1000)]) for i in range(200)))
        assert [round(o.cells[0].value) for o in outcomes] == [1000 - (i + 1) for i in range(200)]
    finally:
        await state.aclose()


async def test_the_guard_fails_open_fast_and_comes_back(valkey, caplog):
    guard = Guarded(RedisState(valkey.url, timeout_s=0.1), probe_s=0.1)
    try:
        assert (await guard.apply([Rate("k", 1, 3)])).applied
        valkey.pause()  # hangs: connections are accepted, nothing is answered
        t0 = time.monotonic()
        outcome = await guard.apply([Rate("k", 1, 3)])
        assert outcome.applied and time.monotonic() - t0 < 1.0  # per replica now, no stall
        status = guard.status()
        assert not status.up and status.mode == "per-replica (fail-open)" and status.fallbacks == 1
        assert any("PER REPLICA" in r.getMessage() for r in caplog.records)
        t0 = time.monotonic()
        await guard.apply([Rate("k", 1, 3)])  # no second wait for the dead server
        assert time.monotonic() - t0 < 0.05
        valkey.resume()
        for _ in range(100):
            if guard.status().up:
                break
            await asyncio.sleep(0.05)
        assert guard.status().up
        # The server's cell again: the first request, and the one that timed out, which the server
        # ran when it woke (an operation that timed out may count twice, never not at all).
        shared_again = await guard.apply([Rate("k", 1, 3)])
        assert shared_again.applied and int(shared_again.cells[0].value) == 0
    finally:
        valkey.resume()
        await guard.aclose()


async def test_the_guard_can_fail_closed(valkey):
    guard = Guarded(RedisState(valkey.url, timeout_s=0.1), fail_closed=True, probe_s=0.1)
    try:
        valkey.kill()
        with pytest.raises(ServiceUnavailable) as refused:
            await guard.apply([Rate("k", 1, 2)])
        assert refused.value.code == "shared_state_unavailable" and refused.value.headers["retry-after"]
        valkey.start()
        for _ in range(100):
            if guard.status().up:
                break
            await asyncio.sleep(0.05)
        assert (await guard.apply([Rate("k", 1, 2)])).applied
    finally:
        await guard.aclose()


# --- the limits built on the seam


def _key(**kw) -> VirtualKey:
    return VirtualKey(id="vk_0123456789abcdef", owner="acme", key_hash="h", prefix="sk-lr-xxxx", **kw)


async def test_a_budget_starts_from_the_ledger_and_refuses_past_it():
    """A restart (a fresh in-process state) must not hand a key its budget again: the counter
    starts from what the store's call records say was spent this month."""
    store = MemoryStore()
    now = datetime.now(UTC)
    record = CallRecord(id="c1", messages=[], requested_model="m", model="m", status="ok", http_status=200)
    record.key_id, record.cost_usd = "vk_0123456789abcdef", 0.75
    await store.write_calls([record])
    limits = RateLimits(LocalState(), ledger=store, now=lambda: now)
    policy = limits.policy(_key(budget_month_usd=1.0))
    who = "vk_0123456789abcdef"
    held, quotas, refused = await limits.admit(who, policy, cost_usd=0.2)
    assert held is not None and quotas[0].name == "usd-month" and quotas[0].remaining == pytest.approx(0.05)
    _, quotas, refused = await limits.admit(who, policy)
    assert refused is None and quotas[0].remaining == pytest.approx(0.05)  # seeded: the headers read it
    _, _, refused = await limits.admit(who, policy, cost_usd=0.2)
    assert refused is not None and refused.code == "budget_exceeded" and refused.status == 429
    _, _, end = period_bounds("month", now)
    assert end is not None and end.isoformat() in refused.message
    assert int(refused.headers["retry-after"]) == pytest.approx((end - now).total_seconds(), abs=1)
    held.settle(10, 0.01)  # it cost far less than held: the rest comes back
    await limits.drain()
    assert (await limits.admit(who, policy, cost_usd=0.2))[2] is None
    total = limits.policy(_key(budget_total_usd=0.5))
    _, _, refused = await limits.admit(who, total, cost_usd=0.0001)
    assert refused is not None and "never resets" in refused.message and "retry-after" not in refused.headers


async def test_one_operation_holds_the_request_its_tokens_and_its_cost(shared):
    """A call of a key with a budget is admitted in one operation (one round trip to a shared
    server): its request, its tokens and its estimated cost, all or none. A call the budget refuses
    takes no request nor token; a rate refusal is reported as such even when the budget is short."""
    limits = RateLimits(shared, ledger=MemoryStore())
    policy = limits.policy(_key(rpm=2, tpm=1000, budget_day_usd=1.0))
    who = "vk_0123456789abcdef"
    held, quotas, refused = await limits.admit(who, policy, 100, cost_usd=0.6)
    assert refused is None and held is not None and (held.tokens, held.nano) == (100, 600_000_000)
    names = {q.name: q.remaining for q in quotas}
    assert names["requests"] == pytest.approx(1, abs=0.01) and names["usd-day"] == pytest.approx(0.4)
    assert names["tokens"] == pytest.approx(900, abs=2)
    _, quotas, refused = await limits.admit(who, policy, 100, cost_usd=0.6)  # over the budget
    assert refused is not None and refused.code == "budget_exceeded"
    assert {q.name: q.remaining for q in quotas}["requests"] == pytest.approx(1, abs=0.01)  # none taken
    held.release()
    await limits.drain()
    assert (await limits.admit(who, policy, 100, cost_usd=0.6))[2] is None  # the release gave it back
    _, _, refused = await limits.admit(who, policy, 100, cost_usd=0.6)  # no request left, nor budget
    assert refused is not None and refused.code == "rate_limit_exceeded" and "requests" in refused.message


def test_periods_and_headers_as_openai_writes_them():
    now = datetime(2026, 12, 31, 22, 30, tzinfo=UTC)
    assert period_bounds("day", now)[0] == "20261231"
    assert period_bounds("month", now)[2] == datetime(2027, 1, 1, tzinfo=UTC)
    assert period_bounds("total", now)[2] is None
    assert [duration(s) for s in (0.02, 1.5, 360, 47_000)] == ["20ms", "1.5s", "6m0s", "13h3m20s"]
    from gateway.limits import Quota

    out = dict(headers([Quota("requests", 60, 59.7, 1.0), Quota("usd-day", 5.0, 3.25, 5400.0)]))
    assert out[b"x-ratelimit-remaining-requests"] == b"59"
    assert out[b"x-ratelimit-reset-requests"] == b"1s"
    assert out[b"x-ratelimit-limit-usd-day"] == b"5" and out[b"x-ratelimit-remaining-usd-day"] == b"3.25"
    assert out[b"x-ratelimit-reset-usd-day"] == b"1h30m0s"
    assert NANO == 10**9

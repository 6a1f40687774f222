"""The dashboard's JSON API without a browser: who may read it, what a bad parameter gets (a clear
OpenAI-style 400, never a 500), "why this model" on the real router (knn_ts with neighbours from the
store), the page's headers and files, and the query plans of its reads on PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.dialects import postgresql

from gateway.domain import CallRecord, Feedback, utcnow
from gateway.insights import CallQuery, Window
from gateway.store.postgres import PostgresStore, make_engine
from gateway.store.postgres_insights import buckets_statement, list_statement
from tests.conftest import make_settings, model, wait_for

ADMIN = "the-admin-key-123"
CLIENT = "a-client-key-456"
USER = [{"role": "user", "content": "How do I reverse a list in Python?"}]


def admin(**kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}", **kw}


@pytest.fixture
def gw(fake, gateway, dsn):
    """On PostgreSQL: what reaches SQL is what must not break it (a NUL, quotes, wildcards)."""
    settings = make_settings(
        [model("m1", fake.url(), input_usd_per_mtok=1.0), model("m2", fake.url())],
        admin_api_key=ADMIN,
        gateway_api_keys=[CLIENT],
        enable_persistence=True,
        database_url=dsn,
    )
    return gateway(settings)


def test_only_the_admin_key_reads_the_dashboard_api(gw):
    paths = ["/ui/api/meta", "/ui/api/overview", "/ui/api/calls", "/ui/api/router", "/ui/api/dpo"]
    for path in paths:
        for headers in ({}, {"Authorization": f"Bearer {CLIENT}"}, {"Authorization": "Bearer nope"}):
            r = httpx.get(gw.url + path, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(gw.url + path, headers=admin()).status_code == 200, path
    r = httpx.post(
        gw.url + "/ui/api/explain", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {CLIENT}"}
    )
    assert r.status_code == 401


def test_the_router_page_lists_the_routers_arms_and_why_one_is_unavailable(fake, gateway):
    settings = make_settings(
        [
            model("m1", fake.url()),
            model("paid", fake.url(), provider="openrouter", api_key_env="NO_SUCH_KEY_ENV"),
            model("emb", fake.url(), capabilities=["embeddings"]),  # not an arm: never routed
        ],
        admin_api_key=ADMIN,
    )
    gw = gateway(settings)
    arms = {a["model"]: a for a in httpx.get(gw.url + "/ui/api/router", headers=admin()).json()["arms"]}
    assert set(arms) == {"m1", "paid"}
    assert arms["m1"]["available"] and arms["m1"]["unavailable_because"] is None
    assert not arms["paid"]["available"]
    assert arms["paid"]["unavailable_because"].startswith("NO_SUCH_KEY_ENV is not set")  # a text


def test_without_an_admin_key_the_dashboard_api_is_disabled(fake, gateway):
    gw = gateway(make_settings([model("m1", fake.url())]))
    r = httpx.get(gw.url + "/ui/api/meta")
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    assert httpx.get(gw.url + "/ui").status_code == 200  # the page itself says how to log in


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/ui/api/overview?range=soon", "range"),
        ("/ui/api/overview?range=0h", "range"),
        ("/ui/api/overview?bucket=minute", "bucket"),
        ("/ui/api/overview?range=90d&bucket=hour", "bucket"),
        ("/ui/api/overview?since=yesterday", "since"),
        ("/ui/api/overview?since=2026-11-02T00:00:00Z&until=2026-11-01T00:00:00Z", "since"),
        ("/ui/api/calls?limit=0", "limit"),
        ("/ui/api/calls?limit=abc", "limit"),
        ("/ui/api/calls?limit=100000", "limit"),
        ("/ui/api/calls?rated=maybe", "rated"),
        ("/ui/api/calls?status=fine", "status"),
        ("/ui/api/calls?cursor=garbage", "cursor"),
        ("/ui/api/calls?cursor=2026-11-01T00:00:00|", "cursor"),
        ("/ui/api/calls?q=%00", "q"),
        ("/ui/api/calls?model=a%00b", "model"),
        ("/ui/api/calls?q=" + "x" * 501, "q"),
        ("/ui/api/dpo?range=7x", "range"),
    ],
)
def test_a_bad_parameter_is_a_400_that_names_it(gw, path, param):
    r = httpx.get(gw.url + path, headers=admin())
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_hostile_values_are_searched_for_not_run(gw):
    for q in ("' OR 1=1 --", "%", "_", "\\", "'; DROP TABLE calls; --", "ü" * 100):
        r = httpx.get(
            gw.url + "/ui/api/calls", params={"q": q, "model": q, "caller": q, "id": q}, headers=admin()
        )
        assert r.status_code == 200 and r.json()["data"] == [], (q, r.text)


def test_calls_page_through_the_api_with_cursors(gw):
    for i in range(5):
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "m1", "messages": [{"role": "user", "content": f"question {i}"}]},
            headers={"Authorization": f"Bearer {CLIENT}", "X-Request-ID": f"page-{i}"},
        )
        assert r.status_code == 200
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = httpx.get(gw.url + "/ui/api/calls", params=params, headers=admin()).json()
        seen += [c["id"] for c in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"page-{i}" for i in reversed(range(5))]
    one = httpx.get(gw.url + "/ui/api/calls/page-3", headers=admin()).json()
    assert one["id"] == "page-3" and one["pairs"] == [] and "embedding" not in one
    assert one["messages"] == [{"role": "user", "content": "question 3"}] and one["response"]
    missing = httpx.get(gw.url + "/ui/api/calls/nope", headers=admin())
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "request_not_found"
    assert httpx.get(gw.url + "/ui/api/calls/%20bad%20id", headers=admin()).status_code == 404


def test_why_this_model_is_the_routers_own_decision_and_calls_nothing(fake, gateway, dsn):
    # knn_ts with rated neighbours in the store: the explanation shows their evidence
    settings = make_settings(
        [model("cheap", fake.url()), model("strong", fake.url())],
        admin_api_key=ADMIN,
        router_policy="knn_ts",
        enable_persistence=True,
        database_url=dsn,
        min_similar_requests=1,
        exploration_rate=0.0,
        similarity_threshold=0.5,
    )
    gw = gateway(settings)
    for i in range(6):
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            json={
                "model": "strong",
                "messages": [{"role": "user", "content": f"Prove that sqrt(2) is irrational ({i})"}],
            },
        )
        rid = r.headers["x-request-id"]
        assert httpx.post(gw.url + "/feedback", json={"request_id": rid, "score": 1.0}).status_code == 200
    wait_for(lambda: gw.call(gw.services.store.rated_since(utcnow() - timedelta(hours=1), 100)))
    before = sum(fake.counts.values())
    calls = httpx.get(gw.url + "/ui/api/calls", headers=admin()).json()["data"]
    r = httpx.post(
        gw.url + "/ui/api/explain",
        json={"prompt": "Prove that sqrt(2) is irrational (7)"},
        headers=admin(),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["layer"] == "bandit" and body["policy"] == "knn_ts" and body["embedded"] is True
    assert {"embed_ms", "neighbours_ms", "sample_ms", "routing_ms"} <= set(body["timings_ms"])
    arms = {a["model"]: a for a in body["arms"]}
    assert set(arms) == {"cheap", "strong"} and sum(a["chosen"] for a in arms.values()) == 1
    assert arms["strong"]["evidence"] > 0 and arms["cheap"]["evidence"] == 0  # the neighbours were read
    strong = arms["strong"]["posterior"]
    assert strong["kind"] == "beta" and strong["low"] < strong["mean"] < strong["high"]
    assert arms["strong"]["posterior"]["mean"] > arms["cheap"]["posterior"]["mean"]
    assert body["propensity"] == pytest.approx(arms[body["model"]]["propensity"], abs=1e-3)
    assert sum(fake.counts.values()) == before  # no upstream
    assert httpx.get(gw.url + "/ui/api/calls", headers=admin()).json()["data"] == calls  # nothing recorded
    # a rule-free explicit model is no decision at all; bad input is a 400 or 404
    explicit = httpx.post(gw.url + "/ui/api/explain", json={"prompt": "x", "model": "cheap"}, headers=admin())
    assert explicit.json()["layer"] == "explicit" and explicit.json()["arms"] == []
    for payload, status in (
        ({"prompt": ""}, 400),
        ({"prompt": 3}, 400),
        ({}, 400),
        ({"prompt": "x", "model": "nope"}, 404),
        ({"prompt": "x", "router": {"max_cost_usd": -1}}, 400),
    ):
        r = httpx.post(gw.url + "/ui/api/explain", json=payload, headers=admin())
        assert r.status_code == status, (payload, r.text)
    bad = httpx.post(gw.url + "/ui/api/explain", content=b"{oops", headers=admin())
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"


def test_the_page_and_its_files_are_served_from_the_package(gw):
    page = httpx.get(gw.url + "/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    for src in ("/ui/static/js/main.js", "/ui/static/app.css", "/ui/static/vendor/uplot/uPlot.iife.min.js"):
        assert src in page.text or src.endswith(("lib.js",))
        r = httpx.get(gw.url + src)
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff", src
    assert "javascript" in httpx.get(gw.url + "/ui/static/js/main.js").headers["content-type"]
    assert "http" not in "".join(
        line for line in page.text.splitlines() if "src=" in line or "href=" in line
    ).replace("http-equiv", "")  # nothing from another origin
    for path in ("/ui/static/../../gateway/config.py", "/ui/static/%2e%2e/api.py", "/ui/static/nope.js"):
        r = httpx.get(gw.url + path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path


async def test_the_dashboards_reads_use_their_indexes(dsn):
    store = PostgresStore(make_engine(dsn))
    now = utcnow()
    rng = np.random.default_rng(0)
    async with store.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO calls (id, created_at, caller, requested_model, model, messages, prompt_hash, "
                "status, http_status, layer) "
                "SELECT 'c' || g, now() - (g || ' seconds')::interval, 'key_' || (g % 50), 'auto', "
                "'m' || (g % 5), '[]'::jsonb, md5(g::text), 'ok', 200, 'bandit' "
                "FROM generate_series(1, 40000) g"
            )
        )
        await conn.execute(text("ANALYZE calls"))
    await store.write_calls([CallRecord("x", USER, "auto", "m1", "ok", 200, created_at=now)])
    await store.add_feedback(Feedback("x", float(rng.random())))

    async def plan(stmt: Any) -> str:
        sql = str(stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
        async with store.engine.connect() as conn:
            return "\n".join(r[0] for r in await conn.execute(text("EXPLAIN " + sql)))

    newest = await plan(list_statement(CallQuery(limit=50)))
    assert "Index Scan Backward using calls_created_at_idx" in newest, newest
    by_key = await plan(list_statement(CallQuery(caller="key_7", limit=50)))
    assert "calls_caller_created_at_idx" in by_key, by_key
    for stmt in (  # a common model, a text search, a page further back: an index walk, never a scan
        list_statement(CallQuery(model="m3", limit=50)),
        list_statement(CallQuery(text="needle", rated=False, limit=50)),
        list_statement(CallQuery(before=(now - timedelta(hours=2), "c7200"), limit=50)),
    ):
        found = await plan(stmt)
        assert "Index Scan" in found and "Seq Scan" not in found, found
    hour = await plan(buckets_statement(Window(now - timedelta(minutes=30), now, "hour")))
    assert "calls_created_at_idx" in hour and "Seq Scan" not in hour, hour
    await store.aclose()

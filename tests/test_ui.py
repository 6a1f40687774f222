"""The dashboard in a real headless Chromium (Playwright on Debian's chromium), against a gateway on
PostgreSQL with calls made through it by the openai SDK and older calls written to its store.

Each page is checked against the database, and its screenshot is saved under out/ui/.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import openai
import pytest

from gateway.auth import key_id
from gateway.domain import CallRecord, Feedback, utcnow
from gateway.embedders.static import StaticEmbedder
from tests.browser import browser, shoot  # noqa: F401 (a fixture)
from tests.conftest import GatewayServer, make_settings, model, query, wait_for

ADMIN = "admin-key-for-the-dashboard"
ALPHA, BETA = "key-alpha-0001", "key-beta-0002"
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script> what is 2+2?'
TOPICS = ["sourdough bread", "kubernetes", "tax returns", "a marathon", "rust lifetimes", "french verbs"]


def _history(now: Any) -> tuple[list[CallRecord], list[Feedback]]:
    """Older calls over the last three days, as the recorder would have written them."""
    rng = random.Random(7)
    records, ratings = [], []
    for i in range(70):
        ok = rng.random() > 0.12
        name = rng.choice(["m1", "m2", "m3"])
        records.append(
            CallRecord(
                id=f"hist-{i:03d}",
                messages=[{"role": "user", "content": f"Old question {i} about {rng.choice(TOPICS)}"}],
                requested_model="auto",
                model=name,
                status="ok" if ok else "error",
                http_status=200 if ok else 502,
                created_at=now - timedelta(hours=rng.uniform(2, 70)),
                layer="bandit",
                strategy="bandit",
                propensity=round(rng.uniform(0.2, 0.95), 3),
                decision={"explored": rng.random() < 0.2, "timings_ms": {"embed_ms": 4.0, "routing_ms": 4.5}},
                overhead_ms=rng.uniform(0.4, 3.0),
                upstream_ms=rng.uniform(80, 900) if ok else None,
                prompt_tokens=rng.randint(10, 400),
                completion_tokens=rng.randint(5, 300) if ok else None,
                cost_usd=rng.uniform(1e-5, 4e-3) if ok else None,
                response=f"An old answer {i}." if ok else None,
                error=None if ok else "all upstream attempts failed",
                caller=key_id(rng.choice([ALPHA, BETA])),
            )
        )
        if ok and rng.random() < 0.45:
            whose = records[-1].caller or ""
            ratings.append(Feedback(f"hist-{i:03d}", round(rng.uniform(0, 1), 2), caller=whose))
    return records, ratings


@pytest.fixture(scope="module")
def site(fake, pg, static_model) -> Iterator[dict[str, Any]]:
    """A gateway on a fresh database, seeded: old calls, then real calls by two keys (one failing,
    one streamed, one hostile prompt, a DPO pair), some rated."""
    dsn = pg.new_database()
    settings = make_settings(
        [
            model("m1", fake.url(), input_usd_per_mtok=0.5, output_usd_per_mtok=1.0),
            model("m2", fake.url(), input_usd_per_mtok=3.0, output_usd_per_mtok=6.0),
            model("m3", fake.url(status=500)),
        ],
        enable_persistence=True,
        database_url=dsn,
        admin_api_key=ADMIN,
        gateway_api_keys=[ALPHA, BETA],
        exploration_rate=0.3,
        upstream_retries=0,
    )
    embedder = StaticEmbedder(static_model)
    server = GatewayServer(settings, embedder=embedder).__enter__()
    try:
        records, ratings = _history(utcnow())
        server.call(server.services.store.write_calls(records))
        for fb in ratings:
            server.call(server.services.store.add_feedback(fb))
        alpha = openai.OpenAI(base_url=server.url + "/v1", api_key=ALPHA, max_retries=0)
        beta = openai.OpenAI(base_url=server.url + "/v1", api_key=BETA, max_retries=0)
        ids: dict[str, str] = {}

        def ask(client: openai.OpenAI, text: str, name: str = "auto") -> str:
            raw = client.chat.completions.with_raw_response.create(
                model=name, messages=[{"role": "user", "content": text}]
            )
            return raw.headers["x-request-id"]

        for i, topic in enumerate(TOPICS):
            ids[f"auto{i}"] = ask(alpha, f"Tell me something useful about {topic}.")
        ids["sourdough"] = ask(alpha, "How long should a SOURDOUGH starter rest before baking?")
        ids["pair_good"] = ask(alpha, "What is the capital of France?", "m1")
        ids["pair_bad"] = ask(alpha, "What is the capital of France?", "m2")
        ids["hostile"] = ask(beta, HOSTILE)
        with pytest.raises(openai.APIStatusError):
            beta.chat.completions.create(
                model="m3", messages=[{"role": "user", "content": "This one fails."}]
            )
        stream = beta.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "Stream me a haiku."}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        for rid, score, key in (
            (ids["pair_good"], 0.9, ALPHA),
            (ids["pair_bad"], 0.1, ALPHA),
            (ids["auto0"], 0.7, ALPHA),
            (ids["hostile"], 0.4, BETA),
        ):
            r = httpx.post(
                server.url + "/feedback",
                json={"request_id": rid, "score": score},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert r.status_code == 200, r.text
        wait_for(lambda: query(dsn, "SELECT count(*) FROM calls WHERE kind = 'call'")[0][0] >= 82)
        yield {"server": server, "dsn": dsn, "ids": ids, "fake": fake}
    finally:
        server.__exit__()
        embedder.worker.shutdown(wait=True)


@pytest.fixture
def page(browser, site) -> Iterator[Any]:  # noqa: F811
    """A logged-in page; it records every request the page makes and every error it logs."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = context.new_page()
    pg.requests, pg.errors = [], []
    pg.on("request", lambda r: pg.requests.append(r.url))
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.goto(site["server"].url + "/ui")
    pg.fill("#admin-key", ADMIN)
    pg.click("#login-button")
    ready(pg)
    yield pg
    origin = site["server"].url
    assert [u for u in pg.requests if not u.startswith(origin + "/")] == []  # offline: only the gateway
    assert all(ADMIN not in u for u in pg.requests)  # the key is never in a URL
    assert pg.errors == []  # no script error, no blocked resource (the CSP would say so)
    context.close()


def ready(pg: Any) -> None:
    pg.wait_for_selector("body[data-ready=true]", timeout=15_000)


def click(pg: Any, selector: str) -> None:
    """Click what re-renders the page (it changes the hash), and wait for that render: the
    previous render's `data-ready=true` must not be taken for it (a race seen in CI)."""
    pg.evaluate("() => { document.body.dataset.ready = 'stale' }")
    pg.click(selector)
    ready(pg)


def go(pg: Any, hash_: str) -> None:
    pg.evaluate("h => { location.hash = h }", hash_)
    pg.wait_for_function("h => location.hash === h && document.body.dataset.ready === 'true'", arg=hash_)


def set_range(pg: Any, value: str) -> None:
    pg.select_option("#range", value)
    ready(pg)


def kpi(pg: Any, name: str) -> float | None:
    raw = pg.get_attribute(f"[data-kpi={name}]", "data-value")
    return None if raw in (None, "") else float(raw)


def one(dsn: str, sql: str, *args: Any) -> Any:
    return query(dsn, sql, *args)[0][0]


def test_login_keeps_the_key_out_of_urls_and_refuses_a_wrong_one(browser, site):  # noqa: F811
    context = browser.new_context()
    pg = context.new_page()
    urls: list[str] = []
    pg.on("request", lambda r: urls.append(r.url))
    pg.goto(site["server"].url + "/ui")
    pg.wait_for_selector("#login-form")
    shoot(pg, "login")
    pg.fill("#admin-key", "not-the-key")
    pg.click("#login-button")
    pg.wait_for_function("() => document.getElementById('login-error').textContent.length > 0")
    assert "Not accepted" in pg.text_content("#login-error")
    assert pg.evaluate("sessionStorage.length") == 0
    pg.fill("#admin-key", ALPHA)  # a client key is not the admin key
    pg.click("#login-button")
    pg.wait_for_function("() => document.getElementById('login-error').textContent.includes('Not accepted')")
    pg.fill("#admin-key", ADMIN)
    pg.click("#login-button")
    ready(pg)
    assert pg.is_visible("#nav") and not pg.is_visible("#login")
    assert pg.evaluate("sessionStorage.getItem('llm-router.admin-key')") == ADMIN
    assert ADMIN not in pg.url and all(ADMIN not in u for u in urls)
    pg.click("#logout")
    assert pg.is_visible("#login-form") and pg.evaluate("sessionStorage.length") <= 1  # the range may stay
    assert pg.evaluate("sessionStorage.getItem('llm-router.admin-key')") is None
    context.close()


def test_overview_numbers_match_the_database(page, site):
    dsn = site["dsn"]
    set_range(page, "7d")
    week = "kind = 'call' AND created_at >= now() - interval '7 days'"
    assert kpi(page, "requests") == one(dsn, f"SELECT count(*) FROM calls WHERE {week}")
    assert kpi(page, "errors") == one(dsn, f"SELECT count(*) FROM calls WHERE {week} AND status <> 'ok'")
    assert kpi(page, "cost") == pytest.approx(one(dsn, f"SELECT sum(cost_usd) FROM calls WHERE {week}"))
    assert kpi(page, "mean-score") == pytest.approx(one(dsn, f"SELECT avg(score) FROM calls WHERE {week}"))
    answered = f"{week} AND status = 'ok' AND overhead_ms IS NOT NULL AND upstream_ms IS NOT NULL"
    for name, p, column in (
        ("latency-p50", 0.5, "overhead_ms + upstream_ms"),
        ("latency-p99", 0.99, "overhead_ms + upstream_ms"),
        ("overhead-p50", 0.5, "overhead_ms"),
        ("overhead-p99", 0.99, "overhead_ms"),
    ):
        expected = one(
            dsn, f"SELECT percentile_cont({p}) WITHIN GROUP (ORDER BY {column}) FROM calls WHERE {answered}"
        )
        assert kpi(page, name) == pytest.approx(expected), name
    per_model = dict(query(dsn, f"SELECT model, count(*) FROM calls WHERE {week} GROUP BY model"))
    rows = page.eval_on_selector_all(
        "#models-table tbody tr", "rows => rows.map(r => [r.cells[0].textContent, r.cells[1].textContent])"
    )
    assert {m: int(n.replace(",", "")) for m, n in rows} == per_model
    assert (
        page.locator("#chart-traffic canvas").count() == 1
        and page.locator("#chart-share .u-legend").count() == 1
    )
    shoot(page, "overview")
    # one key's view
    beta = key_id(BETA)
    page.fill("#overview-caller", beta)
    page.click("#overview-filter button")
    page.wait_for_function(
        "k => (document.querySelector('#view h1')?.textContent || '').includes(k)", arg=beta
    )
    ready(page)
    assert kpi(page, "requests") == one(dsn, f"SELECT count(*) FROM calls WHERE {week} AND caller = $1", beta)


def table_ids(pg: Any) -> list[str]:
    if pg.locator("#calls-empty").count():
        return []
    return pg.eval_on_selector_all("#calls-table tbody tr", "rows => rows.map(r => r.dataset.id)")


def test_calls_list_filters_search_and_pages(page, site):
    dsn = site["dsn"]
    set_range(page, "7d")
    go(page, "#/calls")
    week = "created_at >= now() - interval '7 days'"
    newest = [
        r[0] for r in query(dsn, f"SELECT id FROM calls WHERE {week} ORDER BY created_at DESC, id DESC")
    ]
    assert table_ids(page) == newest[:50]
    click(page, "#calls-older")
    assert table_ids(page) == newest[50:100] and "page 2" in page.text_content("#calls-page")
    click(page, "#calls-newer")
    assert table_ids(page) == newest[:50]
    page.select_option("#f-model", "m2")
    page.select_option("#f-rated", "true")
    click(page, "#calls-apply")
    newest_first = "ORDER BY created_at DESC, id DESC"
    expected = query(
        dsn, f"SELECT id FROM calls WHERE {week} AND model = 'm2' AND score IS NOT NULL {newest_first}"
    )
    assert table_ids(page) == [r[0] for r in expected] and expected
    click(page, "text=Clear")
    page.select_option("#f-status", "error")
    click(page, "#calls-apply")
    errors = query(
        dsn, f"SELECT id FROM calls WHERE {week} AND status = 'error' ORDER BY created_at DESC, id DESC"
    )
    assert table_ids(page) == [r[0] for r in errors] and len(errors) > 1
    shoot(page, "calls")
    click(page, "text=Clear")
    page.fill("#f-q", "sourdough starter")
    click(page, "#calls-apply")
    assert table_ids(page) == [site["ids"]["sourdough"]]
    page.fill("#f-q", "")
    page.fill("#f-caller", key_id(BETA))
    page.fill("#f-id", "")
    click(page, "#calls-apply")
    mine = query(
        dsn,
        f"SELECT id FROM calls WHERE {week} AND caller = $1 ORDER BY created_at DESC, id DESC",
        key_id(BETA),
    )
    assert table_ids(page) == [r[0] for r in mine][:50]


def test_a_call_shows_its_decision_and_takes_a_rating(page, site):
    dsn, ids = site["dsn"], site["ids"]
    rid = ids["auto1"]
    go(page, "#/calls?q=" + "kubernetes")
    page.click(f"a.call-link:text-is('{rid}')")
    page.wait_for_selector("#call-id")
    ready(page)
    assert page.text_content("#call-id") == rid
    assert "Tell me something useful about kubernetes." in page.text_content("#call-messages")
    stored = query(dsn, "SELECT model, response, decision, propensity FROM calls WHERE id = $1", rid)[0]
    assert page.text_content("#call-response") == stored["response"]
    import json

    decision = json.loads(stored["decision"])
    assert page.locator("#candidates-table tbody tr").count() == len(decision["candidates"]) >= 2
    assert page.text_content("#candidates-table tbody tr.chosen td") == decision["candidates"][0]["model"]
    assert page.text_content("[data-fact=propensity]") == f"{stored['propensity']:.3f}"
    assert page.locator("#call-timings .timing").count() >= 3
    assert page.locator("#feedback-none").count() == 1
    page.eval_on_selector("#rate-score", "el => { el.value = '0.85'; el.dispatchEvent(new Event('input')) }")
    page.fill("#rate-text", "clear and correct")
    page.click("#rate-button")
    page.wait_for_selector("#feedback-table")
    assert page.text_content("#rate-result").startswith("Rated 0.850")
    row = query(dsn, "SELECT score, score_source FROM calls WHERE id = $1", rid)[0]
    assert (row["score"], row["score_source"]) == (0.85, "user")
    text = one(dsn, "SELECT feedback_text FROM feedback WHERE request_id = $1", rid)
    assert text == "clear and correct"
    assert "0.850" in page.text_content("#feedback-table") and "0.850" in page.text_content(
        "[data-fact=score]"
    )
    shoot(page, "call")
    # a call of a DPO pair lists it; a hostile prompt stays text
    go(page, "#/call/" + ids["pair_good"])
    assert page.locator("#pairs-table tbody tr").count() == 1
    assert ids["pair_bad"] in page.text_content("#pairs-table")
    go(page, "#/call/" + ids["hostile"])
    assert HOSTILE in page.text_content("#call-messages")
    assert page.evaluate("window.__pwned") is None and page.locator("#call-messages img").count() == 0


def test_why_this_model_runs_the_router_without_an_upstream(page, site):
    dsn, fake = site["dsn"], site["fake"]
    go(page, "#/router")
    assert page.locator("svg.forest circle.mean").count() == 3
    assert page.locator("#arms-table tbody tr").count() == 3
    upstream_before = sum(fake.counts.values())
    calls_before = one(dsn, "SELECT count(*) FROM calls")
    page.fill("#why-prompt", "Which sourdough flour should I use for a rye loaf?")
    page.click("#why-go")
    page.wait_for_selector("#why-verdict")
    chosen = page.text_content("#why-model")
    assert chosen in ("m1", "m2", "m3")
    rows = page.eval_on_selector_all(
        "#why-table tbody tr",
        "rows => rows.map(r => [r.dataset.model, r.querySelector('[data-propensity]').dataset.propensity])",
    )
    propensity = {m: float(p) for m, p in rows}
    assert sum(propensity.values()) == pytest.approx(1.0, abs=0.02)
    assert float(page.text_content("#why-propensity")) == pytest.approx(propensity[chosen], abs=1e-3)
    assert page.locator("#why-table tbody tr.chosen").count() == 1
    assert re.search(r"layer bandit", page.text_content("#why-verdict"))
    shoot(page, "router")
    assert sum(fake.counts.values()) == upstream_before  # no upstream was called
    assert one(dsn, "SELECT count(*) FROM calls") == calls_before  # nothing was recorded


def test_dpo_counts_and_the_download(page, site):
    dsn = site["dsn"]
    go(page, "#/dpo")
    pairs = one(dsn, "SELECT count(*) FROM dpo_pairs")
    assert pairs >= 1 and kpi(page, "pairs") == pairs
    with page.expect_download() as got:
        page.click("#dpo-download")
    path = got.value.path()
    with open(path) as f:
        lines = f.read().splitlines()
    assert len(lines) == one(dsn, "SELECT count(*) FROM dpo_pairs WHERE margin >= 0.2")
    assert '"chosen"' in lines[0] and "Hello from m1" in lines[0]
    page.wait_for_selector("#dpo-status[data-lines]")
    shoot(page, "dpo")

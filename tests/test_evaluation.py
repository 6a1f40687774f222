"""Off-policy evaluation end to end: what the decision records carry, the state a candidate starts
from, candidates as settings, and `POST /v1/evaluate` and `llm-router evaluate` on calls a real
gateway logged (fake upstreams, embedded PostgreSQL, real embeddings)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import httpx
import numpy as np
import pytest
import yaml

from gateway.cli import main
from gateway.domain import CallRecord, FeedbackEntry, StoredCall, utcnow
from gateway.errors import InvalidRequest
from gateway.evaluation.candidate import candidate, settings_of
from gateway.evaluation.command import parse_candidate
from gateway.evaluation.logs import logged_call, snapshot
from tests.conftest import GatewayServer, make_settings, model
from tests.test_router import ask, topic_prompts


@pytest.fixture
def catalogue(fake):
    """Three models far apart in price (as tests/test_router.py's)."""
    return [
        model("cheap", fake.url(), input_usd_per_mtok=0.1, output_usd_per_mtok=0.1, quality=0.5),
        model(
            "mid",
            fake.url(),
            input_usd_per_mtok=1.0,
            output_usd_per_mtok=2.0,
            quality=0.7,
            capabilities=["chat", "streaming", "tools"],
        ),
        model(
            "premium",
            fake.url(),
            input_usd_per_mtok=10.0,
            output_usd_per_mtok=30.0,
            quality=0.95,
            capabilities=["chat", "streaming", "tools", "vision"],
        ),
    ]


def record(gw, resp: httpx.Response) -> dict:
    return httpx.get(f"{gw.url}/requests/{resp.headers['x-request-id']}").json()


def test_deterministic_decisions_say_so_and_every_decision_keeps_its_context(fake, gateway, catalogue, dsn):
    settings = make_settings(
        catalogue,
        enable_persistence=True,
        database_url=dsn,
        rules=[
            {"name": "vip", "keywords": ["urgent"], "model": "premium"},
            {"name": "chitchat", "keywords": ["hello"], "policy": "budget"},
        ],
        routes=[
            {
                "name": "translate",
                "threshold": 0.6,
                "model": "mid",
                "utterances": ["Translate this into French"],
            }
        ],
        policies={"budget": {"models": ["cheap", "mid"]}},
    )
    gw = gateway(settings)
    for resp, model_name in (
        (ask(gw, model="mid"), "mid"),  # explicit
        (ask(gw, "urgent: call me"), "premium"),  # a keyword rule to a model
        (ask(gw, "Please translate this sentence into French"), "mid"),  # a semantic route to a model
        (ask(gw, body={"router": {"strategy": "cost_optimized"}}), "cheap"),  # a fixed strategy
    ):
        rec = record(gw, resp)
        assert rec["propensity"] == 1.0 and rec["decision"]["arm"] == model_name
        assert (
            rec["decision"]["propensities"] == {model_name: 1.0} and rec["decision"]["deterministic"] is True
        )
    # a rule to a policy: the bandit picks among the policy's arms, with their propensities
    rec = record(gw, ask(gw, "hello there"))
    assert rec["layer"] == "keyword" and set(rec["decision"]["propensities"]) == {"cheap", "mid"}
    assert rec["decision"]["deterministic"] is False
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    rec = record(
        gw, ask(gw, "What is 2+2?", body={"tools": tools, "max_tokens": 50, "router": {"max_cost_usd": 1}})
    )
    ctx = rec["decision"]["context"]
    assert (
        ctx["needs"] == ["tools"] and ctx["max_tokens"] == 50 and ctx["constraints"] == {"max_cost_usd": 1.0}
    )
    assert set(rec["decision"]["propensities"]) == {"mid", "premium"}  # cheap has no tools


def test_the_snapshot_is_the_state_when_the_window_began():
    t0 = utcnow()
    since = t0 + timedelta(seconds=10)
    emb = np.eye(384, dtype=np.float32)[0]

    def stored(rid: str, at, model_name: str, ratings, caller: str = "") -> StoredCall:
        rec = CallRecord(
            rid, [{"role": "user", "content": rid}], "auto", model_name, "ok", 200, created_at=at
        )
        rec.embedding, rec.caller = emb, caller
        return StoredCall(rec, None, None, None, [FeedbackEntry(s, None, src, t) for s, src, t in ratings])

    calls = [
        stored(
            "a",
            t0,
            "m1",
            [(0.2, "user", t0 + timedelta(seconds=1)), (0.9, "user", t0 + timedelta(seconds=2))],
        ),
        stored(
            "b", t0 + timedelta(seconds=1), "m2", [(1.0, "user", t0 + timedelta(seconds=20))]
        ),  # rated later
        stored("c", t0 + timedelta(seconds=11), "m1", []),  # in the window
        # another tenant's call with the same id: its rating is its own
        stored("a", t0, "m2", [(0.1, "user", t0 + timedelta(seconds=3))], caller="key_b"),
    ]

    async def check():
        store = await snapshot(calls, since)
        got = [c.record async for c in store.iter_calls(t0, since + timedelta(days=1))]
        assert [(r.caller, r.id) for r in got] == [("", "a"), ("key_b", "a"), ("", "b")]
        a, b = await store.get_call("", "a"), await store.get_call("", "b")
        assert a.score == 0.9 and b.score is None  # the latest rating before the window; none after
        assert (await store.get_call("key_b", "a")).score == 0.1
        stats = await store.arm_stats()
        assert (stats["m1"].rated, stats["m1"].score_sum) == (1, pytest.approx(0.9))
        assert (stats["m2"].rated, stats["m2"].score_sum) == (1, pytest.approx(0.1))
        ratings = await store.tenant_ratings()
        assert ratings["m1"] == {"": (1, pytest.approx(0.9))} and ratings["m2"] == {"key_b": (1, 0.1)}
        rated = {r.key for r in await store.rated_since(t0 - timedelta(days=1), 10)}
        assert rated == {("", "a"), ("key_b", "a")}

    asyncio.run(check())


def test_candidates_are_settings_with_the_usual_names():
    base = make_settings(
        [model(n, "http://127.0.0.1:9/v1") for n in ("a", "b", "c")], cost_weight=-0.2, default_model="a"
    )
    c = parse_candidate("cheap: COST_WEIGHT=-0.8 policy=knn_ts LLM_MODELS=b,c")
    assert c.name == "cheap" and c.overrides == {
        "cost_weight": -0.8,
        "router_policy": "knn_ts",
        "llm_models": "b,c",
    }
    s = settings_of(base, c.overrides)
    assert (s.cost_weight, s.router_policy, [m.name for m in s.models]) == (-0.8, "knn_ts", ["b", "c"])
    assert s.default_model == "b"  # the subset's first: `a` is out
    assert s.stats_refresh_s > 1e9  # frozen
    assert parse_candidate("EXPLORATION_RATE=0").name == "EXPLORATION_RATE=0"
    with pytest.raises(InvalidRequest, match="unknown setting 'COST_WIEGHT'"):
        parse_candidate("COST_WIEGHT=-1")
    with pytest.raises(InvalidRequest, match="'DATABASE_URL' cannot differ"):
        candidate(None, {"DATABASE_URL": "postgresql://elsewhere/db"})
    with pytest.raises(InvalidRequest, match="candidate settings are invalid"):
        settings_of(base, candidate(None, {"exploration_rate": 2}).overrides)
    # the dial: a mode alone takes that mode's default target, not the base's (budget 0.35)
    q = settings_of(base, parse_candidate("ROUTER_DIAL_MODE=quality").overrides)
    assert (q.router_dial_mode, q.router_dial_target) == ("quality", 0.95)
    t = settings_of(base, parse_candidate("ROUTER_DIAL_TARGET=0.5").overrides)
    assert (t.router_dial_mode, t.router_dial_target) == ("budget", 0.5)


def test_a_call_without_propensities_is_left_out_and_says_why():
    rec = CallRecord(
        "x", [{"role": "user", "content": "hi"}], "auto", "m", "ok", 200, decision={"fallbacks": []}
    )
    assert logged_call(StoredCall(rec, 1.0)) == (
        "no propensities (recorded before they were, or by a policy that gives none)"
    )
    assert logged_call(StoredCall(rec, None)) == "unrated"
    # a tenant's call is decided again as that tenant's (its view of the arms, its neighbours)
    rec.caller, rec.decision = "key_b", {"arm": "m", "propensities": {"m": 1.0}, "context": {}}
    again = logged_call(StoredCall(rec, 1.0))
    assert not isinstance(again, str) and again.context.tenant == "key_b"


# --- the endpoint and the command, on calls a real gateway logged

QUALITY = {
    "cooking": {"cheap": 0.9, "mid": 0.7, "premium": 0.8},
    "coding": {"cheap": 0.1, "mid": 0.5, "premium": 1.0},
}


def serve_and_rate(gw, prompts) -> list[float]:
    scores = []
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        for topic, prompt in prompts:
            resp = ask(gw, prompt)
            assert resp.status_code == 200
            score = QUALITY[topic][resp.headers["x-router-model"]]
            scores.append(score)
            fb = http.post("/feedback", json={"request_id": resp.headers["x-request-id"], "score": score})
            assert fb.status_code == 200
    return scores


@pytest.fixture(scope="module")
def logged(fake, pg, st_model):
    """A gateway (hcts, the default: its own propensities are logged; the current settings
    evaluate it as a candidate) that served 40 prompts, then a window of 60, all rated: one for
    the module's tests, which only read."""
    from gateway.embedders.minilm import MiniLMEmbedder

    settings = make_settings(
        [
            model("cheap", fake.url(), input_usd_per_mtok=0.1, output_usd_per_mtok=0.1),
            model("mid", fake.url(), input_usd_per_mtok=1.0, output_usd_per_mtok=2.0),
            model("premium", fake.url(), input_usd_per_mtok=10.0, output_usd_per_mtok=30.0),
        ],
        enable_persistence=True,
        database_url=pg.new_database(),
        exploration_rate=0.3,
        latency_weight=0.0,
        router_policy="hcts",
        embedder="minilm",
    )
    embedder = MiniLMEmbedder(st_model)
    with GatewayServer(settings, embedder=embedder, seed=2) as gw:
        train, test = topic_prompts(seed=5)
        serve_and_rate(gw, train[:40])
        since = utcnow()
        window = serve_and_rate(gw, test[:60])
        gw.call(gw.services.recorder.flush())
        yield gw, since, window, settings
    embedder.worker.shutdown(wait=True)


def test_evaluate_endpoint(logged):
    gw, since, window, _ = logged
    body = {
        "since": since.isoformat(),
        "candidates": [
            {"name": "quality", "settings": {"policy": "lin_ts", "COST_WEIGHT": 0, "EXPLORATION_RATE": 0}},
            {"name": "knn", "settings": {"policy": "knn_ts"}},
            {"name": "no premium", "settings": {"LLM_MODELS": "cheap,mid"}},
            {"name": "dial 0.8", "settings": {"ROUTER_DIAL_TARGET": 0.8}},
        ],
    }
    resp = httpx.post(gw.url + "/v1/evaluate", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    report = resp.json()
    assert report["calls"] == 60 and report["skipped"] == {}
    assert report["logged"]["score"]["value"] == pytest.approx(np.mean(window))
    names = [c["name"] for c in report["candidates"]]
    assert names == ["current settings", "quality", "knn", "no premium", "dial 0.8"]
    assert report["logged"]["propensity_error_max"] < 2e-3  # HCTS's own, as it decided
    for c in report["candidates"]:
        for metric in ("score", "cost_usd"):
            for est in ("ips", "snips", "dr"):
                iv = c[metric][est]
                assert iv["low"] <= iv["value"] <= iv["high"]
        assert 0 < c["diagnostics"]["effective_sample_size"] <= 60
        assert c["diagnostics"]["propensity_error_max"] < 2e-3
    by = {c["name"]: c for c in report["candidates"]}
    assert by["current settings"]["settings"] == {} and set(by["dial 0.8"]["layers"]) == {"bandit"}
    # without the dearest model the calls are cheaper; the logs explored it, so the mass it
    # would have put there is not unsupported
    assert by["no premium"]["cost_usd"]["dr"]["value"] < by["current settings"]["cost_usd"]["dr"]["value"]
    assert (
        set(by["no premium"]["layers"]) == {"bandit"}
        and by["no premium"]["diagnostics"]["unsupported_mass"] == 0
    )
    assert "normal approximation" in report["interval"] and report["question"].startswith(
        "mean score and cost"
    )


def test_evaluate_endpoint_refuses_what_it_cannot_do(logged):
    gw, since, _, _ = logged

    def post(body, **kw):
        return httpx.post(gw.url + "/v1/evaluate", json=body, timeout=60, **kw)

    bad = post({"since": "last tuesday"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
    typo = post({"since": since.isoformat(), "candidates": [{"settings": {"COST_WIEGHT": 0}}]})
    assert typo.status_code == 400 and "unknown setting 'COST_WIEGHT'" in typo.json()["error"]["message"]
    fixed = post({"since": since.isoformat(), "candidates": [{"settings": {"ADMIN_API_KEY": "x"}}]})
    assert fixed.status_code == 400 and "cannot differ" in fixed.json()["error"]["message"]
    backwards = post({"since": since.isoformat(), "until": (since - timedelta(hours=1)).isoformat()})
    assert backwards.status_code == 400 and backwards.json()["error"]["param"] == "until"
    empty = post(
        {
            "since": (utcnow() + timedelta(hours=1)).isoformat(),
            "until": (utcnow() + timedelta(hours=2)).isoformat(),
        }
    )
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "window_empty"
    extra = post({"since": since.isoformat(), "window": "7d"})
    assert extra.status_code == 400 and extra.json()["error"]["param"] == "window"
    twins = post({"since": since.isoformat(), "candidates": [{"name": "a"}, {"name": "a"}]})
    assert twins.status_code == 400 and "two candidates are named 'a'" in twins.json()["error"]["message"]
    too_many = post({"since": since.isoformat(), "candidates": [{"settings": {}}] * 21})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "candidates"


def test_evaluate_is_for_the_admin_once_there_are_client_keys(fake, gateway, catalogue):
    gw = gateway(make_settings(catalogue, gateway_api_keys=["client"], admin_api_key="admin-key"))
    body = {"since": utcnow().isoformat()}
    assert httpx.post(gw.url + "/v1/evaluate", json=body).status_code == 401
    client = httpx.post(gw.url + "/v1/evaluate", json=body, headers={"authorization": "Bearer client"})
    assert client.status_code == 401 and "ADMIN_API_KEY" in client.json()["error"]["message"]
    admin = httpx.post(gw.url + "/v1/evaluate", json=body, headers={"authorization": "Bearer admin-key"})
    assert admin.status_code == 400 and admin.json()["error"]["code"] == "window_empty"  # let in


def test_llm_router_evaluate(logged, tmp_path, monkeypatch, capsys, data_dir):
    _, since, _, settings = logged
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": [m.model_dump(mode="json", exclude_none=True) for m in settings.models],
                "database_url": settings.database_url.get_secret_value(),
                "exploration_rate": 0.3,
                "latency_weight": 0.0,
                "data_dir": str(data_dir),
            }
        )
    )
    monkeypatch.delenv("CONFIG_FILE", raising=False)
    out = tmp_path / "out"
    code = main(
        [
            "evaluate",
            "--config",
            str(config),
            "--since",
            since.isoformat(),
            "--candidate",
            "cheap: COST_WEIGHT=-0.8",
            "--interval",
            "bootstrap",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "logged policy (what it got)" in printed and "cheap" in printed and "current settings" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["calls"] == 60 and report["interval"].startswith("percentile bootstrap")
    assert (out / "evaluation.png").stat().st_size > 10_000
    assert (
        main(["evaluate", "--config", str(config), "--since", since.isoformat(), "--candidate", "NOPE=1"])
        == 2
    )
    assert "unknown setting 'NOPE'" in capsys.readouterr().err

"""Tenants (client keys) cannot hurt each other: request ids are per caller (no squatting, no
probing), DPO mining and export stay within a tenant, and one tenant's ratings cannot steer
another's routing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.config import Settings
from gateway.domain import CallRecord, Feedback, Rating, utcnow
from gateway.routing.bandit import Knobs
from gateway.routing.policies import LinTSPolicy, Observed, PolicyDeps
from gateway.routing.stats import ArmStatsCache
from gateway.store.memory import MemoryStore
from tests.conftest import make_settings, model
from tests.test_errors import assert_openai_error

A, B, C, ADMIN = "sk-tenant-a-000000", "sk-tenant-b-000000", "sk-tenant-c-000000", "sk-admin-0000000"
USER = [{"role": "user", "content": "What is the capital of France?"}]


def post(gw: Any, path: str, key: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(
        gw.url + path, json=body, headers={"Authorization": f"Bearer {key}", **headers}, timeout=30
    )


def get(gw: Any, path: str, key: str) -> httpx.Response:
    return httpx.get(gw.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30)


@pytest.fixture
def keyed(fake, gateway, dsn):
    settings = make_settings(
        [
            model("cheap", fake.url(answer="cheap_answer"), quality=0.7, input_usd_per_mtok=0.1),
            model("dear", fake.url(answer="dear_answer"), quality=0.6, input_usd_per_mtok=30.0),
        ],
        enable_persistence=True,
        database_url=dsn,
        gateway_api_keys=[A, B, C],
        admin_api_key=ADMIN,
        router_policy="default",
        dpo_min_margin=0.2,
    )
    return gateway(settings)


def test_a_request_id_cannot_be_squatted_or_probed(keyed):
    gw = keyed
    squat = post(
        gw, "/v1/chat/completions", B, {"model": "dear", "messages": USER}, **{"X-Request-ID": "order-42"}
    )
    assert squat.status_code == 200
    mine = post(
        gw, "/v1/chat/completions", A, {"model": "cheap", "messages": USER}, **{"X-Request-ID": "order-42"}
    )
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "order-42"
    # A's id is A's call, not B's: A reads its own record and rates it
    record = get(gw, "/requests/order-42", A).json()
    assert record["model"] == "cheap" and record["response"] == "cheap answer"
    rated = post(gw, "/feedback", A, {"request_id": "order-42", "score": 0.9})
    assert rated.status_code == 200 and rated.json()["model"] == "cheap"
    # B's record is untouched, B's rating is B's
    assert get(gw, "/requests/order-42", B).json()["model"] == "dear"
    assert get(gw, "/requests/order-42", B).json()["score"] is None
    # C cannot tell that anyone used the id: the same 404 as for an id nobody used
    used = get(gw, "/requests/order-42", C)
    unused = get(gw, "/requests/order-43", C)
    assert_openai_error(used, 404, "request_not_found")
    assert used.json()["error"]["message"].replace("42", "43") == unused.json()["error"]["message"]
    assert_openai_error(
        post(gw, "/feedback", C, {"request_id": "order-42", "score": 1}), 404, "request_not_found"
    )
    # the admin sees every tenant's, and can narrow to one
    admin = httpx.get(
        gw.url + "/requests/order-42",
        params={"caller": record["caller"]},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert admin.json()["model"] == "cheap"


def test_dpo_pairs_stay_within_a_tenant(keyed):
    gw = keyed

    def call(key: str, name: str) -> str:
        resp = post(gw, "/v1/chat/completions", key, {"model": name, "messages": USER})
        assert resp.status_code == 200
        return resp.headers["x-request-id"]

    b_dear = call(B, "dear")
    assert post(gw, "/feedback", B, {"request_id": b_dear, "score": 0.1}).json()["pairs"] == 0
    # A asks the same thing of another model and rates it far apart: B's call is no partner
    a_cheap = call(A, "cheap")
    assert post(gw, "/feedback", A, {"request_id": a_cheap, "score": 0.9}).json()["pairs"] == 0
    # within A, the pair is made
    a_dear = call(A, "dear")
    assert post(gw, "/feedback", A, {"request_id": a_dear, "score": 0.2}).json()["pairs"] == 1
    b_cheap = call(B, "cheap")
    assert post(gw, "/feedback", B, {"request_id": b_cheap, "score": 0.8}).json()["pairs"] == 1
    admin = {"Authorization": f"Bearer {ADMIN}"}
    everything = httpx.get(gw.url + "/v1/dpo/pairs", params={"format": "jsonl"}, headers=admin)
    pairs = [httpx.Response(200, content=line).json() for line in everything.content.splitlines()]
    assert len(pairs) == 2
    a_caller = get(gw, f"/requests/{a_cheap}", A).json()["caller"]
    only_a = httpx.get(
        gw.url + "/v1/dpo/pairs", params={"format": "jsonl", "caller": a_caller}, headers=admin
    )
    lines = only_a.content.splitlines()
    assert len(lines) == 1 and httpx.Response(200, content=lines[0]).json()["chosen_request_id"] == a_cheap


def test_one_tenants_ratings_do_not_steer_anothers_routing(keyed):
    gw = keyed
    quality = {"model": "auto", "messages": USER, "router": {"strategy": "quality_optimized"}}
    assert post(gw, "/v1/chat/completions", A, quality).headers["x-router-model"] == "cheap"
    for _ in range(24):  # B praises the 300x dearer model and pans the cheap one
        for name, score in (("dear", 1.0), ("cheap", 0.0)):
            rid = post(gw, "/v1/chat/completions", B, {"model": name, "messages": USER}).headers[
                "x-request-id"
            ]
            assert post(gw, "/feedback", B, {"request_id": rid, "score": score}).status_code == 200
    assert post(gw, "/v1/chat/completions", B, quality).headers["x-router-model"] == "dear"  # B's own view
    assert post(gw, "/v1/chat/completions", A, quality).headers["x-router-model"] == "cheap"  # A's is A's


def test_a_tenants_view_counts_others_capped_and_never_the_largest_alone():
    cache = ArmStatsCache([], Knobs(), tenant_cap=10)
    for _ in range(50):
        cache.observe("m", 1.0, None, caller="b")
    assert cache.of("m", "a").rated == 0  # one other tenant alone: nothing
    assert cache.of("m", "b").rated == 50  # its own, fully
    for _ in range(3):
        cache.observe("m", 0.0, None, caller="c")
    seen_by_a = cache.of("m", "a")
    assert seen_by_a.rated == 3 and seen_by_a.score_sum == 0.0  # the largest (b) left out
    cache.observe("m", 1.0, None, caller="d")
    cache.observe("m", 1.0, None, caller="d")
    assert cache.of("m", "a").rated == 5  # c and d; b still out
    assert cache.of("m", None).rated == 55  # every tenant's together (for /metrics)
    open_gateway = ArmStatsCache([], Knobs())
    open_gateway.observe("m", 0.5, None)
    assert open_gateway.of("m", "").rated == 1 and open_gateway.of("m", "").score_sum == 0.5


EMB = "test-embedder"  # the embedder id of these tests' vectors (the policy reads back only its own)


def lin_policy(store: Any = None, **kw: Any) -> LinTSPolicy:
    settings = Settings(_env_file=None, **kw)  # type: ignore[call-arg]
    knobs = Knobs.from_settings(settings)
    deps = PolicyDeps(
        settings, knobs, ArmStatsCache([], knobs), store, np.random.default_rng(0), lambda: 0.0, embedder=EMB
    )
    return LinTSPolicy(deps)


def test_lin_ts_caps_a_tenants_influence_but_not_an_open_gateways():
    x = np.zeros(384, dtype=np.float32)
    x[0] = 1.0
    capped, open_gw = lin_policy(tenant_rating_cap=5), lin_policy(tenant_rating_cap=5)
    for i in range(100):
        capped.observe(Observed("key_b", f"r{i}", "m", 1.0, None, x))
        open_gw.observe(Observed("", f"r{i}", "m", 1.0, None, x))
    weights = [seen.weight for seen in capped.seen.values()]
    assert weights[:5] == [1.0] * 5 and weights[-1] == pytest.approx(0.05)
    assert sum(weights) < 25  # 100 ratings weigh as about 20
    assert all(seen.weight == 1.0 for seen in open_gw.seen.values())
    # less evidence, so a wider posterior for the same mean direction
    assert capped.lin.posterior("m", x).b > open_gw.lin.posterior("m", x).b


async def test_lin_ts_forgets_ratings_older_than_the_recency_window():
    store = MemoryStore()
    x = np.zeros(384, dtype=np.float32)
    x[1] = 1.0
    old = utcnow() - timedelta(days=40)
    await store.write_calls(
        [
            CallRecord(
                id=f"c{i}",
                messages=[],
                requested_model="auto",
                model="m",
                status="ok",
                http_status=200,
                embedding=x,
                embedder=EMB,
            )
            for i in range(3)
        ]
    )
    policy = lin_policy(store, recency_days=30)
    fresh = lin_policy(store, recency_days=30)
    times = (old, old, utcnow())  # two ratings from before the window (absorbed back then)
    for i, at in enumerate(times):
        await store.add_feedback(Feedback(f"c{i}", 1.0, created_at=at))
    for i, at in enumerate(times):
        policy._absorb(("", f"c{i}"), "m", 1.0, x, at)
    assert len(policy.seen) == 3 and policy.lin.n["m"] == 3
    await policy.sync()
    assert list(policy.seen) == [("", "c2")] and policy.lin.n["m"] == 1
    fresh._absorb(("", "c2"), "m", 1.0, x, utcnow())
    assert policy.lin.posterior("m", x).a == pytest.approx(fresh.lin.posterior("m", x).a, abs=1e-6)
    assert policy.lin.posterior("m", x).b == pytest.approx(fresh.lin.posterior("m", x).b, abs=1e-6)
    assert isinstance(Rating("c2", "m", 1.0, utcnow()).key, tuple)

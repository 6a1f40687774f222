"""The router end to end: real embeddings, real Postgres, fake upstreams, the official SDK."""

from __future__ import annotations

import random
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import make_settings, model

DISHES = [
    "lasagna",
    "risotto",
    "banana bread",
    "pad thai",
    "beef stew",
    "sourdough bread",
    "paella",
    "ramen",
    "apple pie",
    "guacamole",
    "tiramisu",
    "chicken curry",
    "pancakes",
    "potato gnocchi",
    "falafel",
    "chocolate brownies",
    "minestrone soup",
    "chili con carne",
    "croissants",
    "pork dumplings",
]
COOKING = [
    "How do I make {} at home?",
    "What is the secret to a really good {}?",
    "Give me a simple recipe for {}.",
    "How long should I bake or cook {}?",
    "Which ingredients do I need for {}?",
    "Can I freeze homemade {}?",
    "What wine pairs well with {}?",
    "Why did my {} come out dry and bland?",
    "How do I reheat leftover {}?",
    "Is {} difficult to cook for a beginner?",
    "What spices go into a traditional {}?",
    "How do I keep {} from sticking to the pan?",
]
TASKS = [
    "reverse a linked list",
    "parse a JSON string",
    "sort a dictionary by value",
    "read a CSV file",
    "write a unit test",
    "handle exceptions properly",
    "connect to a PostgreSQL database",
    "make an HTTP request",
    "use async and await",
    "find a memory leak",
    "profile slow code",
    "merge two sorted arrays",
    "implement binary search",
    "validate an email with a regex",
    "serialize an object to JSON",
    "build a REST API",
    "spawn a background thread",
    "read environment variables",
    "implement an LRU cache",
    "compute a SHA-256 hash",
]
CODING = [
    "How do I {} in Python?",
    "What's the idiomatic way to {} in Rust?",
    "Show me code to {} in JavaScript.",
    "Why does my Go program fail when I try to {}?",
    "Explain how to {} in Java.",
    "What library should I use to {} in C#?",
    "Write a function to {} in TypeScript.",
    "How can I {} efficiently in C++?",
    "Is there a one-liner to {} in Ruby?",
    "What's the fastest way to {} in Kotlin?",
    "Help me debug my code that tries to {} in PHP.",
    "Give an example that shows how to {} in Swift.",
]


def topic_prompts(seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    rng = random.Random(seed)
    cooking = [("cooking", t.format(d)) for t in COOKING for d in DISHES]
    coding = [("coding", t.format(k)) for t in CODING for k in TASKS]
    rng.shuffle(cooking)
    rng.shuffle(coding)
    train = cooking[:150] + coding[:150]
    test = cooking[150:200] + coding[150:200]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


BETTER = {"cooking": "chef", "coding": "coder"}


@pytest.mark.parametrize("policy", ["hcts", "knn_ts", "lin_ts"])
def test_auto_learns_which_model_is_better_for_each_topic(fake, gateway, dsn, policy):
    settings = make_settings(
        [model("chef", fake.url(answer="a_recipe")), model("coder", fake.url(answer="some_code"))],
        enable_persistence=True,
        database_url=dsn,
        router_policy=policy,
        exploration_rate=0.1,
        similarity_threshold=0.45,
        min_similar_requests=3,
        max_similar_requests=30,
        latency_weight=0.0,
        cost_weight=0.0,
    )
    gw = gateway(settings, seed=1)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    train, test = topic_prompts(seed=3)
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        for topic, prompt in train:
            raw = client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": prompt}]
            )
            chosen = raw.headers["x-router-model"]
            assert raw.headers["x-router-layer"] == "bandit"
            score = 1.0 if chosen == BETTER[topic] else 0.0
            resp = http.post("/feedback", json={"request_id": raw.headers["x-request-id"], "score": score})
            assert resp.status_code == 200
    hits = {"cooking": 0, "coding": 0}
    for topic, prompt in test:
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": prompt}]
        )
        hits[topic] += raw.headers["x-router-model"] == BETTER[topic]
    # 50 held-out prompts per topic; exploration alone costs 5%
    assert hits["cooking"] >= 40, hits
    assert hits["coding"] >= 40, hits


@pytest.fixture
def catalogue(fake):
    return [
        model("cheap", fake.url(delay_ms=200), input_usd_per_mtok=0.1, output_usd_per_mtok=0.1, quality=0.5),
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
            fake.url(delay_ms=100),
            input_usd_per_mtok=10.0,
            output_usd_per_mtok=30.0,
            quality=0.95,
            capabilities=["chat", "streaming", "tools", "vision"],
        ),
    ]


def ask(gw, content="Tell me something interesting.", **kw) -> httpx.Response:
    body = {
        "model": kw.pop("model", "auto"),
        "messages": [{"role": "user", "content": content}],
        **kw.pop("body", {}),
    }
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=kw.pop("headers", None), timeout=10)


def test_keyword_rules_pick_a_model_or_a_policy(fake, gateway, catalogue):
    settings = make_settings(
        catalogue,
        rules=[
            {"name": "vip", "keywords": ["urgent", "escalate"], "model": "premium"},
            {"name": "chitchat", "pattern": r"(?m)^\s*(hi|hello)\b", "policy": "budget"},
        ],
        policies={"budget": {"models": ["cheap", "mid"], "strategy": "cost_optimized"}},
    )
    gw = gateway(settings)
    vip = ask(gw, "This is URGENT, please escalate my ticket")
    assert (vip.headers["x-router-model"], vip.headers["x-router-layer"]) == ("premium", "keyword")
    hello = ask(gw, "hello there")
    assert (hello.headers["x-router-model"], hello.headers["x-router-layer"]) == ("cheap", "keyword")
    assert hello.headers["x-router-strategy"] == "cost_optimized"
    other = ask(gw, "What is the boiling point of water at altitude?")
    assert other.headers["x-router-layer"] == "bandit"
    # the whole-word rule does not fire inside another word
    assert ask(gw, "the urgently needed report").headers["x-router-layer"] == "bandit"


def test_semantic_routes(fake, gateway, catalogue):
    settings = make_settings(
        catalogue,
        routes=[
            {
                "name": "translate",
                "threshold": 0.6,
                "model": "mid",
                "utterances": ["Translate this sentence into French", "How do you say this in Spanish?"],
            },
        ],
    )
    gw = gateway(settings)
    hit = ask(gw, "Please translate this sentence into German")
    assert (hit.headers["x-router-model"], hit.headers["x-router-layer"]) == ("mid", "semantic")
    miss = ask(gw, "What is the tallest mountain in Africa?")
    assert miss.headers["x-router-layer"] == "bandit"


def test_strategies_by_body_header_and_virtual_model(fake, gateway, catalogue):
    settings = make_settings(
        catalogue,
        virtual_models={
            "auto-cheap": {"strategy": "cost_optimized"},
            "auto-best": {"strategy": "quality_optimized"},
        },
    )
    gw = gateway(settings)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    by_body = client.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"router": {"strategy": "cost_optimized"}},
    )
    assert by_body.headers["x-router-model"] == "cheap" and by_body.headers["x-router-layer"] == "strategy"
    by_header = ask(gw, headers={"X-Router-Strategy": "quality_optimized"})
    assert by_header.headers["x-router-model"] == "premium"
    assert ask(gw, model="auto-cheap").headers["x-router-model"] == "cheap"
    assert ask(gw, model="auto-best").headers["x-router-model"] == "premium"
    # the request's own `router` beats the virtual model's
    assert (
        ask(gw, model="auto-best", body={"router": {"strategy": "cost_optimized"}}).headers["x-router-model"]
        == "cheap"
    )
    turns = [
        ask(gw, headers={"X-Router-Strategy": "round_robin"}).headers["x-router-model"] for _ in range(3)
    ]
    assert sorted(turns) == ["cheap", "mid", "premium"]
    listed = {m.id: m for m in client.models.list().data}
    assert {"auto", "auto-cheap", "auto-best"} <= set(listed)
    assert listed["auto-cheap"].model_extra["router"] == {"strategy": "cost_optimized"}
    bad = ask(gw, headers={"X-Router-Strategy": "cheapest"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Router-Strategy"


def test_latency_optimized_and_least_loaded_use_what_was_observed(fake, gateway, catalogue, dsn):
    gw = gateway(make_settings(catalogue, enable_persistence=True, database_url=dsn))
    for name in ("cheap", "mid", "premium"):
        for _ in range(3):
            assert ask(gw, model=name).status_code == 200
    gw.call(gw.services.recorder.flush())
    gw.call(gw.services.router.refresh_stats())
    assert ask(gw, headers={"X-Router-Strategy": "latency_optimized"}).headers["x-router-model"] == "mid"
    for _ in range(10):
        capped = ask(gw, headers={"X-Router-Max-Latency-Ms": "90"})  # cheap (200 ms), premium (100 ms) out
        assert capped.headers["x-router-model"] == "mid"
    too_fast = ask(gw, headers={"X-Router-Max-Latency-Ms": "0.001"})
    assert too_fast.status_code == 400 and "max_latency_ms=0.001" in too_fast.json()["error"]["message"]

    busy = threading.Thread(target=ask, kwargs={"gw": gw, "model": "cheap"})
    busy.start()
    time.sleep(0.05)  # `cheap` answers after 200 ms: it is in flight now
    picked = ask(gw, body={"router": {"strategy": "least_loaded", "models": ["cheap", "premium"]}})
    busy.join()
    assert picked.headers["x-router-model"] == "premium"


def test_constraints_and_their_errors(fake, gateway, catalogue):
    gw = gateway(make_settings(catalogue))
    capped = ask(gw, body={"router": {"strategy": "quality_optimized", "max_cost_usd": 0.001}})
    assert capped.headers["x-router-model"] == "mid"  # premium's estimate is above the cap
    impossible = ask(gw, body={"router": {"max_cost_usd": 1e-9}})
    err = impossible.json()["error"]
    assert impossible.status_code == 400 and err["param"] == "router.max_cost_usd"
    assert "the cheapest, cheap" in err["message"]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for _ in range(5):
        assert ask(gw, body={"tools": tools}).headers["x-router-model"] in {"mid", "premium"}
    vision = ask(gw, body={"router": {"capability": "vision"}})
    assert vision.headers["x-router-model"] == "premium"
    nobody = ask(gw, body={"router": {"capability": ["vision", "audio"]}})
    assert nobody.status_code == 400 and "audio" in nobody.json()["error"]["message"]
    allowed = {
        ask(gw, body={"router": {"models": ["cheap", "mid"]}}).headers["x-router-model"] for _ in range(8)
    }
    assert allowed <= {"cheap", "mid"}
    unknown = ask(gw, body={"router": {"models": ["gpt-9"]}})
    assert unknown.status_code == 400 and "gpt-9" in unknown.json()["error"]["message"]
    picky = ask(gw, body={"router": {"min_quality": 0.99}})
    assert picky.status_code == 400 and "min_quality=0.99" in picky.json()["error"]["message"]
    assert ask(gw, body={"router": {"min_quality": 0.9}}).headers["x-router-model"] == "premium"


def test_context_window_and_availability(fake, gateway):
    settings = make_settings(
        [
            model("small", fake.url(), context_window=100),
            model(
                "keyless",
                fake.url(),
                provider="openrouter",
                api_key_env="NO_SUCH_KEY_ENV",
                context_window=100_000,
            ),
        ]
    )
    gw = gateway(settings)
    long = ask(gw, "word " * 1000)
    assert (
        long.status_code == 503 and "keyless: NO_SUCH_KEY_ENV is not set" in long.json()["error"]["message"]
    )
    short = ask(gw, "hi")
    assert short.headers["x-router-model"] == "small"
    huge = ask(gw, "word " * 500_000)
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "messages"


@pytest.mark.parametrize("policy", ["hcts", "lin_ts", "knn_ts"])
def test_the_decision_is_recorded_for_offline_evaluation(fake, gateway, catalogue, dsn, policy):
    gw = gateway(make_settings(catalogue, enable_persistence=True, database_url=dsn, router_policy=policy))
    resp = ask(gw, "Which planets have rings?")
    assert resp.headers["x-router-layer"] == "bandit"
    record = httpx.get(f"{gw.url}/requests/{resp.headers['x-request-id']}").json()
    assert record["layer"] == "bandit" and record["strategy"] == "bandit"
    assert record["model"] == resp.headers["x-router-model"]
    assert len(record["embedding"]) == 384
    assert 0 < record["propensity"] <= 1
    candidates = record["decision"]["candidates"]
    assert {c["model"] for c in candidates} == {"cheap", "mid", "premium"}
    assert candidates[0]["model"] == record["model"] == record["decision"]["arm"]
    # every eligible arm's propensity, computed (not resampled), with its numerical error
    propensities = record["decision"]["propensities"]
    assert set(propensities) == {"cheap", "mid", "premium"}
    assert sum(propensities.values()) == pytest.approx(1, abs=1e-9)
    assert propensities[record["model"]] == record["propensity"]
    assert record["decision"]["deterministic"] is False
    assert 0 <= record["decision"].get("propensity_error", 0) < 1e-3
    # the context to decide it again from: the token estimate, no constraints, nothing down
    assert record["decision"]["context"]["prompt_tokens"] > 0
    assert "constraints" not in record["decision"]["context"] and "unavailable" not in record["decision"]
    timings = record["decision"]["timings_ms"]
    stages = {"embed_ms", "sample_ms", "routing_ms"} | ({"neighbours_ms"} if policy == "knn_ts" else set())
    assert stages == set(timings)
    assert record["overhead_ms"] >= timings["routing_ms"] * 0.9
    assert record["decision"]["fallbacks"] == [c["model"] for c in candidates[1:3]]


def test_feedback_moves_the_global_posterior(fake, gateway, catalogue):
    gw = gateway(make_settings(catalogue, router_policy="knn_ts"))
    ids = [ask(gw, model="mid").headers["x-request-id"] for _ in range(3)]
    for rid in ids:
        assert httpx.post(gw.url + "/feedback", json={"request_id": rid, "score": 0.0}).status_code == 200
    stats = gw.services.router.stats["mid"]
    assert stats.rated == 3 and stats.score_sum == 0.0
    httpx.post(gw.url + "/feedback", json={"request_id": ids[0], "score": 1.0})  # latest wins
    assert gw.services.router.stats["mid"].rated == 3 and gw.services.router.stats["mid"].score_sum == 1.0
    # explicit calls had no embedding: feedback computed it, so they join future neighbour searches
    record = httpx.get(f"{gw.url}/requests/{ids[0]}").json()
    assert record["embedding"] is not None and len(record["embedding"]) == 384

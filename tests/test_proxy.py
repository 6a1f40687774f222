"""The gateway as an OpenAI-compatible proxy, driven by the official `openai` SDK."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.conftest import make_settings, model

USER = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def gw(fake, gateway):
    settings = make_settings(
        [
            model("alpha", fake.url(), input_usd_per_mtok=1.0, output_usd_per_mtok=2.0),
            model("beta", fake.url(chunks=4), upstream_model="vendor/beta-large"),
        ],
        default_model="alpha",
        router_policy="default",  # `auto` -> DEFAULT_MODEL: these tests are about proxying
    )
    return gateway(settings)


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-test", max_retries=0)


def test_sync_completion_with_explicit_model(gw, fake):
    raw = client(gw).chat.completions.with_raw_response.create(model="beta", messages=USER)
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from vendor/beta-large."
    # `model` names the catalogue model; the upstream's own model string is in a header.
    assert completion.model == "beta"
    assert raw.headers["x-router-model"] == "beta"
    assert raw.headers["x-router-upstream-model"] == "vendor/beta-large-2026-01-01"
    assert raw.headers["x-router-layer"] == "explicit"
    assert float(raw.headers["x-router-overhead-ms"]) >= 0
    assert len(raw.headers["x-request-id"]) == 32
    assert fake.received[-1]["body"]["model"] == "vendor/beta-large"


def test_auto_resolves_to_default_model_when_routing_is_off(gw):
    raw = client(gw).chat.completions.with_raw_response.create(model="auto", messages=USER)
    assert raw.parse().model == "alpha"
    assert raw.headers["x-router-model"] == "alpha"
    assert raw.headers["x-router-layer"] == "default"


async def test_async_client_concurrent_requests(gw):
    aclient = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-test", max_retries=0)
    results = await asyncio.gather(
        *(aclient.chat.completions.create(model="alpha", messages=USER) for _ in range(20))
    )
    assert {r.choices[0].message.content for r in results} == {"Hello from alpha."}
    await aclient.close()


def test_request_body_is_forwarded_unchanged_except_model(gw, fake):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    completion = client(gw).chat.completions.create(
        model="alpha",
        messages=USER,
        tools=tools,
        tool_choice="auto",
        temperature=0.3,
        n=2,
        stop=["\n\n"],
        seed=7,
        user="u-42",
        logprobs=True,
        top_logprobs=2,
        extra_body={"top_k": 40, "router": {"strategy": "balanced"}},
    )
    assert completion.choices[0].message.tool_calls[0].function.name == "weather"
    assert len(completion.choices) == 2
    sent = fake.received[-1]["body"]
    expected = {
        "model": "alpha",
        "messages": USER,
        "tools": tools,
        "tool_choice": "auto",
        "temperature": 0.3,
        "n": 2,
        "stop": ["\n\n"],
        "seed": 7,
        "user": "u-42",
        "logprobs": True,
        "top_logprobs": 2,
        "top_k": 40,
        "max_tokens": 4096,  # MAX_OUTPUT_TOKENS: a default for calls that ask for none
    }
    assert sent == expected  # `router` is ours and never reaches the upstream


def test_fields_that_would_change_the_upstream_or_its_price_are_refused(gw):
    # OpenRouter acts on `provider` and `models` (another model answers) while the gateway would
    # price the call as the catalogue model: README, Security and limits.
    with pytest.raises(openai.BadRequestError) as refused:
        client(gw).chat.completions.create(
            model="alpha", messages=USER, extra_body={"provider": {"order": ["x"]}}
        )
    assert refused.value.body["code"] == "unsupported_field" and refused.value.body["param"] == "provider"


def test_response_format_passes_through(gw):
    completion = client(gw).chat.completions.create(
        model="alpha", messages=USER, response_format={"type": "json_object"}
    )
    assert json.loads(completion.choices[0].message.content) == {"answer": "Hello from alpha."}


def test_streaming_through_the_sdk(gw, fake):
    stream = client(gw).chat.completions.create(model="beta", messages=USER, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from vendor/beta-large."
    assert {c.model for c in chunks} == {"beta"}
    # we always ask the upstream for usage, but pass it on only to clients that asked for it
    assert fake.received[-1]["body"]["stream_options"] == {"include_usage": True}
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_streaming_usage_chunk_only_when_asked(gw):
    stream = client(gw).chat.completions.create(
        model="alpha", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


async def test_async_streaming(gw):
    aclient = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-test", max_retries=0)
    stream = await aclient.chat.completions.create(model="alpha", messages=USER, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello from alpha."
    await aclient.close()


def test_raw_stream_is_sse_ending_with_done(gw):
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json={"model": "alpha", "messages": USER, "stream": True}
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-router-model"] == "alpha"
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_same_route_without_v1_prefix(gw):
    resp = httpx.post(gw.url + "/chat/completions", json={"model": "auto", "messages": USER})
    assert resp.status_code == 200
    assert resp.json()["model"] == "alpha"  # `model` may be left out: it means auto


def test_models_list(gw):
    models = client(gw).models.list()
    ids = [m.id for m in models.data]
    assert ids == ["auto", "alpha", "beta"]


def test_request_id_is_accepted_and_echoed(gw):
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "auto", "messages": USER},
        headers={"X-Request-ID": "req-2026.11:abc_1"},
    )
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "req-2026.11:abc_1"


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "-leading-dash", "semi;colon", "ünï"])
def test_bad_request_ids_are_refused(gw, bad):
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "auto", "messages": USER},
        headers={"X-Request-ID": bad.encode("utf-8")},
    )
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["code"] == "invalid_request_id" and err["param"] == "X-Request-ID"
    assert resp.headers["x-request-id"] != bad  # a fresh id for the error itself


def test_cost_is_computed_from_usage_and_prices(gw):
    raw = client(gw).chat.completions.with_raw_response.create(model="alpha", messages=USER)
    usage = raw.parse().usage
    expected = (usage.prompt_tokens * 1.0 + usage.completion_tokens * 2.0) / 1e6
    assert float(raw.headers["x-router-cost-usd"]) == pytest.approx(expected, abs=1e-8)


def test_health_and_probes(gw):
    assert httpx.get(gw.url + "/live").json() == {"status": "ok"}
    ready = httpx.get(gw.url + "/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    client(gw).chat.completions.create(model="alpha", messages=USER)
    health = httpx.get(gw.url + "/health").json()
    alpha = health["providers"]["alpha"]
    assert alpha["status"] == "up" and alpha["circuit"] == "closed"
    assert alpha["requests"] >= 1 and alpha["latency_ms_avg"] > 0
    assert alpha["last_error"] is None

"""Operations: Prometheus metrics, /v1/stats, structured logs, and secrets kept out of everything."""

from __future__ import annotations

import io
import json
import logging

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.logs import setup_logging
from tests.conftest import make_settings, model, wait_for

USER = [{"role": "user", "content": "a question about the ocean"}]
SECRET_OR = "sk-or-v1-0123456789abcdef0123456789abcdef"
SECRET_GW = "sk-gateway-fedcba9876543210"


def scrape(gw) -> dict[str, list]:
    text = httpx.get(gw.url + "/metrics").text
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    return families


def value(samples, name: str, **labels) -> float:
    return sum(
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture
def ops_gw(fake, gateway, dsn):
    settings = make_settings(
        [
            model("alpha", fake.url(), input_usd_per_mtok=1.0, output_usd_per_mtok=2.0),
            model("broken", fake.url(status=500), fallbacks=["alpha"]),
            model("down", fake.url(status=503)),
        ],
        enable_persistence=True,
        database_url=dsn,
        upstream_retries=0,
        circuit_breaker_failure_threshold=2,
        circuit_breaker_cooldown_s=60,
    )
    return gateway(settings)


def test_metrics_match_the_traffic(ops_gw):
    gw = ops_gw
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    ids = []
    for _ in range(5):
        ids.append(
            client.chat.completions.with_raw_response.create(model="alpha", messages=USER).headers[
                "x-request-id"
            ]
        )
    list(client.chat.completions.create(model="alpha", messages=USER, stream=True))
    for _ in range(2):
        assert client.chat.completions.create(model="broken", messages=USER).model == "alpha"  # fallback
    for _ in range(3):
        httpx.post(gw.url + "/v1/chat/completions", json={"model": "down", "messages": USER})
    for _ in range(4):
        client.chat.completions.create(model="auto", messages=USER)
    for rid, score in zip(ids, (1.0, 0.5, 0.0), strict=False):
        assert httpx.post(gw.url + "/feedback", json={"request_id": rid, "score": score}).status_code == 200
    m = scrape(gw)

    req = m["llm_router_requests"]
    # labelled by the model that answered: the two fallbacks from `broken` count for alpha
    assert value(req, "llm_router_requests_total", model="alpha", layer="explicit", status="200") == 6 + 2
    assert value(req, "llm_router_requests_total", layer="bandit") == 4
    assert value(req, "llm_router_requests_total", model="down", status="502") == 2  # then the circuit opened
    assert value(req, "llm_router_requests_total", model="down", status="503") == 1
    assert value(req, "llm_router_requests_total") == 5 + 1 + 2 + 3 + 4
    assert (
        value(m["llm_router_fallbacks"], "llm_router_fallbacks_total", from_model="broken", to_model="alpha")
        == 2
    )
    assert value(m["llm_router_gateway_overhead_seconds"], "llm_router_gateway_overhead_seconds_count") == 15
    assert (
        value(
            m["llm_router_upstream_latency_seconds"],
            "llm_router_upstream_latency_seconds_count",
            model="alpha",
        )
        >= 5
    )
    assert (
        value(m["llm_router_time_to_first_token_seconds"], "llm_router_time_to_first_token_seconds_count")
        == 1
    )
    assert value(m["llm_router_tokens"], "llm_router_tokens_total", model="alpha", kind="completion") > 0
    assert value(m["llm_router_cost_usd"], "llm_router_cost_usd_total", model="alpha") > 0
    assert value(m["llm_router_feedback_score"], "llm_router_feedback_score_count", model="alpha") == 3
    assert value(m["llm_router_feedback_score"], "llm_router_feedback_score_sum", model="alpha") == 1.5
    assert value(m["llm_router_circuit_state"], "llm_router_circuit_state", model="down") == 2
    assert value(m["llm_router_circuit_state"], "llm_router_circuit_state", model="alpha") == 0
    assert (
        value(m["llm_router_in_flight_requests"], "llm_router_in_flight_requests") == 1
    )  # the scrape itself
    assert "llm_router_recorder_queue_depth" in m and "llm_router_recorder_dropped" in m
    assert value(m["llm_router_embedding_cache_misses"], "llm_router_embedding_cache_misses_total") >= 1
    alpha_mean = value(m["llm_router_arm_posterior_mean"], "llm_router_arm_posterior_mean", model="alpha")
    assert alpha_mean == pytest.approx((0.8 * 2 + 1.5) / (2 + 3))  # optimistic prior + three ratings

    # bounded labels: catalogue models, fixed layers/strategies/kinds, HTTP codes; never an id or a prompt
    allowed = {
        "alpha",
        "broken",
        "down",
        "none",
        "explicit",
        "bandit",
        "keyword",
        "semantic",
        "strategy",
        "default",
        "prompt",
        "completion",
        "call",
        "duel",
        "judge",
        "user",
        "app",
    }
    for samples in m.values():
        for s in samples:
            assert not {"request_id", "id", "prompt", "messages"} & set(s.labels)
            for key, v in s.labels.items():
                if key in ("le", "quantile"):
                    continue
                assert v in allowed or v.isdigit() or v in {"bandit", "cost_optimized"}, (s.name, key, v)
                assert v not in ids


def test_stats_endpoint(ops_gw):
    gw = ops_gw
    for name in ("alpha", "alpha", "alpha", "broken"):
        httpx.post(gw.url + "/v1/chat/completions", json={"model": name, "messages": USER})
    gw.call(gw.services.recorder.flush())
    body = httpx.get(gw.url + "/v1/stats?window=1h").json()
    assert body["requests"] == 4 and body["window"] == "1h"
    alpha = next(r for r in body["models"] if r["model"] == "alpha")
    assert alpha["requests"] == 4 and alpha["share"] == 1.0  # the broken call was answered by alpha
    assert alpha["cost_usd"] > 0 and alpha["latency_ms_avg"] > 0
    assert httpx.get(gw.url + "/v1/stats?window=soon").status_code == 400


@pytest.fixture
def logs():
    """Capture the gateway's log output as the CLI sets it up (JSON, redacted)."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buf = io.StringIO()
    yield buf
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_one_json_line_per_request_and_no_prompt_text(fake, gateway, logs):
    settings = make_settings([model("alpha", fake.url(), input_usd_per_mtok=1.0)])
    redact = setup_logging("info", "auto", settings.secrets(), stream=logs)  # a StringIO is no TTY: JSON
    gw = gateway(settings, redact=redact)
    rid = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "alpha", "messages": USER},
        headers={"X-Request-ID": "log-test-1"},
    ).headers["x-request-id"]
    httpx.post(gw.url + "/v1/chat/completions", content=b"{broken")

    def access_lines() -> list[dict]:
        lines = [json.loads(line) for line in logs.getvalue().splitlines()]
        access = [entry for entry in lines if entry["logger"] == "gateway.access"]
        return access if len(access) >= 2 else []

    access = wait_for(access_lines)
    call = next(entry for entry in access if entry["request_id"] == rid)
    for field in (
        "ts",
        "level",
        "request_id",
        "method",
        "path",
        "status",
        "duration_ms",
        "overhead_ms",
        "model",
        "layer",
        "outcome",
        "upstream_ms",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
    ):
        assert field in call, field
    assert call["status"] == 200 and call["model"] == "alpha" and call["layer"] == "explicit"
    bad = next(entry for entry in access if entry["status"] == 400)
    assert bad["path"] == "/v1/chat/completions"
    assert "ocean" not in logs.getvalue()


def test_log_prompts_opt_in_and_text_format(fake, gateway, logs):
    settings = make_settings([model("alpha", fake.url())], log_prompts=True)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    redact = setup_logging("info", "auto", settings.secrets(), stream=tty)  # a terminal: text
    gw = gateway(settings, redact=redact)
    httpx.post(gw.url + "/v1/chat/completions", json={"model": "alpha", "messages": USER})
    out = wait_for(lambda: "gateway.access" in tty.getvalue() and tty.getvalue())
    assert "ocean" in out
    assert not out.lstrip().startswith("{")


def test_secrets_never_appear_in_logs_or_errors(fake, gateway, logs, monkeypatch):
    monkeypatch.setenv("OPENROUTER_API_KEY", SECRET_OR)
    settings = make_settings(
        [
            model("leaky", fake.url(status=401, echo_auth=1), provider="openrouter"),
            model("unauthorized", fake.url(status=500, echo_auth=1), provider="openrouter"),
            model("fine", fake.url(), provider="openrouter"),
        ],
        gateway_api_keys=[SECRET_GW],
        upstream_retries=1,
        log_level="debug",
        openrouter_base_url=fake.url(),  # the fake plays OpenRouter: its key may go there
    )
    redact = setup_logging("debug", "json", settings.secrets(), stream=logs)
    gw = gateway(settings, redact=redact)
    auth = {"Authorization": f"Bearer {SECRET_GW}"}
    bodies = []
    for name in ("leaky", "unauthorized", "fine"):
        resp = httpx.post(
            gw.url + "/v1/chat/completions", json={"model": name, "messages": USER}, headers=auth
        )
        bodies.append(resp.text)
    assert "Incorrect API key provided: [redacted]" in bodies[0]
    assert "[redacted]" in bodies[1]
    assert json.loads(bodies[2])["model"] == "fine"
    assert fake.received[-1]["authorization"] == f"Bearer {SECRET_OR}"  # the key does reach the upstream
    assert fake.received[-1]["headers"]["x-title"] == "LLM Router"  # with OpenRouter's headers
    wrong = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "auto", "messages": USER},
        headers={"Authorization": f"Bearer {SECRET_GW}x"},
    )
    bodies.append(wrong.text)
    bodies.append(httpx.get(gw.url + "/health").text)
    bodies.append(httpx.get(gw.url + "/metrics").text)
    output = logs.getvalue()
    assert "gateway.access" in output
    for secret in (SECRET_OR, SECRET_GW):
        assert secret not in output
        for body in bodies:
            assert secret not in body

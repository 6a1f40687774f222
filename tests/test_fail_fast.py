"""Failures no retry can fix (an API key not set, a local server not running) are answered at once,
with a status and code that say what to fix and nothing that invites a retry; /ready and /health
know about them before any call fails, because local upstreams are probed."""

from __future__ import annotations

import socket

import httpx
import openai
import pytest
from pydantic import ValidationError

from tests.conftest import make_settings, model, wait_for
from tests.fake_upstream import FakeUpstream

USER = [{"role": "user", "content": "hi"}]


def closed_port() -> int:
    """A loopback port nothing listens on (as Ollama's, when it is not running)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def first_run(port: int, **kw):
    """The dev profile's shape on a fresh machine: a cloud model without its key, a local Ollama."""
    return make_settings(
        [
            model(
                "cloud", "https://openrouter.ai/api/v1", provider="openrouter", api_key_env="NO_SUCH_KEY_ENV"
            ),
            model("local", f"http://127.0.0.1:{port}/v1", provider="ollama"),
        ],
        **kw,
    )


def test_the_sdk_gets_one_clear_answer_not_seconds_of_retries(gateway):
    gw = gateway(first_run(closed_port()))
    attempts: list[httpx.Request] = []
    sdk = openai.OpenAI(  # the SDK's defaults: 2 retries, honouring Retry-After
        base_url=gw.url + "/v1",
        api_key="unused",
        http_client=httpx.Client(event_hooks={"request": [attempts.append]}),
    )
    with pytest.raises(openai.APIStatusError) as failed:
        sdk.chat.completions.create(model="auto", messages=USER)
    assert len(attempts) == 1  # not retried (the parent commit: 3 attempts, 5 s apart)
    err = failed.value
    assert err.status_code == 503 and err.code == "upstream_not_configured"
    assert "NO_SUCH_KEY_ENV is not set" in err.message and "connection refused" in err.message
    assert "ollama serve" in err.message  # what to do about it
    assert "retry-after" not in err.response.headers and err.response.headers["x-should-retry"] == "false"


def test_ready_and_health_report_a_local_server_that_is_not_running(gateway):
    port = closed_port()
    gw = gateway(first_run(port))
    # Before any call: the start-up probe has found nothing at the local model's address.
    ready = httpx.get(gw.url + "/ready")
    assert ready.status_code == 503
    models = ready.json()["checks"]["models"]
    assert "NO_SUCH_KEY_ENV is not set" in models and "local: nothing answers at <upstream>" in models
    assert str(port) not in ready.text  # the address is in the log, never in an open probe's body
    local = httpx.get(gw.url + "/health").json()["providers"]["local"]
    assert local["status"] == "down" and "connection refused" in local["reason"]
    assert local["probed_at"] is not None and local["requests"] == 0
    listed = {m["id"]: m for m in httpx.get(gw.url + "/v1/models").json()["data"]}
    assert listed["local"]["available"] is False


def test_a_refused_local_model_is_tried_once_and_does_not_open_its_circuit(gateway):
    gw = gateway(first_run(closed_port(), circuit_breaker_failure_threshold=2, upstream_retries=2))
    for _ in range(4):
        resp = httpx.post(gw.url + "/v1/chat/completions", json={"model": "local", "messages": USER})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "upstream_unreachable"
        assert "retry-after" not in resp.headers
    record = httpx.get(f"{gw.url}/requests/{resp.headers['x-request-id']}").json()
    assert [(a["model"], a["kind"]) for a in record["attempts"]] == [("local", "refused")]  # no retries
    local = httpx.get(gw.url + "/health").json()["providers"]["local"]
    assert local["status"] == "down" and local["circuit"] == "closed"  # an answer for what is wrong


def test_a_local_server_that_starts_is_found_by_the_next_probe(gateway):
    port = closed_port()
    gw = gateway(
        make_settings(
            [model("local", f"http://127.0.0.1:{port}/v1", provider="ollama")], local_probe_interval_s=1
        )
    )
    assert httpx.get(gw.url + "/ready").status_code == 503
    server = FakeUpstream().start(port=port)
    try:
        wait_for(lambda: httpx.get(gw.url + "/ready").status_code == 200, timeout=10)
        assert httpx.get(gw.url + "/health").json()["providers"]["local"]["status"] == "up"
        assert server.model_lists >= 1
        ok = httpx.post(gw.url + "/v1/chat/completions", json={"model": "auto", "messages": USER})
        assert ok.status_code == 200 and ok.json()["model"] == "local"
    finally:
        server.stop()


def test_transient_unavailability_still_says_when_to_retry(fake, gateway):
    gw = gateway(make_settings([model("flaky", fake.url(status=500))], circuit_breaker_failure_threshold=1))
    assert (
        httpx.post(gw.url + "/v1/chat/completions", json={"model": "auto", "messages": USER}).status_code
        == 502
    )
    opened = httpx.post(gw.url + "/v1/chat/completions", json={"model": "auto", "messages": USER})
    assert opened.status_code == 503 and opened.json()["error"]["code"] == "no_available_model"
    assert opened.headers["retry-after"] == "5" and "x-should-retry" not in opened.headers


def test_the_probe_cadence_is_bounded():
    # A probe is a request to the model's server; and without probes a model found down would
    # never be routed to again.
    for too_often in (0, 0.2):
        with pytest.raises(ValidationError, match="local_probe_interval_s"):
            make_settings([], local_probe_interval_s=too_often)

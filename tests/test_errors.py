"""Every failure reaches the client in OpenAI's error shape with the right status; no traces."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import make_settings, model

USER = [{"role": "user", "content": "hi"}]


def assert_openai_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    if code is not None:
        assert err["code"] == code
    assert resp.headers["x-request-id"]
    return err


@pytest.fixture
def gw(fake, gateway):
    settings = make_settings(
        [
            model("ok", fake.url()),
            model("broken", fake.url(status=500)),
            model("slow", fake.url(hang=1), read_timeout_s=0.3),
            model("refuses", fake.url(status=400)),
            model("nowhere", "http://127.0.0.1:9/v1", connect_timeout_s=0.5),
            model("paid", fake.url(), provider="openrouter", api_key_env="NO_SUCH_KEY_ENV"),
        ],
        default_model="ok",
        max_body_bytes=10_000,
        upstream_retries=1,
    )
    return gateway(settings)


def post(gw, body=None, content=None, headers=None) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions", json=body, content=content, headers=headers, timeout=10
    )


def test_malformed_json_is_400(gw):
    err = assert_openai_error(
        post(gw, content=b'{"messages": [', headers={"content-type": "application/json"}), 400, "invalid_json"
    )
    assert "not valid JSON" in err["message"]


@pytest.mark.parametrize("content", [b"", b"[1, 2]", b'"text"'])
def test_body_that_is_not_an_object_is_400(gw, content):
    assert_openai_error(post(gw, content=content), 400, "invalid_json")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "ok"}, "messages"),
        ({"model": "ok", "messages": []}, "messages"),
        ({"model": "ok", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": "ok", "messages": [{"role": "user"}]}, "messages.0"),
        ({"model": "ok", "messages": USER, "temperature": 7}, "temperature"),
        ({"model": "ok", "messages": USER, "stream": "yes"}, "stream"),
        ({"model": "ok", "messages": USER, "n": 0}, "n"),
        ({"model": 42, "messages": USER}, "model"),
        ({"model": "auto", "messages": USER, "router": {"max_cost_usd": -1}}, "router.max_cost_usd"),
    ],
)
def test_schema_violations_name_the_field(gw, body, param):
    err = assert_openai_error(post(gw, body), 400, "invalid_value")
    assert err["param"] == param
    assert param in err["message"]


def test_bad_router_header_names_the_header(gw):
    err = assert_openai_error(
        post(gw, {"model": "auto", "messages": USER}, headers={"X-Router-Max-Cost-Usd": "cheap"}), 400
    )
    assert err["param"] == "X-Router-Max-Cost-Usd"


def test_unknown_model_is_404(gw):
    err = assert_openai_error(post(gw, {"model": "gpt-9", "messages": USER}), 404, "model_not_found")
    assert "gpt-9" in err["message"] and err["param"] == "model"


def test_sdk_raises_not_found_for_unknown_model(gw):
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=USER)


def test_body_over_the_limit_is_413(gw):
    big = {"model": "ok", "messages": [{"role": "user", "content": "x" * 20_000}]}
    assert_openai_error(post(gw, big), 413, "request_too_large")


def test_chunked_body_over_the_limit_is_413(gw):
    def chunks():
        yield b'{"model": "ok", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}]}'

    resp = httpx.post(gw.url + "/v1/chat/completions", content=chunks(), timeout=10)
    assert_openai_error(resp, 413, "request_too_large")


def test_upstream_failure_after_retries_is_502(gw, fake):
    before = fake.counts["status=500"]
    err = assert_openai_error(post(gw, {"model": "broken", "messages": USER}), 502, "upstream_failed")
    assert "HTTP 500" in err["message"]
    assert fake.counts["status=500"] - before == 2  # the first try and one retry


def test_upstream_timeout_is_504(gw):
    err = assert_openai_error(post(gw, {"model": "slow", "messages": USER}), 504, "upstream_timeout")
    assert "0.3 s" in err["message"]


def test_upstream_client_error_is_passed_back_not_retried(gw, fake):
    before = fake.counts["status=400"]
    resp = post(gw, {"model": "refuses", "messages": USER})
    err = assert_openai_error(resp, 400)
    assert err["message"] == "fake failure 400"
    assert fake.counts["status=400"] - before == 1


def test_a_local_upstream_that_is_not_running_fails_fast(gw):
    """Connection refused on a local model: no retry starts it, so the answer says what to fix,
    at once, and tells the client not to retry (no Retry-After; `x-should-retry: false`)."""
    resp = post(gw, {"model": "nowhere", "messages": USER})
    err = assert_openai_error(resp, 503, "upstream_unreachable")
    assert "connection refused" in err["message"] and "nothing answers at <upstream>" in err["message"]
    assert "127.0.0.1:9" not in resp.text  # the address is in the log, not in what a client sees
    assert "retry-after" not in resp.headers and resp.headers["x-should-retry"] == "false"


def test_missing_api_key_fails_fast_and_is_named(gw):
    resp = post(gw, {"model": "paid", "messages": USER})
    err = assert_openai_error(resp, 503, "upstream_key_missing")
    assert "NO_SUCH_KEY_ENV is not set" in err["message"]
    assert "retry-after" not in resp.headers and resp.headers["x-should-retry"] == "false"
    health = httpx.get(gw.url + "/health").json()["providers"]["paid"]
    assert health["status"] == "unavailable" and "NO_SUCH_KEY_ENV" in health["reason"]


def test_streaming_errors_before_the_first_byte_are_plain_errors(gw):
    resp = post(gw, {"model": "broken", "messages": USER, "stream": True})
    assert_openai_error(resp, 502, "upstream_failed")


def test_unknown_route_and_wrong_method(gw):
    assert_openai_error(httpx.get(gw.url + "/v2/nothing"), 404, "not_found")
    assert_openai_error(httpx.get(gw.url + "/v1/chat/completions"), 405, "method_not_allowed")


def test_gateway_keys_are_enforced(fake, gateway):
    gw = gateway(make_settings([model("ok", fake.url())], gateway_api_keys=["sk-good-1", "sk-good-2"]))
    assert_openai_error(post(gw, {"model": "auto", "messages": USER}), 401, "invalid_api_key")
    assert_openai_error(
        post(gw, {"model": "auto", "messages": USER}, headers={"Authorization": "Bearer sk-bad"}), 401
    )
    ok = post(gw, {"model": "auto", "messages": USER}, headers={"Authorization": "Bearer sk-good-2"})
    assert ok.status_code == 200
    assert httpx.get(gw.url + "/live").status_code == 200  # probes stay open
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="ok", messages=USER)
    # one client key cannot read or rate another's calls
    rid = ok.headers["x-request-id"]
    other = {"Authorization": "Bearer sk-good-1"}
    assert httpx.get(f"{gw.url}/requests/{rid}", headers=other).status_code == 404
    assert (
        httpx.post(gw.url + "/feedback", json={"request_id": rid, "score": 1}, headers=other).status_code
        == 404
    )
    mine = {"Authorization": "Bearer sk-good-2"}
    assert httpx.get(f"{gw.url}/requests/{rid}", headers=mine).status_code == 200
    assert (
        httpx.post(gw.url + "/feedback", json={"request_id": rid, "score": 1}, headers=mine).status_code
        == 200
    )
    assert httpx.get(gw.url + "/models").status_code == 401


def test_cors_preflight_and_errors_with_client_keys(fake, gateway):
    settings = make_settings(
        [model("ok", fake.url())], gateway_api_keys=["sk-k"], cors_origins=["https://app.example"]
    )
    gw = gateway(settings)
    origin = {"Origin": "https://app.example"}
    preflight = httpx.options(
        gw.url + "/v1/chat/completions",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    denied = httpx.post(
        gw.url + "/v1/chat/completions", json={"model": "auto", "messages": USER}, headers=origin
    )
    assert denied.status_code == 401  # and the browser can read why
    assert denied.headers["access-control-allow-origin"] == "https://app.example"
    ok = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "auto", "messages": USER},
        headers={**origin, "Authorization": "Bearer sk-k"},
    )
    assert ok.status_code == 200 and "x-request-id" in ok.headers["access-control-expose-headers"]

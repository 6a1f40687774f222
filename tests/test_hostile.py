"""A hostile client against a real gateway: huge and slow headers, slow bodies, too many
connections, JSON bombs, fields that change what an upstream does, n x max_tokens, forged log
lines, control characters from an upstream, internal URLs, key guessing, bad admin parameters:
each fails safely, in OpenAI's error shape where there is an answer at all."""

from __future__ import annotations

import io
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest

from gateway import fields
from gateway.catalogue import ModelSpec
from gateway.logs import TextFormatter
from gateway.store.memory import MemoryStore
from tests.conftest import make_settings, model
from tests.test_errors import assert_openai_error

USER = [{"role": "user", "content": "hi"}]


def raw(gw: Any) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (a reset counts as closed)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def chat(gw: Any, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30, **kw)


# --- the HTTP server's limits


def test_a_huge_header_is_refused_without_being_read(fake, gateway):
    gw = gateway(make_settings([model("ok", fake.url())], max_header_bytes=8192))
    sock = raw(gw)
    sock.sendall(b"GET /live HTTP/1.1\r\nhost: x\r\nx-big: ")
    refused = b""
    try:
        for _ in range(1024):  # up to 64 MiB, as the client sent
            sock.sendall(b"a" * 65536)
    except OSError:
        pass  # the server closed the connection: what we want
    refused = read_all(sock)
    assert refused.startswith(b"HTTP/1.1 431")
    assert b'"code":"headers_too_large"' in refused
    assert httpx.get(gw.url + "/live").status_code == 200


def test_slow_and_idle_connections_are_closed(fake, gateway):
    gw = gateway(make_settings([model("ok", fake.url())], header_timeout_s=0.5, body_timeout_s=0.5))
    idle = raw(gw)
    half_head = raw(gw)
    half_head.sendall(b"GET /live HTTP/1.1\r\nhost: x\r\n")
    half_body = raw(gw)
    half_body.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{"mo')
    t0 = time.monotonic()
    for sock in (idle, half_head, half_body):
        assert read_all(sock) == b""  # closed by the server, without an answer
    assert time.monotonic() - t0 < 5
    assert httpx.get(gw.url + "/live").status_code == 200


def test_past_max_connections_the_answer_is_a_clear_503(fake, gateway):
    gw = gateway(make_settings([model("slow", fake.url(delay_ms=1500))], max_connections=2))
    with ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(chat, gw, {"model": "slow", "messages": USER}) for _ in range(2)]
        time.sleep(0.5)
        refused = httpx.get(gw.url + "/live")
        assert_openai_error(refused, 503, "overloaded")
        assert refused.headers["retry-after"] == "1"
        assert [f.result().status_code for f in busy] == [200, 200]


# --- bodies


def test_a_json_bomb_is_refused_before_it_is_parsed(fake, gateway):
    gw = gateway(make_settings([model("ok", fake.url())]))
    bomb = b'{"messages":[{"role":"user","content":"hi"}],"x":[' + b",".join([b"{}"] * 2_000_000) + b"]}"
    resp = httpx.post(gw.url + "/v1/chat/completions", content=bomb, timeout=60)
    assert_openai_error(resp, 413, "too_many_json_values")
    many_commas = orjson.dumps({"messages": [{"role": "user", "content": "a, " * 150_000}], "model": "ok"})
    assert httpx.post(gw.url + "/v1/chat/completions", content=many_commas, timeout=60).status_code == 200


def test_fields_that_change_what_an_upstream_does_are_refused(fake, gateway):
    gw = gateway(make_settings([model("ok", fake.url())]))
    for field, value in (("models", ["openai/gpt-4o"]), ("provider", {"order": ["x"]}), ("plugins", [{}])):
        err = assert_openai_error(
            chat(gw, {"model": "ok", "messages": USER, field: value}), 400, "unsupported_field"
        )
        assert err["param"] == field
    assert chat(gw, {"model": "ok", "messages": USER, "top_k": 5}).status_code == 200
    assert fake.received[-1]["body"]["top_k"] == 5


def test_each_kind_gets_its_own_fields():
    openai_model = ModelSpec(name="o", provider="openai")
    vllm_model = ModelSpec(name="v", provider="vllm")
    body = {"model": "x", "messages": USER, "guided_json": {}, "top_k": 3, "seed": 1}
    assert fields.for_model(openai_model, body) == {"model": "x", "messages": USER, "seed": 1}
    assert fields.for_model(vllm_model, body) == body
    extra = ModelSpec(name="e", provider="openai", extra_body_fields=("guided_json",))
    assert "guided_json" in fields.for_model(extra, body)


def test_n_and_output_tokens_are_capped_and_reserved(fake, gateway):
    gw = gateway(
        make_settings([model("ok", fake.url())], max_n=4, max_output_tokens=300, rate_limit_tpm=1000)
    )
    err = assert_openai_error(chat(gw, {"model": "ok", "messages": USER, "n": 5}), 400, "invalid_value")
    assert err["param"] == "n"
    assert chat(gw, {"model": "ok", "messages": USER, "max_tokens": 1_000_000}).status_code == 200
    assert fake.received[-1]["body"]["max_tokens"] == 300
    assert chat(gw, {"model": "ok", "messages": USER}).status_code == 200
    assert fake.received[-1]["body"]["max_tokens"] == 300  # a default cap when none is asked
    # n x max_tokens: 4 x 300 tokens cannot fit a 1,000-token minute
    err = assert_openai_error(chat(gw, {"model": "ok", "messages": USER, "n": 4}), 429, "rate_limit_exceeded")
    assert "larger than the limit" in err["message"]


# --- what reaches clients and logs


def test_a_control_character_from_an_upstream_never_breaks_the_answer(fake, gateway, dsn):
    settings = make_settings(
        [model("odd", fake.url(), upstream_model="evil\r\nset-cookie: x=1\x00")],
        enable_persistence=True,
        database_url=dsn,
    )
    gw = gateway(settings)
    resp = chat(gw, {"model": "odd", "messages": USER})
    assert resp.status_code == 200 and resp.json()["choices"]
    assert resp.headers["x-router-upstream-model"].startswith("evilset-cookie: x=1")
    assert "set-cookie" not in resp.headers
    record = httpx.get(gw.url + "/requests/" + resp.headers["x-request-id"]).json()
    assert record["status"] == "ok" and record["cost_usd"] is not None


def test_internal_urls_never_reach_a_client(gateway):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    gw = gateway(make_settings([model("down", f"http://127.0.0.1:{port}/v1")], upstream_retries=0))
    resp = chat(gw, {"model": "down", "messages": USER})
    assert resp.status_code in (502, 503)
    health = httpx.get(gw.url + "/health")
    for text in (resp.text, health.text):
        assert "127.0.0.1" not in text and str(port) not in text


def test_health_is_cheap_and_cacheable(fake, gateway):
    class Counting(MemoryStore):
        pings = 0

        async def ping(self) -> bool:
            Counting.pings += 1
            return True

    gw = gateway(make_settings([model("ok", fake.url())], health_cache_s=600), store=Counting())
    with httpx.Client() as client:
        for _ in range(50):
            resp = client.get(gw.url + "/health")
    assert resp.headers["cache-control"] == "max-age=600"
    assert Counting.pings == 1
    assert httpx.get(gw.url + "/ready").status_code == 200 and Counting.pings == 1


def test_a_forged_log_line_is_escaped(fake, gateway):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter(lambda s: s))  # type: ignore[arg-type]
    access = logging.getLogger("gateway.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        gw = gateway(make_settings([model("ok", fake.url())]))
        httpx.get(gw.url + "/nope%0a2026-01-01 00:00:00,000 INFO    gateway.access: POST /admin 200")
        time.sleep(0.2)
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    lines = stream.getvalue().splitlines()
    assert lines and all(not line.startswith("2026-01-01") for line in lines)
    assert any("\\n2026-01-01" in line for line in lines)


def test_key_guessing_is_limited_per_address(fake, gateway):
    gw = gateway(
        make_settings(
            [model("ok", fake.url())], gateway_api_keys=["sk-right-key-0000"], auth_failures_per_minute=3
        )
    )
    for i in range(3):
        assert_openai_error(chat(gw, {"messages": USER}, headers={"Authorization": f"Bearer guess-{i}"}), 401)
    limited = chat(gw, {"messages": USER}, headers={"Authorization": "Bearer guess-4"})
    assert_openai_error(limited, 429, "rate_limit_exceeded")
    assert int(limited.headers["retry-after"]) >= 1
    # from this address even the right key waits: the guesser cannot tell a hit
    assert (
        chat(gw, {"messages": USER}, headers={"Authorization": "Bearer sk-right-key-0000"}).status_code == 429
    )
    metrics = httpx.get(gw.url + "/metrics").text
    assert "llm_router_auth_failures_total 3.0" in metrics


@pytest.mark.parametrize(
    "path",
    [
        "/v1/stats?window=1000000d",
        "/v1/stats?window=99999999999999999999d",
        "/v1/stats?window=0h",
        "/v1/dpo/pairs?limit=-1",
        "/v1/dpo/pairs?limit=abc",
        "/v1/dpo/pairs?min_margin=nan",
        "/v1/dpo/pairs?min_margin=inf",
        "/v1/dpo/pairs?cursor=2026-01-01T00:00:00|99999999999999999999999",
        "/v1/dpo/pairs?since=9999-12-31T23:59:59-23:59",
        "/v1/dpo/pairs?since=yesterday",
    ],
)
def test_bad_admin_parameters_are_400_never_500(fake, gateway, path):
    gw = gateway(make_settings([model("ok", fake.url())], admin_api_key="sk-admin-000000"))
    resp = httpx.get(gw.url + path, headers={"Authorization": "Bearer sk-admin-000000"})
    assert_openai_error(resp, 400, "invalid_value")

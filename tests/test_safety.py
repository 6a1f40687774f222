"""Keys, tenants, limits, upstream hygiene and graceful shutdown, the way a client meets them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.limits import RateLimits
from gateway.logs import Redactor
from gateway.shared.local import LocalState
from tests.conftest import make_settings, model, query, wait_for
from tests.test_errors import assert_openai_error

ROOT = Path(__file__).resolve().parent.parent
USER = [{"role": "user", "content": "hi"}]


def chat(gw: Any, body: dict[str, Any], key: str | None = None, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=30, **kw)


# --- keys and tenants


def test_the_prod_profile_refuses_to_start_without_client_keys(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_API_KEYS", "CONFIG_FILE")}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(ROOT / "config.prod.yaml"), "--port", "0"],
        cwd=tmp_path,  # no .env here
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "GATEWAY_API_KEYS is empty" in proc.stderr and "Traceback" not in proc.stderr


def test_an_open_gateway_says_so_at_start(fake, gateway, caplog):
    gateway(make_settings([model("ok", fake.url())]))
    assert any("NO GATEWAY_API_KEYS" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_stats_and_other_callers_calls_are_for_the_admin(fake, gateway):
    settings = make_settings(
        [model("ok", fake.url())], gateway_api_keys=["sk-alice", "sk-bob"], admin_api_key="sk-admin"
    )
    gw = gateway(settings)
    rid = chat(gw, {"model": "auto", "messages": USER}, key="sk-alice").headers["x-request-id"]
    stats = gw.url + "/v1/stats"
    assert_openai_error(httpx.get(stats), 401, "invalid_api_key")
    assert_openai_error(httpx.get(stats, headers={"Authorization": "Bearer sk-alice"}), 401)
    assert httpx.get(stats, headers={"Authorization": "Bearer sk-admin"}).json()["requests"] >= 1
    for path in (f"/requests/{rid}", f"/metrics/{rid}"):
        bob = httpx.get(gw.url + path, headers={"Authorization": "Bearer sk-bob"})
        assert_openai_error(bob, 404, "request_not_found")  # not 403: ids cannot be probed
        assert httpx.get(gw.url + path, headers={"Authorization": "Bearer sk-admin"}).status_code == 200


def test_without_an_admin_key_admin_endpoints_are_off_and_an_open_gateway_shows_stats(fake, gateway):
    keyed = gateway(make_settings([model("ok", fake.url())], gateway_api_keys=["sk-alice"]))
    alice = {"Authorization": "Bearer sk-alice"}
    assert_openai_error(httpx.get(keyed.url + "/v1/stats", headers=alice), 403, "admin_disabled")
    assert_openai_error(httpx.get(keyed.url + "/v1/dpo/pairs", headers=alice), 403, "admin_disabled")
    open_gw = gateway(make_settings([model("ok", fake.url())]))
    assert httpx.get(open_gw.url + "/v1/stats").status_code == 200


# --- rate limits


def test_requests_per_minute_per_key(fake, gateway):
    gw = gateway(
        make_settings([model("ok", fake.url())], gateway_api_keys=["sk-a", "sk-b"], rate_limit_rpm=3)
    )
    answers = [chat(gw, {"model": "auto", "messages": USER}, key="sk-a") for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
    assert answers[-1].headers["x-ratelimit-remaining-requests"] == "0"
    limited = chat(gw, {"model": "auto", "messages": USER}, key="sk-a")
    err = assert_openai_error(limited, 429, "rate_limit_exceeded")
    assert err["type"] == "requests" and "3 requests per minute" in err["message"]
    assert 1 <= int(limited.headers["retry-after"]) <= 20
    assert (
        chat(gw, {"model": "auto", "messages": USER}, key="sk-b").status_code == 200
    )  # another key has its own
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-a", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="ok", messages=USER)  # type: ignore[arg-type]
    # feedback and lookups count as requests too
    assert_openai_error(
        httpx.post(
            gw.url + "/feedback",
            json={"request_id": "x", "score": 1},
            headers={"Authorization": "Bearer sk-a"},
        ),
        429,
    )


@pytest.mark.parametrize("shared", ["in-process", "valkey"])
def test_tokens_per_minute_count_what_calls_really_used(fake, gateway, monkeypatch, request, shared):
    # a settlement rides with the next admission (not a timer): that admission must count it, in
    # this process or on the shared server (its pipelined connection answers in order)
    monkeypatch.setattr("gateway.limits.SETTLE_AFTER_S", 30.0)
    url = {"redis_url": request.getfixturevalue("valkey").url} if shared == "valkey" else {}
    gw = gateway(make_settings([model("ok", fake.url())], rate_limit_tpm=400, max_output_tokens=0, **url))
    long = [{"role": "user", "content": "w " * 250}]  # 129 tokens estimated, 253 counted upstream
    assert chat(gw, {"model": "auto", "messages": long}).status_code == 200
    assert (
        chat(gw, {"model": "auto", "messages": long}).status_code == 200
    )  # the first's real usage is charged now
    limited = chat(gw, {"model": "auto", "messages": long})
    err = assert_openai_error(limited, 429, "rate_limit_exceeded")
    assert err["type"] == "tokens"
    assert int(limited.headers["retry-after"]) > 20
    huge = chat(gw, {"model": "auto", "messages": [{"role": "user", "content": "x" * 2000}]})
    err = assert_openai_error(huge, 429, "rate_limit_exceeded")
    assert "larger than the limit of 400 tokens" in err["message"] and "retry-after" not in huge.headers


async def test_token_buckets_refill_and_carry_debt():
    now = [0.0]
    limits = RateLimits(LocalState(clock=lambda: now[0]), rpm=60, tpm=600)
    policy = limits.policy(None)
    for _ in range(59):
        assert (await limits.admit("k", policy))[2] is None
    held, _, refused = await limits.admit("k", policy, 500)  # a chat call: a request and its tokens
    assert held is not None and refused is None
    _, _, refused = await limits.admit("k", policy)
    assert refused is not None and "60 requests per minute" in refused.message
    held.settle(1200)  # the call used 1,200: a debt of 600
    held.settle(5000)  # settled once only
    await limits.drain()
    now[0] += 59.0
    _, _, refused = await limits.admit("k", policy, 100)
    assert refused is not None and "tokens per minute" in refused.message  # still 10 in debt
    now[0] += 11.0  # 110 more: exactly 100 available
    held, quotas, _ = await limits.admit("k", policy, 100)
    assert held is not None and quotas[1].remaining == pytest.approx(0.0, abs=1e-3)
    held.release()  # a call refused before it went upstream gets its tokens back
    await limits.drain()
    _, quotas, _ = await limits.admit("k", policy)
    assert [q.name for q in quotas] == ["requests", "tokens"]
    assert quotas[1].remaining == pytest.approx(100.0, abs=1e-3)


# --- size limits and per-model caps


def test_too_many_messages_or_characters_is_400(fake, gateway):
    gw = gateway(make_settings([model("ok", fake.url())], max_messages=3, max_input_chars=100))
    four = [{"role": "user", "content": "a"}] * 4
    assert_openai_error(chat(gw, {"model": "auto", "messages": four}), 400, "too_many_messages")
    big = [{"role": "user", "content": "a" * 101}]
    err = assert_openai_error(chat(gw, {"model": "auto", "messages": big}), 400, "input_too_long")
    assert err["param"] == "messages"
    assert (
        chat(gw, {"model": "auto", "messages": [{"role": "user", "content": "a" * 100}]}).status_code == 200
    )


def test_max_tokens_is_capped_per_model(fake, gateway):
    gw = gateway(make_settings([model("capped", fake.url(answer="capped"), max_output_tokens=50)]))

    def sent(**params: Any) -> dict[str, Any]:
        assert chat(gw, {"model": "auto", "messages": USER, **params}).status_code == 200
        return next(r["body"] for r in reversed(fake.received) if r["scenario"] == "answer=capped")

    assert sent(max_tokens=1000)["max_tokens"] == 50
    assert sent()["max_tokens"] == 50
    assert sent(max_tokens=10)["max_tokens"] == 10
    body = sent(max_completion_tokens=500)
    assert body["max_completion_tokens"] == 50 and "max_tokens" not in body


def test_a_busy_model_queues_briefly_then_falls_back_or_says_503(fake, gateway):
    settings = make_settings(
        [
            model(
                "small",
                fake.url(delay_ms=1500, answer="small"),
                max_concurrency=1,
                max_queue=1,
                queue_timeout_s=0.3,
                fallbacks=["spare"],
            ),
            model("spare", fake.url(answer="spare")),
            model("solo", fake.url(delay_ms=1000, answer="solo"), max_concurrency=1, max_queue=0),
        ]
    )
    gw = gateway(settings)

    def timed(name: str, delay: float) -> tuple[str, float, httpx.Response]:
        time.sleep(delay)
        t0 = time.perf_counter()
        resp = chat(gw, {"model": name, "messages": USER})
        return name, time.perf_counter() - t0, resp

    with ThreadPoolExecutor(3) as pool:
        runs = [f.result() for f in [pool.submit(timed, "small", d) for d in (0, 0.2, 0.4)]]
    answered = sorted((r.headers["x-router-model"], round(t, 1)) for _, t, r in runs)
    assert [m for m, _ in answered] == ["small", "spare", "spare"]
    waits = sorted(t for m, t in answered if m == "spare")
    assert waits[0] < 0.25  # the queue was full: at once to the fallback
    assert 0.25 <= waits[1] < 1.2  # waited its 0.3 s in the queue, then fell back
    health = httpx.get(gw.url + "/health").json()["providers"]["small"]
    assert health["failures"] == 0 and health["circuit"] == "closed"  # busy is not broken
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(timed, "solo", d) for d in (0, 0.2)]
        statuses = sorted(f.result()[2].status_code for f in futures)
    assert statuses == [200, 503]


def test_the_request_deadline_cuts_slow_calls_and_streams(fake, gateway):
    settings = make_settings(
        [
            model("slow", fake.url(delay_ms=3000), read_timeout_s=10),
            model("dribble", fake.url(chunk_delay_ms=300, chunks=10), read_timeout_s=10),
        ],
        request_timeout_s=0.6,
    )
    gw = gateway(settings)
    t0 = time.perf_counter()
    resp = chat(gw, {"model": "slow", "messages": USER})
    assert time.perf_counter() - t0 < 2.5
    err = assert_openai_error(resp, 504, "deadline_exceeded")
    assert "REQUEST_TIMEOUT_S" in err["message"]
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json={"model": "dribble", "messages": USER, "stream": True}
    ) as stream:
        lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    assert events[-1]["error"]["code"] == "deadline_exceeded"
    assert 0 < len(events) - 1 < 10
    health = httpx.get(gw.url + "/health").json()["providers"]
    assert health["dribble"]["circuit"] == "closed" and health["dribble"]["failures"] == 0


# --- upstream hygiene


class Hostile(BaseHTTPRequestHandler):
    """An upstream that misbehaves: redirects elsewhere, sets cookies, quotes unknown keys back."""

    seen: list[dict[str, Any]] = []
    redirect_to = ""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        Hostile.seen.append({"path": self.path, "authorization": self.headers.get("authorization")})
        if self.path.startswith("/redirect/"):
            self.send_response(307)
            self.send_header("Location", Hostile.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/leak/"):
            status, body = (
                401,
                {
                    "error": {
                        "message": "Incorrect API key provided: sk-proj-AAAAbbbbCCCCdddd1234. "
                        "You sent Authorization: Bearer abcdefghijklmnopqrstuvwxyz0123",
                        "type": "invalid_request_error",
                        "code": "invalid_api_key",
                    }
                },
            )
        else:
            status, body = (
                200,
                {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": "hostile-1",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hi"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                },
            )
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("Set-Cookie", "session=stolen; Path=/")
        self.send_header("X-Upstream-Internal", "node-7")
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hostile(fake):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    Hostile.seen = []
    Hostile.redirect_to = fake.url(answer="redirected") + "/chat/completions"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("text", "left"),
    [
        ("Incorrect API key provided: sk-proj-AAAAAAAAAAAAAAAAAAAAAAAA.", "Incorrect API key provided: ."),
        ("said: Authorization: Bearer abcdefghijklmnopqrstu", "said: Authorization: Bearer "),
        ('{"api_key": "0123456789abcdef", "x": 1}', '{"api_key": "", "x": 1}'),
        ("GET /v1?API_KEY=0123456789abcdef&x=1", "GET /v1?API_KEY=&x=1"),
        ("key=AIzaSyA0123456789012345678901234567890 end", "key= end"),
        ("id AKIA0123456789ABCDEF end", "id  end"),
        ("the known secret s3cret-value and rk-live_0123456789abcdefgh", "the known secret  and "),
    ],
)
def test_the_redactor_hides_known_secrets_and_key_like_strings(text, left):
    redacted = Redactor(["s3cret-value"])(text)
    assert redacted.replace("[redacted]", "") == left
    plain = "POST /v1/chat/completions 200 model=m0 task-1 overhead_ms=0.7"
    assert Redactor([])(plain) == plain


def test_provider_keys_only_go_to_their_own_hosts(fake):
    with pytest.raises(ValueError, match=r"would send OPENROUTER_API_KEY to http://127\.0\.0\.1"):
        make_settings([model("or", fake.url(), provider="openrouter")])
    with pytest.raises(ValueError, match="would send OPENAI_API_KEY"):
        make_settings([model("oa", fake.url(), provider="openai")])
    make_settings([model("or", fake.url(), provider="openrouter")], openrouter_base_url=fake.url())
    make_settings([model("own", fake.url(), api_key_env="MY_VLLM_KEY")])  # a key of its own: fine


def test_keys_do_not_follow_redirects_and_upstream_headers_stay_upstream(fake, gateway, hostile, monkeypatch):
    monkeypatch.setenv("HOSTILE_KEY", "sk-hostile-key-0123456789abcdef")
    monkeypatch.setenv("PLAIN_KEY", "sk-plain-key-0123456789abcdef")
    settings = make_settings(
        [
            model("redirecting", hostile + "/redirect/v1", api_key_env="HOSTILE_KEY"),
            model("cookies", hostile + "/ok/v1"),
            model("leaky", hostile + "/leak/v1", api_key_env="PLAIN_KEY"),
            model("plain", fake.url(answer="plain")),
        ],
        upstream_retries=0,
    )
    gw = gateway(settings)
    before = len(fake.received)
    moved = chat(gw, {"model": "redirecting", "messages": USER})
    assert_openai_error(moved, 502, "upstream_failed")
    assert "HTTP 307" in moved.json()["error"]["message"]
    assert not any(r["scenario"] == "answer=redirected" for r in list(fake.received)[before:])
    assert Hostile.seen[-1]["authorization"] == "Bearer sk-hostile-key-0123456789abcdef"
    ok = chat(gw, {"model": "cookies", "messages": USER})
    assert ok.status_code == 200 and ok.json()["model"] == "cookies"
    assert "set-cookie" not in ok.headers and "x-upstream-internal" not in ok.headers
    assert Hostile.seen[-1]["authorization"] is None  # no key of its own: none sent
    leaky = chat(gw, {"model": "leaky", "messages": USER})
    assert leaky.status_code == 502
    text = leaky.text
    assert "sk-proj-AAAA" not in text and "abcdefghijklmnop" not in text and "[redacted]" in text
    plain = chat(gw, {"model": "plain", "messages": USER})
    assert plain.status_code == 200
    assert fake.received[-1]["authorization"] == ""  # other models' keys never reach it


# --- graceful shutdown


def _stream_in_thread(gw: Any, model_name: str) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {"lines": [], "first": threading.Event()}

    def run() -> None:
        body = {"model": model_name, "messages": USER, "stream": True}
        try:
            with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30) as resp:
                out["rid"] = resp.headers["x-request-id"]
                for line in resp.iter_lines():
                    if line:
                        out["lines"].append(line)
                        out["first"].set()
        except httpx.HTTPError as exc:
            out["error"] = exc
        out["first"].set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_shutdown_finishes_streams_in_flight_then_flushes_the_records(fake, gateway, dsn):
    settings = make_settings(
        [model("steady", fake.url(chunk_delay_ms=150, chunks=8))],
        enable_persistence=True,
        database_url=dsn,
        shutdown_timeout_s=10,
    )
    gw = gateway(settings)
    thread, out = _stream_in_thread(gw, "steady")
    assert out["first"].wait(10)
    stopper = threading.Thread(target=gw.__exit__)
    t0 = time.perf_counter()
    stopper.start()
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):  # no new connections once shutdown began
        httpx.get(gw.url + "/live", timeout=2)
    thread.join(30)
    stopper.join(30)
    assert out["lines"][-1] == "data: [DONE]" and "error" not in out
    assert time.perf_counter() - t0 < 8
    rows = query(dsn, "SELECT status FROM calls WHERE id = $1", out["rid"])
    assert [r["status"] for r in rows] == ["ok"]


def test_shutdown_is_bounded_and_a_cut_stream_is_still_recorded(fake, gateway, dsn):
    settings = make_settings(
        [model("endless", fake.url(chunk_delay_ms=500, chunks=20))],
        enable_persistence=True,
        database_url=dsn,
        shutdown_timeout_s=1,
    )
    gw = gateway(settings)
    thread, out = _stream_in_thread(gw, "endless")
    assert out["first"].wait(10)
    t0 = time.perf_counter()
    gw.__exit__()
    assert time.perf_counter() - t0 < 5
    thread.join(30)
    assert "data: [DONE]" not in out["lines"]
    rows = wait_for(lambda: query(dsn, "SELECT status FROM calls WHERE id = $1", out["rid"]))
    assert rows[0]["status"] == "cancelled"

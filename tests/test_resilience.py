"""Retries, fallbacks, circuit breakers, broken streams and clients that go away."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import openai
import pytest

from gateway.health import CircuitBreaker
from gateway.upstreams import Upstreams
from tests.conftest import make_settings, model

USER = [{"role": "user", "content": "hi"}]


def uid() -> str:
    return uuid.uuid4().hex[:8]


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)


def test_retries_recover_from_transient_failures(fake, gateway):
    key = uid()
    gw = gateway(make_settings([model("flaky", fake.url(fail_times=2, id=key))], upstream_retries=2))
    raw = client(gw).chat.completions.with_raw_response.create(model="flaky", messages=USER)
    assert raw.parse().choices[0].message.content == "Hello from flaky."
    assert raw.headers["x-router-attempts"] == "3"
    assert fake.counts[f"fail_times=2,id={key}"] == 3


def test_429_is_retried(fake, gateway):
    key = uid()
    gw = gateway(make_settings([model("limited", fake.url(status=429, fail_times=1, id=key))]))
    assert client(gw).chat.completions.create(model="limited", messages=USER).model == "limited"
    assert fake.counts[f"status=429,fail_times=1,id={key}"] == 2


def test_fallback_chain_after_retries(fake, gateway):
    key = uid()
    settings = make_settings(
        [
            model("primary", fake.url(status=503, id=key), fallbacks=["secondary", "tertiary"]),
            model("secondary", fake.url(status=500, id=key)),
            model("tertiary", fake.url()),
        ],
        upstream_retries=1,
    )
    gw = gateway(settings)
    raw = client(gw).chat.completions.with_raw_response.create(model="primary", messages=USER)
    assert raw.parse().model == "tertiary"
    assert raw.headers["x-router-model"] == "tertiary"
    assert raw.headers["x-router-attempts"] == "5"  # 2 + 2 + 1
    stream = client(gw).chat.completions.create(model="primary", messages=USER, stream=True)
    assert {c.model for c in stream} == {"tertiary"}


def test_circuit_breaker_opens_skips_and_recovers(fake, gateway):
    key = uid()
    scenario = f"status=500,fail_times=3,id={key}"
    settings = make_settings(
        [
            model("shaky", fake.url(status=500, fail_times=3, id=key), fallbacks=["steady"]),
            model("steady", fake.url()),
        ],
        upstream_retries=0,
        circuit_breaker_failure_threshold=2,
        circuit_breaker_cooldown_s=0.5,
    )
    gw = gateway(settings)
    c = client(gw)
    assert c.chat.completions.create(model="shaky", messages=USER).model == "steady"  # failure 1
    assert c.chat.completions.create(model="shaky", messages=USER).model == "steady"  # failure 2: opens
    assert fake.counts[scenario] == 2
    health = httpx.get(gw.url + "/health").json()["providers"]["shaky"]
    assert health["circuit"] == "open" and health["status"] == "circuit_open"
    assert "fake failure 500" in health["last_error"]
    raw = c.chat.completions.with_raw_response.create(model="shaky", messages=USER)
    assert raw.parse().model == "steady"
    assert fake.counts[scenario] == 2  # skipped while open
    time.sleep(0.6)
    assert httpx.get(gw.url + "/health").json()["providers"]["shaky"]["circuit"] == "half_open"
    assert c.chat.completions.create(model="shaky", messages=USER).model == "steady"  # probe fails (3rd)
    assert httpx.get(gw.url + "/health").json()["providers"]["shaky"]["circuit"] == "open"
    time.sleep(0.6)
    assert c.chat.completions.create(model="shaky", messages=USER).model == "shaky"  # probe succeeds
    assert httpx.get(gw.url + "/health").json()["providers"]["shaky"]["circuit"] == "closed"


def test_all_circuits_open_is_503(fake, gateway):
    settings = make_settings(
        [model("down", fake.url(status=500, id=uid()))],
        upstream_retries=0,
        circuit_breaker_failure_threshold=1,
        circuit_breaker_cooldown_s=60,
    )
    gw = gateway(settings)
    first = httpx.post(gw.url + "/v1/chat/completions", json={"model": "down", "messages": USER})
    assert first.status_code == 502
    second = httpx.post(gw.url + "/v1/chat/completions", json={"model": "down", "messages": USER})
    assert second.status_code == 503
    assert "circuit open" in second.json()["error"]["message"]


@pytest.mark.parametrize("knob", ["cut_after", "error_after", "abort_after", "garbage_after"])
def test_mid_stream_failure_ends_with_an_error_event(fake, gateway, knob):
    gw = gateway(make_settings([model("breaks", fake.url(**{knob: 2}, id=uid()))]))
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json={"model": "breaks", "messages": USER, "stream": True}
    ) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"code":"stream_interrupted"' in lines[-2]
    # what arrived before the break was passed on (a reset connection may lose its last bytes)
    assert sum('"content"' in line for line in lines) >= (2 if knob != "abort_after" else 1)
    # and the official SDK raises instead of returning a clean-looking, truncated answer
    stream = client(gw).chat.completions.create(model="breaks", messages=USER, stream=True)
    with pytest.raises(openai.APIError, match="broke off"):
        for _ in stream:
            pass


def test_stream_client_disconnect_cancels_upstream(fake, gateway):
    gw = gateway(make_settings([model("slowstream", fake.url(chunk_delay_ms=300, chunks=8, id=uid()))]))
    before = fake.disconnects
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        json={"model": "slowstream", "messages": USER, "stream": True},
    ) as resp:
        for line in resp.iter_lines():
            if '"content"' in line:
                break  # leave after the first chunk
    deadline = time.monotonic() + 5
    while fake.disconnects == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.disconnects == before + 1
    assert gw.services.upstreams.health["slowstream"].in_flight == 0


def test_client_disconnect_cancels_a_waiting_completion(fake, gateway):
    gw = gateway(make_settings([model("hangs", fake.url(hang=1, id=uid()), read_timeout_s=30)]))
    before = fake.disconnects
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/chat/completions", json={"model": "hangs", "messages": USER}, timeout=0.5)
    deadline = time.monotonic() + 5
    while fake.disconnects == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.disconnects == before + 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_state_machine():
    clock = Clock()
    b = CircuitBreaker(threshold=3, cooldown_s=10, clock=clock)
    assert b.acquire() and b.state == "closed"
    b.failure()
    b.failure()
    b.success()  # a success resets the count of consecutive failures
    b.failure()
    b.failure()
    assert b.state == "closed"
    b.failure()
    assert b.state == "open" and not b.acquire() and not b.available()
    clock.now = 9.9
    assert not b.acquire()
    clock.now = 10.0
    assert b.state == "half_open" and b.available()
    assert b.acquire()  # the one probe
    assert not b.acquire() and not b.available()
    b.failure()
    assert b.state == "open"
    clock.now = 20.0
    assert b.acquire()
    b.release()  # a probe that tells nothing (cancelled) frees the slot
    assert b.acquire()
    b.success()
    assert b.state == "closed" and b.acquire()


class Blocking:
    """A provider whose calls fail (retryably) or block until cancelled."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.gate = asyncio.Event()

    async def chat(self, payload):
        if self.fail:
            from gateway.providers import ProviderError

            raise ProviderError("status", "HTTP 503: busy", status=503, retryable=True)
        await self.gate.wait()
        return {"choices": []}

    def stream(self, payload):
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


async def test_a_cancelled_probe_frees_the_half_open_slot():
    clock = Clock()
    settings = make_settings(
        [model("m", "http://127.0.0.1:9/v1", max_concurrency=1)],
        circuit_breaker_failure_threshold=1,
        circuit_breaker_cooldown_s=10,
        upstream_retries=2,
    )
    never = asyncio.Event()

    async def sleep_forever(_: float) -> None:
        await never.wait()

    ups = Upstreams(settings, {"m": Blocking(fail=True)}, clock=clock, sleep=sleep_forever)
    breaker = ups.breakers["m"]
    breaker.failure()
    clock.now = 11
    assert breaker.state == "half_open"
    # cancelled in the backoff between retries
    task = asyncio.create_task(ups.chat(["m"], {"messages": []}))
    await asyncio.sleep(0.01)
    assert breaker.probing
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not breaker.probing and breaker.available()
    # cancelled while waiting for the model's concurrency slot
    ups.providers["m"] = Blocking(fail=False)
    breaker.success()
    holder = asyncio.create_task(ups.chat(["m"], {"messages": []}))
    await asyncio.sleep(0.01)
    breaker.failure()
    clock.now = 30
    waiter = asyncio.create_task(ups.chat(["m"], {"messages": []}))
    await asyncio.sleep(0.01)
    assert breaker.probing
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not breaker.probing and breaker.available()
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert ups.health["m"].in_flight == 0


@pytest.mark.parametrize("status", [401, 402, 403, 404])
def test_a_model_the_gateway_cannot_use_falls_back(fake, gateway, status):
    # a bad or exhausted key, a wrong model id: the gateway's problem, not the caller's
    key = uid()
    settings = make_settings(
        [model("broken", fake.url(status=status, id=key), fallbacks=["spare"]), model("spare", fake.url())],
        circuit_breaker_failure_threshold=1,
    )
    gw = gateway(settings)
    assert client(gw).chat.completions.create(model="broken", messages=USER).model == "spare"
    assert fake.counts[f"status={status},id={key}"] == 1  # not retried
    assert httpx.get(gw.url + "/health").json()["providers"]["broken"]["circuit"] == "open"
    alone = gateway(make_settings([model("broken", fake.url(status=status, id=key))]))
    resp = httpx.post(alone.url + "/v1/chat/completions", json={"model": "broken", "messages": USER})
    assert resp.status_code == 502 and f"HTTP {status}" in resp.json()["error"]["message"]

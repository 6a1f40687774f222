"""OpenTelemetry traces, exported over OTLP/HTTP (protobuf) to a real receiver on loopback that
decodes them (tests/otlp_receiver.py): the spans, their parent-child structure and their GenAI
attributes for a plain, a streamed and a failed-over call; the incoming traceparent honoured; the
trace id in the call record and the log line. Off unless OTEL_* configures it, and then the SDK is
never imported."""

from __future__ import annotations

import io
import itertools
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.logs import setup_logging
from tests.conftest import make_settings, model, wait_for
from tests.otlp_receiver import OtlpReceiver, Span

INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def receiver(monkeypatch) -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", r.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export every 50 ms, not every 5 s
    monkeypatch.setenv("OTEL_SERVICE_NAME", "router-under-test")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    yield r
    r.stop()


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buf = io.StringIO()
    yield buf
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


@pytest.fixture
def traced(fake, gateway, receiver, logs) -> Any:
    settings = make_settings(
        [
            model("primary", fake.url(status=500), fallbacks=["backup"]),
            model("backup", fake.url(), input_usd_per_mtok=1.0, output_usd_per_mtok=2.0),
            model("slow", fake.url(chunk_delay_ms=30, answer="one_two_three_four_five_six_seven_eight")),
            model("dead", fake.url(status=503)),
        ],
        upstream_retries=1,
        router_policy="lin_ts",
    )
    redact = setup_logging("info", "json", settings.secrets(), stream=logs)
    return gateway(settings, redact=redact)


def spans_of(receiver: OtlpReceiver, trace_id: str, count: int) -> list[Span]:
    """The trace's spans, once `count` have arrived (the record span comes after the recorder wrote)."""
    return wait_for(lambda: len(receiver.trace(trace_id)) >= count and receiver.trace(trace_id))


def record_of(gw: Any, rid: str) -> dict[str, Any]:
    return httpx.get(f"{gw.url}/requests/{rid}").json()


def one(spans: list[Span], **match: Any) -> Span:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, [(s.name, s.kind) for s in spans])
    return found[0]


def children(spans: list[Span], parent: Span) -> list[Span]:
    return sorted((s for s in spans if s.parent_id == parent.span_id), key=lambda s: s.start_ns)


def test_a_plain_routed_call_continues_the_incoming_trace(traced, receiver, logs):
    client = openai.OpenAI(base_url=traced.url + "/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "Name three prime numbers."}],
        extra_body={"router": {"models": ["backup"]}},  # one arm, but the bandit still decides
        extra_headers={"traceparent": f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01"},
    )
    rid = raw.headers["x-request-id"]
    spans = spans_of(receiver, INCOMING_TRACE, 6)
    root = one(spans, kind="SERVER")
    assert root.parent_id == INCOMING_SPAN and root.name == "chat auto"
    a = root.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "auto"
    assert a["gen_ai.response.model"] == "backup-2026-01-01"
    assert a["gen_ai.system"] == a["gen_ai.provider.name"] == "openai_compatible"
    record = record_of(traced, rid)
    assert a["gen_ai.usage.input_tokens"] == record["prompt_tokens"] > 0
    assert a["gen_ai.usage.output_tokens"] == record["completion_tokens"] > 0
    assert a["llm_router.layer"] == "bandit" and a["llm_router.model"] == "backup"
    assert a["llm_router.propensity"] == pytest.approx(record["propensity"])
    assert a["llm_router.cost_usd"] == pytest.approx(record["cost_usd"]) and a["llm_router.request_id"] == rid
    assert root.status != "ERROR" and root.resource["service.name"] == "router-under-test"
    # gateway -> route -> embed, policy; gateway -> the upstream call; gateway -> the recorder's write
    route = one(spans, name="route")
    client_span = one(spans, kind="CLIENT")
    record_span = one(spans, name="record")
    assert {s.span_id for s in children(spans, root)} == {
        route.span_id,
        client_span.span_id,
        record_span.span_id,
    }
    stages = children(spans, route)
    assert [s.name for s in stages] == ["embed", "policy"]  # lin_ts asks the store for no neighbours
    assert route.start_ns <= stages[0].start_ns and stages[-1].end_ns <= route.end_ns
    assert root.start_ns <= route.start_ns and route.end_ns <= client_span.start_ns <= client_span.end_ns
    assert client_span.end_ns <= root.end_ns <= record_span.end_ns
    assert client_span.name == "chat backup" and client_span.attributes["gen_ai.request.model"] == "backup"
    assert client_span.attributes["server.address"] == "127.0.0.1"
    assert client_span.attributes["gen_ai.usage.output_tokens"] == record["completion_tokens"]
    # the trace id, cross-referenced in the call record and in the log line
    assert record["trace_id"] == INCOMING_TRACE
    line = wait_for(
        lambda: next(
            (json.loads(x) for x in logs.getvalue().splitlines() if f'"request_id":"{rid}"' in x), None
        )
    )
    assert line["trace_id"] == INCOMING_TRACE


def test_a_streamed_call_spans_its_whole_stream(traced, receiver):
    client = openai.OpenAI(base_url=traced.url + "/v1", api_key="x", max_retries=0)
    with client.chat.completions.with_streaming_response.create(
        model="slow", messages=[{"role": "user", "content": "Stream, slowly."}], stream=True
    ) as resp:
        rid = resp.headers["x-request-id"]
        body = resp.read()
    assert b"[DONE]" in body
    trace_id = wait_for(lambda: record_of(traced, rid).get("trace_id"))
    spans = spans_of(receiver, trace_id, 3)
    root = one(spans, kind="SERVER")
    assert root.parent_id == "" and root.name == "chat slow"  # a new trace: no incoming traceparent
    assert root.attributes["llm_router.stream"] is True and root.attributes["gen_ai.request.model"] == "slow"
    assert "route" not in {s.name for s in spans}  # an explicit model is not routed
    upstream = one(spans, kind="CLIENT")
    assert upstream.parent_id == root.span_id and upstream.status != "ERROR"
    # the answering attempt lasts until the stream ended (8 chunks, 30 ms apart), not until its first chunk
    assert upstream.end_ns - upstream.start_ns >= 150e6
    assert upstream.attributes["gen_ai.response.model"] == "slow-2026-01-01"
    assert upstream.attributes["gen_ai.usage.output_tokens"] > 0
    assert one(spans, name="record").parent_id == root.span_id


def test_a_responses_call_is_traced_like_a_chat_call(traced, receiver):
    client = openai.OpenAI(base_url=traced.url + "/v1", api_key="x", max_retries=0)
    raw = client.responses.with_raw_response.create(
        model="primary",  # translated to chat completions; falls over to `backup`
        input="Name three prime numbers.",
        extra_headers={"traceparent": f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01"},
    )
    assert raw.parse().output_text and raw.headers["x-router-model"] == "backup"
    record = record_of(traced, raw.headers["x-request-id"])
    assert record["trace_id"] == INCOMING_TRACE
    spans = spans_of(receiver, INCOMING_TRACE, 5)
    root = one(spans, kind="SERVER")
    assert root.parent_id == INCOMING_SPAN and root.attributes["gen_ai.request.model"] == "primary"
    assert [s.name for s in spans if s.kind == "CLIENT"] == ["chat primary", "chat primary", "chat backup"]
    assert one(spans, name="record").parent_id == root.span_id


def test_a_failed_over_call_has_a_span_per_attempt(traced, receiver):
    client = openai.OpenAI(base_url=traced.url + "/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="primary", messages=[{"role": "user", "content": "Fall over, please."}]
    )
    assert raw.headers["x-router-model"] == "backup"
    trace_id = wait_for(lambda: record_of(traced, raw.headers["x-request-id"]).get("trace_id"))
    spans = spans_of(receiver, trace_id, 5)
    root = one(spans, kind="SERVER")
    attempts = children(spans, root)
    attempts = [s for s in attempts if s.kind == "CLIENT"]
    assert [(s.name, s.status, s.attributes["llm_router.attempt"]) for s in attempts] == [
        ("chat primary", "ERROR", 1),  # HTTP 500, retried once
        ("chat primary", "ERROR", 2),
        ("chat backup", "UNSET", 3),
    ]
    assert attempts[0].attributes["error.type"] and "500" in attempts[0].status_message
    for earlier, later in itertools.pairwise(attempts):
        assert earlier.end_ns <= later.start_ns  # one after another, never overlapping
    assert "gen_ai.response.model" not in attempts[0].attributes
    assert attempts[2].attributes["gen_ai.response.model"] == "backup-2026-01-01"
    assert root.status != "ERROR" and root.attributes["llm_router.attempts"] == 3
    assert root.attributes["gen_ai.response.model"] == "backup-2026-01-01"


def test_a_call_that_fails_is_an_error_span_with_its_attempts(traced, receiver):
    r = httpx.post(
        traced.url + "/v1/chat/completions",
        json={"model": "dead", "messages": [{"role": "user", "content": "hello"}]},
    )
    assert r.status_code == 502
    record = record_of(traced, r.headers["x-request-id"])
    assert [a["outcome"] for a in record["attempts"]] == ["error", "error"]  # kept for the record too
    spans = spans_of(receiver, record["trace_id"], 4)
    root = one(spans, kind="SERVER")
    assert root.status == "ERROR" and root.attributes["error.type"] == "502"
    assert root.attributes["http.response.status_code"] == 502
    assert [s.status for s in spans if s.kind == "CLIENT"] == ["ERROR", "ERROR"]


def test_an_unsampled_incoming_trace_exports_nothing(traced, receiver):
    r = httpx.post(
        traced.url + "/v1/chat/completions",
        json={"model": "backup", "messages": [{"role": "user", "content": "hello"}]},
        headers={"traceparent": f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-00"},  # the caller sampled it out
    )
    assert r.status_code == 200
    marker = httpx.post(  # a sampled call after it: once its spans are in, the first's would be too
        traced.url + "/v1/chat/completions",
        json={"model": "backup", "messages": [{"role": "user", "content": "hello"}]},
    )
    spans_of(receiver, record_of(traced, marker.headers["x-request-id"])["trace_id"], 3)
    assert receiver.trace(INCOMING_TRACE) == []
    assert record_of(traced, r.headers["x-request-id"])["trace_id"] == INCOMING_TRACE


def test_tracing_is_off_unless_configured_and_then_never_loads_the_sdk(fake):
    # A fresh interpreter (this one has imported the SDK for the receiver): a gateway app with no
    # OTEL_* variables serves a call, records no trace id, and never imports opentelemetry.
    script = textwrap.dedent(f"""
        import os, sys
        for k in list(os.environ):
            if k.startswith("OTEL_"):
                del os.environ[k]
        from starlette.testclient import TestClient
        from gateway.app import create_app
        from gateway.config import Settings
        settings = Settings(_env_file=None, enable_persistence=False, router_policy="default",
            models=[{{"name": "m", "provider": "openai_compatible", "base_url": "{fake.url()}"}}])
        with TestClient(create_app(settings)) as client:
            body = {{"model": "m", "messages": [{{"role": "user", "content": "hi"}}]}}
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            record = client.get("/requests/" + r.headers["x-request-id"]).json()
            assert record["trace_id"] is None, record
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        assert not loaded, loaded
        print("untraced")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "untraced" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_what_turns_tracing_on(env, on):
    from gateway.tracing import configured

    assert configured(env) is on

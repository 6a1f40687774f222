"""The rest of the OpenAI API (POST /v1/responses, POST /v1/embeddings) under the rules chat calls
follow: a Responses call is refused before it goes upstream when there is no room to record it, its
answer (or its stream's last event) is withheld when its record cannot be kept, its fields are
checked against the Responses API's allowlist, its output tokens are capped and reserved, its ids
belong to its tenant; embeddings have their own allowlist; key guessing is limited whatever header
the key comes in; header values from upstreams lose their control characters."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from gateway.errors import StoreUnavailable
from gateway.store.memory import MemoryStore
from tests.conftest import make_settings, model
from tests.test_errors import assert_openai_error

TOOLS = ["chat", "streaming", "tools", "json"]


class Unwritable(MemoryStore):
    """A database that is down: every record waits in the recorder."""

    async def write_calls(self, records: Any) -> Any:
        raise StoreUnavailable("the database is unreachable (ConnectionRefusedError)")


def models(fake: Any, **kw: Any) -> list[Any]:
    return [
        model("chatty", fake.url(), capabilities=TOOLS, **kw),
        model("native", fake.url(answer="Native_hello."), capabilities=[*TOOLS, "responses"], **kw),
        model("emb", fake.url(), capabilities=["embeddings"]),
    ]


def responses(gw: Any, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return httpx.post(gw.url + "/v1/responses", json=body, timeout=30, **kw)


def events(resp: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: ")]


def test_no_room_to_record_refuses_a_responses_call_before_it_goes_upstream(fake, gateway):
    gw = gateway(make_settings(models(fake)), store=Unwritable())
    assert responses(gw, {"model": "chatty", "input": "first"}).status_code == 200
    recorder = gw.services.recorder
    recorder.queue_bytes = recorder.held  # full: the database has not taken the first record
    sent = len(fake.received)
    for name in ("chatty", "native"):
        refused = responses(gw, {"model": name, "input": "second"})
        assert_openai_error(refused, 503, "recorder_unavailable")
        assert refused.headers["retry-after"]
    assert len(fake.received) == sent  # nothing went upstream
    # Embeddings are not recorded: they go on.
    assert httpx.post(gw.url + "/v1/embeddings", json={"model": "emb", "input": "hi"}).status_code == 200


@pytest.mark.parametrize("name", ["chatty", "native"])
def test_an_answer_whose_record_cannot_be_kept_is_withheld(fake, gateway, name):
    gw = gateway(make_settings(models(fake)), store=Unwritable())
    assert responses(gw, {"model": name, "input": "first"}).status_code == 200
    recorder = gw.services.recorder
    recorder.queue_bytes = recorder.held + 1  # room to admit one more call, none to keep its record
    sent = len(fake.received)
    assert_openai_error(responses(gw, {"model": name, "input": "second"}), 503, "recorder_unavailable")
    assert len(fake.received) == sent + 1  # it was answered upstream, and not sent on

    recorder.queue_bytes = recorder.held + 1
    streamed = responses(gw, {"model": name, "input": "third", "stream": True})
    assert streamed.status_code == 200
    kinds = [e["type"] for e in events(streamed)]
    assert "response.created" in kinds and kinds[-1] == "error"  # the stream's end is withheld
    assert not {"response.completed", "response.incomplete"} & set(kinds)
    assert events(streamed)[-1]["code"] == "recorder_unavailable"


def test_a_responses_stream_ends_only_once_its_record_is_kept(fake, gateway):
    gw = gateway(make_settings(models(fake)))
    for name in ("chatty", "native"):
        streamed = responses(gw, {"model": name, "input": "hi", "stream": True})
        kinds = [e["type"] for e in events(streamed)]
        assert kinds[-1] == "response.completed" and kinds.count("response.completed") == 1
        rid = streamed.headers["x-request-id"]
        assert gw.services.recorder.has("", rid) or httpx.get(f"{gw.url}/requests/{rid}").status_code == 200


def test_responses_fields_are_checked_against_their_own_allowlist(fake, gateway):
    gw = gateway(make_settings(models(fake)))
    for field, value in (("service_tier", "priority"), ("provider", {"order": ["x"]}), ("n", 2)):
        err = assert_openai_error(
            responses(gw, {"model": "chatty", "input": "hi", field: value}), 400, "unsupported_field"
        )
        assert err["param"] == field
    # A sampling extra of the model's kind reaches its translation; the Responses API's own fields
    # reach a native model.
    assert responses(gw, {"model": "chatty", "input": "hi", "top_k": 5}).status_code == 200
    assert fake.received[-1]["body"]["top_k"] == 5
    ok = responses(gw, {"model": "native", "input": "hi", "truncation": "auto", "include": []})
    assert ok.status_code == 200 and fake.received[-1]["body"]["truncation"] == "auto"
    # Embeddings: OpenAI's fields only (OpenRouter's `provider` changes the model and the price).
    err = assert_openai_error(
        httpx.post(gw.url + "/v1/embeddings", json={"model": "emb", "input": "hi", "provider": {}}),
        400,
        "unsupported_field",
    )
    assert err["param"] == "provider"


def test_responses_output_tokens_are_capped_and_reserved(fake, gateway):
    gw = gateway(make_settings(models(fake), max_output_tokens=300, rate_limit_tpm=1000))
    assert responses(gw, {"model": "native", "input": "hi", "max_output_tokens": 10**6}).status_code == 200
    assert fake.received[-1]["body"]["max_output_tokens"] == 300
    assert responses(gw, {"model": "chatty", "input": "hi", "max_output_tokens": 10**6}).status_code == 200
    assert fake.received[-1]["body"]["max_tokens"] == 300
    assert responses(gw, {"model": "chatty", "input": "hi"}).status_code == 200
    assert fake.received[-1]["body"]["max_tokens"] == 300  # a default cap when none is asked
    # The reservation holds the prompt and the output allowance: 2,000 tokens cannot fit 1,000 a minute.
    capped = gateway(make_settings(models(fake), max_output_tokens=2000, rate_limit_tpm=1000))
    err = assert_openai_error(
        responses(capped, {"model": "chatty", "input": "hi"}), 429, "rate_limit_exceeded"
    )
    assert "larger than the limit" in err["message"]
    small = responses(capped, {"model": "chatty", "input": "hi", "max_output_tokens": 50})
    assert small.status_code == 200


def test_responses_ids_belong_to_their_tenant(fake, gateway):
    gw = gateway(make_settings(models(fake), gateway_api_keys=["sk-tenant-a-0000", "sk-tenant-b-0000"]))
    a, b = {"x-api-key": "sk-tenant-a-0000"}, {"api-key": "sk-tenant-b-0000"}
    rid = {"x-request-id": "order-42"}
    assert responses(gw, {"model": "chatty", "input": "A's"}, headers={**a, **rid}).status_code == 200
    assert responses(gw, {"model": "native", "input": "B's"}, headers={**b, **rid}).status_code == 200
    gw.call(gw.services.recorder.flush(5))
    mine = httpx.get(gw.url + "/requests/order-42", headers=a).json()
    theirs = httpx.get(gw.url + "/requests/order-42", headers=b).json()
    assert mine["model"] == "chatty" and theirs["model"] == "native"
    assert mine["messages"][-1]["content"] == "A's" and theirs["messages"][-1]["content"] == "B's"


@pytest.mark.parametrize(
    ("path", "body", "header"),
    [
        ("/v1/responses", {"model": "chatty", "input": "hi"}, "x-api-key"),
        ("/v1/embeddings", {"model": "emb", "input": "hi"}, "api-key"),
    ],
)
def test_key_guessing_is_limited_in_any_key_header(fake, gateway, path, body, header):
    gw = gateway(
        make_settings(models(fake), gateway_api_keys=["sk-right-key-0000"], auth_failures_per_minute=3)
    )
    for i in range(3):
        assert_openai_error(httpx.post(gw.url + path, json=body, headers={header: f"guess-{i}"}), 401)
    limited = httpx.post(gw.url + path, json=body, headers={header: "sk-right-key-0000"})
    assert_openai_error(limited, 429, "rate_limit_exceeded")
    assert "llm_router_auth_failures_total 3.0" in httpx.get(gw.url + "/metrics").text


def test_a_control_character_from_an_upstream_never_breaks_a_header(fake, gateway):
    evil = "evil\r\nset-cookie: x=1\x00"
    gw = gateway(
        make_settings(
            [
                model("odd", fake.url(), upstream_model=evil),
                model("emb", fake.url(), upstream_model=evil, capabilities=["embeddings"]),
            ]
        )
    )
    for path, body in (
        ("/v1/responses", {"model": "odd", "input": "hi"}),
        ("/v1/embeddings", {"model": "emb", "input": "hi"}),
    ):
        resp = httpx.post(gw.url + path, json=body, timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-router-upstream-model"].startswith("evilset-cookie: x=1")
        assert "set-cookie" not in resp.headers

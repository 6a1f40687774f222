"""The OpenAI API beyond chat, through the official `openai` SDK: GET /v1/models/{id},
POST /v1/embeddings, POST /v1/responses (translated to chat completions, or passed through to a
model that speaks it; plain, streamed, with tools; `auto` included), and the other ways to send a
key (`x-api-key`, `api-key`)."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

from tests.conftest import make_settings, model, wait_for

WEATHER = {
    "type": "function",
    "name": "weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TOOLS = ["chat", "streaming", "tools", "json"]
TRANSLATED = {"router": {"models": ["chatty"]}}  # `auto`, routed among the translated models only
NATIVE = {"router": {"models": ["native"]}}


@pytest.fixture
def gw(fake, gateway):
    settings = make_settings(
        [
            model("chatty", fake.url(), capabilities=TOOLS, input_usd_per_mtok=1.0, output_usd_per_mtok=2.0),
            model("native", fake.url(answer="Native_hello."), capabilities=[*TOOLS, "responses"]),
            model("embedder/small", fake.url(), capabilities=["embeddings"], input_usd_per_mtok=0.02),
        ],
        virtual_models={"auto-native": {"models": ["native"]}},
    )
    return gateway(settings)


def client(gw, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-test", max_retries=0, **kw)


# --- GET /v1/models/{id}


def test_models_retrieve_auto_virtual_and_catalogue_models(gw):
    c = client(gw)
    auto = c.models.retrieve("auto")
    assert (auto.id, auto.object, auto.owned_by) == ("auto", "model", "llm-router")
    virtual = c.models.retrieve("auto-native")
    assert virtual.id == "auto-native" and virtual.model_extra["router"] == {"models": ["native"]}
    emb = c.models.retrieve("embedder/small")  # a name with a slash in it
    assert emb.id == "embedder/small" and emb.model_extra["capabilities"] == ["embeddings"]
    listed = {m.id: m for m in c.models.list()}
    assert listed["chatty"].model_dump() == c.models.retrieve("chatty").model_dump()
    with pytest.raises(openai.NotFoundError) as missing:
        c.models.retrieve("gpt-9")
    assert missing.value.code == "model_not_found" and missing.value.param == "model"


# --- POST /v1/embeddings


def test_embeddings_through_the_sdk(gw, fake):
    c = client(gw)
    raw = c.embeddings.with_raw_response.create(model="embedder/small", input=["hello", "world"])
    result = raw.parse()  # the SDK asks for base64 and decodes it: the gateway passes it through
    assert result.model == "embedder/small" and [e.index for e in result.data] == [0, 1]
    assert all(len(e.embedding) == 8 for e in result.data)
    assert all(math.isclose(sum(x * x for x in e.embedding), 1.0, rel_tol=1e-5) for e in result.data)
    assert result.usage.prompt_tokens == 2
    sent = fake.received[-1]
    assert sent["path"].endswith("/v1/embeddings") and sent["body"]["model"] == "embedder/small"
    assert sent["body"]["encoding_format"] == "base64"
    assert raw.headers["x-router-model"] == "embedder/small"
    assert float(raw.headers["x-router-cost-usd"]) == pytest.approx(2 * 0.02 / 1e6)
    floats = c.embeddings.create(model="embedder/small", input="hello", encoding_format="float", dimensions=4)
    assert len(floats.data[0].embedding) == 4
    again = c.embeddings.create(model="embedder/small", input="hello", encoding_format="float", dimensions=4)
    assert again.data[0].embedding == floats.data[0].embedding
    tokens = c.embeddings.create(model="embedder/small", input=[[1, 2, 3], [4, 5]])
    assert len(tokens.data) == 2


def test_embeddings_refuse_what_they_cannot_serve(gw):
    c = client(gw)
    for name, status, code in (
        ("auto", 400, "model_not_supported"),  # embeddings are not routed: vectors would not compare
        ("auto-native", 400, "model_not_supported"),
        ("chatty", 400, "model_not_supported"),
        ("nope", 404, "model_not_found"),
    ):
        with pytest.raises(openai.APIStatusError) as refused:
            c.embeddings.create(model=name, input="hello")
        assert (refused.value.status_code, refused.value.code) == (status, code), name
        assert "embedder/small" in refused.value.message
    for bad in ("", [], [""], [[]]):
        with pytest.raises(openai.BadRequestError) as empty:
            c.embeddings.create(model="embedder/small", input=bad)
        assert empty.value.param == "input"


def test_chat_routing_never_picks_an_embeddings_model(gw):
    c = client(gw)
    seen = {
        c.chat.completions.create(model="auto", messages=[{"role": "user", "content": f"q{i}"}]).model
        for i in range(12)
    }
    assert seen <= {"chatty", "native"}
    with pytest.raises(openai.BadRequestError) as explicit:
        c.chat.completions.create(model="embedder/small", messages=[{"role": "user", "content": "hi"}])
    assert explicit.value.code == "model_not_supported"


# --- POST /v1/responses


def test_responses_plain_through_auto_translated_and_recorded(gw, fake):
    c = client(gw)
    raw = c.responses.with_raw_response.create(
        model="auto", input="What is the capital of France?", instructions="Be brief.", extra_body=TRANSLATED
    )
    response = raw.parse()
    assert response.output_text == "Hello from chatty." and response.status == "completed"
    assert response.model == "chatty" and response.object == "response"
    assert response.usage.input_tokens > 0 and response.usage.output_tokens == 3
    assert raw.headers["x-router-model"] == "chatty" and raw.headers["x-router-layer"] == "bandit"
    sent = fake.received[-1]
    assert sent["path"].endswith("/chat/completions")  # translated
    assert sent["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert "router" not in sent["body"] and "input" not in sent["body"]
    # Recorded like a chat call, and rated by its request id.
    rid = raw.headers["x-request-id"]
    record = wait_for(lambda: httpx.get(f"{gw.url}/requests/{rid}").json() if _recorded(gw, rid) else None)
    assert record["model"] == "chatty" and record["response"] == "Hello from chatty."
    assert record["requested_model"] == "auto" and record["completion_tokens"] == 3
    assert record["cost_usd"] == pytest.approx((record["prompt_tokens"] * 1 + 3 * 2) / 1e6)
    rated = httpx.post(f"{gw.url}/feedback", json={"request_id": rid, "score": 0.9})
    assert rated.status_code == 200 and rated.json()["applied"] is True


def _recorded(gw, rid: str) -> bool:
    return httpx.get(f"{gw.url}/requests/{rid}").status_code == 200


def test_responses_passed_through_to_a_native_model(gw, fake):
    c = client(gw)
    response = c.responses.create(model="auto-native", input="Say hello.")
    assert response.output_text == "Native hello." and response.model == "native"
    sent = fake.received[-1]
    assert sent["path"].endswith("/v1/responses")
    assert sent["body"]["input"] == "Say hello." and sent["body"]["store"] is False  # stateless
    assert sent["body"]["model"] == "native"


@pytest.mark.parametrize("route", [TRANSLATED, NATIVE], ids=["translated", "native"])
def test_responses_streamed(gw, route):
    c = client(gw)
    events = list(c.responses.create(model="auto", input="Say hello.", stream=True, extra_body=route))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    expected = "Hello from chatty." if route is TRANSLATED else "Native hello."
    assert text == expected and final.output_text == expected
    assert final.status == "completed" and final.usage.output_tokens == len(expected.split())
    assert final.model == route["router"]["models"][0]
    if route is TRANSLATED:
        assert types[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert types[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]


@pytest.mark.parametrize("route", [TRANSLATED, NATIVE], ids=["translated", "native"])
def test_responses_with_tools_return_a_function_call(gw, fake, route):
    c = client(gw)
    response = c.responses.create(model="auto", input="Weather in Paris?", tools=[WEATHER], extra_body=route)
    [call] = response.output
    assert call.type == "function_call" and call.name == "weather"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id
    if route is TRANSLATED:
        sent = fake.received[-1]["body"]
        assert sent["tools"] == [
            {
                "type": "function",
                "function": {k: WEATHER[k] for k in ("name", "description", "parameters")},
            }
        ]
    # Streamed: the function call's own events, and the call in the final response.
    events = list(
        c.responses.create(model="auto", input="Weather?", tools=[WEATHER], stream=True, extra_body=route)
    )
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.name == "weather"
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(args) == json.loads(done.arguments) == {"city": "Paris"}
    [final] = events[-1].response.output
    assert final.type == "function_call" and final.status == "completed" and final.arguments == done.arguments


def test_a_conversation_with_tool_results_is_translated(gw, fake):
    c = client(gw)
    first = c.responses.create(
        model="auto", input="Weather in Paris?", tools=[WEATHER], extra_body=TRANSLATED
    )
    call = first.output[0]
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"},
    ]
    answer = c.responses.create(model="auto", input=history, extra_body=TRANSLATED)
    assert answer.output_text == "Hello from chatty."
    sent = fake.received[-1]["body"]["messages"]
    assert sent[0] == {"role": "user", "content": "Weather in Paris?"}
    assert sent[1]["role"] == "assistant" and sent[1]["tool_calls"][0]["id"] == call.call_id
    assert sent[1]["tool_calls"][0]["function"] == {"name": "weather", "arguments": call.arguments}
    assert sent[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "18 C, sunny"}


def test_responses_is_stateless_and_says_so(gw):
    c = client(gw)
    for extra, param in (
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"extra_body": {"conversation": "conv_1"}}, "conversation"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            c.responses.create(model="auto", input="hi", **extra)
        assert refused.value.param == param and "does not store responses" in refused.value.message
    ok = c.responses.create(model="auto", input="hi", store=False)
    assert ok.status == "completed"


def test_what_chat_cannot_express_goes_to_a_native_model(gw, fake):
    c = client(gw)
    search = [{"type": "web_search"}]
    routed = c.responses.create(model="auto", input="News?", tools=search)  # only `native` can
    assert routed.model == "native" and fake.received[-1]["path"].endswith("/v1/responses")
    with pytest.raises(openai.BadRequestError) as explicit:
        c.responses.create(model="chatty", input="News?", tools=search)
    assert explicit.value.code == "unsupported_by_model" and "web_search" in explicit.value.message
    with pytest.raises(openai.BadRequestError) as nobody:
        c.responses.create(model="auto", input="News?", tools=search, extra_body=TRANSLATED)
    assert "responses" in nobody.value.message


def test_responses_and_embeddings_count_against_the_rate_limits(fake, gateway):
    emb = model("emb", fake.url(), capabilities=["embeddings"])
    # No output cap: the reservations hold the input alone (see test_responses_reserve_their_output).
    settings = make_settings([model("chatty", fake.url()), emb], rate_limit_tpm=400, max_output_tokens=0)
    gw = gateway(settings)
    c = client(gw)
    with pytest.raises(openai.RateLimitError) as limited:
        c.responses.create(model="auto", input="word " * 2000)
    assert "larger than the limit of 400 tokens" in limited.value.message
    raw = c.responses.with_raw_response.create(model="auto", input="hi")
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 400
    with pytest.raises(openai.RateLimitError):
        c.embeddings.create(model="emb", input=["word " * 1000])
    before = int(raw.headers["x-ratelimit-remaining-tokens"])
    embedded = c.embeddings.with_raw_response.create(model="emb", input=["word " * 60])
    # charged the upstream's count (60), less what the bucket refilled meanwhile (400 a minute)
    assert int(embedded.headers["x-ratelimit-remaining-tokens"]) <= before - 30


# --- a request must name its model; the key may come in other headers


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/chat/completions", {"modle": "chatty", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/responses", {"input": "hi"}),
        ("/v1/embeddings", {"input": "hi"}),
    ],
)
def test_a_request_without_model_is_400_as_on_openai(gw, path, body):
    resp = httpx.post(gw.url + path, json=body)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert (err["code"], err["param"], err["type"]) == ("missing_model", "model", "invalid_request_error")
    assert '"auto"' in err["message"]


def test_x_api_key_and_api_key_headers_are_accepted(fake, gateway):
    gw = gateway(make_settings([model("chatty", fake.url())], gateway_api_keys=["sk-good"]))
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    url = gw.url + "/v1/chat/completions"
    for header in ("x-api-key", "api-key"):
        assert httpx.post(url, json=body, headers={header: "sk-good"}).status_code == 200, header
        bad = httpx.post(url, json=body, headers={header: "sk-bad"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    missing = httpx.post(url, json=body)
    assert missing.status_code == 401 and "x-api-key" in missing.json()["error"]["message"]
    for path in ("/responses", "/v1/responses", "/embeddings", "/v1/embeddings", "/models/auto"):
        assert httpx.post(gw.url + path, json={"model": "auto", "input": "hi"}).status_code == 401, path
    # An SDK that sends a placeholder bearer token and the real key in x-api-key gets in.
    sdk = openai.OpenAI(
        base_url=gw.url + "/v1", api_key="unused", default_headers={"x-api-key": "sk-good"}, max_retries=0
    )
    assert sdk.models.retrieve("auto").id == "auto"
    azure_style = httpx.get(gw.url + "/v1/models/auto", headers={"api-key": "sk-good"})
    assert azure_style.status_code == 200

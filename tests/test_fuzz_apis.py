"""Hostile input against the rest of the OpenAI API (POST /v1/responses, POST /v1/embeddings,
GET /v1/models/{id}), with the same property and harness as `tests/test_fuzz.py`: every answer is a
success or a well-formed 4xx OpenAI error, the gateway stays up, records every call it answered
and logs no error. Responses requests reach both a model that speaks the Responses API (passed
through) and one that does not (translated)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import given
from hypothesis import strategies as st

from tests import test_fuzz as fuzz
from tests.test_fuzz import (
    FUZZ,
    MAX_BODY,
    NASTY_TEXT,
    Reply,
    any_text,
    encode,
    from_httpx,
    json_values,
    nested_list,
    nested_object,
    not_a_list_of_objects,
    plain_text,
    roles,
    router_,
)

RESPONSES_PATHS = ("/v1/responses", "/responses")
EMBEDDINGS_PATHS = ("/v1/embeddings", "/embeddings")


# The gateway (with m1 and the models m3 and e1), the client and the harness of tests/test_fuzz.py.
gw = fuzz.gw
client = fuzz.client
harness = fuzz.harness


# --- strategies

parts = st.lists(
    st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text"]), "text": any_text}),
        st.fixed_dictionaries({"type": st.just("input_image")}, optional={"image_url": any_text}),
        st.fixed_dictionaries({"type": st.sampled_from(["input_file", "refusal"])}),
        st.dictionaries(any_text, json_values, max_size=3),
        json_values,
    ),
    max_size=3,
)
items = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"role": roles},
            optional={"type": st.just("message"), "content": st.one_of(any_text, parts, json_values)},
        ),
        st.fixed_dictionaries(
            {"type": st.just("function_call")},
            optional={"call_id": any_text, "name": any_text, "arguments": st.one_of(any_text, json_values)},
        ),
        st.fixed_dictionaries(
            {"type": st.just("function_call_output")},
            optional={"call_id": any_text, "output": st.one_of(any_text, parts, json_values)},
        ),
        st.fixed_dictionaries(
            {"type": st.one_of(st.sampled_from(["reasoning", "item_reference"]), any_text)}
        ),
        json_values,
    ),
    max_size=4,
)
function_tool = st.fixed_dictionaries(
    {"type": st.just("function"), "name": any_text},
    optional={"parameters": st.dictionaries(any_text, json_values, max_size=3), "strict": json_values},
)
_responses_optional = {
    "instructions": st.one_of(any_text, json_values),
    "stream": st.one_of(st.booleans(), json_values),
    "store": st.one_of(st.booleans(), json_values),
    "previous_response_id": st.one_of(any_text, json_values),
    "tools": st.one_of(
        st.lists(st.one_of(function_tool, st.fixed_dictionaries({"type": any_text})), max_size=2),
        json_values.filter(not_a_list_of_objects),
    ),
    "tool_choice": st.one_of(
        st.sampled_from(["auto", "none", "required"]),
        st.fixed_dictionaries({"type": st.just("function"), "name": any_text}),
        json_values,
    ),
    "text": st.one_of(
        st.fixed_dictionaries({"format": st.one_of(st.fixed_dictionaries({"type": any_text}), json_values)}),
        json_values,
    ),
    "reasoning": st.one_of(st.fixed_dictionaries({"effort": any_text}), json_values),
    "max_output_tokens": st.one_of(st.integers(), json_values),
    "temperature": st.one_of(st.floats(), json_values),
    "router": router_,
    "metadata": json_values,
    "include": json_values,
    "\x00": json_values,
}
responses_bodies = st.one_of(
    st.fixed_dictionaries(  # anything
        {},
        optional={
            "model": st.one_of(st.sampled_from(["m1", "m3", "e1", "auto"]), any_text, json_values),
            "input": st.one_of(any_text, items, json_values),
            **_responses_optional,
        },
    ),
    st.fixed_dictionaries(  # a model and an input, and the rest a few at a time: these reach upstreams
        {"model": st.sampled_from(["m1", "m3", "auto"]), "input": st.one_of(plain_text, items)},
        optional={k: v for k, v in _responses_optional.items() if k not in ("store", "previous_response_id")},
    ),
)
_embeddings_input = st.one_of(
    any_text,
    st.lists(any_text, max_size=4),
    st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=5),
    st.lists(st.lists(st.integers(min_value=0, max_value=10**6), max_size=3), max_size=3),
    json_values,
)
_embeddings_optional = {
    "encoding_format": st.one_of(st.sampled_from(["float", "base64"]), json_values),
    "dimensions": st.one_of(st.integers(min_value=-5, max_value=3000), json_values),
    "user": any_text,
    "router": router_,
}
embeddings_bodies = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.one_of(st.sampled_from(["e1", "m1", "auto"]), any_text, json_values),
            "input": _embeddings_input,
            **_embeddings_optional,
        },
    ),
    st.fixed_dictionaries(
        {"model": st.just("e1"), "input": _embeddings_input}, optional=_embeddings_optional
    ),
)

RAW_BODIES = [
    b"",
    b"{",
    b"[]",
    b'{"model":"auto"}',
    b'{"model":"auto","input":null}',
    b'{"model":"auto","input":[]}',
    b'{"model":"auto","input":[null]}',
    b'{"model":"auto","input":[{"role":["user"],"content":"hi"}]}',
    b'{"model":"auto","input":[{"role":"user","content":{"a":1}}]}',
    b'{"model":"auto","input":"hi","text":"json"}',
    b'{"model":"auto","input":"hi","text":{"format":[]}}',
    b'{"model":"auto","input":"hi","reasoning":"high"}',
    b'{"model":"auto","input":"hi","tools":[{"type":"function"}]}',
    b'{"model":"auto","input":"hi","tools":[{"type":"function","name":""}]}',
    b'{"model":"auto","input":"hi","tools":[{"type":"web_search"}],"router":{"models":["m1"]}}',
    b'{"model":"m1","input":"hi","tools":[{"type":"code_interpreter"}]}',
    b'{"model":"auto","input":"hi","tool_choice":{"type":"allowed_tools"}}',
    b'{"model":"auto","input":"hi","store":true}',
    b'{"model":"auto","input":"hi","store":"yes"}',
    b'{"model":"auto","input":"hi","previous_response_id":"resp_1"}',
    b'{"model":"auto","input":"hi","background":true}',
    b'{"model":"auto","input":"hi","max_output_tokens":0}',
    b'{"model":"auto","input":"hi","max_output_tokens":1e400}',
    b'{"model":"auto","input":"\\ud800"}',
    b'{"model":"auto","input":"\xed\xa0\x80"}',
    b'{"model":"auto","input":"a\\u0000b","instructions":"\\u0000"}',
    b'{"model":"m3","input":"hi","stream":true,"tools":[{"type":"function","name":"f"}]}',
    b'{"model":"m1","input":"hi","stream":true,"tools":[{"type":"function","name":"f"}]}',
    b'{"model":"e1","input":"hi"}',
    b'{"model":"auto","input":' + nested_list(300) + b"}",
    b'{"model":"auto","input":"hi","metadata":' + nested_object(300) + b"}",
    nested_list(5_000),
]
RAW_EMBEDDINGS = [
    b'{"model":"e1"}',
    b'{"model":"e1","input":null}',
    b'{"model":"e1","input":""}',
    b'{"model":"e1","input":[""]}',
    b'{"model":"e1","input":[[]]}',
    b'{"model":"e1","input":[1,"a"]}',
    b'{"model":"e1","input":[[1],"a"]}',
    b'{"model":"e1","input":"hi","dimensions":0}',
    b'{"model":"e1","input":"hi","encoding_format":"hex"}',
    b'{"model":"e1","input":"\\u0000"}',
    b'{"model":"e1","input":[1e400]}',
    b'{"model":"auto","input":"hi"}',
    b'{"model":"m1","input":"hi"}',
    b'{"model":"e1","input":' + json.dumps(["x"] * 2049).encode() + b"}",
    b'{"model":"e1","input":"' + b"x" * (MAX_BODY - 100) + b'"}',
]


def post(client: httpx.Client, path: str, body: bytes) -> Reply:
    return from_httpx(client.post(path, content=body), f"POST {path} {body[:200]!r}")


def test_responses_and_embeddings_explicit_nasty_bodies(gw, client, harness):
    cases: list[tuple[str, Callable[[], Reply]]] = []
    for paths, bodies in ((RESPONSES_PATHS, RAW_BODIES), (EMBEDDINGS_PATHS, RAW_EMBEDDINGS)):
        for i, body in enumerate(bodies):
            for path in paths:
                cases.append((f"{path} body#{i} {body[:80]!r}", lambda p=path, b=body: post(client, p, b)))
    for text in NASTY_TEXT[:24]:
        for name, body in (
            ("input", {"model": "auto", "input": text}),
            (
                "item",
                {
                    "model": "m3",
                    "input": [{"role": "user", "content": [{"type": "input_text", "text": text}]}],
                },
            ),
            ("embed", {"model": "e1", "input": [text or "x"]}),
        ):
            path = EMBEDDINGS_PATHS[0] if name == "embed" else RESPONSES_PATHS[0]
            raw = encode(body, False)
            cases.append((f"{name}={text[:30]!r}", lambda p=path, r=raw: post(client, p, r)))
    for text in NASTY_TEXT:
        cases.append(
            (
                f"GET /v1/models/{text[:30]!r}",
                lambda t=text: from_httpx(client.get("/v1/models/" + quote(t)), t),
            )
        )
    harness.run(cases)


@FUZZ
@given(body=responses_bodies, path=st.sampled_from(RESPONSES_PATHS), ascii_only=st.booleans())
def test_responses_fuzzed_json(gw, client, harness, body: dict[str, Any], path, ascii_only):
    raw = encode(body, ascii_only)
    harness.check(post(client, path, raw), fuzzing=True)


@FUZZ
@given(body=embeddings_bodies, path=st.sampled_from(EMBEDDINGS_PATHS), ascii_only=st.booleans())
def test_embeddings_fuzzed_json(gw, client, harness, body: dict[str, Any], path, ascii_only):
    raw = encode(body, ascii_only)
    harness.check(post(client, path, raw), fuzzing=True)

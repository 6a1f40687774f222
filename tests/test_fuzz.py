"""Hostile input against a real gateway over real HTTP: every answer is a success or a well-formed
OpenAI error with a 4xx status (never a 500, never a trace), carries `x-request-id`, and the gateway
stays up, keeps recording (to a real PostgreSQL) and logs no error.

Each test starts one gateway (persistence on, a fresh database) and throws at it a list of explicit
nasty cases and then what hypothesis generates (derandomized, so CI sees the same examples every
run). Bytes an HTTP client refuses to send (CR/LF, NUL and non-ASCII in headers, raw non-ASCII
in the path) go through a raw socket.

A request that the HTTP parser itself rejects (a malformed request line or header) never reaches
the app: uvicorn answers it with a plain `400 Invalid HTTP request received.`, without
`x-request-id`. That answer is accepted for raw-socket requests only.

The fake upstream is a test double, not an OpenAI: it assumes well-formed `tools` (it reads
`tools[0]["function"]["name"]`). So generated `tools` are either well-formed or not a list of
objects at all; a list of arbitrary objects would only test the fake.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.middleware import REQUEST_ID
from tests.conftest import GatewayServer, make_settings, model

MAX_BODY = 64 * 1024
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
USER = [{"role": "user", "content": "hi"}]
PARSER_REJECTION = b"Invalid HTTP request received."
ERROR_KEYS = {"message", "type", "param", "code"}

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one gateway per test, shared by its examples
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

# --- nasty values

SQL = [
    "'; drop table calls; --",
    "1 OR 1=1",
    "1' OR '1'='1",
    '"; DELETE FROM feedback; --',
    "x'); DROP TABLE arm_stats; --",
    "$1",
    "%s%s%s%n",
    "\\x00",
    "E'\\\\x00'",
    "1; SELECT pg_sleep(10)",
]
NASTY_TEXT = [
    *SQL,
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x00" * 64,
    "\x01\x02\x03\x1b[31m\x7f",
    "\r\n",
    "\r\nX-Injected: 1",
    "\t\v\f",
    "\\",
    "\\u0000",
    "\\ud800",
    "null",
    "NaN",
    "-0",
    "{{7*7}}",
    "${jndi:ldap://127.0.0.1/x}",
    "../../../../etc/passwd",
    "<script>alert(1)</script>",
    "\u202eevil\u202c",
    "\ufeffbom",
    "\uffff\ufffe\ufffd",
    "\U0010ffff",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",
    "e\u0301\u0301\u0301\u0301",
    "\u200b\u200c\u200d\u2060",
    "Z\u0324\u0354\u0367\u0311\u0313a\u0356\u032d\u0308\u0307l\u036e\u0312\u036bg\u0317\u031a",
    "\U0001d573\U0001d58a\U0001d591\U0001d591\U0001d594",
    "\u0130\u0131\u00df\ufb03",
    "a" * 10_000,
    "\u00e9" * 3_000,
    "\U0001f4a9" * 2_000,
]
NASTY_IDS = [
    *SQL,
    "\x00",
    "abc\x00def",
    "a" * 128,
    "a" * 129,
    "a" * 10_000,
    "\u00e9t\u00e9",
    "\U0001f4a9",
    "..",
    "-leading-dash",
    "a b",
    "a\tb",
    "a\nb",
    "a/b",
    "a?b=c",
    "a#b",
    "%00",
    "%2e%2e",
    "\ufffd",
    "\ud800",
    "\udfff\ud800",
    "fuzz:judge",
    "fuzz:duel",
]


def nested_list(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def nested_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"{}" + b"}" * depth


def chat_with(value: bytes, where: str = "content", stream: bool = False) -> bytes:
    """A chat request whose one user message (or an extra top-level field) holds `value` raw."""
    head = b'{"stream":true,' if stream else b"{"
    if where == "content":
        return (
            head
            + b'"model":"m2","messages":[{"role":"user","content":[{"type":"text","text":"x","x":'
            + (value + b"}]}]}")
        )
    return head + b'"model":"m1","messages":[{"role":"user","content":"hi"}],"metadata":' + value + b"}"


VALID = json.dumps({"model": "m1", "messages": USER}).encode()

RAW_CHAT_BODIES: list[bytes] = [
    b"",
    b" ",
    b"{",
    b"}",
    b"[",
    b"null",
    b"true",
    b"0",
    b"-0.0e-0",
    b'"x"',
    b"[]",
    b"{}",
    b'{"messages":[',
    b"\x00",
    b"\xff\xfe\xfd",
    b"\xef\xbb\xbf" + VALID,  # a UTF-8 byte order mark
    b"\xff\xfe" + VALID.decode().encode("utf-16-le"),
    VALID + b"\x00",
    VALID + b" trailing",
    VALID + VALID,
    VALID[:-1],
    b'{"model":"m1","model":"nope","messages":[{"role":"user","content":"hi"}]}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"messages":5}',
    b'{"model":"m1","messages":NaN}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"temperature":NaN}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"temperature":Infinity}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"temperature":1e400}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":1e400}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":99999999999999999999999}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"seed":99999999999999999999999}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"n":1.0}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"n":true}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"stream":1}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"stream":"true"}',
    b'{"model":"m1","messages":[{"role":"user","content":"\\ud800"}]}',  # a lone surrogate escape
    b'{"model":"m1","messages":[{"role":"user","content":"\\udc00\\ud800"}]}',
    b'{"model":"m1","messages":[{"role":"user","content":"\xed\xa0\x80"}]}',  # a raw surrogate
    b'{"model":"m1","messages":[{"role":"user","content":"\xc0\xaf"}]}',  # an overlong encoding
    b'{"model":"m1","messages":[{"role":"user","content":"\xf4\x90\x80\x80"}]}',  # above U+10FFFF
    b'{"model":"m1","messages":[{"role":"user","content":"\x00\x01\x1f"}]}',  # raw control bytes
    b'{"model":"m1","messages":[{"role":"user","content":"a\\u0000b"}]}',
    b'{"model":"m1\\u0000","messages":[{"role":"user","content":"hi"}]}',
    b'{"model":"m1","messages":[{"role":"user\\u0000","content":"hi"}]}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi","\\u0000":"nul key"}]}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi","name":"\\u0000"}]}',
    b'{"model":"m1","messages":[{"role":"user","content":[{"type":"text","text":"\\u0000"}]}]}',
    b'{"model":"m1","messages":[{"role":"user","content":[{"\\u0000":"x"}]}]}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"user":"\\u0000"}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"metadata":{"\\u0000":1}}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"router":{"models":"\\u0000"}}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"router":{"policy":"\\u0000"}}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"router":{"policy":"nope"}}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"router":{"strategy":"nope"}}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"router":{"capability":"x,,y"}}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"router":{"max_cost_usd":1e308}}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"router":{"max_latency_ms":5e-324}}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"router":{"unknown":1}}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"router":[]}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":1}}',
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"stream":true,'
    b'"stream_options":{"include_usage":true}}',
    b'{"model":"m2","messages":[{"role":"user","content":"hi"}],"tools":[]}',
    b'{"model":"m2","messages":[{"role":"user","content":"hi"}],"tools":[1]}',
    b'{"model":"auto","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function",'
    b'"function":{"name":"f"}}],"router":{"models":["m1"]}}',
    b'{"model":"m2","messages":[{"role":"user","content":"hi"}],"tools":{}}',
    b'{"model":"m2","messages":[{"role":"user","content":"hi"}],"response_format":"json"}',
    b'{"model":"m2","messages":[{"role":"user","content":"hi"}],"response_format":{"type":[]}}',
    nested_list(5_000),
    nested_object(5_000),
    chat_with(nested_list(5_000)),
    chat_with(nested_object(5_000)),
    # Depths orjson reads (up to 1024) but cannot write back (over 254): forwarded upstream, stored.
    chat_with(nested_list(300)),
    chat_with(nested_object(300)),
    chat_with(nested_list(1_000), where="extra"),
    chat_with(nested_object(1_000), where="extra"),
    chat_with(nested_list(250)),
    chat_with(nested_list(250), where="extra"),
    chat_with(nested_list(300), stream=True),
    chat_with(nested_list(300), where="extra", stream=True),
]


# --- hypothesis strategies

# Text without lone surrogates (which JSON encoders refuse or escape), plus the nasty list.
plain_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
any_text = st.one_of(plain_text, st.sampled_from(NASTY_TEXT), st.text(max_size=20))  # some surrogates
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),  # NaN and infinities are written as bare NaN / Infinity tokens: invalid JSON
    any_text,
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(any_text, kids, max_size=4),
    max_leaves=12,
)
roles = st.one_of(
    st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]), any_text, json_values
)
content_parts = st.lists(
    st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": any_text}),
        st.fixed_dictionaries(
            {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": any_text})}
        ),
        st.dictionaries(any_text, json_values, max_size=3),
    ),
    max_size=3,
)
messages_ = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"role": roles},
            optional={"content": st.one_of(any_text, content_parts, json_values), "name": any_text},
        ),
        st.fixed_dictionaries({"role": st.just("user"), "content": any_text}),
        json_values,
    ),
    max_size=4,
)
tool = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": any_text}, optional={"parameters": st.dictionaries(any_text, json_values, max_size=3)}
        ),
    }
)


def not_a_list_of_objects(value: Any) -> bool:
    return not (isinstance(value, list) and value and all(isinstance(v, dict) for v in value))


router_ = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "strategy": st.one_of(st.sampled_from(["cheapest", "fastest", "best", "balanced"]), json_values),
            "policy": st.one_of(st.sampled_from(["default", "knn_ts", "lin_ts"]), json_values),
            "max_cost_usd": st.one_of(st.floats(), json_values),
            "max_latency_ms": st.one_of(st.floats(), json_values),
            "min_quality": st.one_of(st.floats(), json_values),
            "capability": st.one_of(any_text, st.lists(any_text, max_size=3), json_values),
            "models": st.one_of(
                st.sampled_from(["m1", "m2", "m1,m2"]), any_text, st.lists(any_text, max_size=3), json_values
            ),
        },
    ),
    json_values,
)
chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.sampled_from(["m1", "m2", "auto"]), any_text, json_values),
        "messages": st.one_of(messages_, st.just(USER), json_values),
        "stream": st.one_of(st.booleans(), json_values),
        "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
        "temperature": st.one_of(st.floats(), json_values),
        "top_p": st.one_of(st.floats(), json_values),
        "n": st.one_of(st.integers(min_value=-3, max_value=200), json_values),
        "max_tokens": st.one_of(st.integers(), json_values),
        "max_completion_tokens": st.one_of(st.integers(), json_values),
        "tools": st.one_of(st.lists(tool, max_size=2), json_values.filter(not_a_list_of_objects)),
        "functions": json_values.filter(not_a_list_of_objects),
        "response_format": st.one_of(
            st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema"])}),
            json_values,
        ),
        "router": router_,
        "user": any_text,
        "metadata": json_values,
        "\x00": json_values,
        "": json_values,
    },
)


def encode(value: Any, ascii_only: bool) -> bytes:
    """JSON as a client might send it: with bare NaN/Infinity for non-finite floats, lone surrogates
    as escapes (ASCII) or as raw, invalid UTF-8 bytes."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def mutate(body: bytes, data: st.DataObject) -> bytes:
    """Flip, drop or insert a few bytes of a valid body."""
    buf = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        if not buf:
            break
        i = data.draw(st.integers(0, len(buf) - 1))
        op = data.draw(st.sampled_from(["flip", "drop", "insert", "truncate"]))
        if op == "flip":
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "drop":
            del buf[i]
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        else:
            del buf[i:]
    return bytes(buf)


# --- the wire


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    case: str = ""
    raw: bool = field(default=False, repr=False)


def from_httpx(resp: httpx.Response, case: str) -> Reply:
    return Reply(resp.status_code, {k.lower(): v for k, v in resp.headers.items()}, resp.content, case)


def raw_http(
    gw: GatewayServer,
    method: bytes,
    path: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes | None = None,
    case: str = "",
) -> Reply:
    """One request over a fresh socket, bytes exactly as given (Connection: close)."""
    head = [method + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    if body is not None:
        head.append(b"Content-Length: " + str(len(body)).encode())
    head += [name + b": " + value for name, value in headers or []]
    data = b"\r\n".join(head) + b"\r\n\r\n" + (body or b"")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the gateway may answer (413) and close before it has read everything
        resp = http.client.HTTPResponse(sock, method=method.decode())
        resp.begin()
        out = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, out, case, raw=True)


def check(reply: Reply, *, allowed: tuple[int, ...] | None = None) -> dict[str, Any] | None:
    """The property. Returns the parsed error (or None for a success)."""
    where = f"{reply.case}: HTTP {reply.status} {reply.body[:600]!r}"
    text = reply.body.decode("utf-8", "replace")
    assert "Traceback" not in text and 'File "' not in text, where
    if reply.raw and "x-request-id" not in reply.headers and reply.body == PARSER_REJECTION:
        assert reply.status == 400, where  # refused by the HTTP parser: the app never saw it
        return None
    rid = reply.headers.get("x-request-id")
    assert rid and REQUEST_ID.fullmatch(rid), where
    if allowed is not None:
        assert reply.status in allowed, where
    ctype = reply.headers.get("content-type", "")
    if reply.status == 200:
        if ctype.startswith("text/event-stream") and reply.body.startswith(b"event: response."):
            ends = (b"event: response.completed\n", b"event: response.incomplete\n")
            assert any(end in reply.body for end in ends), where  # the Responses API's stream
            assert b"event: error\n" not in reply.body, where
        elif ctype.startswith("text/event-stream"):
            assert reply.body.endswith(b"data: [DONE]\n\n"), where
            assert b'"stream_interrupted"' not in reply.body, where
        else:
            assert ctype == "application/json", where
            assert isinstance(json.loads(reply.body), dict), where
        return None
    assert 400 <= reply.status < 500, where
    assert ctype == "application/json", where
    body = json.loads(reply.body)
    assert isinstance(body, dict) and set(body) == {"error"}, where
    err = body["error"]
    assert isinstance(err, dict) and set(err) == ERROR_KEYS, where
    assert isinstance(err["message"], str) and err["message"], where
    assert isinstance(err["type"], str) and err["type"], where
    assert err["code"] is None or isinstance(err["code"], str), where
    assert err["param"] is None or isinstance(err["param"], str), where
    return err


# --- the gateway under test


@pytest.fixture
def gw(fake, gateway, dsn) -> GatewayServer:
    settings = make_settings(
        [
            model("m1", fake.url()),
            model(
                "m2",
                fake.url(answer="Bonjour."),
                capabilities=["chat", "streaming", "tools", "json", "vision"],
            ),
            # for tests/test_fuzz_apis.py: a model that speaks the Responses API, an embeddings model
            model("m3", fake.url(answer="Native."), capabilities=["chat", "streaming", "tools", "responses"]),
            model("e1", fake.url(), capabilities=["embeddings"]),
        ],
        default_model="m1",
        enable_persistence=True,
        database_url=dsn,
        max_body_bytes=MAX_BODY,
        upstream_retries=0,
    )
    return gateway(settings)


@pytest.fixture
def client(gw: GatewayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        yield c


class Harness:
    """Sends cases and pins on each one what it left behind: records the store refused (the
    recorder's `dropped`) and lines logged at ERROR level."""

    def __init__(self, gw: GatewayServer, caplog: pytest.LogCaptureFixture) -> None:
        self.gw = gw
        self.caplog = caplog
        self.seen_logs = 0
        self.dropped = 0

    def aftermath(self) -> list[str]:
        self.gw.call(self.gw.services.recorder.flush())
        problems = []
        dropped = self.gw.services.recorder.dropped
        if dropped != self.dropped:
            problems.append(f"the store refused {dropped - self.dropped} call record(s): dropped")
            self.dropped = dropped
        records = self.caplog.records[self.seen_logs :]
        self.seen_logs += len(records)
        for r in records:
            if r.levelno >= logging.ERROR or r.exc_info:
                last = (r.exc_text or "").strip().splitlines()[-1:] or [""]
                problems.append(f"logged {r.levelname} {r.name}: {r.getMessage()} {last[0]}".strip())
        return problems

    def check(self, reply: Reply, *, fuzzing: bool = False, **kw: Any) -> dict[str, Any] | None:
        """`check` and then the aftermath: one assertion for hypothesis to shrink on."""
        if fuzzing:  # what the examples reached: --hypothesis-show-statistics
            event(f"HTTP {reply.status}")
        try:
            err = check(reply, **kw)
        finally:
            problems = self.aftermath()
        assert not problems, f"{reply.case}: HTTP {reply.status} {reply.body[:300]!r}: " + "; ".join(problems)
        return err

    def run(self, cases: list[tuple[str, Callable[[], Reply]]], **kw: Any) -> None:
        """Runs every case, then fails once with all the failures (one report shows them all)."""
        failures: list[str] = []
        for name, send in cases:
            problems: list[str] = []
            try:
                reply = send()
                check(reply, **kw)
            except Exception as exc:
                problems.append(" | ".join(f"{type(exc).__name__}: {exc}".splitlines()[:2])[:600])
            problems += self.aftermath()
            if problems:
                failures.append(f"- {name}:\n    " + "\n    ".join(problems))
        assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


@pytest.fixture
def harness(gw: GatewayServer, caplog: pytest.LogCaptureFixture) -> Iterator[Harness]:
    """After the test: the gateway is up, serves a normal call end to end, recorded every call it
    answered, and logged nothing at ERROR level."""
    caplog.set_level(logging.WARNING)
    h = Harness(gw, caplog)
    yield h
    assert gw.thread.is_alive() and gw.error is None
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        assert c.get("/live").status_code == 200
        health = c.get("/health")
        assert health.status_code == 200, health.text
        ok = c.post("/v1/chat/completions", json={"model": "m1", "messages": USER})
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["content"] == "Hello from m1."
        rid = ok.headers["x-request-id"]
        assert c.get(f"/requests/{rid}").json()["messages"] == USER
        assert c.post("/feedback", json={"request_id": rid, "score": 1}).status_code == 200
    gw.call(gw.services.recorder.flush())
    state = gw.services.recorder.state()
    assert (state.queue_depth, state.dropped, state.failing) == (0, 0, False), state
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, "the gateway logged errors:\n" + "\n\n".join(
        f"{r.name} {r.levelname}: {r.getMessage()}\n{r.exc_text or ''}" for r in errors
    )


# --- POST /v1/chat/completions


def test_chat_explicit_nasty_bodies(gw, client, harness):
    cases: list[tuple[str, Callable[[], Reply]]] = []
    for i, body in enumerate(RAW_CHAT_BODIES):
        for path in CHAT_PATHS:
            label = f"POST {path} body#{i} {body[:80]!r}{'...' if len(body) > 80 else ''} ({len(body)} B)"
            cases.append(
                (
                    label,
                    lambda path=path, body=body, label=label: from_httpx(
                        client.post(path, content=body, headers={"content-type": "application/json"}),
                        label,
                    ),
                )
            )
    for text in NASTY_TEXT:
        for key in ("content", "name"):
            msg = {"role": "user", "content": "hi", key: text}
            label = f"message {key}={text[:40]!r}"
            cases.append(
                (
                    label,
                    lambda msg=msg, label=label: from_httpx(
                        client.post(CHAT_PATHS[0], json={"model": "m1", "messages": [msg]}), label
                    ),
                )
            )
        label = f"model={text[:40]!r}"
        cases.append(
            (
                label,
                lambda text=text, label=label: from_httpx(
                    client.post(CHAT_PATHS[0], json={"model": text, "messages": USER}), label
                ),
            )
        )
    harness.run(cases)


def test_chat_bodies_over_the_limit_are_413(gw, client, harness):
    content = "x" * MAX_BODY
    big = json.dumps({"model": "m1", "messages": [{"role": "user", "content": content}]}).encode()

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit must hold as the body arrives
        for _ in range(4):
            yield from (big[i : i + 8192] for i in range(0, len(big), 8192))

    cases: list[tuple[str, Callable[[], Reply]]] = [
        (
            "exactly the limit + 1",
            lambda: from_httpx(client.post(CHAT_PATHS[0], content=b" " * (MAX_BODY + 1)), "limit+1"),
        ),
        ("a 64 KiB message", lambda: from_httpx(client.post(CHAT_PATHS[0], content=big), "64KiB message")),
        ("1 MiB of '['", lambda: from_httpx(client.post(CHAT_PATHS[1], content=b"[" * 2**20), "1MiB [")),
        (
            "a chunked body over the limit",
            lambda: from_httpx(client.post(CHAT_PATHS[0], content=chunked()), "chunked"),
        ),
        (
            "Content-Length far over the limit, no body sent",
            lambda: raw_http(
                gw, b"POST", CHAT_PATHS[0].encode(), [(b"Content-Length", b"99999999999999")], case="CL"
            ),
        ),
    ]
    for name, send in cases:
        err = harness.check(send(), allowed=(413,))
        assert err is not None and err["code"] == "request_too_large", name
    # just under the limit still works
    under = {"model": "m1", "messages": [{"role": "user", "content": "y" * (MAX_BODY - 200)}]}
    harness.check(from_httpx(client.post(CHAT_PATHS[0], json=under), "under the limit"), allowed=(200,))


@settings(FUZZ, max_examples=300)
@given(body=chat_bodies, path=st.sampled_from(CHAT_PATHS), ascii_only=st.booleans())
def test_chat_fuzzed_json(gw, client, harness, body, path, ascii_only):
    raw = encode(body, ascii_only)
    harness.check(from_httpx(client.post(path, content=raw), f"POST {path} {raw[:300]!r}"), fuzzing=True)


@FUZZ
@given(data=st.data(), path=st.sampled_from(CHAT_PATHS))
def test_chat_fuzzed_bytes(gw, client, harness, data, path):
    valid = encode(data.draw(chat_bodies.filter(lambda b: "messages" in b)), False)
    raw = data.draw(st.one_of(st.binary(max_size=300), st.just(mutate(valid, data))))
    harness.check(from_httpx(client.post(path, content=raw), f"POST {path} {raw[:300]!r}"), fuzzing=True)


# --- headers: X-Request-ID and the X-Router-* headers, byte for byte

HEADER_VALUES: list[bytes] = [
    b"",
    b" ",
    b"fuzz-ok-1",
    b"a" * 128,
    b"a" * 129,
    b"a" * 8_000,
    b"-dash",
    b"a:b.c-d_e",
    b"\xe9t\xe9",  # latin-1
    "\u00e9t\u00e9-\U0001f4a9".encode(),  # UTF-8
    b"\xff\xfe\x80",
    b"\x00",
    b"abc\x00def",
    b"\x7f",
    b"a\tb",
    b"a\rb",
    b"a\nb",
    b"abc\r\nX-Injected: yes",
    b"abc\r\n\r\nGET /live HTTP/1.1",
    b"abc\r\n def",  # obsolete line folding
    *(s.encode() for s in SQL),
]
HEADER_NAMES = [
    b"X-Request-ID",
    b"X-Router-Strategy",
    b"X-Router-Policy",
    b"X-Router-Max-Cost-Usd",
    b"X-Router-Max-Latency-Ms",
    b"X-Router-Min-Quality",
    b"X-Router-Capability",
    b"X-Router-Models",
    b"Authorization",
    b"Content-Type",
]


def chat_raw(gw: GatewayServer, headers: list[tuple[bytes, bytes]], case: str) -> Reply:
    return raw_http(gw, b"POST", CHAT_PATHS[0].encode(), headers, VALID, case)


def test_explicit_nasty_headers(gw, harness):
    cases: list[tuple[str, Callable[[], Reply]]] = []
    for name in HEADER_NAMES:
        for value in HEADER_VALUES:
            label = f"{name.decode()}: {value[:60]!r} ({len(value)} B)"
            cases.append((label, lambda h=[(name, value)], label=label: chat_raw(gw, h, label)))
    extra: list[tuple[str, list[tuple[bytes, bytes]]]] = [
        ("two X-Request-IDs", [(b"X-Request-ID", b"fuzz-a"), (b"X-Request-ID", b"'; drop table calls; --")]),
        ("Authorization: Bearer <NUL>", [(b"Authorization", b"Bearer \x00")]),
        ("Authorization: Bearer <non-ASCII>", [(b"Authorization", b"Bearer \xff\xe9")]),
        ("Authorization: Bearer <SQL>", [(b"Authorization", b"Bearer '; drop table calls; --")]),
        ("Content-Length: -1", [(b"Content-Length", b"-1")]),
        ("Content-Length: abc", [(b"Content-Length", b"abc")]),
        ("Transfer-Encoding and Content-Length", [(b"Transfer-Encoding", b"chunked")]),
        ("a header name with a space", [(b"X Request ID", b"x")]),
        ("a header name with non-ASCII", [(b"X-\xe9", b"x")]),
        ("a header without a colon", [(b"X-Request-ID-no-colon", b"")]),
        ("8 KiB header name", [(b"X-" + b"a" * 8_000, b"x")]),
        ("500 headers", [(f"X-H{i}".encode(), b"v") for i in range(500)]),
    ]
    for label, headers in extra:
        cases.append((label, lambda headers=headers, label=label: chat_raw(gw, headers, label)))
    cases.append(
        ("raw non-ASCII path", lambda: raw_http(gw, b"GET", b"/requests/\xe9\xff\x00", case="raw path"))
    )
    cases.append(
        ("a request line with spaces", lambda: raw_http(gw, b"GET", b"/requests/a b c", case="spaces"))
    )
    cases.append(
        ("method junk", lambda: raw_http(gw, b"P\xc3\xb6ST", b"/v1/chat/completions", case="method"))
    )
    harness.run(cases)


def test_valid_request_ids_are_echoed_and_reusing_one_is_harmless(gw, client, harness):
    for rid in ["fuzz-reused-1", "a" * 128, "0:1.2_3-4"]:
        for _ in range(2):
            resp = client.post(
                CHAT_PATHS[0], json={"model": "m1", "messages": USER}, headers={"X-Request-ID": rid}
            )
            harness.check(from_httpx(resp, rid), allowed=(200,))
            assert resp.headers["x-request-id"] == rid
        harness.check(from_httpx(client.get(f"/metrics/{rid}"), rid), allowed=(200,))


@FUZZ
@given(
    name=st.sampled_from(HEADER_NAMES),
    value=st.one_of(
        st.binary(max_size=200),
        st.sampled_from(HEADER_VALUES),
        st.from_regex(REQUEST_ID, fullmatch=True).map(str.encode),
        plain_text.map(lambda s: s.encode("utf-8")),
    ),
)
def test_fuzzed_headers(gw, harness, name, value):
    reply = chat_raw(gw, [(name, value)], f"{name.decode()}: {value!r}")
    harness.check(reply, fuzzing=True)
    if (
        name == b"X-Request-ID"
        and REQUEST_ID.fullmatch(value.decode("latin-1"))
        and "x-request-id" in reply.headers
    ):
        assert reply.headers["x-request-id"] == value.decode(), reply
    elif name == b"X-Request-ID" and "x-request-id" in reply.headers and not set(value) & set(b"\r\n"):
        # (a CR or LF ends the header line: the server then reads another id, or another header)
        assert reply.status == 400 and json.loads(reply.body)["error"]["code"] == "invalid_request_id", reply


# --- POST /feedback


def feedback_cases(client: httpx.Client, rid: str) -> list[tuple[str, Callable[[], Reply]]]:
    cases: list[tuple[str, Callable[[], Reply]]] = []
    raw_bodies = [
        b"",
        b"{",
        b"null",
        b"[]",
        b'{"request_id":"' + rid.encode() + b'","score":NaN}',
        b'{"request_id":"' + rid.encode() + b'","score":Infinity}',
        b'{"request_id":"' + rid.encode() + b'","score":1e400}',
        b'{"request_id":"' + rid.encode() + b'","score":1,"feedback_text":"\\ud800"}',
        b'{"request_id":"' + rid.encode() + b'","score":1,"feedback_text":"\xed\xa0\x80"}',
        b'{"request_id":"\\u0000","score":1}',
        b'{"request_id":"' + rid.encode() + b'\\u0000","score":1}',
        b'{"request_id":"' + rid.encode() + b'","score":1,"feedback_text":"a\\u0000b"}',
        b'{"request_id":"' + rid.encode() + b'","score":1,"source":"\\u0000"}',
        b'{"request_id":"' + rid.encode() + b'","score":1,"\\u0000":1}',
        b'{"request_id":"' + rid.encode() + b'","score":1,"score":"x"}',
        nested_list(5_000),
        nested_object(5_000),
        b'{"request_id":"' + rid.encode() + b'","score":1,"feedback_text":' + nested_list(300) + b"}",
        b" " * (MAX_BODY + 1),
    ]
    for i, body in enumerate(raw_bodies):
        label = f"feedback body#{i} {body[:100]!r}"
        cases.append(
            (label, lambda body=body, label=label: from_httpx(client.post("/feedback", content=body), label))
        )
    values: list[dict[str, Any]] = [
        *({"request_id": s, "score": 1} for s in NASTY_IDS),
        *({"request_id": rid, "score": 0.5, "feedback_text": s} for s in NASTY_TEXT),
        {"request_id": rid, "score": 1, "feedback_text": "x" * 10_001},
        {"request_id": rid, "score": True},
        {"request_id": rid, "score": "1"},
        {"request_id": rid, "score": -0.0},
        {"request_id": rid, "score": 1.0000001},
        {"request_id": rid, "score": 5e-324},
        {"request_id": rid, "score": 1, "source": "judge"},
        {"request_id": rid, "score": 1, "source": "app"},
        {"request_id": 1, "score": 1},
        {"request_id": [rid], "score": 1},
        {"request_id": {"$ne": None}, "score": 1},
        {"request_id": rid},
        {"score": 1},
    ]
    for v in values:
        label = f"feedback {str(v)[:120]}"
        cases.append(
            (
                label,
                lambda v=v, label=label: from_httpx(client.post("/feedback", content=encode(v, True)), label),
            )
        )
    return cases


def make_call(client: httpx.Client, rid: str | None = None) -> str:
    headers = {"X-Request-ID": rid} if rid else {}
    resp = client.post(CHAT_PATHS[0], json={"model": "m1", "messages": USER}, headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.headers["x-request-id"]


def test_feedback_explicit_nasty_bodies(gw, client, harness):
    rid = make_call(client)
    harness.run(feedback_cases(client, rid))
    # the call is still there and rated
    record = client.get(f"/requests/{rid}").json()
    assert record["score"] is not None and record["feedback"]


@pytest.fixture
def rid(client: httpx.Client) -> str:
    """The id of one real call (made once per test, not per example)."""
    return make_call(client)


@FUZZ
@given(data=st.data())
def test_feedback_fuzzed(gw, client, harness, rid, data):
    body = data.draw(
        st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "request_id": st.one_of(st.just(rid), st.sampled_from(NASTY_IDS), any_text, json_values),
                    "score": st.one_of(st.floats(), st.sampled_from([0, 1, 0.5]), json_values),
                    "feedback_text": st.one_of(any_text, json_values),
                    "source": st.one_of(st.sampled_from(["user", "app", "judge"]), any_text, json_values),
                    "extra": json_values,
                },
            ),
            json_values,
        )
    )
    raw = encode(body, data.draw(st.booleans()))
    harness.check(
        from_httpx(client.post("/feedback", content=raw), f"POST /feedback {raw[:300]!r}"), fuzzing=True
    )


# --- GET /requests/{id} and /metrics/{id}


def path_for(request_id: str) -> str:
    return quote(request_id.encode("utf-8", "surrogatepass"), safe="")


def test_record_lookups_explicit_nasty_ids(gw, client, harness):
    rid = make_call(client, "fuzz-lookup-1")
    cases: list[tuple[str, Callable[[], Reply]]] = []
    for prefix in ("/requests/", "/metrics/"):
        for s in [*NASTY_IDS, *(t for t in NASTY_TEXT if t), rid]:
            label = f"GET {prefix}{path_for(s)[:100]}"
            cases.append(
                (label, lambda u=prefix + path_for(s), label=label: from_httpx(client.get(u), label))
            )
        for raw in [
            b"%00",
            b"%FF%FE",
            b"%ED%A0%80",
            b"%C0%AF",
            b"%",
            b"%zz",
            b"%%",
            b"a%00b",
            b"x" * 100_000,
        ]:
            label = f"GET {prefix}{raw[:60]!r} (raw)"
            cases.append(
                (label, lambda u=prefix.encode() + raw, label=label: raw_http(gw, b"GET", u, case=label))
            )
    harness.run(cases, allowed=(200, 400, 404, 414))
    # an empty id is another route: Starlette redirects /metrics/ to the Prometheus /metrics
    for prefix in ("/requests/", "/metrics/"):
        reply = from_httpx(client.get(prefix), f"GET {prefix}")
        if reply.status == 307:
            assert reply.headers["location"].endswith(prefix.rstrip("/")) and "x-request-id" in reply.headers
        else:
            harness.check(reply, allowed=(404,))
    assert client.get(f"/metrics/{rid}").json()["request_id"] == rid


@FUZZ
@given(
    prefix=st.sampled_from(["/requests/", "/metrics/"]),
    request_id=st.one_of(
        st.text(min_size=1, max_size=60),
        st.sampled_from(NASTY_IDS),
        st.from_regex(REQUEST_ID, fullmatch=True),
        st.binary(min_size=1, max_size=40).map(lambda b: "".join(f"%{x:02X}" for x in b)),
    ),
)
def test_record_lookups_fuzzed(gw, client, harness, prefix, request_id):
    path = prefix + (request_id if request_id.startswith("%") else path_for(request_id))
    harness.check(from_httpx(client.get(path), f"GET {path[:300]}"), allowed=(200, 400, 404), fuzzing=True)

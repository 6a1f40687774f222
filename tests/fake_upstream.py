"""A fake OpenAI-compatible upstream: a real HTTP server on 127.0.0.1 (uvicorn, raw ASGI).

Behaviour is chosen per base URL, so one server plays many models: a model whose base URL is
`http://127.0.0.1:PORT/s/delay_ms=50,status=500/v1` gets the knobs `delay_ms=50,status=500`.

Knobs (all optional):
  delay_ms=N        wait N ms before the response head
  chunk_delay_ms=N  wait N ms between stream chunks
  chunks=N          number of content chunks in a stream (default 8)
  status=N          answer every request with HTTP N and an OpenAI error body
  fail_times=N      the first N requests of this scenario fail (with `status`, default 500)
  fail_rate=P       each request fails with probability P (with `status`, default 500)
  cut_after=N       stream: end the body after N content chunks, without [DONE]
  error_after=N     stream: after N content chunks send an error event (as OpenRouter does)
  abort_after=N     stream: after N content chunks reset the connection
  garbage_after=N   stream: after N content chunks send an event that is not a JSON object
  cut_rate=P        stream: with probability P, end the body after `cut_after` (default 2)
                    content chunks, without [DONE]
  abort_rate=P      with probability P, reset the connection: a stream after `abort_after`
                    (default 2) content chunks, a non-stream response halfway through its body
  hang=1            never answer (until the client goes away)
  answer=TEXT       the content (default: "Hello from <model>."); `_` stands for a space
  usage=0           leave `usage` out of responses
  echo_auth=1       with `status`: the error message quotes the API key it received

The random knobs draw from a random.Random per scenario, seeded from the server's `seed` (0 by
default, `--seed` on the command line) and the scenario, so a run is reproducible (given the order
of requests). Several knobs may be combined: `fail_rate=0.05,abort_rate=0.02`.

Besides chat completions it answers `GET /models` (counted in `model_lists`), `POST /embeddings`
(deterministic unit vectors of `dimensions` floats, default 8, as floats or base64 as asked) and
`POST /responses`, the Responses API, streamed too (a model with the `responses` capability in the
gateway's catalogue calls it; a function tool in the request gets a function call back).

It records what it receives (`received`, with each request's `path`), how many requests each
scenario saw (`counts`) and how many streams their client abandoned (`disconnects`). Run standalone
for benchmarks:
  python -m tests.fake_upstream --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import itertools
import random
import socket
import struct
import threading
import time
from collections import Counter, deque
from typing import Any

import orjson
import uvicorn

_ids = itertools.count(1)
JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


def parse_knobs(path: str) -> tuple[str, dict[str, str]]:
    """`/s/a=1,b=2/v1/chat/completions` -> ("a=1,b=2", {"a": "1", "b": "2"})."""
    if not path.startswith("/s/"):
        return "", {}
    scenario = path[3:].split("/", 1)[0]
    knobs = dict(kv.split("=", 1) for kv in scenario.split(",") if "=" in kv)
    return scenario, knobs


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _error(status: int, message: str) -> bytes:
    etype = (
        "rate_limit_error"
        if status == 429
        else ("server_error" if status >= 500 else "invalid_request_error")
    )
    return orjson.dumps({"error": {"message": message, "type": etype, "param": None, "code": str(status)}})


def _embeddings(req: dict[str, Any], model: str) -> bytes:
    """A deterministic unit vector per input (from its hash), as floats or base64 float32."""
    given = req["input"]
    items = [given] if isinstance(given, str) or isinstance(given[0], int) else given
    size = int(req.get("dimensions") or 8)
    data = []
    for n, item in enumerate(items):
        digest = hashlib.sha256(str(item).encode()).digest() * (size // 32 + 1)
        raw = [b - 127.5 for b in digest[:size]]
        norm = sum(x * x for x in raw) ** 0.5
        vector = [x / norm for x in raw]
        value: Any = vector
        if req.get("encoding_format") == "base64":
            value = base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
        data.append({"object": "embedding", "index": n, "embedding": value})
    tokens = sum(len(i.split()) if isinstance(i, str) else len(i) for i in items)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return orjson.dumps({"object": "list", "data": data, "model": model + "-2026-01-01", "usage": usage})


class FakeUpstream:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.rngs: dict[str, random.Random] = {}
        self.received: deque[dict[str, Any]] = deque(maxlen=1000)
        self.counts: Counter[str] = Counter()
        self.disconnects = 0
        self.completed_streams = 0
        self.model_lists = 0
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.port = 0

    # --- ASGI
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        if path.endswith("/models") and scope["method"] == "GET":
            self.model_lists += 1
            await self._json(
                send, 200, orjson.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]})
            )
            return
        api = next((a for a in ("/chat/completions", "/embeddings", "/responses") if path.endswith(a)), None)
        if api is None or scope["method"] != "POST":
            await self._json(send, 404, _error(404, f"no route {path}"))
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            await self._json(send, 400, _error(400, "invalid JSON"))
            return
        scenario, knobs = parse_knobs(path)
        self.counts[scenario] += 1
        n = self.counts[scenario]
        auth = dict(scope["headers"]).get(b"authorization", b"").decode()
        self.received.append(
            {
                "scenario": scenario,
                "path": path,
                "body": req,
                "authorization": auth,
                "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
            }
        )
        if api == "/chat/completions" and (not isinstance(req.get("messages"), list) or not req["messages"]):
            await self._json(send, 400, _error(400, "'messages' must be a non-empty array"))
            return
        if api != "/chat/completions" and not req.get("input"):
            await self._json(send, 400, _error(400, "'input' is required"))
            return
        if knobs.get("hang"):
            await self._wait_disconnect(receive)
            self.disconnects += 1
            return
        # The random draws, in a fixed order, for every request (so that one knob's outcome does
        # not shift another's sequence).
        rng = self.rngs.get(scenario)
        if rng is None:
            rng = self.rngs[scenario] = random.Random(f"{self.seed}:{scenario}")
        fail, cut, abort = (
            rng.random() < float(knobs.get(k, "0")) for k in ("fail_rate", "cut_rate", "abort_rate")
        )
        if "delay_ms" in knobs:
            await asyncio.sleep(float(knobs["delay_ms"]) / 1000)
        fail_times = int(knobs.get("fail_times", "0"))
        if "fail_rate" in knobs:
            if fail:
                status = int(knobs.get("status", "500"))
                await self._json(send, status, _error(status, f"fake random failure {status}"))
                return
        elif "status" in knobs and (fail_times == 0 or n <= fail_times):
            status = int(knobs["status"])
            message = f"fake failure {status}"
            if knobs.get("echo_auth"):  # as OpenAI does: "Incorrect API key provided: sk-..."
                message = f"Incorrect API key provided: {auth.removeprefix('Bearer ')}"
            await self._json(send, status, _error(status, message))
            return
        if fail_times and n <= fail_times:
            await self._json(send, 500, _error(500, "fake failure 500"))
            return
        model = str(req.get("model") or "fake")
        answer = knobs.get("answer", f"Hello from {model}.").replace("_", " ")
        if api == "/embeddings":
            await self._json(send, 200, _embeddings(req, model))
            return
        if api == "/responses":
            await self._responses(send, req, model, answer)
            return
        prompt_tokens = sum(len(str(m.get("content", "")).split()) + 3 for m in req["messages"])
        with_usage = knobs.get("usage", "1") != "0"
        if req.get("stream"):
            # A random cut or abort happens where `cut_after` / `abort_after` say (default 2).
            for rate, at, drawn in (("cut_rate", "cut_after", cut), ("abort_rate", "abort_after", abort)):
                if drawn:
                    knobs[at] = knobs.get(at, "2")
                elif rate in knobs:
                    knobs.pop(at, None)
            await self._stream(scope, receive, send, req, knobs, model, answer, prompt_tokens, with_usage)
            return
        message = {"role": "assistant", "content": answer}
        finish = "stop"
        if req.get("tools"):
            tool = req["tools"][0]["function"]["name"]
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": tool, "arguments": '{"city": "Paris"}'},
                    }
                ],
            }
            finish = "tool_calls"
        elif (req.get("response_format") or {}).get("type") in ("json_object", "json_schema"):
            message["content"] = orjson.dumps({"answer": answer}).decode()
        completion = {
            "id": f"chatcmpl-fake{next(_ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model + "-2026-01-01",
            "system_fingerprint": "fp_fake",
            "choices": [
                {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                for i in range(int(req.get("n") or 1))
            ],
        }
        if with_usage:
            completion["usage"] = _usage(prompt_tokens, len(answer.split()))
        payload = orjson.dumps(completion)
        if abort:
            headers = [*JSON, (b"content-length", str(len(payload)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            half = payload[: len(payload) // 2]
            await send({"type": "http.response.body", "body": half, "more_body": True})
            raise ConnectionAbortedError("fake upstream aborts the response")
        await self._json(send, 200, payload)

    async def _stream(
        self,
        scope: Any,
        receive: Any,
        send: Any,
        req: dict[str, Any],
        knobs: dict[str, str],
        model: str,
        answer: str,
        prompt_tokens: int,
        with_usage: bool,
    ) -> None:
        include_usage = bool((req.get("stream_options") or {}).get("include_usage")) and with_usage
        words = answer.split(" ")
        n_chunks = max(1, min(int(knobs.get("chunks", "8")), len(words)))
        step = -(-len(words) // n_chunks)
        pieces = [(" " if i else "") + " ".join(words[i : i + step]) for i in range(0, len(words), step)]
        deltas: list[dict[str, Any]] = [{"content": piece} for piece in pieces]
        finish = "stop"
        if req.get("tools"):  # a tool call, its arguments in two pieces (as real upstreams send them)
            fn = {"name": req["tools"][0]["function"]["name"], "arguments": ""}
            deltas = [
                {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": fn}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
            ]
            finish = "tool_calls"
        cid, created = f"chatcmpl-fake{next(_ids)}", int(time.time())
        chunk_delay = float(knobs.get("chunk_delay_ms", "0")) / 1000
        gone = asyncio.Event()

        async def watch() -> None:
            await self._wait_disconnect(receive)
            gone.set()

        watcher = asyncio.ensure_future(watch())

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model + "-2026-01-01",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                obj["usage"] = None
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE})
            await send(
                {
                    "type": "http.response.body",
                    "body": b": keep-alive\n\n" + chunk({"role": "assistant", "content": ""}, None),
                    "more_body": True,
                }
            )
            for i, delta in enumerate(deltas):
                if chunk_delay:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(gone.wait(), chunk_delay)
                if gone.is_set():
                    self.disconnects += 1
                    return
                if "cut_after" in knobs and i == int(knobs["cut_after"]):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                if "error_after" in knobs and i == int(knobs["error_after"]):
                    err = {"error": {"message": "fake upstream overloaded mid-stream", "code": 502}}
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"data: " + orjson.dumps(err) + b"\n\n",
                            "more_body": True,
                        }
                    )
                    await send(
                        {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False}
                    )
                    return
                if "garbage_after" in knobs and i == int(knobs["garbage_after"]):
                    await send({"type": "http.response.body", "body": b"data: null\n\n", "more_body": True})
                    continue
                if "abort_after" in knobs and i == int(knobs["abort_after"]):
                    raise ConnectionAbortedError("fake upstream aborts the stream")
                await send({"type": "http.response.body", "body": chunk(delta, None), "more_body": True})
            tail = chunk({}, finish)
            if include_usage:
                tail += (
                    b"data: "
                    + orjson.dumps(
                        {
                            "id": cid,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": model + "-2026-01-01",
                            "choices": [],
                            "usage": _usage(prompt_tokens, len(words)),
                        }
                    )
                    + b"\n\n"
                )
            await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n", "more_body": False})
            self.completed_streams += 1
        finally:
            watcher.cancel()

    async def _responses(self, send: Any, req: dict[str, Any], model: str, answer: str) -> None:
        """The Responses API: a Response object, or its stream of events."""
        rid, created = f"resp_fake{next(_ids)}", int(time.time())
        tools = [t for t in req.get("tools") or () if isinstance(t, dict) and t.get("type") == "function"]
        if tools:
            item: dict[str, Any] = {
                "type": "function_call",
                "id": "fc_fake1",
                "call_id": "call_1",
                "name": tools[0].get("name", "f"),
                "arguments": '{"city": "Paris"}',
                "status": "completed",
            }
        else:
            part = {"type": "output_text", "text": answer, "annotations": []}
            item = {
                "type": "message",
                "id": "msg_fake1",
                "role": "assistant",
                "status": "completed",
                "content": [part],
            }
        words = str(req["input"]).split()
        usage = {
            "input_tokens": len(words),
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": len(answer.split()),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": len(words) + len(answer.split()),
        }
        response = {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": "completed",
            "model": model + "-2026-01-01",
            "output": [item],
            "parallel_tool_calls": True,
            "tool_choice": req.get("tool_choice", "auto"),
            "tools": req.get("tools") or [],
            "usage": usage,
            "error": None,
        }
        if not req.get("stream"):
            await self._json(send, 200, orjson.dumps(response))
            return
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": {**response, "status": "in_progress", "output": []}},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "status": "in_progress"},
            },
        ]
        if tools:
            events += [
                {"type": "response.function_call_arguments.delta", "item_id": "fc_fake1", "output_index": 0,
                 "delta": item["arguments"]},
                {"type": "response.function_call_arguments.done", "item_id": "fc_fake1", "output_index": 0,
                 "arguments": item["arguments"]},
            ]  # fmt: skip
        else:
            at = {"item_id": "msg_fake1", "output_index": 0, "content_index": 0}
            events += [{"type": "response.output_text.delta", **at, "delta": (" " if n else "") + w,
                        "logprobs": []} for n, w in enumerate(answer.split(" "))]  # fmt: skip
            events.append({"type": "response.output_text.done", **at, "text": answer, "logprobs": []})
        events += [
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": "response.completed", "response": response},
        ]
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        body = b"".join(
            b"event: "
            + e["type"].encode()
            + b"\ndata: "
            + orjson.dumps({**e, "sequence_number": n})
            + b"\n\n"
            for n, e in enumerate(events)
        )
        await send({"type": "http.response.body", "body": body})  # no [DONE]: the Responses API sends none

    @staticmethod
    async def _wait_disconnect(receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    @staticmethod
    async def _json(send: Any, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": JSON})
        await send({"type": "http.response.body", "body": body})

    # --- running
    def url(self, **knobs: object) -> str:
        """The base URL (ending in /v1) of a model with these knobs."""
        if not knobs:
            return f"http://127.0.0.1:{self.port}/v1"
        scenario = ",".join(f"{k}={v}" for k, v in knobs.items())
        return f"http://127.0.0.1:{self.port}/s/{scenario}/v1"

    def start(self, port: int = 0) -> FakeUpstream:
        sock = socket.socket(
            socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
        )  # asyncio sets TCP_NODELAY only then
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self, log_level="critical", access_log=False, lifespan="on", loop="asyncio", http="httptools"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description="fake OpenAI-compatible upstream")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random knobs (fail_rate, ...)")
    args = ap.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the fake upstream only listens on loopback")
    uvicorn.run(
        FakeUpstream(seed=args.seed),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="on",
    )


if __name__ == "__main__":
    main()

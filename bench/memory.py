"""Memory of the gateway in each mode it runs in, measured on this machine (README: Performance).

    .venv/bin/python bench/memory.py [--requests 3000] [--replay FILE] [--skip-replay]

Three modes, each a fresh process (`llm-router ...`) on 127.0.0.1:
  proxy     the plain proxy: persistence off, ROUTER_POLICY=default and no semantic routes, so no
            embedding model is loaded; requests name a catalogue model or `auto`.
  defaults  the defaults: lin_ts routing (the embedding model loaded), the embedded PostgreSQL in
            a fresh DATA_DIR, every call recorded and rated; varied prompts (the embedding cache misses).
  replay    `llm-router replay FILE` (the lab: a gateway, the file's embeddings, the embedded
            PostgreSQL, the baselines): its peak.
The gateway's figure is its process's RSS (VmRSS; the peak is VmHWM); the embedded PostgreSQL's is
the sum of its processes' PSS (shared memory counted once), sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "llm-router"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def postgres_pss_kb(pgdata: str) -> int:
    """PSS of every process whose command line names `pgdata` and of their children (backends)."""
    total = 0
    parents = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if pgdata in cmd and "postgres" in cmd:
                parents.add(proc.name)
        except OSError:
            continue
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = next(
                line.split()[1]
                for line in (proc / "status").read_text().splitlines()
                if line.startswith("PPid:")
            )
            if proc.name in parents or ppid in parents:
                for line in (proc / "smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except (OSError, StopIteration):
            continue
    return total


class Sampler(threading.Thread):
    """The peak of the gateway's RSS and of PostgreSQL's PSS, every 0.2 s."""

    def __init__(self, pid: int, pgdata: str | None) -> None:
        super().__init__(daemon=True)
        self.pid, self.pgdata = pid, pgdata
        self.peak_pg = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            if self.pgdata:
                self.peak_pg = max(self.peak_pg, postgres_pss_kb(self.pgdata))


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the process exited with {proc.returncode}")
        try:
            if urllib.request.urlopen(url + "/ready", timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("not ready in time")


async def load(url: str, n: int, model: str, rate: bool) -> None:
    sem = asyncio.Semaphore(8)
    async with aiohttp.ClientSession() as http:

        async def one(i: int) -> None:
            async with sem:
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": f"Question {i}: what is {i} * 7?"}],
                }
                async with http.post(url + "/v1/chat/completions", json=body) as resp:
                    await resp.read()
                    rid = resp.headers.get("x-request-id")
                if rate and rid and resp.status == 200:
                    async with http.post(
                        url + "/feedback", json={"request_id": rid, "score": (i % 10) / 10}
                    ) as r:
                        await r.read()

        await asyncio.gather(*(one(i) for i in range(n)))


def gateway_mode(
    name: str, extra_yaml: str, env: dict[str, str], requests: int, model: str, rate: bool
) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"mem-{name}-"))
    up_port, gw_port = free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_upstream", "--port", str(up_port)], cwd=ROOT
    )
    config = work / "config.yaml"
    config.write_text(
        f"models:\n  - {{name: m1, base_url: 'http://127.0.0.1:{up_port}/v1'}}\n"
        f"  - {{name: m2, base_url: 'http://127.0.0.1:{up_port}/v1', input_usd_per_mtok: 1}}\n"
        "log_level: warning\n" + extra_yaml
    )
    full_env = {
        **os.environ,
        "DATA_DIR": str(work / "data"),
        "MODELS_DIR": str(ROOT / "data" / "models"),
        **env,
    }
    gw = subprocess.Popen(
        [str(BIN), "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(gw_port)],
        env=full_env,
        cwd=work,
    )
    url = f"http://127.0.0.1:{gw_port}"
    pgdata = str((work / "data" / "pg").resolve()) if env.get("ENABLE_PERSISTENCE") != "false" else None
    try:
        wait_ready(url, gw)
        ready_kb = status_kb(gw.pid, "VmRSS")
        sampler = Sampler(gw.pid, pgdata)
        sampler.start()
        t0 = time.monotonic()
        asyncio.run(load(url, requests, model, rate))
        time.sleep(3)  # the recorder's last batch
        sampler.stop.set()
        sampler.join()
        return {
            "mode": name,
            "requests": requests,
            "seconds": round(time.monotonic() - t0, 1),
            "gateway_rss_ready_mb": round(ready_kb / 1024),
            "gateway_rss_end_mb": round(status_kb(gw.pid, "VmRSS") / 1024),
            "gateway_rss_peak_mb": round(status_kb(gw.pid, "VmHWM") / 1024),
            "postgres_pss_peak_mb": round(sampler.peak_pg / 1024) if pgdata else None,
        }
    finally:
        gw.terminate()
        gw.wait(60)
        upstream.terminate()
        upstream.wait(10)


def replay_mode(file: str, limit: int | None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="mem-replay-"))
    cmd = [str(BIN), "replay", file, "--out", str(work / "out"), "--data-dir", str(ROOT / "data")]
    if limit:
        cmd += ["--limit", str(limit)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sampler = Sampler(proc.pid, str((ROOT / "data" / "lab" / "pg").resolve()))
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.stop.set()
    sampler.join()
    return {
        "mode": "replay",
        "file": Path(file).name,
        "limit": limit,
        "exit": proc.returncode,
        "seconds": round(time.monotonic() - t0, 1),
        "lab_process_rss_peak_mb": round(usage.ru_maxrss / 1024),
        "postgres_pss_peak_mb": round(sampler.peak_pg / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument(
        "--replay", default=str(ROOT.parent / "shared" / "data" / "replay" / "routerbench_dev.jsonl")
    )
    parser.add_argument("--limit", type=int, help="replay: only the first N prompts")
    parser.add_argument("--skip-replay", action="store_true")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}", flush=True)
    results = [
        gateway_mode(
            "proxy",
            "",
            {"ENABLE_PERSISTENCE": "false", "ROUTER_POLICY": "default"},
            args.requests,
            "m1",
            rate=False,
        ),
        gateway_mode("defaults", "", {}, args.requests, "auto", rate=True),
    ]
    for r in results:
        print(r, flush=True)
    if not args.skip_replay:
        print(replay_mode(args.replay, args.limit), flush=True)


if __name__ == "__main__":
    main()
